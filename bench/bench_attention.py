"""FlashAttention, ours vs torch SDPA (CPU: its own flash kernel; CUDA: the flash and the cuDNN
backends, each forced with torch.nn.attention.sdpa_kernel).

One process, same inputs, side by side, median of repeats. TFLOPs count the useful work for
every implementation alike: forward 4 * B * T^2 * H * D (halved for causal), forward + backward
3.5x that (the backward is 2.5x the forward). The peak memory of one forward + backward (CPU: peak RSS)
for T = 2k..16k is recorded too (it should grow linearly in T: no T x T matrix). Decode rows:
one new token against a KV cache of T tokens (flash_attn_with_kvcache vs SDPA on the cache).
--overhead-only: the Python cost of one flash_attn_with_kvcache call on the CPU (call minus kernel).
--paged: decode over a paged KV cache (block_table) vs gathering its blocks for SDPA (CPU).
--dropout P: prefill rows with dropout on the probabilities, ours vs SDPA's dropout_p (and ours without).
Before timing, each row's forward output of ours must match the peer's (the first that runs) on the
same inputs, prefill and decode alike (dropout rows excepted: their masks are random).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyllm  # noqa: E402


def ours(q, k, v, causal):
    return pyllm.flash_attn(q, k, v, causal=causal)


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        # SDPA takes (B, H, T, D): transposed views of the same (B, T, H, D) tensors, no copies.
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=causal)
        return out.transpose(1, 2)

    return run


# Our fp32 SIMT CUDA backward (PYLLM_ATTN_BWD=simt), the reference of the tensor-core one: timed
# in fwd+bwd up to T = 4096 only, to show what the mma kernels buy.
SIMT_BWD = "pyllm simt-bwd"
# The forward with 128-query tiles (2 m-tiles per warp, D = 64 / 128), not yet measured: until a
# GPU run picks one, both forwards are timed side by side.
FWD_M128 = "pyllm fwd-m128"
# The same for the backward's dq kernel (128 query rows) and dk_dv kernel (128 keys, D = 64), fwd+bwd
# rows only, and all three together.
DQ_M128 = "pyllm dq-m128"
DKV_M128 = "pyllm dkv-n128"
ALL_M128 = "pyllm all-128"
# The backward with dQ added up by fp32 atomics in the dk_dv kernel (PYLLM_ATTN_BWD=atomic, D = 64 /
# 128, sm_90; FlashAttention-2's default) instead of the dq kernel: not yet measured, fwd+bwd rows.
ATOMIC_DQ = "pyllm atomic-dq"
# Each taller-tile variant's setting (128 where it is on).
TALL_TILES = {FWD_M128: "PYLLM_ATTN_FWD_BLOCK_M", DQ_M128: "PYLLM_ATTN_BWD_DQ_BLOCK_M",
              DKV_M128: "PYLLM_ATTN_BWD_DKV_BLOCK_N"}
# The environment each variant of ours runs under, set around its timing only.
VARIANT_ENV = {SIMT_BWD: {"PYLLM_ATTN_BWD": "simt"}, **{name: {var: "128"} for name, var in TALL_TILES.items()},
               ALL_M128: {var: "128" for var in TALL_TILES.values()}, ATOMIC_DQ: {"PYLLM_ATTN_BWD": "atomic"}}


@contextlib.contextmanager
def variant_env(name: str):
    saved = {key: os.environ.get(key) for key in VARIANT_ENV.get(name, {})}
    os.environ.update(VARIANT_ENV.get(name, {}))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def impls_for(device: str) -> dict:
    from torch.nn.attention import SDPBackend

    if device == "cuda":
        return {"pyllm": ours, FWD_M128: ours, DQ_M128: ours, DKV_M128: ours, ALL_M128: ours, ATOMIC_DQ: ours,
                SIMT_BWD: ours,
                "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
                "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    return {"pyllm": ours, "sdpa": sdpa(SDPBackend.FLASH_ATTENTION)}


def configs(device: str, quick: bool, dims=(64, 128)):
    """(batch, seqlen, head_dim, dtype, causal)"""
    if device == "cuda":
        dtypes = (torch.bfloat16, torch.float16)
        # --quick keeps one long row: the range ends at 16k, where the kernel's own speed shows
        seqlens = (512, 2048, 16384) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        batches = {512: 16, 1024: 8, 2048: 4, 4096: 2, 8192: 1, 16384: 1}
        for dtype in dtypes[:1] if quick else dtypes:
            for d in dims:
                for t in seqlens:
                    for causal in (False, True):
                        yield batches[t], t, d, dtype, causal
        return
    if quick:
        for d in dims:
            for dtype in (torch.float32, torch.bfloat16):
                yield 1, 512, d, dtype, True
        return
    for d in dims:
        for dtype in (torch.float32, torch.bfloat16):
            for t, b in ((512, 4), (1024, 2), (2048, 1), (4096, 1)):
                for causal in (False, True):
                    yield b, t, d, dtype, causal


def sinks_of(h: int, device: str) -> torch.Tensor:
    """gpt-oss-like sinks, a logit per head in [-2, 3]."""
    return torch.linspace(-2.0, 3.0, h, device=device)


def ours_with_sinks(q, k, v, causal):
    return pyllm.flash_attn(q, k, v, causal=causal, sinks=sinks_of(q.shape[2], q.device))


def eager_with_sinks(q, k, v, causal):
    """Attention with sinks as transformers' gpt-oss eager_attention_forward computes it (no fused
    kernel in torch takes sinks): the (B, H, T, T) scores whole, the sink column appended, the
    softmax in the scores' dtype, the column dropped, times V."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    sink = sinks_of(q.shape[1], q.device).to(s.dtype)[None, :, None, None].expand(*s.shape[:3], 1)
    s = torch.cat([s, sink], dim=-1)
    p = torch.softmax(s - s.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return (p.to(v.dtype) @ v).transpose(1, 2)


@functools.lru_cache(maxsize=None)
def alibi_slopes_of(h: int, device) -> torch.Tensor:
    """ALiBi's own slopes for h heads (a power of 2): 2^(-8 i / h), i = 1..h (Press et al. 2022). One
    tensor per (h, device), as a model keeps them in a buffer: a fresh CUDA tensor per call would time
    its host copy and pyllm's finiteness check (a sync, read once per slopes tensor) with the kernel."""
    return torch.tensor([2.0 ** (-8.0 * i / h) for i in range(1, h + 1)], device=device)


def ours_with_alibi(q, k, v, causal):
    return pyllm.flash_attn(q, k, v, causal=causal, alibi_slopes=alibi_slopes_of(q.shape[2], q.device))


def ours_with_dropout(p: float):
    def run(q, k, v, causal):
        return pyllm.flash_attn(q, k, v, causal=causal, dropout_p=p)
    return run


def sdpa_with_dropout(p: float):
    """SDPA's own dropout_p (its default backend choice: on the CPU and for flash-less shapes the math
    backend materialises the (B, H, T, T) probabilities and their mask)."""
    def run(q, k, v, causal):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, dropout_p=p)
        return out.transpose(1, 2)
    return run


_ALIBI_MASKS: dict = {}


def sdpa_with_alibi(q, k, v, causal):
    """ALiBi on torch's SDPA as transformers' BLOOM / MPT run it: the bias (and the causal mask) as
    a (1, H, T, T) additive float mask in q's dtype. The mask is built once per shape, outside the
    timing (the models build theirs every forward): the peer's best case."""
    t, h = q.shape[1], q.shape[2]
    key = (t, h, q.dtype, causal, str(q.device))
    if key not in _ALIBI_MASKS:
        pos = torch.arange(t, device=q.device)
        bias = -(pos[:, None] - pos[None, :]).abs().float() * alibi_slopes_of(h, q.device)[:, None, None]
        if causal:
            bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        _ALIBI_MASKS.clear()
        _ALIBI_MASKS[key] = bias[None].to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=_ALIBI_MASKS[key])
    return out.transpose(1, 2)


def capped_eager(q, k, v, softcap: float):
    """Capped attention as transformers' eager Gemma 2 attention computes it (SDPA takes no cap):
    the (B, H, Tq, Tk) scores whole, c tanh(s / c), softmax, times V. No mask: one query over the
    whole cache."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    s = softcap * torch.tanh(s / softcap)
    return (torch.softmax(s.float(), -1).to(q.dtype) @ v).transpose(1, 2)


def decode_rows(device: str, h: int, quick: bool, softcap: float = 0.0, dims=(64, 128)) -> list[dict]:
    """Generation: one new token per sequence attending to a full KV cache of T tokens, ours
    (flash_attn_with_kvcache) vs SDPA on the same cache (with softcap: vs capped_eager, the scores
    capped as transformers' Gemma 2 does). Memory-bound: the work column counts the same 4 * B * T
    * H * D FLOPs as the table above, the cache read is 2 * B * T * H * D elements."""
    rows = []
    dtypes = (torch.bfloat16,) if device == "cuda" else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        for d in dims:
            for t in (2048,) if quick else (512, 4096):
                b = 1
                q = torch.randn(b, 1, h, d, device=device, dtype=dtype)
                k_cache, v_cache = (torch.randn(b, t, h, d, device=device, dtype=dtype) for _ in range(2))
                seqlens = torch.full((b,), t, dtype=torch.int32, device=device)
                impls = {"pyllm": lambda: pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, seqlens, softcap=softcap)}
                if softcap:
                    impls["torch eager, capped"] = lambda: capped_eager(q, k_cache, v_cache, softcap)
                for name, fn in ({} if softcap else impls_for(device)).items():
                    # Our variants are full-attention kernels: here they would time the plain forward.
                    if name != "pyllm" and name not in VARIANT_ENV:
                        impls[name] = lambda fn=fn: fn(q, k_cache, v_cache, False)
                base, ours_ms = None, None
                with torch.no_grad():
                    check_against_peer(impls, ["pyllm"], lambda fn: fn(), dtype,
                                       f"decode B {b} T {t} D {d} {dtype} softcap {softcap}")
                for name, fn in impls.items():
                    def step(fn=fn):
                        with torch.no_grad():
                            return fn()
                    row = {"dtype": str(dtype).removeprefix("torch."), "B": b, "T": t, "D": d, "causal": False,
                           "mode": "decode", "impl": name}
                    try:
                        ms = common.median_ms(step, device, warmup=3, repeat=20)
                    except RuntimeError as e:
                        rows.append({**row, "ms": "n/a", "note": str(e)[:60]})
                        continue
                    rows.append({**row, "ms": round(ms, 3), "TFLOPs": round(4 * b * t * h * d / ms / 1e9, 3),
                                 **common.spread(ms)})
                    if name == "pyllm":
                        ours_ms, ours_row = ms, rows[-1]
                    elif base is None:
                        base = ms
                if base and ours_ms:
                    ours_row["vs sdpa"] = f"{base / ours_ms:.2f}x"
    return rows


def check_against_peer(impls: dict, ours: list[str], call, dtype, what: str) -> None:
    """call(fn) of each of ours against the first other impl for which it runs (check_close);
    nothing to compare where none runs."""
    for name, fn in impls.items():
        if name in ours or name.startswith("pyllm"):
            continue
        try:
            expected = call(fn)
        except RuntimeError:  # a backend that refuses this config
            continue
        for mine in ours:
            with variant_env(mine):
                try:
                    got = call(impls[mine])
                except RuntimeError:  # refused here: its row says so
                    continue
            common.check_close(got, expected, f"{mine} vs {name}, {what}")
        return


def overhead_rows(h: int) -> list[dict]:
    """The Python cost of one flash_attn_with_kvcache call on the CPU: a 16-token cache (so the
    kernel is ~4 us), B = 1, D = 64, one query; the public call (tensor cache_seqlens; an int and
    one new token appended, as the model's attention calls it) against the bare _C call with the
    same arguments. Thread CPU time, best of 30 x 1000 calls: other processes on the machine do not
    count (their cache and core sharing still does, hence the best). Overhead = call - kernel."""
    import time
    from array import array

    from pyllm.ops import _util
    from pyllm.ops import flash_attn as fa

    def us_per_call(fn, n=1000):
        for _ in range(200):
            fn()
        best = float("inf")
        for _ in range(30):  # many short samples: the best one is the least disturbed
            t0 = time.thread_time_ns()
            for _ in range(n):
                fn()
            best = min(best, (time.thread_time_ns() - t0) / n / 1e3)
        return best

    rows, t, d = [], 16, 64
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 1, h, d, dtype=dtype)
        k_cache, v_cache = (torch.randn(1, 64, h, d, dtype=dtype) for _ in range(2))
        k_new, v_new = (torch.randn(1, 1, h, d, dtype=dtype) for _ in range(2))
        seqlens = torch.full((1,), t, dtype=torch.int32)
        out, lse, used = torch.empty_like(q), array("f", [0.0]) * h, array("i", [t])
        kernel_args = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), lse.buffer_info()[0], 0, 0,
                       used.buffer_info()[0], 1, 1, 64, h, h, d, q.stride()[:3], k_cache.stride()[:3],
                       v_cache.stride()[:3], out.stride()[:3], (h, 1), d ** -0.5, -1, 0, _util.DTYPE_CODES[dtype])
        with torch.no_grad():
            kernel = us_per_call(lambda: fa._C.flash_attn_fwd_cpu(*kernel_args))
            calls = {"tensor seqlens": lambda: pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, seqlens),
                     "int seqlen + 1 new": lambda: pyllm.flash_attn_with_kvcache(q, k_cache, v_cache, t, k_new, v_new)}
            for name, fn in calls.items():
                us = us_per_call(fn)
                rows.append({"dtype": str(dtype).removeprefix("torch."), "B": 1, "T": t, "D": d, "mode": "overhead",
                             "impl": name, "call us": round(us, 1), "kernel us": round(kernel, 1),
                             "overhead us": round(us - kernel, 1)})
    return rows


def prefill_step(name: str, fn, q, k, v, dout, causal: bool, mode: str):
    """One timed call of implementation `name` (its variant's environment set around it): the forward
    without autograd, or the forward and the gradients of q, k and v."""
    if mode == "fwd":
        def step():
            with variant_env(name), torch.no_grad():
                return fn(q, k, v, causal)
    else:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def step():
            with variant_env(name):
                return torch.autograd.grad(fn(*leaves, causal), leaves, dout)
    return step


def memory_rows(device: str, impls: dict, h: int, quick: bool) -> list[dict]:
    """Peak memory of one causal bf16 forward + backward (B=1, D=128) as T doubles: linear growth
    (about 2x per row) means no T x T matrix anywhere; the per-1k-token column makes that easy to read."""
    rows = []
    # The GPU's quick run still reaches 16k (a few ms per call there).
    for t in ((256, 1024, 4096, 16384) if device == "cuda" else (256, 1024, 2048, 4096)) if quick else (256, 2048, 4096, 8192, 16384):
        for name, fn in impls.items():
            if name in VARIANT_ENV:
                continue
            try:
                if device == "cpu" and t != 256:
                    # A fresh process per row: pyllm's CPU kernels keep per-thread scratch across calls, so in
                    # one process an earlier, shorter row's scratch sat in this row's baseline (ours at 16k
                    # read 173 MiB in the bench's order against 218 measured alone, after the same warm-up).
                    mb = _peak_mib_in_fresh_process(name, t, h)
                else:
                    mb = peak_mib(fn, t, h, device)
            except RuntimeError as e:
                rows.append({"dtype": "bfloat16", "B": 1, "T": t, "D": 128, "causal": True,
                             "mode": "peak MiB fwd+bwd", "impl": name, "ms": "n/a", "note": str(e)[:60]})
                continue
            if t == 256:  # warm-up: thread pools, lazy initialisation
                continue
            # "ms" holds MiB in these rows (older files read it there); unit and mib say so
            rows.append({"dtype": "bfloat16", "B": 1, "T": t, "D": 128, "causal": True, "mode": "peak MiB fwd+bwd",
                         "impl": name, "ms": round(mb, 1), "unit": "MiB", "mib": round(mb, 1),
                         "note": f"{mb / t * 1024:.2f} MiB per 1k tokens"})
    return rows


def peak_mib(fn, t: int, h: int, device: str) -> float:
    """Peak MiB of one causal bf16 forward + backward of fn at length t (B = 1, H = h, D = 128)."""
    q, k, v, dout = (torch.randn(1, t, h, 128, device=device, dtype=torch.bfloat16) for _ in range(4))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    return common.peak_memory_mb(lambda: torch.autograd.grad(fn(*leaves, True), leaves, dout), device)


def _peak_mib_in_fresh_process(name: str, t: int, h: int) -> float:
    """memory_rows' measurement of impl `name` at length t in a new process (after its own T = 256
    warm-up, as memory_rows does): nothing an earlier row left behind sits in its baseline."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--memory-one", f"{name},{t}", "--heads", str(h)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return float(out.stdout.strip().splitlines()[-1])


def _memory_one(spec: str, h: int) -> int:
    name, t = spec.rsplit(",", 1)
    fn = impls_for("cpu")[name]
    peak_mib(fn, 256, h, "cpu")  # (memory_rows' warm-up)
    print(peak_mib(fn, int(t), h, "cpu"))
    return 0


def paged_rows(h: int, quick: bool, page: int = 16) -> list[dict]:
    """Decode over a paged KV cache (CPU): B sequences of ragged lengths whose blocks of `page` tokens
    (vLLM's default 16) lie shuffled in one pool. Ours reads the blocks where they are
    (flash_attn_with_kvcache's block_table); the peer gathers each sequence's blocks into a
    contiguous cache (torch indexing) and runs SDPA with a padding mask, what torch offers without a
    paged kernel; ours on the same caches contiguous shows what the paging costs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for d in (64, 128):
            for b, t in ((4, 2048),) if quick else ((1, 4096), (4, 2048), (16, 512)):
                hk = h // 4  # GQA, as the models served this way
                lengths = [t - (t // 4) * (i % 4) for i in range(b)]  # ragged: t, 3t/4, t/2, t/4, ...
                per_seq = t // page
                pool = torch.randn(b * per_seq, page, hk, d, dtype=dtype)
                v_pool = torch.randn_like(pool)
                table = torch.randperm(b * per_seq, generator=gen).view(b, per_seq).to(torch.int32)
                k_cont, v_cont = pool[table.long()].flatten(1, 2), v_pool[table.long()].flatten(1, 2)  # (B, t, hk, d)
                q = torch.randn(b, 1, h, d, dtype=dtype)
                seqlens = torch.tensor(lengths, dtype=torch.int32)
                mask = torch.arange(t)[None, :] < seqlens[:, None]  # (B, t)

                def gather_sdpa():
                    k, v = pool[table.long()].flatten(1, 2), v_pool[table.long()].flatten(1, 2)
                    with sdpa_kernel([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]):
                        out = F.scaled_dot_product_attention(
                            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :],
                            enable_gqa=True)
                    return out.transpose(1, 2)

                impls = {"pyllm paged": lambda: pyllm.flash_attn_with_kvcache(q, pool, v_pool, seqlens,
                                                                               block_table=table),
                         "pyllm contiguous": lambda: pyllm.flash_attn_with_kvcache(q, k_cache=k_cont, v_cache=v_cont,
                                                                                    cache_seqlens=seqlens),
                         "torch gather + sdpa": gather_sdpa}
                with torch.no_grad():
                    check_against_peer(impls, ["pyllm paged", "pyllm contiguous"], lambda fn: fn(), dtype,
                                       f"paged decode B {b} T {t} D {d} {dtype}")
                timed = {}
                for name, fn in impls.items():
                    def step(fn=fn):
                        with torch.no_grad():
                            return fn()
                    ms = common.median_ms(step, "cpu", warmup=3, repeat=20)
                    timed[name] = ms
                    rows.append({"dtype": str(dtype).removeprefix("torch."), "B": b, "T": t, "D": d, "causal": False,
                                 "mode": f"decode paged {page}", "impl": name, "ms": round(ms, 3),
                                 "note": f"Hkv {hk}, lengths {lengths[0]}..{lengths[-1]}", **common.spread(ms)})
                for row in rows[-3:-1]:
                    row["vs gather+sdpa"] = f"{timed['torch gather + sdpa'] / timed[row['impl']]:.2f}x"
    return rows


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dims", default="64,128",
                        help="comma-separated head dims of the prefill and decode rows (e.g. 80: the kernels zero-padded "
                             "to the next of 32, 64, 96, 128, 256)")
    parser.add_argument("--decode-only", action="store_true", help="only the decode (KV cache) rows")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory rows")
    parser.add_argument("--softcap", type=float, default=0.0,
                        help="decode rows with capped scores (Gemma 2's, e.g. 50), against the capped eager computation")
    parser.add_argument("--sinks", action="store_true",
                        help="prefill rows with attention sinks (gpt-oss's): ours vs transformers' eager form")
    parser.add_argument("--alibi", action="store_true",
                        help="prefill rows with ALiBi (BLOOM's, MPT's): ours vs SDPA with the bias as a float mask")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="prefill rows with dropout on the probabilities (e.g. 0.1): ours vs SDPA's dropout_p")
    parser.add_argument("--paged", action="store_true",
                        help="only decode over a paged KV cache (CPU): ours vs gathering the blocks for SDPA")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the Python cost per flash_attn_with_kvcache call (CPU, tiny cache)")
    parser.add_argument("--memory-one", help=argparse.SUPPRESS)  # IMPL,T: one memory row, in a fresh process
    args = parser.parse_args()
    device, h = args.device, args.heads
    if args.memory_one:
        return _memory_one(args.memory_one, h)
    impls = impls_for(device)
    print(f"# attention on {common.device_description(device)}, H={h}, (B, T, H, D) layout")
    if args.overhead_only:
        rows = overhead_rows(h)
        common.print_table(rows, ["dtype", "B", "T", "D", "mode", "impl", "call us", "kernel us", "overhead us"])
        common.write_json(args.json, "attention", "cpu", rows, {"heads": h})
        return 0
    if args.paged:
        rows = paged_rows(h, args.quick)
        common.print_table(rows, ["dtype", "B", "T", "D", "mode", "impl", "ms", "vs gather+sdpa", "note"])
        common.write_json(args.json, "attention", "cpu", rows, {"heads": h, "paged": True})
        return 0
    rows = []
    only = args.decode_only or args.memory_only
    ratio = "vs sdpa"
    if args.sinks:  # the peer is the eager form (SDPA takes no sinks); ours without sinks shows their cost
        impls, ratio, only = {"pyllm sinks": ours_with_sinks, "pyllm": ours, "eager sinks": eager_with_sinks}, "vs eager", False
    if args.alibi:  # the peer is SDPA with a float mask; ours without the bias shows its cost
        impls, ratio, only = {"pyllm alibi": ours_with_alibi, "pyllm": ours, "sdpa alibi mask": sdpa_with_alibi}, \
            "vs sdpa mask", False
    if args.dropout:  # the peer is SDPA's dropout_p; ours without dropout shows its cost
        impls, ratio, only = {"pyllm dropout": ours_with_dropout(args.dropout), "pyllm": ours,
                              "sdpa dropout": sdpa_with_dropout(args.dropout)}, "vs sdpa dropout", False
    # ours with the peer's feature (all of ours in plain rows); none with dropout, whose masks are random
    checked = [] if args.dropout else list(impls)[:1] if args.sinks or args.alibi else \
        [name for name in impls if name.startswith("pyllm")]
    dims = tuple(int(d) for d in args.head_dims.split(","))
    for b, t, d, dtype, causal in ([] if only else configs(device, args.quick, dims)):
        flops = 4 * b * t * t * h * d * (0.5 if causal else 1.0)
        q, k, v, dout = (torch.randn(b, t, h, d, device=device, dtype=dtype) for _ in range(4))
        repeat = 5 if device == "cpu" or t >= 8192 else 20  # a 16k fwd+bwd call takes tens of ms on the GPU
        with torch.no_grad():
            check_against_peer(impls, checked, lambda fn: fn(q, k, v, causal), dtype,
                               f"prefill B {b} T {t} D {d} {dtype} causal {causal}")
        for mode, work in (("fwd", flops), ("fwd+bwd", 3.5 * flops)):
            base, first, times = None, len(rows), {}
            steps = {}
            for name, fn in impls.items():
                if name == SIMT_BWD and (mode == "fwd" or t > 4096):
                    continue
                if name in (DQ_M128, DKV_M128, ALL_M128, ATOMIC_DQ) and mode == "fwd":  # the forwards' rows
                    continue
                if name == DKV_M128 and d != 64:  # built for D = 64 only: the default tiles' row again
                    continue
                steps[name] = prefill_step(name, fn, q, k, v, dout, causal, mode)
            if device == "cpu":
                # each implementation timed once per round, in turn (a busy spell of the shared machine
                # touches them alike: timed one after the other, 5 calls each, one config's ratio read
                # 1.72x, 8.75x and 2.29x in three runs, 2.00-2.15x interleaved; benchmark audit, 2026-12-06)
                timed = {}
                for name, step in steps.items():
                    try:
                        step()  # (the warm-up; a backend that refuses this config says so here)
                        timed[name] = step
                    except RuntimeError as e:
                        times[name] = e
                seconds = common.interleaved_seconds(timed, repeat, device)
                times.update((name, common.in_ms(seconds[name])) for name in timed)
            else:
                for name, step in steps.items():
                    try:
                        times[name] = common.median_ms(step, device, warmup=3, repeat=repeat)
                    except RuntimeError as e:  # a backend that refuses this config
                        times[name] = e
            for name in steps:
                ms = times[name]
                if isinstance(ms, RuntimeError):
                    rows.append({"dtype": str(dtype).removeprefix("torch."), "B": b, "T": t, "D": d,
                                 "causal": causal, "mode": mode, "impl": name, "ms": "n/a", "note": str(ms)[:60]})
                    del times[name]
                    continue
                base = ms if base is None and not name.startswith("pyllm") else base
                rows.append({"dtype": str(dtype).removeprefix("torch."), "B": b, "T": t, "D": d, "causal": causal,
                             "mode": mode, "impl": name, "ms": round(ms, 4), "TFLOPs": round(work / ms / 1e9, 3),
                             **common.spread(ms)})
            for ours_row in rows[first:]:  # this mode's rows
                if base and ours_row["impl"].startswith("pyllm") and ours_row["impl"] in times:
                    ours_row[ratio] = f"{base / times[ours_row['impl']]:.2f}x"
    prefill_only = args.sinks or args.alibi or args.dropout
    if not args.memory_only and not prefill_only:
        rows += decode_rows(device, h, args.quick, args.softcap, dims)
    if not args.decode_only and not prefill_only:
        rows += memory_rows(device, impls, h, args.quick)
    common.print_table(rows, ["dtype", "B", "T", "D", "causal", "mode", "impl", "ms", "TFLOPs", ratio, "note"])
    common.write_json(args.json, "attention", device, rows, {"heads": h, "softcap": args.softcap, "sinks": args.sinks,
                                                             "alibi": args.alibi, "dropout": args.dropout,
                                                             "head_dims": list(dims)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
