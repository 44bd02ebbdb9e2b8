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


def flash_attn_cases():
    # T not a multiple of the tiles, GQA, causal bottom-right with Tq != Tk, a window, varlen with
    # an empty sequence, and a decode step over a KV cache.
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128, 256):
            q = torch.randn(2, 37, 4, d, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(2, 70, 2, d, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(2, 70, 2, d, device="cuda", dtype=dtype, requires_grad=True)
            out = pyllm.flash_attn(q, k, v, causal=True, window=(20, -1))
            out.backward(torch.randn_like(out))
            ref = pyllm.flash_attn(q.detach().cpu().float(), k.detach().cpu().float(), v.detach().cpu().float(),
                                   causal=True, window=(20, -1))
            assert (out.detach().cpu().float() - ref).abs().max().item() < 0.05, "flash_attn forward wrong"
        cu = torch.tensor([0, 5, 5, 40], dtype=torch.int32, device="cuda")
        qv = torch.randn(40, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
        pyllm.flash_attn(qv, qv, qv, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu).sum().backward()
        cache = torch.randn(2, 300, 2, 64, device="cuda", dtype=dtype)
        pyllm.flash_attn_with_kvcache(torch.randn(2, 1, 4, 64, device="cuda", dtype=dtype), cache, cache.clone(),
                                      torch.tensor([10, 250], dtype=torch.int32, device="cuda"),
                                      torch.randn(2, 1, 2, 64, device="cuda", dtype=dtype),
                                      torch.randn(2, 1, 2, 64, device="cuda", dtype=dtype))


CASES = {"swiglu": swiglu_cases, "flash_attn": flash_attn_cases}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    for name in names:
        CASES[name]()
        torch.cuda.synchronize()
        print(f"{name}: ok")
