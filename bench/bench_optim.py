"""Optimizer step, pyllm.optim.AdamW vs torch.optim.AdamW (foreach=True, foreach=False, fused=True),
(vs apex FusedAdam on the GPU when installed), one process, same sizes, side by side.

Params: --params in total (default 50M on the CPU, 200M on a GPU), as tensors of --tensor-size (default 1M) elements.
Rows:
  fp32            fp32 params, plain AdamW step.
  bf16+master     bf16 params with fp32 master weights. Torch's equivalent keeps fp32 params as the
                  masters, steps them, and copies them into the bf16 model params (_foreach_copy_).
  bf16+master+amp the same with the whole mixed-precision step: grads carry a loss scale, are
                  unscaled, inf-checked and clipped to a global norm. Torch: GradScaler-style
                  _amp_foreach_non_finite_check_and_unscale_ + clip_grad_norm_ + AdamW + copy.
                  Ours: one step(grad_scaler=, max_grad_norm=) call.
GB/s counts the minimum bytes per param for every implementation alike: 28 B (grad read; master or
fp32 param, m, v read and written; the bf16 params' 2 B grad + 2 B write are the same 4 B as an fp32
grad) plus, for the amp row, the norm pass's grad read (2 B). "vs copy" is that over the measured
copy bandwidth, for scale (an in-place update can pass 100%). Speedup is against torch foreach=True
(torch's default on CUDA; on the CPU torch.optim.AdamW() runs the for-loop row). Every
implementation starts from the same params and grads; before timing, ours and torch foreach's
weights after one step must match (the fp32 weights of record within 2% of lr, the bf16 params
within bf16's tolerance).
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pyllm.optim import AdamW, DynamicLossScaler  # noqa: E402

HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# torch's unscale and clip rewrite the grads in place, so over the timed repeats a real scale and
# an active clip would shrink them into denormals (slow on a CPU) for torch alone. Scale 1 and a
# norm bound above the grads' norm (~7 at 50M params) leave the grads as they are while every
# implementation still does the multiply, the inf check and the norm.
LOSS_SCALE = 1.0
MAX_NORM = 1e4


def make_params(sizes, dtype, device):
    torch.manual_seed(0)  # the same start for every implementation: the step-one check compares them
    params = [torch.nn.Parameter(torch.randn(n, device=device).to(dtype)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def torch_impl(kind: str, sizes, mode: str, device: str):
    """(step, weights) for torch AdamW (kind: foreach / for-loop / fused) in `mode`: weights() gives
    the fp32 weights of record and, with bf16 params, those params."""
    flags = {"foreach": dict(foreach=True), "for-loop": dict(foreach=False), "fused": dict(fused=True)}[kind]
    if mode == "fp32":
        params = make_params(sizes, torch.float32, device)
        opt = torch.optim.AdamW(params, **HYPER, **flags)
        return opt.step, lambda: (params, [])
    model = make_params(sizes, torch.bfloat16, device)  # the bf16 model, whose grads arrive
    masters = [torch.nn.Parameter(p.detach().float()) for p in model]
    for m in masters:
        m.grad = torch.empty_like(m)
    master_grads = [m.grad for m in masters]
    opt = torch.optim.AdamW(masters, **HYPER, **flags)
    scale = torch.full((), LOSS_SCALE, device=device)
    growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
    found_inf = torch.zeros((), device=device)

    def step():
        grads = [p.grad for p in model]
        if mode == "bf16+master+amp":
            found_inf.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scale.double().reciprocal().float())
            torch.nn.utils.clip_grad_norm_(model, MAX_NORM, foreach=True)
        torch._foreach_copy_(master_grads, grads)  # torch's AdamW wants grads in the params' dtype
        opt.step()
        torch._foreach_copy_([p.data for p in model], [m.data for m in masters])
        if mode == "bf16+master+amp":  # GradScaler.update's growth / backoff
            torch._amp_update_scale_(scale, growth_tracker, found_inf, 2.0, 0.5, 2000)

    return step, lambda: (masters, model)


def ours_impl(sizes, mode: str, device: str):
    if mode == "fp32":
        params = make_params(sizes, torch.float32, device)
        opt = AdamW(params, **HYPER)
        return opt.step, lambda: (params, [])
    params = make_params(sizes, torch.bfloat16, device)
    opt = AdamW(params, **HYPER)
    weights = lambda: ([opt.state[p]["master"] for p in params], params)  # noqa: E731
    if mode == "bf16+master":
        return opt.step, weights
    scaler = DynamicLossScaler(init_scale=LOSS_SCALE)

    def step():  # a scaler is updated once per step (step() refuses a second step before update())
        opt.step(grad_scaler=scaler, max_grad_norm=MAX_NORM)
        scaler.update()
    return step, weights


def apex_impl(sizes, mode: str, device: str):
    if device != "cuda" or mode != "fp32":
        return None
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        print("# skipped: apex not installed (its FusedAdam row)")
        return None
    params = make_params(sizes, torch.float32, device)
    return FusedAdam(params, adam_w_mode=True, **HYPER).step, lambda: (params, [])


def after_one_step(make) -> tuple[list, list]:
    """Copies of an implementation's weights (weights of record, bf16 params) after one step."""
    step, weights = make()
    with torch.no_grad():
        step()
    return tuple([w.detach().clone() for w in ws] for ws in weights())


def check_step(ours, theirs, mode: str) -> None:
    """Ours against torch foreach after one step from the same start. The step moves a weight by
    about lr: a tolerance on the weights themselves (1e-4 of ~1) would pass a step that did nothing,
    so the fp32 weights must agree within 2% of lr (a few ulps of |w| < 8); bf16 params round them."""
    record, params = after_one_step(ours)
    peer_record, peer_params = after_one_step(theirs)
    common.check_close(record, peer_record, f"{mode}: weights after one step, pyllm vs torch foreach",
                       rtol=0.0, atol=HYPER["lr"] * 2e-2)
    if params:
        common.check_close(params, peer_params, f"{mode}: bf16 params after one step, pyllm vs torch foreach")
    gc.collect()


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--params", type=float, default=None,
                        help="total number of params (default 50M on cpu, 200M on cuda, 10M with --quick)")
    parser.add_argument("--tensor-size", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=None, help="timed steps per row (default 7, 3 with --quick)")
    args = parser.parse_args()
    device = args.device
    total = int(args.params or (10e6 if args.quick else 200e6 if device == "cuda" else 50e6))
    repeat = args.repeat or (3 if args.quick else 7)
    sizes = [args.tensor_size] * (total // args.tensor_size)
    if total % args.tensor_size:
        sizes.append(total % args.tensor_size)
    n = sum(sizes)

    copy_gbs = common.copy_bandwidth_gbs(device)
    print(f"# optimizer step on {common.device_description(device)}: {n / 1e6:.0f}M params in {len(sizes)} "
          f"tensors, copy bandwidth {copy_gbs:.1f} GB/s")
    kinds = ["foreach", "for-loop", "fused"]
    modes = ["fp32", "bf16+master"] if args.quick else ["fp32", "bf16+master", "bf16+master+amp"]
    rows = []
    for mode in modes:
        impls = {"pyllm": lambda: ours_impl(sizes, mode, device)}
        for kind in kinds:
            impls[f"torch {kind}"] = lambda kind=kind: torch_impl(kind, sizes, mode, device)
        impls["apex FusedAdam"] = lambda: apex_impl(sizes, mode, device)
        bytes_per_param = 28 + (2 if mode == "bf16+master+amp" else 0)
        check_step(impls["pyllm"], impls["torch foreach"], mode)
        mode_rows, times = [], {}
        for name, make in impls.items():
            try:
                made = make()
            except (RuntimeError, NotImplementedError) as e:  # e.g. fused not supported here
                print(f"# {name} {mode}: skipped ({str(e).splitlines()[0][:80]})")
                continue
            if made is None:
                continue
            with torch.no_grad():
                ms = times[name] = common.median_ms(made[0], device, warmup=2, repeat=repeat)
            gbs = bytes_per_param * n / ms / 1e6
            mode_rows.append({"mode": mode, "impl": name, "ms": round(ms, 2), "GB/s": round(gbs, 1),
                              "of copy": f"{gbs / copy_gbs:.0%}", **common.spread(ms)})
            del made
            gc.collect()
        base = times.get("torch foreach")  # unrounded: 0.01 ms is 5% of a 0.2 ms GPU step
        for r in mode_rows:
            r["vs foreach"] = f"{base / times[r['impl']]:.2f}x" if base else ""
        rows += mode_rows
    common.print_table(rows, ["mode", "impl", "ms", "GB/s", "of copy", "vs foreach"], common.COPY_HEADER)
    print(common.COPY_NOTE)
    common.write_json(args.json, "optim", device, rows, {"params": n, "tensors": len(sizes),
                                                         "copy_GBps": round(copy_gbs, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
