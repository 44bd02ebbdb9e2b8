"""Small cases of every CUDA kernel, run once each under compute-sanitizer by bench/gpu_check.sh.

Odd sizes reach the tails and the scalar paths; each case checks its own answer so that a
sanitizer-clean but wrong kernel still fails.
"""
import sys

import torch
import torch.nn.functional as F

import pyllm


def swiglu_cases():
    # SwiGLU and GeGLU (the same kernels, the activation a template parameter), forward checked
    # against float64, backward against float64 autograd.
    glus = [(pyllm.swiglu, pyllm.swiglu_packed, F.silu), (pyllm.geglu, pyllm.geglu_packed,
                                                            lambda x: F.gelu(x, approximate="tanh"))]
    for split, packed, act in glus:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for shape in [(3, 17), (2, 64), (1000,)]:
                g = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
                u = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
                out = split(g, u)
                dout = torch.randn_like(out)
                out.backward(dout)
                g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
                ref = act(g64) * u64
                ref.backward(dout.double())
                for got, want, what in ((out, ref, "forward"), (g.grad, g64.grad, "dgate")):
                    err = (got.double() - want).abs().max() / want.abs().max()
                    assert err.item() < 0.02, f"{split.__name__} {what} wrong: max error {err.item():.3g} of max |ref|"
                x = torch.randn((*shape[:-1], 2 * shape[-1]), device="cuda", dtype=dtype, requires_grad=True)
                packed(x).sum().backward()


def rms_norm_cases():
    # Warp-per-row and block-per-row widths, a width off the 16-byte vector (scalar path), more rows
    # than the backward's grid (rows walked in steps), no weight; each checked against float64.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, has_weight in [((3, 17), True), ((70, 128), True), ((5, 3000), True), ((2, 8200), False),
                                  ((4000, 64), True)]:
            x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
            w = (1 + 0.3 * torch.randn(shape[-1], device="cuda", dtype=dtype)).requires_grad_() if has_weight else None
            out = pyllm.rms_norm(x, w)
            dout = torch.randn_like(out)
            out.backward(dout)
            x64 = x.detach().double().requires_grad_()
            w64 = None if w is None else w.detach().double().requires_grad_()
            ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
            ref = ref if w64 is None else ref * w64
            ref.backward(dout.double())
            assert (out.double() - ref).abs().max().item() < 0.02 * ref.abs().max().item(), "rms_norm forward wrong"
            assert (x.grad.double() - x64.grad).abs().max().item() < 0.05 * x64.grad.abs().max().item(), "rms_norm dx"
            if w is not None:
                assert (w.grad.double() - w64.grad).abs().max().item() < 0.02 * w64.grad.abs().max().item(), "rms_norm dw"


def cross_entropy_cases():
    # Vocabularies of one pack, off the 16-byte vector (scalar path) and wide (many packs a thread),
    # smoothing, z-loss, scale and cap; ignored rows, an out-of-range target (its row NaN); the
    # in-place form over a strided chunk. Checked against float64.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, vocab in [(3, 8), (5, 37), (4, 8200), (2, 65536)]:
            x = (3 * torch.randn(rows, vocab, device="cuda")).to(dtype).requires_grad_()
            t = torch.randint(0, vocab, (rows,), device="cuda")
            t[0] = -100
            kw = dict(label_smoothing=0.1, z_loss=1e-3, scale=0.9, softcap=5.0)
            loss = pyllm.cross_entropy(x, t, reduction="none", **kw)
            loss.sum().backward()
            x64 = x.detach().double().requires_grad_()
            z = 5.0 * torch.tanh(0.9 * x64 / 5.0)
            ref = F.cross_entropy(z, t, reduction="none", label_smoothing=0.1)
            ref = ref + 1e-3 * torch.logsumexp(z, -1) ** 2 * (t != -100)
            ref.sum().backward()
            assert (loss.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item(), "cross_entropy loss wrong"
            assert (x.grad.double() - x64.grad).abs().max().item() < 0.02 * x64.grad.abs().max().item(), "cross_entropy grad"
    bad = pyllm.cross_entropy(torch.randn(2, 9, device="cuda"), torch.tensor([3, 9], device="cuda"), reduction="none")
    assert torch.isfinite(bad[0]) and torch.isnan(bad[1]), "cross_entropy: an out-of-range target must give NaN"
    from pyllm.ops import cross_entropy as ce_ops
    buffer = torch.randn(6, 1000 + 5, device="cuda", dtype=torch.bfloat16)
    ce_ops.cross_entropy_rows_(buffer[:, :1000], torch.randint(0, 1000, (6,), device="cuda"), z_loss=1e-3)


def distill_cases():
    # Vocabularies of one pack, off the 16-byte vector (scalar path) and wide; the three beta paths
    # with both sides scaled and the student capped; a masked row (weight 0); the in-place form over
    # a strided chunk, with a broadcast teacher row (stride 0). Checked against float64.
    from pyllm.nn import distill_divergence
    from pyllm.ops import distill as distill_ops

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, vocab in [(3, 8), (5, 37), (4, 8200), (2, 65536)]:
            for beta in (0.0, 0.5, 1.0):
                s = (3 * torch.randn(rows, vocab, device="cuda")).to(dtype).requires_grad_()
                t = (3 * torch.randn(rows, vocab, device="cuda")).to(dtype)
                mask = torch.ones(rows, dtype=torch.bool, device="cuda")
                mask[0] = False
                loss = pyllm.generalized_jsd(s, t, beta=beta, temperature=1.5, reduction="sum", mask=mask, scale=0.9,
                                             softcap=5.0, teacher_scale=1.1)
                loss.backward()
                s64 = s.detach().double().requires_grad_()
                ref = distill_divergence(5.0 * torch.tanh(0.9 * s64 / 5.0), 1.1 * t.double(), beta, 1.5)[mask].sum()
                ref.backward()
                assert abs(loss.item() - ref.item()) < 1e-3 * abs(ref.item()), "distill loss wrong"
                assert (s.grad.double() - s64.grad).abs().max().item() < 0.02 * s64.grad.abs().max().item(), "distill grad"
    buffer = torch.randn(6, 1000 + 5, device="cuda", dtype=torch.bfloat16)
    teacher = torch.randn(1, 1000, device="cuda", dtype=torch.bfloat16).expand(6, 1000)
    distill_ops.distill_rows_(buffer[:, :1000], teacher, beta=0.5, temperature=2.0)


def rope_cases():
    # Full and partial rotary, per-row tables, a strided view of a fused projection; checked against
    # float64 and by rotating back.
    from pyllm.nn import rope_cos_sin

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for B, T, H, D, R in [(2, 5, 3, 64, 64), (1, 7, 2, 80, 32), (3, 1, 1, 128, 128)]:
            x = torch.randn(B, T, 3 * H * D, device="cuda", dtype=dtype)[..., :H * D].view(B, T, H, D)
            positions = torch.randint(0, 4096, (B, T), device="cuda")
            cos, sin = rope_cos_sin(T, R, device="cuda", positions=positions)
            xl = x.detach().requires_grad_()
            out = pyllm.rope(xl, cos, sin)
            out.backward(torch.randn_like(out))
            x64, c, s = x.double(), cos.double().unsqueeze(-2), sin.double().unsqueeze(-2)
            x1, x2 = x64[..., :R // 2], x64[..., R // 2:R]
            ref = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x64[..., R:]], dim=-1)
            assert (out.double() - ref).abs().max().item() < 0.02 * ref.abs().max().item(), "rope forward wrong"
            back = pyllm.rope(out.detach(), cos, -sin)
            assert (back.double() - x64).abs().max().item() < 0.05 * x64.abs().max().item(), "rope inverse wrong"


def adamw_cases():
    from pyllm.optim import AdamW, DynamicLossScaler

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for sr in (False, True) if dtype == torch.bfloat16 else (False,):
            # param views one element into their storage (not 16-byte aligned: the step kernel's
            # scalar path; their fresh grads take the norm kernel's 16-byte path), odd sizes, one
            # tensor of 2+ chunks
            params = [torch.nn.Parameter(torch.randn(n + 1, device="cuda").to(dtype)[1:]) for n in (1, 13, 65536 + 7)]
            opt, scaler = AdamW(params, lr=1e-2, stochastic_rounding=sr), DynamicLossScaler(2.0**4)
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn_like(p) * 16
                opt.step(grad_scaler=scaler, max_grad_norm=1.0)
                scaler.update()
            ref = torch.cat([p.grad.double().flatten() for p in params]).norm().item() / scaler.get_scale()
            assert abs(opt.last_grad_norm.item() - ref) < 1e-3 * ref, "adamw grad norm wrong"
            for p in params:
                assert torch.isfinite(p).all(), "adamw wrote a non-finite param"
                if dtype != torch.float32 and not sr:
                    assert torch.equal(p, opt.state[p]["master"].to(dtype)), "adamw 16-bit copy wrong"
            adamw_vector_case(dtype, sr)


def adamw_vector_case(dtype, sr):
    """Fresh (16-byte aligned) tensors: adamw.cu's 16-byte path, both kernels. Sizes: whole vectors
    only (8 * 37), vectors and a ragged scalar tail (8 * 37 + 5), and a second chunk that has both
    (65536 + 8 * 3 + 3). Checked against the CPU twin on the same inputs."""
    from pyllm.optim import AdamW, DynamicLossScaler

    gen = torch.Generator().manual_seed(5)
    cpu = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in (8 * 37, 8 * 37 + 5, 65536 + 8 * 3 + 3)]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    assert all(p.data_ptr() % 16 == 0 for p in gpu), "adamw vector case: expected 16-byte aligned params"
    opts = [AdamW(ps, lr=1e-2, stochastic_rounding=sr) for ps in (cpu, gpu)]  # one seed: torch.initial_seed()
    scalers = [DynamicLossScaler(2.0**4), DynamicLossScaler(2.0**4)]
    for _ in range(2):
        for c, g in zip(cpu, gpu):
            c.grad = (torch.randn(c.shape, generator=gen) * 16).to(dtype)
            g.grad = c.grad.cuda()
        for opt, scaler in zip(opts, scalers):
            opt.step(grad_scaler=scaler, max_grad_norm=1.0)
            scaler.update()
        norms = [opt.last_grad_norm.item() for opt in opts]
        assert abs(norms[1] - norms[0]) <= 1e-9 * norms[0], "adamw vector path: grad norm differs from the CPU"
    for c, g in zip(cpu, gpu):
        for key in ("exp_avg", "exp_avg_sq") + (("master",) if dtype != torch.float32 else ()):
            ref, got = opts[0].state[c][key], opts[1].state[g][key].cpu()
            # atol: masters near 0 move by ~lr = 1e-2 per step, with fp32 error ~1e-9 of that move
            atol = 1e-6 if key == "master" else 1e-12
            assert torch.allclose(got, ref, rtol=1e-5, atol=atol), f"adamw vector path: {key} differs from the CPU"
        # 16-bit copies: the same rounding of fp32 values that agree to ~1e-7, so at most one ulp apart
        rtol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        assert torch.allclose(g.detach().cpu().float(), c.detach().float(), rtol=rtol, atol=1e-6), \
            "adamw vector path: params differ from the CPU"


def bpe_cases():
    import random

    from pyllm.tokenizer import Tokenizer

    rng = random.Random(0)
    corpus = ["def f(x):\n    return x + 1\n", "Hello, wörld! 123456 \u4e2d\u6587 😀", "aaaa bbbb aaaa"] * 20
    tok = Tokenizer.train(corpus, 300, special_tokens=["<|endoftext|>"], show_progress=False)
    # Thread path (<= 48 bytes), block path (49..2048 bytes), host path (> 2048 bytes), specials.
    texts = corpus[:3] + ["".join(rng.choice("ab") for _ in range(n)) for n in (47, 49, 500, 2048, 2100)]
    texts.append("x<|endoftext|>y")
    got = tok.encode_batch(texts, allowed_special="all", device="cuda")
    assert got == tok.encode_batch(texts, allowed_special="all"), "bpe: CUDA ids differ from the CPU path"


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
        # An lse torch calls contiguous with a free size-1 stride ((1, H, Tq), strides (Tq, Tq, 1)):
        # the backward's delta scratch (lse layout) must still hold every row it writes.
        from pyllm.ops import flash_attn as fa

        q1, k1 = (torch.randn(1, 40, h, 64, device="cuda", dtype=dtype) for h in (4, 2))
        out1, lse1 = torch.empty_like(q1), torch.empty(4, 1, 40, device="cuda").transpose(0, 1)
        fa.flash_attn_forward_into(q1, k1, k1, out1, lse1, None, None, 40, 40, 0.125, -1, 0)
        grads = [torch.empty_like(t) for t in (q1, k1, k1)]
        fa.flash_attn_backward_into(torch.randn_like(q1), None, q1, k1, k1, out1, lse1, *grads, None, None, 40, 40,
                                    0.125, -1, 0, True)


def _attn_grads(algo, fn, inputs, dout):
    """dq, dk, dv of fn(*inputs) against dout under PYLLM_ATTN_BWD=algo."""
    import os

    os.environ["PYLLM_ATTN_BWD"] = algo
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, dout)


def _gqa_and_varlen_inputs(scale: float = 1.0):
    """(dtype, head dim, (q, k, v), varlen's cu_seqlens kwargs) for fp16 / bf16 x D = 64 / 128: q (2,
    150, 4, D), k and v (2, 170, 2, D) (GQA 4:2, Tq < Tk); the varlen call takes sequences of 0, 1 and
    43 queries (3, 1 and 70 keys) from batch row 0's first 44 / 74 tokens."""
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            q = scale * torch.randn(2, 150, 4, d, device="cuda", dtype=dtype)
            k, v = (scale * torch.randn(2, 170, 2, d, device="cuda", dtype=dtype) for _ in range(2))
            cu = dict(cu_seqlens_q=torch.tensor([0, 0, 1, 44], dtype=torch.int32, device="cuda"),
                      cu_seqlens_k=torch.tensor([0, 3, 4, 74], dtype=torch.int32, device="cuda"))
            yield dtype, d, (q, k, v), cu


def _attn_against_cpu(inputs, kw, what: str, seed=None):
    """pyllm.flash_attn(*inputs, **kw) on CUDA against the same call on the CPU kernels in fp32 (kw's
    tensors moved there): the forward, and the mma and SIMT backwards. seed: torch.manual_seed before
    every call (dropout's draw: the same seed, the same elements on both)."""
    def call(*tensors, kw=kw):
        if seed is not None:
            torch.manual_seed(seed)
        return pyllm.flash_attn(*tensors, **kw)

    dout = torch.randn_like(inputs[0])
    cpu_in = [t.cpu().float().requires_grad_() for t in inputs]
    cpu_out = call(*cpu_in, kw={name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in kw.items()})
    cpu_grads = torch.autograd.grad(cpu_out, cpu_in, dout.cpu().float())
    assert _rel(call(*inputs).cpu(), cpu_out) < 1e-2, f"flash_attn forward with {what} wrong"
    for algo in ("mma", "simt"):
        for name, a, c in zip("qkv", _attn_grads(algo, call, inputs, dout), cpu_grads):
            assert _rel(a.cpu(), c) < 2e-2, f"flash_attn {algo} backward with {what}: d{name} wrong"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()


def _attn_backward_cases(dtype, d, b, tq, tk, window, extra=()):
    """(inputs, fn) pairs: causal with `window`, GQA 4:2, (b, tq, tk); then varlen with an empty and a
    length-1 sequence (the first 44 queries and 74 keys of batch 0); `extra`: more (kv_len, kwargs)."""
    q = torch.randn(b, tq, 4, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, tk, 2, d, device="cuda", dtype=dtype) for _ in range(2))
    cu_q = torch.tensor([0, 0, 1, 41, 44], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 3, 4, 74, 74], dtype=torch.int32, device="cuda")
    cases = [((q, k, v), lambda q, k, v: pyllm.flash_attn(q, k, v, causal=True, window=window))]
    cases += [((q, k[:, :n], v[:, :n]), lambda q, k, v, kw=kw: pyllm.flash_attn(q, k, v, **kw)) for n, kw in extra]
    cases.append(((q[0, :44], k[0, :74], v[0, :74]),
                  lambda q, k, v: pyllm.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)))
    return cases


def flash_attn_bwd_mma_cases():
    # The tensor-core backward (PYLLM_ATTN_BWD=mma) next to the SIMT one on small shapes: several
    # key / query blocks, tails, GQA, a window with Tq != Tk, varlen with empty and length-1
    # sequences; the two must agree (the mma one rounds P and dS to 16 bits, hence 5%).
    import os

    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 256):
            for inputs, fn in _attn_backward_cases(dtype, d, 1, 70, 100, (20, -1)):
                dout = torch.randn_like(inputs[0])
                mma, simt = _attn_grads("mma", fn, inputs, dout), _attn_grads("simt", fn, inputs, dout)
                for name, a, b in zip("qkv", mma, simt):
                    assert _rel(a, b) < 0.05, f"flash_attn mma backward: d{name} differs from the SIMT one"
    os.environ.pop("PYLLM_ATTN_BWD")


def flash_attn_shapes_cases():
    # What flash_attn / flash_attn_bwd_mma leave out: head dims 32 and 96 (the 4-chunk swizzle, the
    # smaller tiles), MQA with a group of 4 and causal Tq > Tk (queries that see no key: lse = +inf
    # through the backward), both backwards (the SIMT one also at D = 128), and decode with two
    # queries, a window, D = 256, an empty and a 3-key cache (more splits than keys) and a cache of
    # capacity 0.
    import os

    for dtype in (torch.float16, torch.bfloat16):
        for d in (32, 96, 128):
            q = torch.randn(1, 45, 4, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(1, 30, 1, d, device="cuda", dtype=dtype) for _ in range(2))
            ref = pyllm.flash_attn(*(t.cpu().float() for t in (q, k, v)), causal=True)
            for algo in ("mma", "simt") if d != 128 else ("simt",):
                os.environ["PYLLM_ATTN_BWD"] = algo
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                out = pyllm.flash_attn(*leaves, causal=True)
                out.backward(torch.randn_like(out))
                assert (out.detach().cpu().float() - ref).abs().max().item() < 0.05, "flash_attn forward wrong"
        os.environ.pop("PYLLM_ATTN_BWD")
        for d in (64, 256):
            cache_k, cache_v = (torch.randn(2, 50, 2, d, device="cuda", dtype=dtype) for _ in range(2))
            new = [torch.randn(2, 2, 2, d, device="cuda", dtype=dtype) for _ in range(2)]
            pyllm.flash_attn_with_kvcache(torch.randn(2, 2, 4, d, device="cuda", dtype=dtype), cache_k, cache_v,
                                          torch.tensor([0, 3], dtype=torch.int32, device="cuda"), *new,
                                          window=(8, -1))
        empty = torch.empty(2, 0, 2, 64, device="cuda", dtype=dtype)
        pyllm.flash_attn_with_kvcache(torch.randn(2, 1, 2, 64, device="cuda", dtype=dtype), empty, empty.clone(),
                                      torch.zeros(2, dtype=torch.int32, device="cuda"))


def flash_attn_tall_tiles_cases():
    # The taller tiles (PYLLM_ATTN_FWD_BLOCK_M, PYLLM_ATTN_BWD_DQ_BLOCK_M, PYLLM_ATTN_BWD_DKV_BLOCK_N
    # = 128; D = 64 / 128, dk_dv D = 64): two query blocks, the second partial, causal Tq < Tk with
    # a window, GQA, varlen with an empty sequence. The forward gives the 64-row tiles' bits: each
    # row takes the same steps, plus key blocks its tile's other rows need, fully masked for it.
    import os

    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            q = torch.randn(2, 150, 4, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(2, 170, 2, d, device="cuda", dtype=dtype) for _ in range(2))
            cu = torch.tensor([0, 0, 131, 150], dtype=torch.int32, device="cuda")
            runs = []
            for block_m in ("64", "128"):
                os.environ["PYLLM_ATTN_FWD_BLOCK_M"] = block_m
                runs.append((pyllm.flash_attn(q, k, v, causal=True, window=(90, -1)),
                             pyllm.flash_attn(q[0], q[0], q[0], causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)))
            for a, b in zip(*runs):
                assert torch.equal(a, b), "flash_attn 128-row forward differs from the 64-row one"
            os.environ.pop("PYLLM_ATTN_FWD_BLOCK_M")
            # The dq kernel's 128-row tiles, causal without a window (no left window: the same dq
            # bits), and the dk_dv kernel's 128-key tiles, non-causal (no right window: the same
            # dk, dv bits); at D = 128 the latter's setting leaves the default tiles.
            for env, causal, which in (("PYLLM_ATTN_BWD_DQ_BLOCK_M", True, (0,)),
                                       ("PYLLM_ATTN_BWD_DKV_BLOCK_N", False, (1, 2))):
                grads = []
                for block in ("64", "128"):
                    os.environ[env] = block
                    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                    pyllm.flash_attn(*leaves, causal=causal).backward(torch.ones_like(q))
                    grads.append([leaves[i].grad for i in which])
                os.environ.pop(env)
                for a, b in zip(*grads):
                    assert torch.equal(a, b), f"flash_attn backward with {env}=128 differs from the default tiles"


def flash_attn_atomic_dq_cases():
    # The backward with dQ added up by atomics (PYLLM_ATTN_BWD=atomic, deterministic=False; D = 64 /
    # 128 on sm_90): dk and dv the deterministic kernels' bits, dq within rounding of theirs. Causal
    # with a window and Tq < Tk, GQA; causal Tq > Tk (queries with no key: dq 0); varlen with an
    # empty and a length-1 sequence; then garbage cu_seqlens (memcheck: the accumulator rows stay in
    # bounds, whatever the answers).
    import os

    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            for inputs, fn in _attn_backward_cases(dtype, d, 2, 150, 170, (90, -1), extra=[(70, dict(causal=True))]):
                dout = torch.randn_like(inputs[0])
                atomic, mma = _attn_grads("atomic", fn, inputs, dout), _attn_grads("mma", fn, inputs, dout)
                err = _rel(atomic[0], mma[0])
                assert err < 1e-2, f"flash_attn atomic dq differs from the dq kernel's: {err:.3g}"
                assert torch.equal(atomic[1], mma[1]) and torch.equal(atomic[2], mma[2]), "atomic-dq dk / dv differ"
    os.environ["PYLLM_ATTN_BWD"] = "atomic"
    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.float16)
    for vals in ([0, 7, 3, 10], [-5, 2**30, -2**31, 10], [0, 10, 20, 40]):
        bad = torch.tensor(vals, dtype=torch.int32, device="cuda")
        qg = q.clone().requires_grad_()
        out = pyllm.flash_attn(qg, qg, qg, causal=True, cu_seqlens_q=bad, cu_seqlens_k=bad, max_seqlen_q=10,
                               max_seqlen_k=10)
        out.backward(torch.ones_like(out))
    os.environ.pop("PYLLM_ATTN_BWD")


def flash_attn_score_mods_cases():
    # Capped scores and ALiBi (softcap, alibi_slopes; new 2026-12-05) in the forward, the tensor-core
    # and SIMT backwards and the decode kernel, against the CPU kernels in fp32: causal with a window,
    # GQA 4:2, per-sequence slopes; varlen with an empty and a length-1 sequence.
    import os

    for dtype, d, (q, k, v), cu in _gqa_and_varlen_inputs(scale=2.0):  # (x 2: the cap binds)
        slopes = torch.rand(3, 4, device="cuda") * 0.3 + 0.02
        cases = [((q, k, v), dict(causal=True, window=(90, -1), alibi_slopes=slopes[:2])),
                 ((q[0, :44], k[0, :74], v[0, :74]), dict(cu, alibi_slopes=slopes))]
        for inputs, kw in cases:
            _attn_against_cpu(inputs, dict(kw, softcap=1.5), "softcap / ALiBi")
        cache = torch.randn(2, 300, 2, d, device="cuda", dtype=dtype)
        qd = 2 * torch.randn(2, 2, 4, d, device="cuda", dtype=dtype)
        lens = torch.tensor([0, 290], dtype=torch.int32, device="cuda")
        out = pyllm.flash_attn_with_kvcache(qd, cache, cache.clone(), lens, softcap=1.5, alibi_slopes=slopes[:2])
        ref = pyllm.flash_attn_with_kvcache(qd.cpu().float(), cache.cpu().float(), cache.cpu().float(), lens.cpu(),
                                            softcap=1.5, alibi_slopes=slopes[:2].cpu())
        assert _rel(out.cpu(), ref) < 1e-2, "flash_attn_with_kvcache with softcap / ALiBi wrong"
    os.environ.pop("PYLLM_ATTN_BWD")


def flash_attn_dropout_cases():
    # Dropout on the probabilities (dropout_p; new 2026-12-05) in the forward and the tensor-core and
    # SIMT backwards, against the CPU kernels in fp32 with the same seed (torch.manual_seed: the same
    # draw, the same elements): causal with a window and GQA 4:2; varlen with an empty and a length-1
    # sequence, under a cap.
    import os

    for dtype, d, (q, k, v), cu in _gqa_and_varlen_inputs():
        cases = [((q, k, v), dict(causal=True, window=(90, -1))),
                 ((q[0, :44], k[0, :74], v[0, :74]), dict(cu, softcap=1.5))]
        for inputs, kw in cases:
            _attn_against_cpu(inputs, dict(kw, dropout_p=0.3), "dropout", seed=3)
    os.environ.pop("PYLLM_ATTN_BWD")


def flash_attn_bad_seqlens_cases():
    # Unchecked cu_seqlens / cache_seqlens (CUDA, max_seqlen given, no PYLLM_ATTN_CHECK_SEQLENS):
    # garbage contents must stay in bounds (memcheck), whatever the answers.
    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.float16)
    for vals in ([0, 7, 3, 10], [-5, 2**30, -2**31, 10], [3, 3, 3, 3], [0, 10, 20, 40]):
        bad = torch.tensor(vals, dtype=torch.int32, device="cuda")
        qg = q.clone().requires_grad_()
        out = pyllm.flash_attn(qg, qg, qg, causal=True, cu_seqlens_q=bad, cu_seqlens_k=bad, max_seqlen_q=10,
                               max_seqlen_k=10)
        out.backward(torch.ones_like(out))
    cache = torch.randn(3, 16, 2, 64, device="cuda", dtype=torch.float16)
    new = torch.randn(3, 1, 2, 64, device="cuda", dtype=torch.float16)
    pyllm.flash_attn_with_kvcache(torch.randn(3, 1, 2, 64, device="cuda", dtype=torch.float16), cache, cache.clone(),
                                  torch.tensor([-4, 2**30, 15], dtype=torch.int32, device="cuda"), new, new)


def flash_attn_cache_layouts_cases():
    # The decode kernel over flash-attn's cache layouts (cache rows, left pads, blocks of 16 and of
    # 7) against the same call on the CPU kernels; then garbage indices, unchecked (CUDA clamps
    # them): memcheck must find no stray access, whatever the answers.
    gen = torch.Generator().manual_seed(0)
    b, h, hk, d = 3, 4, 2, 64
    q = torch.randn(b, 2, h, d, generator=gen).bfloat16()
    new = torch.randn(b, 2, hk, d, generator=gen).bfloat16()
    lengths = torch.tensor([5, 140, 298], dtype=torch.int32)
    pads = torch.tensor([2, 0, 37], dtype=torch.int32)
    for page in (16, 7):
        per_seq = -(-300 // page)
        table = torch.randperm(b * per_seq + 3, generator=gen)[:b * per_seq].view(b, per_seq).to(torch.int32)
        pool = torch.randn(b * per_seq + 3, page, hk, d, generator=gen).bfloat16()
        layouts = [dict(block_table=table), dict(block_table=table, cache_leftpad=pads)]
        caches = [pool, pool]
        if page == 16:
            rows = torch.randn(b + 2, 300, hk, d, generator=gen).bfloat16()
            layouts.append(dict(cache_batch_idx=torch.tensor([4, 0, 2], dtype=torch.int32), cache_leftpad=pads))
            caches.append(rows)
        for cache, layout in zip(caches, layouts):
            want = pyllm.flash_attn_with_kvcache(q.float(), cache.float(), cache.float().clone(), lengths, new.float(),
                                                 new.float(), **layout)
            gpu = {k: v.cuda() for k, v in layout.items()}
            out = pyllm.flash_attn_with_kvcache(q.cuda(), cache.cuda(), cache.cuda().clone(), lengths.cuda(),
                                                new.cuda(), new.cuda(), **gpu)
            assert (out.float().cpu() - want).abs().max().item() < 0.05, f"decode over {sorted(layout)} wrong"
    garbage = torch.tensor([-7, 2**30, 5], dtype=torch.int32, device="cuda")
    cache = torch.randn(4, 16, hk, d, device="cuda", dtype=torch.float16)
    qh, nh = q[:, :1].half().cuda(), new[:, :1].half().cuda()
    pyllm.flash_attn_with_kvcache(qh, cache, cache.clone(), torch.tensor([3, 9, 40], dtype=torch.int32, device="cuda"),
                                  nh, nh, block_table=torch.tensor([[0, 9], [-3, 1], [2, 2**30]], dtype=torch.int32,
                                                                   device="cuda"))
    pyllm.flash_attn_with_kvcache(qh, cache, cache.clone(), torch.tensor([3, 9, 15], dtype=torch.int32, device="cuda"),
                                  nh, nh, cache_batch_idx=garbage, cache_leftpad=garbage)


CASES = {"swiglu": swiglu_cases, "rms_norm": rms_norm_cases, "rope": rope_cases, "cross_entropy": cross_entropy_cases,
         "distill": distill_cases,
         "adamw": adamw_cases, "bpe": bpe_cases, "flash_attn": flash_attn_cases,
         "flash_attn_bwd_mma": flash_attn_bwd_mma_cases, "flash_attn_shapes": flash_attn_shapes_cases,
         "flash_attn_tall_tiles": flash_attn_tall_tiles_cases, "flash_attn_bad_seqlens": flash_attn_bad_seqlens_cases,
         "flash_attn_cache_layouts": flash_attn_cache_layouts_cases, "flash_attn_atomic_dq": flash_attn_atomic_dq_cases,
         "flash_attn_score_mods": flash_attn_score_mods_cases, "flash_attn_dropout": flash_attn_dropout_cases}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"usage: sanitize_cases.py [CASE ...]; unknown {unknown}, cases: {' '.join(CASES)}")
    for name in names:
        CASES[name]()
        torch.cuda.synchronize()
        print(f"{name}: ok")
