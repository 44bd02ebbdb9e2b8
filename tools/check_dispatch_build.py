"""Checks a dispatch build (PYLLM_CPU_DISPATCH=1) with a portable base: no code outside the levels'
namespaces uses an instruction beyond the x86-64 baseline, and the avx2 level has no AVX-512.

Each level's copy of the CPU kernels is compiled in a namespace of its own (pyllm_isa_<level>), but
the copies share the standard library's out-of-line instantiations (std::vector<double>::assign and
the like) with the base-level code, and the linker keeps one copy of each: CMakeLists.txt orders the
link so that it keeps the least capable. Were an AVX2 copy kept, the portable kernels (and the BPE,
and the bindings) would call it and die of SIGILL on a CPU without AVX2. This disassembles the
module and lists every function outside pyllm_isa_* that holds an instruction the baseline lacks:
any VEX or EVEX encoding (first opcode byte c4 / c5 / 62 in 64-bit mode: AVX, AVX-512, BMI1/2,
mask registers), or a legacy-encoded one from a later level (popcnt, lzcnt and tzcnt, which older
CPUs run as bsr / bsf with other results, movbe, crc32, ...). Compiler-made clones ("[clone
.constprop.0]") are local to the file that made them and are skipped, as are the functions of a
level's namespace, except that pyllm_isa_avx2's may not hold EVEX (AVX-512) instructions.

    python tools/check_dispatch_build.py pyllm/_C.cpython-*.so
"""
from __future__ import annotations

import re
import subprocess
import sys

LABEL = re.compile(r"^[0-9a-f]+ <(.*)>:$")
SEGMENT_OR_ADDRESS_PREFIXES = {"26", "2e", "36", "3e", "64", "65", "67"}
LEGACY_ABOVE_BASELINE = {"popcnt", "lzcnt", "tzcnt", "movbe", "crc32", "crc32b", "crc32w", "crc32l", "crc32q",
                         "cmpxchg16b", "lahf", "sahf"}


def encoding(raw: list[str]) -> str:
    """'evex', 'vex' or 'legacy' from an instruction's bytes."""
    i = 0
    while i < len(raw) and raw[i] in SEGMENT_OR_ADDRESS_PREFIXES:
        i += 1
    first = raw[i] if i < len(raw) else ""
    return {"62": "evex", "c4": "vex", "c5": "vex"}.get(first, "legacy")


def offending_functions(module: str) -> dict[str, str]:
    """{function: its first instruction above what its code may use}."""
    dump = subprocess.run(["objdump", "-d", "-C", "--insn-width=15", module], capture_output=True, text=True,
                          check=True).stdout
    found: dict[str, str] = {}
    name = None
    for line in dump.splitlines():
        label = LABEL.match(line)
        if label:
            name = label.group(1)
            continue
        parts = line.split("\t")
        if name is None or len(parts) < 3 or "[clone ." in name or name in found:
            continue
        raw, instruction = parts[1].split(), parts[2].strip()
        kind = encoding(raw)
        if "pyllm_isa_" in name:
            if "pyllm_isa_avx2::" in name and kind == "evex":
                found[name] = instruction
            continue
        if kind != "legacy" or instruction.split(" ", 1)[0] in LEGACY_ABOVE_BASELINE:
            found[name] = instruction
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    symbols = subprocess.run(["objdump", "-t", argv[0]], capture_output=True, text=True, check=True).stdout
    if "pyllm_isa_" not in symbols:
        print(f"{argv[0]}: no pyllm_isa_ symbols (stripped, or not a dispatch build)", file=sys.stderr)
        return 2
    found = offending_functions(argv[0])
    for name, instruction in sorted(found.items()):
        print(f"{name}: {instruction}")
    print(f"{len(found)} function(s) use instructions above their level")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
