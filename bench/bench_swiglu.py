"""SwiGLU and GeGLU (silu(gate) * up, gelu_tanh(gate) * up), ours vs eager torch vs torch.compile
(vs Liger-Kernel on the GPU when installed).

One process, same inputs, side by side. Sizes: 8M output elements (2048 x 4096) by default.
Effective GB/s counts the minimum bytes (forward 3 elements per output element, forward+backward
3 + 5) over the time, for every implementation alike; "vs copy" is that over the measured copy
bandwidth of this device, for scale. Before timing, ours must match torch eager on the row's inputs.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyllm  # noqa: E402


def eager_swiglu(gate, up):
    return F.silu(gate) * up


def eager_geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


# activation -> (ours, torch eager, Liger-Kernel's module and function names)
ACTIVATIONS = {
    "silu": (pyllm.swiglu, eager_swiglu, ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction")),
    "gelu_tanh": (pyllm.geglu, eager_geglu, ("liger_kernel.ops.geglu", "LigerGELUMulFunction")),
}


def liger_fn(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name).apply
    except (ImportError, AttributeError):
        return None


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--activation", choices=[*ACTIVATIONS, "both"], default="both")
    args = parser.parse_args()
    device = args.device
    n = args.rows * args.cols

    copy_gbs = common.copy_bandwidth_gbs(device)
    print(f"# swiglu on {common.device_description(device)}: {args.rows}x{args.cols}, copy bandwidth {copy_gbs:.1f} GB/s")
    rows = []
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    if device == "cuda" and not has_liger:
        print("# skipped: liger_kernel not installed: no liger rows")
    for activation in ACTIVATIONS if args.activation == "both" else [args.activation]:
        ours, eager, liger = ACTIVATIONS[activation]
        impls = {"pyllm": ours, "torch eager": eager}
        if not args.quick:
            impls["torch.compile"] = torch.compile(eager)
        if device == "cuda" and has_liger:
            if (liger_impl := liger_fn(*liger)) is not None:
                impls["liger"] = liger_impl
            else:
                print(f"# skipped: liger_kernel has no {liger[1]}: no liger {activation} rows")
        rows += measure(impls, args, device, copy_gbs, {"act": activation})
    common.print_table(rows, ["act", "dtype", "mode", "impl", "ms", "GB/s", "of copy", "vs eager"], common.COPY_HEADER)
    print(common.COPY_NOTE)
    common.write_json(args.json, "swiglu", device, rows, {"shape": [args.rows, args.cols], "copy_GBps": round(copy_gbs, 1)})
    return 0


def measure(impls: dict, args, device: str, copy_gbs: float, labels: dict) -> list[dict]:
    n = args.rows * args.cols
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        esize = torch.finfo(dtype).bits // 8
        # Several input sets, rotated, so a GPU's L2 (50 MB on an H100) never holds the inputs.
        sets = [[torch.randn(args.rows, args.cols, device=device, dtype=dtype) * 2 for _ in range(3)] for _ in range(3)]
        for mode, elems in (("fwd", 3), ("fwd+bwd", 8)):
            def step_of(fn, mode=mode):
                it = iter(range(1 << 30))

                def step():
                    gate, up, dout = sets[next(it) % len(sets)]
                    if mode == "fwd":
                        return fn(gate, up)
                    g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
                    return torch.autograd.grad(fn(g, u), (g, u), dout)
                return step

            rows += common.bandwidth_rows(impls, step_of, device, elems * n * esize, copy_gbs, "torch eager", "vs eager",
                                          {**labels, "dtype": str(dtype).removeprefix("torch."), "mode": mode})
    return rows


if __name__ == "__main__":
    sys.exit(main())
