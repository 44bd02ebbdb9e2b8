"""Counts the instructions a CUDA kernel's main loop issues per iteration, from its SASS, without a GPU.

    python tools/sass_census.py csrc/cuda/flash_attn_fwd.cu [--arch 90] [--kernel REGEX] [--json FILE]

Compiles the file to a cubin (nvcc -O3, as CMakeLists.txt does), disassembles it with nvdisasm and,
for each kernel whose mangled name matches REGEX, takes the loop with the most HMMA instructions (the
key- or query-block loop of the attention kernels) and, over its control-flow graph from the loop's
head to its back edge, the two paths through an iteration that issue every copy (LDGSTS) of it with
the fewest and the most instructions (loop_paths): a full block no mask crosses, and one that takes
every branch (the mask, a partial tile, O's rescale). Each is a row of counts by class: HMMA
(tensor-core mma.sync), MUFU (exp2, rcp), FP32, INT (addresses, masks, counters), MEM (ldmatrix,
shared and global loads and stores, cp.async, shuffles, barriers), CVT and OTHER (branches,
convergence markers); --opcodes lists the opcodes themselves. Predicated-off instructions still take
an issue slot, so they are counted. These are static counts: they say how many issue slots one warp
spends per iteration beside its mma.sync, not how long it waits (latency, bank conflicts, occupancy):
only a GPU (bench/profile_attention.py under Nsight Compute) says that.

nvdisasm is not in the CUDA toolkit's compiler-only installs (this machine's nvcc 13 has none): the
script looks on PATH, in $CUDA_HOME/bin, and in NVIDIA's wheel (`pip download --no-deps
nvidia-cuda-nvdisasm`, unpacked: nvidia/cu13/bin/nvdisasm; NVDISASM=path).
"""
import argparse
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLASSES = {
    "HMMA": "HMMA", "MUFU": "MUFU",
    "FADD": "FP32", "FMUL": "FP32", "FFMA": "FP32", "FMNMX": "FP32", "FSETP": "FP32", "FSEL": "FP32", "FSET": "FP32",
    "F2FP": "CVT", "F2F": "CVT", "F2I": "CVT", "I2F": "CVT", "I2FP": "CVT",
    "LDSM": "MEM", "LDS": "MEM", "STS": "MEM", "LDGSTS": "MEM", "LDG": "MEM", "STG": "MEM", "LDL": "MEM",
    "STL": "MEM", "SHFL": "MEM", "BAR": "MEM", "LDGDEPBAR": "MEM", "DEPBAR": "MEM", "RED": "MEM", "ATOM": "MEM",
    "ATOMS": "MEM", "REDG": "MEM", "LDC": "MEM",
}
INT_OPS = {"IMAD", "IADD3", "IADD", "LOP3", "SHF", "LEA", "ISETP", "VIADD", "IABS", "SEL", "MOV", "PLOP3", "IMNMX",
           "VIMNMX", "PRMT", "S2R", "CS2R", "P2R", "R2P", "R2UR", "S2UR", "UIADD3", "ULDC", "UMOV", "ULEA", "USHF",
           "ULOP3", "UISETP", "UIMAD", "USEL", "FLO", "POPC", "BREV", "IMUL", "VOTE", "VOTEU", "UPRMT", "USHL",
           "SHL", "SHR"}


def classify(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base in CLASSES:
        return CLASSES[base]
    return "INT" if base in INT_OPS else "OTHER"


def find_nvdisasm() -> str:
    candidates = [os.environ.get("NVDISASM"), shutil.which("nvdisasm"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvdisasm")]
    candidates += glob.glob("/tmp/**/nvidia/cu1*/bin/nvdisasm", recursive=True)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit("sass_census: nvdisasm not found (see the docstring: NVIDIA's nvidia-cuda-nvdisasm wheel has it)")


def parse(sass: str) -> dict:
    """kernel name -> (instructions [(opcode, text)], labels {name: index})."""
    kernels = {}
    for m in re.finditer(r"^\.text\.(\S+):\n(.*?)(?=^\s*\.section|\Z)", sass, re.S | re.M):
        instrs, labels = [], {}
        for line in m.group(2).splitlines():
            lab = re.match(r"^(\.L_x_\d+):", line.strip())
            if lab:
                labels[lab.group(1)] = len(instrs)
                continue
            ins = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
            if ins:
                text = ins.group(1)
                opcode = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
                instrs.append((opcode, text))
        kernels[m.group(1)] = (instrs, labels)
    return kernels


def branch_target(text: str, labels: dict):
    m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", text)
    return labels.get(m.group(1)) if m else None


def loop_paths(instrs: list, labels: dict) -> tuple:
    """The loop with the most HMMAs, and two paths through one iteration of it, among those that issue
    every global -> shared copy of the loop (LDGSTS): the one with the fewest instructions and the one
    with the most, as opcode counts. Dynamic programming over the iteration's forward edges, in program
    order (a topological order of them)."""
    loops = [(t, i) for i, (op, text) in enumerate(instrs)
             if op.startswith("BRA") and (t := branch_target(text, labels)) is not None and t <= i]
    if not loops:
        return None, {}
    head, tail = max(loops, key=lambda l: (sum(op.startswith("HMMA") for op, _ in instrs[l[0]:l[1] + 1]), l[1] - l[0]))
    result = {}
    for name, sign in (("fewest", -1), ("most", 1)):
        best = {head: ((0, 0), collections.Counter())}  # index -> ((copies, sign * instructions), counts before it)
        for i in range(head, tail + 1):
            if i not in best:
                continue
            (copies, _), counts = best[i]
            op, text = instrs[i]
            counts = counts.copy()
            counts[op] += 1
            copies += op.startswith("LDGSTS")
            key = (copies, sign * sum(counts.values()))
            if i == tail:
                result[name] = counts
                break
            nexts = []
            is_branch = op.startswith("BRA") or op.startswith("EXIT")
            if not is_branch or text.startswith("@"):
                nexts.append(i + 1)
            target = branch_target(text, labels) if op.startswith("BRA") else None
            if target is not None and i < target <= tail:
                nexts.append(target)
            for j in nexts:
                if j not in best or key > best[j][0]:
                    best[j] = (key, counts)
    return (head, tail), result


def census(path: str, arch: int, kernel_re: str, extra_flags: list) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        cmd = ["nvcc", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-I" + os.path.join(ROOT, "csrc"), "-cubin", "-o", cubin,
               path, *extra_flags]
        subprocess.run(cmd, check=True)
        sass = subprocess.run([find_nvdisasm(), "-c", cubin], check=True, capture_output=True, text=True).stdout
    rows = []
    for name, (instrs, labels) in parse(sass).items():
        if not re.search(kernel_re, name):
            continue
        span, paths = loop_paths(instrs, labels)
        if span is None:
            continue
        demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
        for which, ops in paths.items():
            counts = collections.Counter()
            for op, n in ops.items():
                counts[classify(op)] += n
            rows.append({"kernel": re.sub(r"\(.*\)$", "", demangled.replace("pyllm::attn::", "").replace("void ", "")),
                         "arch": f"sm_{arch}", "path": which, "instructions": sum(counts.values()),
                         **{k: counts.get(k, 0) for k in ("HMMA", "MUFU", "FP32", "INT", "MEM", "CVT", "OTHER")},
                         "opcodes": dict(ops.most_common())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--kernel", default=".", help="regex over the mangled kernel names")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--opcodes", type=int, default=0, help="print each path's N most frequent opcodes")
    ap.add_argument("-X", dest="extra", action="append", default=[], help="an extra nvcc flag (repeatable)")
    args = ap.parse_args()
    rows = []
    for f in args.files:
        rows += census(f, args.arch, args.kernel, args.extra)
    for r in rows:
        print(f"{r['kernel']:<58} {r['arch']} {r['path']:>6} {r['instructions']:5d}: HMMA {r['HMMA']:4d} MUFU {r['MUFU']:3d} "
              f"FP32 {r['FP32']:4d} INT {r['INT']:4d} MEM {r['MEM']:4d} CVT {r['CVT']:3d} OTHER {r['OTHER']:3d}")
        if args.opcodes:
            print("    " + ", ".join(f"{op} {n}" for op, n in list(r["opcodes"].items())[:args.opcodes]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
