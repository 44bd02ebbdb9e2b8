"""One forward + backward of pyllm.flash_attn per tile variant, for Nsight Compute's counters
(bench/gpu_check.sh's profile stage):

    ncu --clock-control none --profile-from-start off -k regex:flash_attn --section ... \
        python3 bench/profile_attention.py

Warm-up calls run first, outside the profiled region (cudaProfilerStart / Stop around each
measured call), so every kernel is counted once per variant. Shapes: B = 4, T = 2048, H = 8, bf16,
non-causal, D = 64 and 128: the rows of bench_attention where the kernels should be compute-bound.
The kernel names carry the variant (flash_attn_fwd_kernel<T, D, MT>, ..._dk_dv_mma_kernel<T, D, MK,
AtomicDQ>; the atomic-dQ backward adds flash_attn_dq_from_accum_kernel).
"""
import os
import sys

import torch

from bench_attention import ATOMIC_DQ, DKV_M128, TALL_TILES, VARIANT_ENV  # the variants' settings, as timed

import pyllm


def fwd_bwd(q, k, v, dout):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.autograd.grad(pyllm.flash_attn(*leaves), leaves, dout)


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_attention: no GPU", file=sys.stderr)
        return 1
    for d in (64, 128):
        q, k, v, dout = (torch.randn(4, 2048, 8, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for name in ["default", *TALL_TILES, ATOMIC_DQ]:
            if name == DKV_M128 and d != 64:  # built for D = 64 only
                continue
            env = VARIANT_ENV.get(name, {})
            os.environ.update(env)
            for _ in range(2):  # first-call work (attributes, allocator) stays out of the counters
                fwd_bwd(q, k, v, dout)
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            fwd_bwd(q, k, v, dout)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            for key in env:
                os.environ.pop(key)
            print(f"profiled {name} D={d}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
