"""The `pyllm` command (also `python -m pyllm`)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def cmd_info(args) -> int:
    import torch

    import pyllm
    from pyllm import _C
    from pyllm.ops import BACKENDS, _util

    print(f"pyllm {pyllm.__version__}  (torch {torch.__version__}, python {sys.version.split()[0]})")
    if _util.HAS_CUDA_KERNELS:
        print(f"CUDA kernels: built for sm {_util.CUDA_ARCHS.replace(',', ', ')} (CUDA runtime {_C.cuda_runtime_version()}, static)")
        n = _C.cuda_device_count()
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        if _util.cuda_usable():
            print(f"GPU usable now: yes, {n} device(s): {', '.join(gpus)}")
        else:
            why = "torch has no CUDA support" if not torch.cuda.is_available() else "no device visible to pyllm"
            print(f"GPU usable now: no ({why}; driver sees {n} device(s))")
    else:
        print("CUDA kernels: not built (no nvcc at build time, or PYLLM_CUDA=off)")
        print(f"GPU usable now: no (torch.cuda.is_available() = {torch.cuda.is_available()})")
    print("ops:")
    for op, by_device in BACKENDS.items():
        for device, dtypes in by_device.items():
            built = device == "cpu" or _util.HAS_CUDA_KERNELS
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            print(f"  {op:<14} {device:<5} {'built' if built else 'not built':<10} {names}")
    return 0


def cmd_bench(args) -> int:
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    if not bench_dir.is_dir():
        print("pyllm bench runs the scripts in bench/ of a source checkout; none found next to this install", file=sys.stderr)
        return 2
    scripts = sorted(bench_dir.glob("bench_*.py"))
    rc = 0
    for script in scripts:
        print(f"== {script.name}", flush=True)
        rc |= subprocess.call([sys.executable, str(script), *args.bench_args])
    return rc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyllm", description="pyllm: LLM training kernels, model and trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, CUDA build and GPU status, and which ops have which backends")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="run the benchmark scripts of bench/ (source checkout), ours vs peers")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to every script (e.g. --quick)")
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
