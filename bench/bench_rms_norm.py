"""RMSNorm, ours vs torch as models write it (LLaMA's module) vs F.rms_norm vs torch.compile (vs
Liger-Kernel on the GPU when installed).

One process, same inputs, side by side, forward and forward+backward (the gradients of x and of
the weight). Shapes: a model's hidden rows (2048 x 4096) and per-head rows as Qwen3's q/k norm
sees them (2048 tokens x 32 heads x 128). Effective GB/s counts the minimum bytes (forward reads x
and writes y: 2 elements per element; backward reads dy and x and writes dx: 3 more) over the time,
for every implementation alike; "vs copy" is that over this device's measured copy bandwidth, for
scale. Before timing, ours must match LLaMA's module on the row's inputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyllm  # noqa: E402

EPS = 1e-6


def llama(x, weight):
    """transformers' LlamaRMSNorm.forward."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def torch_rms_norm(x, weight):
    return F.rms_norm(x, weight.shape, weight, EPS)


def ours(x, weight):
    return pyllm.rms_norm(x, weight, EPS)


def liger_fn():
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return None
    return lambda x, weight: LigerRMSNormFunction.apply(x, weight, EPS, 0.0, "llama")


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args()
    device = args.device

    impls = {"pyllm": ours, "torch (LLaMA's module)": llama, "F.rms_norm": torch_rms_norm}
    if not args.quick:
        impls["torch.compile"] = torch.compile(llama)
    if device == "cuda":
        if (liger := liger_fn()) is not None:
            impls["liger"] = liger
        else:
            print("# skipped: liger_kernel not installed: no liger rows")

    copy_gbs = common.copy_bandwidth_gbs(device)
    shapes = [(args.rows, args.cols), (args.rows * 32, 128)]
    print(f"# rms_norm on {common.device_description(device)}: rows x cols {shapes}, copy bandwidth "
          f"{copy_gbs:.1f} GB/s")
    rows = []
    for shape in shapes:
        n = shape[0] * shape[1]
        for dtype in (torch.bfloat16, torch.float32):
            esize = torch.finfo(dtype).bits // 8
            # Several input sets, rotated, so a GPU's L2 (50 MB on an H100) never holds the inputs.
            sets = [(torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
                    for _ in range(3)]
            weight = (1 + 0.1 * torch.randn(shape[1], device=device)).to(dtype)
            for mode, elems in (("fwd", 2), ("fwd+bwd", 5)):
                def step_of(fn, mode=mode):
                    it = iter(range(1 << 30))

                    def step():
                        x, dout = sets[next(it) % len(sets)]
                        if mode == "fwd":
                            return fn(x, weight)
                        xl, wl = x.detach().requires_grad_(), weight.detach().requires_grad_()
                        return torch.autograd.grad(fn(xl, wl), (xl, wl), dout)
                    return step

                rows += common.bandwidth_rows(impls, step_of, device, elems * n * esize, copy_gbs,
                                              "torch (LLaMA's module)", "vs LLaMA's",
                                              {"shape": "x".join(map(str, shape)),
                                               "dtype": str(dtype).removeprefix("torch."), "mode": mode})
    common.print_table(rows, ["shape", "dtype", "mode", "impl", "ms", "GB/s", "of copy", "vs LLaMA's"], common.COPY_HEADER)
    print(common.COPY_NOTE)
    common.write_json(args.json, "rms_norm", device, rows, {"shapes": [list(s) for s in shapes],
                                                             "copy_GBps": round(copy_gbs, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
