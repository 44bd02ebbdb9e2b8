"""RoPE, ours vs pyllm.nn.apply_rope's torch form (rotate_half computed in fp32, as ours;
transformers' LlamaRotaryEmbedding casts cos / sin to x's dtype and rotates in bf16, ~2-3x faster
than this form on the CPU and less exact) vs torch.compile. (Liger-Kernel's rope rotates q and k
together, in place, in HF's (B, H, T, D) layout: not a like-for-like row, so not measured here.)

One process, same inputs, side by side, forward and forward+backward of q for a llama-124m-like
layer (B = 4, T = 1024, H = 12, D = 64) and an 8B-like one (B = 1, T = 4096, H = 32, D = 128), q a
view of a fused qkv projection as in pyllm's model. Effective GB/s counts the minimum bytes (forward
reads x and writes out: 2 elements per element; backward 2 more) over the time, for every
implementation alike; "vs copy" is that over this device's measured copy bandwidth, for scale.
Before timing, ours must match the torch form on the row's inputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyllm  # noqa: E402
from pyllm.nn import rope_cos_sin  # noqa: E402


def torch_form(x, cos, sin):
    half = cos.shape[-1]
    xr = x.to(cos.dtype)
    x1, x2 = xr[..., :half], xr[..., half:]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def main() -> int:
    parser = common.base_parser(__doc__)
    args = parser.parse_args()
    device = args.device

    impls = {"pyllm": pyllm.rope, "torch (apply_rope's form)": torch_form}
    if not args.quick:
        impls["torch.compile"] = torch.compile(torch_form)

    copy_gbs = common.copy_bandwidth_gbs(device)
    shapes = [(4, 1024, 12, 64), (1, 4096, 32, 128)]
    print(f"# rope on {common.device_description(device)}: (B, T, H, D) {shapes}, copy bandwidth {copy_gbs:.1f} GB/s")
    rows = []
    for B, T, H, D in shapes:
        n = B * T * H * D
        cos, sin = (t.to(device) for t in rope_cos_sin(T, D))
        for dtype in (torch.bfloat16, torch.float32):
            esize = torch.finfo(dtype).bits // 8
            # q as a view of a fused qkv projection (B, T, 3 H D); several sets, rotated past a GPU's L2
            sets = [(torch.randn(B, T, 3 * H * D, device=device, dtype=dtype)[..., :H * D].view(B, T, H, D),
                     torch.randn(B, T, H, D, device=device, dtype=dtype)) for _ in range(3)]
            for mode, elems in (("fwd", 2), ("fwd+bwd", 4)):
                def step_of(fn, mode=mode):
                    it = iter(range(1 << 30))

                    def step():
                        x, dout = sets[next(it) % len(sets)]
                        if mode == "fwd":
                            return fn(x, cos, sin)
                        xl = x.detach().requires_grad_()
                        return torch.autograd.grad(fn(xl, cos, sin), xl, dout)
                    return step

                rows += common.bandwidth_rows(impls, step_of, device, elems * n * esize, copy_gbs,
                                              "torch (apply_rope's form)", "vs torch",
                                              {"shape": f"{B}x{T}x{H}x{D}",
                                               "dtype": str(dtype).removeprefix("torch."), "mode": mode})
    common.print_table(rows, ["shape", "dtype", "mode", "impl", "ms", "GB/s", "of copy", "vs torch"], common.COPY_HEADER)
    print(common.COPY_NOTE)
    common.write_json(args.json, "rope", device, rows, {"shapes": [list(s) for s in shapes],
                                                         "copy_GBps": round(copy_gbs, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
