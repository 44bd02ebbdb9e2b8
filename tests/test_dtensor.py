"""The ops on DTensors (tensor and sequence parallelism: torchtitan's and torch's parallelize_module
plans hand a norm, the loss or attention DTensors): each op's sharding rule against the op on the
whole tensors, forward and backward, on two CPU processes (gloo). Without the rules every op
failed with DTensor's "does not have a sharding strategy registered"."""
import os
import sys
import traceback

import pytest
import torch

pytest.importorskip("torch.distributed.tensor")
import torch.distributed as dist  # noqa: E402
from helpers import free_port  # noqa: E402

WORLD = 2


def _cases(mesh):
    """(name, fn of plain or DTensor inputs -> output(s), inputs, their placements, the inputs to
    differentiate, the first output's placement: the layout the op ran in, sharded where the rule
    lets the inputs stay as they are, gathered (Replicate) where it does not; a row loss's sum Partial, each rank's rows' share, or
    Replicate where torch sums at once: 2.6)."""
    import pyllm
    from pyllm.ops.cross_entropy import token_stats
    from torch.distributed.tensor import Partial, Replicate, Shard

    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen)
    B, T, H, Hkv, D, V = 4, 6, 4, 2, 32, 11
    g, u = rand(B, T, 16), rand(B, T, 16)
    x, w = rand(B, T, 16), rand(16) + 1
    q, k, v = rand(B, T, H, D), rand(B, T, Hkv, D), rand(B, T, Hkv, D)
    cos, sin = rand(T, D // 2), rand(T, D // 2)
    cos_rows, sin_rows = rand(B, T, D // 2), rand(B, T, D // 2)
    logits, teacher = rand(B, T, V), rand(B, T, V)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[0, :2] = -100
    slopes = torch.rand(H, dtype=torch.float32, generator=gen)
    cu = torch.tensor([0, 5, 5, 12, 24], dtype=torch.int32)
    vq, vk = rand(24, H, D), rand(24, Hkv, D)
    S, R, P = Shard, Replicate, Partial
    return [
        ("swiglu rows", pyllm.swiglu, (g, u), (S(0), S(0)), (0, 1), S(0)),
        ("swiglu features", pyllm.swiglu, (g, u), (S(2), S(2)), (0, 1), S(2)),
        ("swiglu mixed", pyllm.swiglu, (g, u), (S(1), R()), (0, 1), S(1)),
        ("geglu", pyllm.geglu, (g, u), (S(1), S(1)), (0, 1), S(1)),
        ("swiglu_packed", pyllm.swiglu_packed, (g,), (S(1),), (0,), S(1)),
        ("swiglu_packed on the packed dim", pyllm.swiglu_packed, (g,), (S(2),), (0,), R()),
        ("rms_norm sequence parallel", pyllm.rms_norm, (x, w), (S(1), R()), (0, 1), S(1)),
        ("rms_norm batch", pyllm.rms_norm, (x, w), (S(0), R()), (0, 1), S(0)),
        ("rms_norm without weight", lambda a: pyllm.rms_norm(a, None), (x,), (S(1),), (0,), S(1)),
        ("rms_norm on its features", pyllm.rms_norm, (x, w), (S(2), R()), (0, 1), R()),
        ("rms_norm on its features, another eps", lambda a, b: pyllm.rms_norm(a, b, eps=0.5), (x, w), (S(2), R()),
         (0, 1), R()),
        ("rope heads", lambda a, c, s_: pyllm.rope(a, c, s_), (q, cos, sin), (S(2), R(), R()), (0,), S(2)),
        ("rope sequence", lambda a, c, s_: pyllm.rope(a, c, s_), (q, cos, sin), (S(1), S(0), S(0)), (0,), S(1)),
        ("rope batch, per-row angles", lambda a, c, s_: pyllm.rope(a, c, s_), (q, cos_rows, sin_rows),
         (S(0), S(0), S(0)), (0,), S(0)),
        ("rope sequence, angles whole", lambda a, c, s_: pyllm.rope(a, c, s_), (q, cos, sin), (S(1), R(), R()), (0,), S(1)),
        ("flash_attn heads (GQA)", lambda a, b, c: pyllm.flash_attn(a, b, c, causal=True, return_lse=True),
         (q, k, v), (S(2), S(2), S(2)), (0, 1, 2), S(2)),
        ("flash_attn batch", lambda a, b, c: pyllm.flash_attn(a, b, c, window=(3, 0)), (q, k, v), (S(0),) * 3, (0, 1, 2), S(0)),
        ("flash_attn alibi heads", lambda a, b, c: pyllm.flash_attn(a, b, c, causal=True, alibi_slopes=slopes),
         (q, k, v), (S(2),) * 3, (0, 1, 2), S(2)),
        # dropout: gathered (a shard's kernel would count its heads from 0: ranks drawing one seed would drop
        # the same elements of different heads); the mask is the whole call's (the seed, drawn here, alike)
        ("flash_attn dropout heads (gathered)", lambda a, b, c: (torch.manual_seed(7), pyllm.flash_attn(
            a, b, c, causal=True, dropout_p=0.3))[1], (q, k, v), (S(2),) * 3, (0, 1, 2), R()),
        ("flash_attn sequence (gathered)", lambda a, b, c: pyllm.flash_attn(a, b, c, causal=True), (q, k, v),
         (S(1),) * 3, (0, 1, 2), R()),
        ("flash_attn varlen heads", lambda a, b, c: pyllm.flash_attn(a, b, c, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                                      max_seqlen_q=12, max_seqlen_k=12, causal=True),
         (vq, vk, vk), (S(1),) * 3, (0, 1, 2), S(1)),
        ("cross_entropy rows", lambda a, t: pyllm.cross_entropy(a, t, label_smoothing=0.1, z_loss=1e-3),
         (logits, targets), (S(0), S(0)), (0,), (P(), R())),
        ("cross_entropy none", lambda a, t: pyllm.cross_entropy(a, t, reduction="none"), (logits, targets),
         (S(0), S(0)), (0,), S(0)),
        ("cross_entropy vocab parallel (gathered)", lambda a, t: pyllm.cross_entropy(a, t), (logits, targets),
         (S(2), R()), (0,), R()),
        ("generalized_jsd", lambda a, b: pyllm.generalized_jsd(a, b, beta=0.3), (logits, teacher), (S(0), S(0)), (0,), (P(), R())),
        # (no gradient: a metric)
        ("token_stats rows", lambda a, t: tuple(token_stats(a, t, softcap=5.0)), (logits, targets), (S(0), S(0)), (),
         S(0)),
    ]


def _worker(rank: int, port: int, failures) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    for name, fn, inputs, placements, wanted, placement in _cases(mesh):
        try:
            plain = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
            want = fn(*plain)
            want = want if isinstance(want, tuple) else (want,)
            grads_out = [torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(i))
                         for i, o in enumerate(want) if o.is_floating_point()]
            want_grads = torch.autograd.grad(want, [plain[i] for i in wanted], grads_out) if wanted else ()
            dist_in = [distribute_tensor(t, mesh, [p]).requires_grad_(i in wanted)
                       for i, (t, p) in enumerate(zip(inputs, placements))]
            got = fn(*dist_in)
            got = got if isinstance(got, tuple) else (got,)
            assert all(isinstance(o, DTensor) for o in got), name
            assert got[0].placements[0] in (placement if isinstance(placement, tuple) else (placement,)), \
                (name, got[0].placements)
            got_grads = torch.autograd.grad(
                got, [dist_in[i] for i in wanted],
                [distribute_tensor(gr, mesh, o.placements) for gr, o in zip(grads_out, got)]) if wanted else ()
            for i, (a, b) in enumerate(zip([*got, *got_grads], [*want, *want_grads])):
                what = f"output {i}" if i < len(got) else f"gradient {i - len(got)}"
                torch.testing.assert_close(a.full_tensor(), b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")
        except Exception:
            failures.append(f"rank {rank}, {name}:\n{traceback.format_exc()}")
    try:  # a module under torch's own plan: a plain input is each rank's share of the positions
        import pyllm.nn as pnn
        from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

        torch.manual_seed(0)
        norm = pnn.RMSNorm(16).double()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        whole = pnn.RMSNorm(16).double()
        whole.load_state_dict(norm.state_dict())
        parallelize_module(norm, mesh, SequenceParallel())
        x = torch.randn(2, 8, 16, dtype=torch.float64)
        y = norm(x[:, 4 * rank:4 * (rank + 1)])
        y.full_tensor().square().sum().backward()
        whole(x).square().sum().backward()
        torch.testing.assert_close(y.full_tensor(), whole(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(norm.weight.grad.full_tensor(), whole.weight.grad, rtol=1e-12, atol=1e-12)
    except Exception:
        failures.append(f"rank {rank}, SequenceParallel RMSNorm:\n{traceback.format_exc()}")
    dist.barrier()  # no rank tears gloo down while another is still in a collective


def _run(rank: int, port: int, out_dir: str) -> None:
    from pyllm.train import end_process

    failures: list = []
    _worker(rank, port, failures)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(failures))
    # past gloo's abort at interpreter exit (end_process's docstring): a rank aborted there after
    # every case had passed (CI, 2026-12-04; here 1 of 24 runs, then the 4th)
    end_process(0)


@pytest.mark.skipif(sys.platform == "win32" or not dist.is_available(), reason="gloo on Linux / macOS")
def test_ops_on_dtensors_match_the_whole_tensors(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_run, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    failures = "\n".join((tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)).strip()
    assert not failures, failures


def test_cases_are_sharded_for_real():
    # (a guard on the test itself: every case's placements name a Shard, or it would test nothing)
    from torch.distributed.tensor import Shard

    assert all(any(isinstance(p, Shard) for p in case[3]) for case in _cases(None))


def test_rules_reach_dtensor_as_it_is_imported():
    # Not at `import pyllm` (DTensor's modules cost ~0.4 s to import) but as DTensor is imported, so
    # that a compiled first call (which runs no Python check of ours) finds them too.
    import subprocess

    probe = ("import sys, pyllm, pyllm.ops._util as u; "
             "assert 'torch.distributed.tensor' not in sys.modules and not u._sharding_registered; "
             "import torch.distributed.tensor; assert u._sharding_registered; print('ok')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
