"""Checks a dispatch build (PYLLM_CPU_DISPATCH=1) with a portable base: no code outside the levels'
namespaces uses an instruction beyond SSE2.

Each level's copy of the CPU kernels is compiled in a namespace of its own (pyllm_isa_<level>), but
the copies share the standard library's out-of-line instantiations (std::vector<double>::assign and
the like) with the base-level code, and the linker keeps one copy of each: CMakeLists.txt orders the
link so that it keeps the least capable. Were an AVX2 copy kept, the portable kernels (and the BPE,
and the bindings) would call it and die of SIGILL on a CPU without AVX2. This disassembles the
module and lists every function outside pyllm_isa_* that holds a VEX or EVEX instruction (any
mnemonic starting with "v", or a ymm / zmm register). Compiler-made clones ("[clone .constprop.0]")
are local to the file that made them and are skipped, as are the functions of a level's namespace.

    python tools/check_dispatch_build.py pyllm/_C.cpython-*.so
"""
from __future__ import annotations

import re
import subprocess
import sys

LABEL = re.compile(r"^[0-9a-f]+ <(.*)>:$")


def vex_functions(module: str) -> dict[str, str]:
    """{function: its first VEX / EVEX instruction} for functions outside the level namespaces."""
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", module], capture_output=True, text=True,
                          check=True).stdout
    found: dict[str, str] = {}
    name = None
    for line in dump.splitlines():
        label = LABEL.match(line)
        if label:
            name = label.group(1)
            continue
        if name is None or "pyllm_isa_" in name or "[clone ." in name or name in found:
            continue
        instruction = line.rsplit("\t", 1)[-1].strip()
        mnemonic = instruction.split(" ", 1)[0]
        if mnemonic.startswith("v") and mnemonic not in ("verr", "verw") or "%ymm" in instruction or "%zmm" in instruction:
            found[name] = instruction
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    dump = subprocess.run(["objdump", "-t", argv[0]], capture_output=True, text=True, check=True).stdout
    if "pyllm_isa_" not in dump:
        print(f"{argv[0]}: no pyllm_isa_ symbols (stripped, or not a dispatch build)", file=sys.stderr)
        return 2
    found = vex_functions(argv[0])
    for name, instruction in sorted(found.items()):
        print(f"{name}: {instruction}")
    print(f"{len(found)} function(s) outside the levels' namespaces use AVX instructions")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
