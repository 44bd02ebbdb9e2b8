"""Small cases of every CUDA kernel, run once each under compute-sanitizer by bench/gpu_check.sh.

Odd sizes reach the tails and the scalar paths; each case checks its own answer so that a
sanitizer-clean but wrong kernel still fails.
"""
import sys

import torch
import torch.nn.functional as F

import pyllm


def swiglu_cases():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in [(3, 17), (2, 64), (1000,)]:
            g = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            u = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            out = pyllm.swiglu(g, u)
            out.backward(torch.randn_like(out))
            ref = F.silu(g.double()) * u.double()
            assert (out.double() - ref).abs().max().item() < 0.05, "swiglu forward wrong"
            x = torch.randn((*shape[:-1], 2 * shape[-1]), device="cuda", dtype=dtype, requires_grad=True)
            pyllm.swiglu_packed(x).sum().backward()


CASES = {"swiglu": swiglu_cases}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    for name in names:
        CASES[name]()
        torch.cuda.synchronize()
        print(f"{name}: ok")
