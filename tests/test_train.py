"""The trainer on tiny models and a synthetic token file: loss falls, exact resume, atomic
checkpoints, fp16 overflow skips, divergence stop, DDP on 2 CPU processes."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import pyllm
from pyllm import data
from pyllm import train as trainer
from pyllm.model import LLM, ModelConfig
from pyllm.train import TrainConfig
from helpers import free_port

TINY = dict(n_layers=1, n_heads=2, dim=64, block_size=16)  # head dim 32: flash_attn takes 32..256


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A learnable stream: a short repeating phrase with 10% random tokens mixed in; its last
    token, 32, is recorded as the end of a document (doc_mask cuts after it)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("tokens")
    for name, n in (("train.bin", 20000), ("val.bin", 2000)):
        tokens = np.tile(np.array([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32]), n // 12 + 1)[:n]
        noise = rng.random(n) < 0.1
        tokens[noise] = rng.integers(0, 64, noise.sum())
        data.write_tokens(folder / name, tokens, vocab_size=64, doc_end=32)
    return folder


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """Conversations as prepare_chat writes them: documents of 3-20 tokens (the phrase above from a
    random point), the second half of each marked as the assistant's."""
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("chats")
    phrase = np.array([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32])
    for name, n in (("train.bin", 400), ("val.bin", 40)):
        docs = [np.roll(phrase, -int(rng.integers(12)))[np.arange(int(rng.integers(3, 21))) % 12] for _ in range(n)]
        masks = [(np.arange(len(d)) >= len(d) // 2).astype(np.uint8) for d in docs]
        data.write_documents(folder / name, docs, masks, vocab_size=64)
    return folder


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """Preference pairs as prepare_preferences writes them: a prompt of 2-10 tokens of the phrase
    above (from a random point), then a reply of 2-8 tokens: the phrase going on (chosen) or random
    tokens (rejected), the replies marked; some rejected replies as long as the row."""
    rng = np.random.default_rng(2)
    folder = tmp_path_factory.mktemp("pairs")
    phrase = np.array([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32])
    for name, n in (("train.bin", 200), ("val.bin", 20)):
        docs, masks = [], []
        for i in range(n):
            prompt, reply = int(rng.integers(2, 11)), int(rng.integers(2, 9))
            good = np.roll(phrase, -int(rng.integers(12)))[np.arange(prompt + reply) % 12]
            bad = np.concatenate([good[:prompt], rng.integers(0, 64, 16 if i % 10 == 0 else reply)])
            for doc in (good, bad):
                docs.append(doc)
                masks.append((np.arange(len(doc)) >= prompt).astype(np.uint8))
        data.write_documents(folder / name, docs, masks, vocab_size=64, pairs=np.arange(2 * n).reshape(-1, 2))
    return folder


@pytest.fixture(scope="module")
def uneven_pairs_dir(tmp_path_factory):
    """pairs_dir's kind of pairs whose chosen and rejected replies are of independent lengths (2-8
    tokens each), for LD-DPO's weighting past the shorter one."""
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("uneven_pairs")
    docs, masks = [], []
    for i in range(60):
        prompt = int(rng.integers(2, 7))
        for _ in range(2):
            doc = rng.integers(0, 64, prompt + int(rng.integers(2, 9)))
            doc[:prompt] = np.arange(prompt) + i % 8
            docs.append(doc)
            masks.append((np.arange(len(doc)) >= prompt).astype(np.uint8))
    data.write_documents(folder / "train.bin", docs, masks, vocab_size=64, pairs=np.arange(len(docs)).reshape(-1, 2))
    return folder


def config(data_dir, out, **kw) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out), model=dict(TINY), device="cpu", batch_size=4,
                max_steps=8, warmup_steps=2, lr=1e-2, eval_every=4, eval_batches=2, ckpt_every=4, progress=False)
    if kw.get("init_from_run") or kw.get("init_from_hf"):
        del base["model"]  # (a loaded model keeps its own config: overrides are refused)
    return TrainConfig(**{**base, **kw})


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def grad_norms(out) -> list[float]:
    """Each step's gradient norm before clipping, as logged."""
    return [json.loads(line)["grad_norm"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_loss_falls_and_outputs_written(data_dir, tmp_path):
    summary = trainer.train(config(data_dir, tmp_path, max_steps=40, eval_every=20))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(40))
    assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]]) - 1.0
    assert records[19]["val_loss"] > records[39]["val_loss"] == summary["val_loss"]
    assert records[0]["mfu"] is None  # CPU: no peak to compare with
    for name in ("checkpoint.pt", "model.safetensors", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp"))


def test_keep_checkpoints_keeps_the_last_k_to_resume_from(data_dir, tmp_path):
    # --keep-checkpoints 2: the last two checkpoints as checkpoints/step_N.pt (links to what
    # checkpoint.pt was then); `--resume RUN/checkpoints/step_6.pt` resumes exactly from its step,
    # leaving the kept files as they were (a plain cp over checkpoint.pt, the newest's hard link,
    # had written step 6 into step_7.pt).
    from pyllm import cli

    trainer.train(config(data_dir, tmp_path / "run", max_steps=7, ckpt_every=2, keep_checkpoints=2, eval_every=0))
    kept = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["step_6.pt", "step_7.pt"]
    assert torch.load(kept / "step_6.pt", weights_only=True)["step"] == 6
    assert (kept / "step_7.pt").read_bytes() == (tmp_path / "run" / "checkpoint.pt").read_bytes()
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    straight = losses(tmp_path / "run")
    assert cli.install_kept_checkpoint(kept / "step_6.pt") == str((tmp_path / "run").resolve())
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 6
    trainer.train(config(data_dir, tmp_path / "run", max_steps=7, ckpt_every=2, keep_checkpoints=2, eval_every=0),
                  resume=True)
    assert losses(tmp_path / "run") == straight
    with pytest.raises(ValueError, match="give a run folder, or a checkpoint its --keep-checkpoints kept"):
        cli.install_kept_checkpoint(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 0"):
        config(data_dir, tmp_path / "x", keep_checkpoints=-1).validate()


def test_a_stop_request_checkpoints_the_step_and_resume_is_exact(data_dir, tmp_path, monkeypatch):
    # request_stop (pyllm train's SIGTERM handler) ends the run after the step under way, whose
    # checkpoint it writes whatever ckpt_every says; the resume then goes on as a straight run.
    kw = dict(max_steps=9, ckpt_every=4, eval_every=0)
    trainer.train(config(data_dir, tmp_path / "straight", **kw))
    real_step = trainer.lr_at
    calls = {"n": 0}

    def lr_then_stop(step, cfg):  # asked for during step 5 (steps counted from 0)
        calls["n"] += 1
        if step == 5:
            trainer.request_stop()
        return real_step(step, cfg)

    monkeypatch.setattr(trainer, "lr_at", lr_then_stop)
    with pytest.raises(trainer.TrainingStopped) as stopped:
        trainer.train(config(data_dir, tmp_path / "cut", **kw))
    assert stopped.value.step == 6 and not trainer._stop_requested.is_set()
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 6
    monkeypatch.setattr(trainer, "lr_at", real_step)
    trainer.train(config(data_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")


def test_one_run_at_a_time_in_a_folder_and_a_new_run_replaces_the_old(data_dir, tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    trainer.train(config(data_dir, out, max_steps=4, keep_checkpoints=1, eval_every=0))
    assert (out / "checkpoint.pt").exists() and (out / "checkpoints").is_dir()
    with open(out / ".lock", "a") as held:  # another process's run, as flock sees it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="in use by another `pyllm train`"):
            trainer.train(config(data_dir, out, max_steps=4))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4  # refused before touching anything
    # A new run (no resume) stopped before its first checkpoint leaves no earlier run's to be resumed
    # as if it were its own (its log had been replaced, the old checkpoint kept): set aside, not lost.
    old = (out / "checkpoint.pt").read_bytes()
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half")  # a save SIGKILLed mid-write
    trainer.train(config(data_dir, out, max_steps=8, ckpt_every=4), stop_at=2)
    assert "holds an earlier run's checkpoint; this new run sets it aside as checkpoint.previous.pt" in (
        capsys.readouterr().err)
    assert not (out / "checkpoint.pt").exists() and not (out / "checkpoints").exists()
    assert (out / "checkpoint.previous.pt").read_bytes() == old and list((out / "checkpoints.previous").iterdir())
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]
    assert not (out / ".checkpoint.pt.x1y2.tmp").exists()


def test_run_lock_nests_and_runs_unguarded_where_the_file_system_takes_none(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    with trainer.run_lock(tmp_path):
        with trainer.run_lock(tmp_path):  # (the CLI's, then train()'s: one lock)
            pass
        with open(tmp_path / ".lock", "a") as other:  # another process's attempt, as flock sees it
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    real_flock = fcntl.flock

    def no_locks(fd, op):  # NFS mounted nolock
        if op & fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with trainer.run_lock(tmp_path):
        pass
    assert "file system takes no lock (No locks available)" in capsys.readouterr().err


def test_a_second_sigterm_is_the_same_request_unless_it_comes_later(monkeypatch):
    # SLURM and torchrun each send a worker SIGTERM within milliseconds: one request. A second one
    # ESCALATE_AFTER_S later ends the process (a run stuck in set-up still dies to `kill`).
    import signal

    raised = []
    monkeypatch.setattr(signal, "raise_signal", raised.append)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)
    clock = [100.0]
    monkeypatch.setattr(trainer.time, "monotonic", lambda: clock[0])
    try:
        trainer.request_stop(signal.SIGTERM, None)
        clock[0] += 0.01
        trainer.request_stop(signal.SIGTERM, None)
        assert trainer._stop_requested.is_set() and raised == []
        clock[0] += trainer.ESCALATE_AFTER_S
        trainer.request_stop(signal.SIGTERM, None)
        assert raised == [signal.SIGTERM]
    finally:
        trainer._stop_requested.clear()


def test_kept_checkpoints_past_the_step_are_an_abandoned_branch(tmp_path):
    # After a resume from an older kept checkpoint, the later ones are another branch: they go when the
    # run saves, and the last K are by step (not file times, which a copied run folder changes).
    out = tmp_path
    for step in (10, 20, 30, 40):
        (out / "checkpoint.pt").write_bytes(str(step).encode())
        trainer.keep_checkpoint(out, step, 3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_20.pt", "step_30.pt", "step_40.pt"]
    os.utime(out / "checkpoints" / "step_20.pt", (1, 1))  # (a copy's times: meaningless)
    (out / "checkpoint.pt").write_bytes(b"25")  # resumed from step 20, saved at 25
    trainer.keep_checkpoint(out, 25, 3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_20.pt", "step_25.pt"]


def test_a_failed_checkpoint_write_keeps_the_last_one_and_says_why(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    trainer.save_checkpoint(path, {"step": 1})

    def full_disk(obj, f):
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15104 vs 14998")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"writing .*checkpoint.pt failed .*MiB free there\): the previous checkpoint is kept"):
        trainer.save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=True) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_signals_wait_for_a_held_block():
    # A Ctrl-C (or SIGTERM) during a checkpoint's write arrives once it is whole.
    import os
    import signal

    done = []
    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job
    # starts with SIGINT ignored, which signals_held keeps as it is).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with trainer.signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                done.append(True)
        assert done == [True]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with trainer.signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # ignored before: still ignored, nothing raised
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_checkpoint_format_old_notes_and_newer_refused(data_dir, tmp_path, capsys):
    # Checkpoints carry a format number (an audit resumed earlier pyllm's run folders: two changes of
    # meaning, attention dropout and the WSD decay's first step, went on without a word). A checkpoint
    # without it says what its run now does otherwise; one from a newer pyllm is refused.
    out = tmp_path / "run"
    cfg = config(data_dir, out, max_steps=4, ckpt_every=4, eval_every=0, schedule="wsd", decay_frac=0.3,
                 model={**TINY, "dropout": 0.1})
    trainer.train(cfg)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == trainer.CHECKPOINT_FORMAT == 3
    capsys.readouterr()
    trainer.train(replace(cfg, max_steps=5), resume=True)
    assert "earlier pyllm" not in capsys.readouterr().err  # (a current checkpoint: nothing to say)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["format"]
    torch.save(ckpt, out / "checkpoint.pt")
    trainer.train(replace(cfg, max_steps=7), resume=True)
    err = capsys.readouterr().err
    assert "is from an earlier pyllm" in err and "dropout (0.1) also drops attention probabilities" in err
    assert "the WSD decay starts at step 5, not 4" in err  # 7 - round(2.1) vs int(7 * 0.7)
    assert trainer.changes_since({"model_config": {"dropout": 0.0}}, replace(cfg, schedule="cosine")) == []
    # format 2 (every process drew rank 0's random numbers): said to a run of several processes with dropout
    two = {"format": 2, "model_config": {"dropout": 0.1}}
    assert trainer.changes_since(two, cfg) == [] == trainer.changes_since({**two, "format": 3}, cfg, world_size=2)
    assert "each of the processes draws its own dropout masks" in trainer.changes_since(two, cfg, world_size=2)[0]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["format"] = trainer.CHECKPOINT_FORMAT + 1
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="written by a newer pyllm \\(checkpoint format 4; this one reads up to 3\\): upgrade"):
        trainer.load_checkpoint(out)


def test_resume_refuses_what_is_no_run_checkpoint(tmp_path):
    torch.save({"hello": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="no checkpoint `pyllm train` wrote .*lacks model, optimizer"):
        trainer.load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(RuntimeError, match="corrupt or truncated") as e:
        trainer.load_checkpoint(tmp_path)
    assert "weights_only" not in str(e.value)


def test_run_files_are_whole_and_readable_by_others(tmp_path):
    # model.safetensors gets a new file's usual mode (safetensors had left its private 0600 temp file's);
    # a torn run.json says which file it is.
    from pyllm import cli
    from pyllm.model import save_weights

    cfg = ModelConfig(**TINY, vocab_size=64)
    save_weights(LLM(cfg).state_dict(), cfg, tmp_path / "model.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    cli.write_json(tmp_path / "run.json", {"a": 1})
    assert cli.read_json(tmp_path / "run.json") == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors", "run.json"]
    (tmp_path / "run.json").write_text("")
    with pytest.raises(ValueError, match="run.json is not valid JSON"):
        cli.read_json(tmp_path / "run.json")


@pytest.mark.parametrize("moe", [False, True])
def test_muon_trains_resumes_and_takes_the_blocks_matrices(data_dir, tmp_path, moe):
    # optimizer muon: Muon on every matrix of the blocks (the fused q k v and gate up weights split
    # into their parts, a MoE's experts as a stack), AdamW on the embeddings, norms and output
    # layer; the loss falls as with AdamW at the same lr; resume is exact.
    model = dict(TINY, **(dict(n_experts=4, experts_per_token=2) if moe else {}))
    llm = LLM(trainer.ModelConfig.from_preset("tiny", **model))
    matrices, splits = trainer.muon_params(llm)
    names = {id(p): n for n, p in llm.named_parameters()}
    taken = {names[id(p)]: split for p, split in zip(matrices, splits)}
    D, H, Hkv = llm.config.head_dim, llm.config.n_heads, llm.config.n_kv_heads
    assert taken["blocks.0.attn.qkv.weight"] == [H * D, Hkv * D, Hkv * D]
    assert taken["blocks.0.mlp.gate_up" if moe else "blocks.0.mlp.gate_up.weight"] == [llm.config.mlp_hidden] * 2
    assert all(n.startswith("blocks.") for n in taken) and not any(p.dim() < 2 for p in matrices)
    assert set(taken) == {n for n, p in llm.blocks.named_parameters(prefix="blocks") if p.dim() >= 2}
    kw = dict(model=model, optimizer="muon", max_steps=30, eval_every=30, ckpt_every=10)
    trainer.train(config(data_dir, tmp_path / "muon", **kw))
    trainer.train(config(data_dir, tmp_path / "adamw", **{**kw, "optimizer": "adamw"}))
    muon, adamw = losses(tmp_path / "muon"), losses(tmp_path / "adamw")
    assert np.mean(muon[-5:]) < np.mean(muon[:5]) - 1.0 and muon != adamw
    trainer.train(config(data_dir, tmp_path / "cut", **kw), stop_at=15)
    trainer.train(config(data_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == muon
    for bad in (dict(lora_rank=2), dict(dist_mode="fsdp"), dict(dist_mode="zero1")):
        with pytest.raises(ValueError, match="optimizer muon orthogonalizes each whole matrix"):
            TrainConfig(optimizer="muon", **bad).validate()


@pytest.mark.cuda
def test_muon_on_the_gpu(data_dir, tmp_path):
    # optimizer muon on CUDA (bf16 autocast; Newton-Schulz in bf16 on the device, AdamW's CUDA kernel
    # for the rest): the loss falls as on the CPU and resume is exact.
    kw = dict(device="cuda", optimizer="muon", max_steps=30, eval_every=30, ckpt_every=10)
    trainer.train(config(data_dir, tmp_path / "whole", **kw))
    records = losses(tmp_path / "whole")
    assert np.mean(records[-5:]) < np.mean(records[:5]) - 1.0
    trainer.train(config(data_dir, tmp_path / "cut", **kw), stop_at=15)
    trainer.train(config(data_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == records


@pytest.mark.cuda
def test_loss_falls_on_the_gpu(data_dir, tmp_path):
    # The whole stack on the GPU: bf16 autocast into pyllm's flash attention and SwiGLU kernels,
    # AdamW's fused step on the fp32 masters, evaluation and checkpoints.
    summary = trainer.train(config(data_dir, tmp_path, device="cuda", max_steps=40, eval_every=20))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert summary["precision"] == "bf16" and summary["device"].startswith("cuda")
    assert all(math.isfinite(r["loss"]) for r in records)
    assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]]) - 1.0
    assert records[19]["val_loss"] > records[39]["val_loss"] == summary["val_loss"]


@pytest.mark.parametrize("extra", [dict(), dict(grad_accum=2, schedule="wsd", precision="bf16"), dict(doc_mask=True),
                                   dict(lora_rank=2, lora_targets="q,v,down", lora_dropout=0.2),
                                   dict(fused_loss=True, precision="bf16"),
                                   dict(model=dict(TINY, n_experts=4), grad_accum=2),
                                   # compiled on the CPU: inductor's embedding backward adds with atomics in the
                                   # threads' order (~1e-7 apart) unless train() sets the deterministic mode
                                   dict(compile=True, batch_size=16)])
def test_exact_resume(data_dir, tmp_path, extra):
    trainer.train(config(data_dir, tmp_path / "whole", **extra))
    trainer.train(config(data_dir, tmp_path / "cut", **extra), stop_at=6)  # killed after step 5, ckpt at 4
    assert len(losses(tmp_path / "cut")) == 6
    trainer.train(config(data_dir, tmp_path / "cut", **extra), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # bitwise: floats compared exactly
    a = torch.load(tmp_path / "whole/checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.are_deterministic_algorithms_enabled()  # (train() restores the mode it set)
    # the logged token stats and TRL's num_tokens (the tokens of every step so far) go on alike
    records = {run: [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
               for run in ("whole", "cut")}
    for name in ("entropy", "mean_token_accuracy", "num_tokens", "val_entropy"):
        assert [r.get(name) for r in records["cut"]] == [r.get(name) for r in records["whole"]], name
    assert [r["num_tokens"] for r in records["whole"]] == list(np.cumsum([r["tokens"] for r in records["whole"]]))
    if not extra:  # a checkpoint written before num_tokens was: None from there on, not a count from 0
        ckpt = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=False)
        del ckpt["num_tokens"]
        torch.save(ckpt, tmp_path / "cut/checkpoint.pt")
        trainer.train(config(data_dir, tmp_path / "cut", **dict(extra, max_steps=10)), resume=True)
        assert [json.loads(line)["num_tokens"] for line in (tmp_path / "cut/log.jsonl").read_text().splitlines()][-2:] \
            == [None, None]


def test_doc_mask_changes_what_is_seen(data_dir, tmp_path):
    # Learned positions see the cut (RoPE alone is blind to where positions start), and attention
    # does: the losses differ from the plain run's from the first step, and both fall.
    model = dict(TINY, positions="learned")
    trainer.train(config(data_dir, tmp_path / "plain", model=model, max_steps=30))
    trainer.train(config(data_dir, tmp_path / "masked", model=model, max_steps=30, doc_mask=True))
    plain, masked = losses(tmp_path / "plain"), losses(tmp_path / "masked")
    assert plain[0] != masked[0] and masked[-1] < masked[0] - 1.0


def test_activation_checkpointing_trains_the_same(data_dir, tmp_path):
    trainer.train(config(data_dir, tmp_path / "plain", model=dict(TINY, dropout=0.1)))
    trainer.train(config(data_dir, tmp_path / "ac", model=dict(TINY, dropout=0.1), activation_checkpointing=True))
    assert losses(tmp_path / "ac") == losses(tmp_path / "plain")  # bitwise, dropout masks included


def test_checkpoint_write_is_atomic(data_dir, tmp_path, monkeypatch):
    trainer.train(config(data_dir, tmp_path, max_steps=4))
    good = (tmp_path / "checkpoint.pt").read_bytes()

    def torn_save(obj, f):  # a kill in the middle of writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config(data_dir, tmp_path, max_steps=8), resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert trainer.load_checkpoint(tmp_path)["step"] == 4


def test_keep_best_keeps_the_weights_of_the_lowest_val_loss(data_dir, tmp_path, monkeypatch):
    # nanoGPT's always_save_checkpoint=False: a run that overfits keeps its best weights. The val
    # losses are scripted (evaluations at steps 2, 4, 6, 8): a NaN first never counts, the lowest
    # comes at step 4, and a resume from step 6 (after the best) knows the best it already has.
    from safetensors.torch import load_file

    def scripted(values):
        it = iter(values)
        monkeypatch.setattr(trainer, "evaluate", lambda *args: next(it))

    kw = dict(eval_every=2, ckpt_every=2, keep_best=True)
    scripted([math.nan, 2.0, 3.0, 2.5])
    trainer.train(config(data_dir, tmp_path / "best", **kw))
    scripted([math.nan, 2.0])
    trainer.train(config(data_dir, tmp_path / "at4", **kw), stop_at=4)  # its checkpoint: the weights after step 4
    at4 = torch.load(tmp_path / "at4/checkpoint.pt", weights_only=True)
    assert at4["best_val_loss"] == 2.0
    kept = load_file(tmp_path / "best/model.safetensors")
    assert all(torch.equal(kept[k], at4["model"][k]) for k in kept)
    last = torch.load(tmp_path / "best/checkpoint.pt", weights_only=True)["model"]  # the latest, to resume from
    assert not all(torch.equal(kept[k], last[k]) for k in kept)

    scripted([math.nan, 2.0, 3.0])
    trainer.train(config(data_dir, tmp_path / "cut", **kw), stop_at=6)
    scripted([2.5])
    trainer.train(config(data_dir, tmp_path / "cut", **kw), resume=True)
    resumed = load_file(tmp_path / "cut/model.safetensors")
    assert all(torch.equal(resumed[k], kept[k]) for k in kept)
    assert not list((tmp_path / "cut").glob("*.tmp"))

    with pytest.raises(ValueError, match="keep_best"):
        config(data_dir, tmp_path / "grpo", keep_best=True, grpo_reward="len").validate()


def test_corrupt_or_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        trainer.load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        trainer.load_checkpoint(tmp_path)


def test_fp16_overflow_steps_are_skipped(data_dir, tmp_path):
    # 2^40 overflows fp16 gradients: the scaler halves down to a workable scale, skipping each step.
    summary = trainer.train(config(data_dir, tmp_path, precision="fp16", init_loss_scale=2.0 ** 40, max_steps=30))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert summary["skipped_steps"] == sum(r["skipped"] for r in records) >= 10
    assert records[0]["skipped"] and records[0]["loss_scale"] == 2.0 ** 39
    assert not records[-1]["skipped"]
    assert records[-1]["loss"] < records[0]["loss"]


def test_loss_scaler_is_pyllms_for_fp16_only():
    # The scaler's own growth/backoff is tested in test_optim.py.
    from pyllm.optim import DynamicLossScaler

    cfg = trainer.TrainConfig()
    assert isinstance(trainer.make_loss_scaler("fp16", cfg), DynamicLossScaler)
    assert trainer.make_loss_scaler("bf16", cfg) is None and trainer.make_loss_scaler("fp32", cfg) is None


def test_optimizer_on_a_gpu_without_pyllms_cuda_kernels(monkeypatch):
    # pip install without nvcc builds the CPU kernels only: a run on the GPU then takes torch's
    # AdamW (as the model takes torch's attention and SwiGLU) instead of failing at the first step.
    from pyllm.optim import AdamW

    model = torch.nn.Linear(4, 4)
    cfg = trainer.TrainConfig()
    gpu, cpu = trainer.DistInfo(device=torch.device("cuda")), trainer.DistInfo(device=torch.device("cpu"))
    monkeypatch.setattr(trainer._util, "HAS_CUDA_KERNELS", False)
    assert type(trainer.make_optimizer(model, cfg, gpu)) is trainer.TorchAdamW
    assert type(trainer.make_optimizer(model, cfg, cpu)) is AdamW
    zero1 = trainer.TrainConfig(dist_mode="zero1")
    with pytest.raises(ValueError, match="zero1 .* without CUDA kernels"):
        trainer.make_optimizer(model, zero1, trainer.DistInfo(rank=0, world_size=2, device=torch.device("cuda")))
    monkeypatch.setattr(trainer._util, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(trainer._util, "gpu_runs_kernels", lambda index=None: True)  # (sm_80+, without a GPU here)
    assert type(trainer.make_optimizer(model, cfg, gpu)) is AdamW
    monkeypatch.setattr(trainer._util, "gpu_runs_kernels", lambda index=None: False)  # a V100
    assert type(trainer.make_optimizer(model, cfg, gpu)) is trainer.TorchAdamW
    with pytest.raises(ValueError, match="zero1 .* older than pyllm's CUDA kernels need"):
        trainer.make_optimizer(model, zero1, trainer.DistInfo(rank=0, world_size=2, device=torch.device("cuda")))


def test_persistent_nan_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real_forward = trainer.LLM.forward
    calls = {"n": 0}

    def poisoned_forward(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 5:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(trainer.LLM, "forward", poisoned_forward)
    with pytest.raises(trainer.TrainingDiverged, match=r"nan for 3 steps in a row \(steps 5..7\).*last good checkpoint"):
        trainer.train(config(data_dir, tmp_path, max_steps=20))
    ckpt = trainer.load_checkpoint(tmp_path)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_resume_goes_on_counting_non_finite_losses(data_dir, tmp_path, monkeypatch):
    # the count of non-finite losses in a row is in the checkpoint (an audit of exact resume,
    # 2026-12-05: a resume had given a run two steps from its nan_patience the whole patience again)
    real_forward = trainer.LLM.forward
    poisoned = set()

    def poisoned_forward(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training:
            poisoned_forward.n += 1
            if poisoned_forward.n in poisoned:
                loss = loss * float("nan")
        return logits, loss

    poisoned_forward.n = 0
    poisoned.update({5, 6})  # steps 5 and 6 (indices 4 and 5): two in a row, then the run ends
    monkeypatch.setattr(trainer.LLM, "forward", poisoned_forward)
    trainer.train(config(data_dir, tmp_path, max_steps=6, ckpt_every=1))
    assert trainer.load_checkpoint(tmp_path)["bad_in_a_row"] == 2
    poisoned.update({7})  # one more: the third in a row, as in the run that had gone on
    with pytest.raises(trainer.TrainingDiverged, match=r"nan for 3 steps in a row \(steps 4..6\)"):
        trainer.train(config(data_dir, tmp_path, max_steps=10, ckpt_every=1), resume=True)


def test_short_runs_are_told_when_warmup_swallows_them(data_dir, tmp_path, capsys):
    # nanoGPT's fine-tune recipe (20 steps, a constant lr) with the default 30 warmup steps never
    # reaches its lr: said on stderr, not silently
    trainer.train(config(data_dir, tmp_path, max_steps=3, warmup_steps=30, schedule="constant"))
    assert "warmup_steps 30 >= max_steps 3: the learning rate never reaches lr 0.01" in capsys.readouterr().err
    # as long as the run: lr (s + 1) / W reaches the peak at its last step (said as it is)
    trainer.train(config(data_dir, tmp_path / "equal", max_steps=3, warmup_steps=3, eval_every=0))
    assert "warmup_steps 3 >= max_steps 3: the learning rate reaches lr 0.01 only at its last step" \
        in capsys.readouterr().err
    assert json.loads((tmp_path / "equal/log.jsonl").read_text().splitlines()[-1])["lr"] == 0.01


def test_schedules():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert trainer.lr_at(0, cfg) == pytest.approx(0.1)
    assert trainer.lr_at(10, cfg) == pytest.approx(1.0)
    assert trainer.lr_at(60, cfg) == pytest.approx(0.55)
    assert trainer.lr_at(110, cfg) == pytest.approx(0.1)
    cfg.schedule, cfg.decay_frac = "wsd", 0.1
    assert trainer.lr_at(98, cfg) == 1.0 and trainer.lr_at(109, cfg) == pytest.approx(0.1)
    cfg.max_steps, cfg.decay_frac = 100, 0.8  # the decay's 80 steps start at 20 (int(100 * 0.2) was 19)
    assert trainer.lr_at(19, cfg) == 1.0 and trainer.lr_at(20, cfg) < 1.0 and trainer.lr_at(99, cfg) == pytest.approx(0.1)


def test_run_log_drops_a_torn_line(tmp_path, capsys):
    # a line cut short (a full disk, a power cut) is the run's own record: dropped on resume, not fatal
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0, "loss": 3.0}\n{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    trainer.RunLog(path, 2, True)
    assert path.read_text() == '{"step": 0, "loss": 3.0}\n{"step": 1, "loss": 2.5}\n'
    assert "log.jsonl:3 is not a whole JSON line; dropped" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="fp8"), "precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    (dict(dist_mode="zero3"), "dist_mode must be one of ddp, fsdp, zero1"),
    (dict(max_steps="ten"), "max_steps must be of type int, got 'ten'"),
    (dict(batch_size=2.0), "batch_size must be of type int"),
    (dict(compile="yes"), "compile must be of type bool"),
    (dict(lr="3e-3"), "lr must be of type float, got '3e-3' .YAML 1.1 reads"),
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(beta2=1.0), r"beta2 must be in \[0, 1\)"),
    (dict(decay_frac=0.0), r"decay_frac must be in \(0, 1\]"),
    (dict(min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]"),
    (dict(init_loss_scale=float("inf")), "init_loss_scale must be > 0 and finite"),
    # nanoGPT's names: at validate, pointed to ours (train() had failed only once it built the model)
    (dict(model=dict(n_layer=2, n_embd=64)), r"unknown ModelConfig field\(s\) n_embd, n_layer \(n_embd is dim here"),
    # a loaded model keeps its own config: overrides had been ignored silently
    (dict(init_from_hf="some/model", model=dict(n_layers=2, dropout=0.1)),
     r"TrainConfig.model \['n_layers'\]: a model from.*dropout and router_aux_loss_coef, may be set"),
])
def test_bad_option_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs).validate()


def test_a_fine_tune_sets_what_it_trains_with(data_dir, tmp_path, capsys):
    # dropout and router_aux_loss_coef change how a model trains, not its weights: a fine-tune sets
    # them over its source's (they had been refused as a change of the weights' shape). A Hugging Face
    # source whose config.json asks for dropout (GPT-2's 0.1) is said to train without it.
    transformers = pytest.importorskip("transformers")
    moe = dict(TINY, n_experts=4, router_aux_loss_coef=0.01)
    trainer.train(config(data_dir, tmp_path / "base", model=moe, max_steps=2, eval_every=0))
    kw = dict(init_from_run=str(tmp_path / "base"), max_steps=2, eval_every=0)
    trainer.train(config(data_dir, tmp_path / "same", **kw))
    trainer.train(config(data_dir, tmp_path / "tuned", **kw, model=dict(dropout=0.2, router_aux_loss_coef=0.0)))
    same, tuned = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model_config"] for d in ("same", "tuned"))
    assert (same["dropout"], same["router_aux_loss_coef"]) == (0.0, 0.01)
    assert (tuned["dropout"], tuned["router_aux_loss_coef"]) == (0.2, 0.0)
    records = [json.loads(line) for line in (tmp_path / "same/log.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in records)
    records = [json.loads(line) for line in (tmp_path / "tuned/log.jsonl").read_text().splitlines()]
    assert all("aux_loss" not in r for r in records)
    # the model dropped: at the same weights and batch, the first loss differs from the source's
    assert losses(tmp_path / "tuned")[0] != losses(tmp_path / "same")[0]
    model = LLM.load(tmp_path / "tuned/model.safetensors")
    assert model.dropout.p == model.blocks[0].dropout.p == model.blocks[0].attn.attn_dropout == 0.2

    hf = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1,
                                                         n_head=2)).save_pretrained(hf)
    capsys.readouterr()
    trainer.train(config(data_dir, tmp_path / "hf", init_from_hf=str(hf), max_steps=1, eval_every=0))
    assert "asks for dropout (embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)" in capsys.readouterr().err
    trainer.train(config(data_dir, tmp_path / "hf-dropout", init_from_hf=str(hf), max_steps=1, eval_every=0,
                         model=dict(dropout=0.1)))
    assert "asks for dropout" not in capsys.readouterr().err
    assert torch.load(tmp_path / "hf-dropout/checkpoint.pt", weights_only=True)["model_config"]["dropout"] == 0.1


def test_rows_longer_than_the_context_are_refused_up_front(data_dir, tmp_path):
    # a fine-tune's --seq-len past its source's block_size had failed at the first forward, after
    # the run's set-up ("sequence of 32 tokens is longer than block_size 16")
    trainer.train(config(data_dir, tmp_path / "base", max_steps=1, eval_every=0))
    with pytest.raises(ValueError, match="seq_len 32 is longer than the model's block_size 16"):
        trainer.train(config(data_dir, tmp_path / "ft", init_from_run=str(tmp_path / "base"), seq_len=32))
    assert not (tmp_path / "ft/log.jsonl").exists()


def test_bad_config():
    TrainConfig().validate()
    TrainConfig(lr=1, grad_clip=0).validate()  # an int where a float is expected is fine
    with pytest.raises(ValueError, match="unknown training option.*max_step"):
        TrainConfig.from_dict({"max_step": 3})


DIST_WORKER = """
import json, sys, torch
torch.set_num_threads(1)
from pyllm.train import TrainConfig, train
common = json.loads(sys.argv[1])
cross = common.pop("cross", True)
# fsdp_reduce: gloo's reduce_scatter as it was up to torch 2.8, summing under ReduceOp.AVG, and
# wrap_model's way around it: "sum" (FSDP sums and divides, 2.8) or "divide" (the trainer divides, 2.7)
reduce = common.pop("fsdp_reduce", None)
if reduce:
    import torch.distributed as dist
    def summing(reduce_scatter):
        def call(*args, op=dist.ReduceOp.SUM, **kwargs):
            return reduce_scatter(*args, op=dist.ReduceOp.SUM if op == dist.ReduceOp.AVG else op, **kwargs)
        return call
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):  # (FSDP2 calls the second from 2.10 or so)
        if hasattr(dist, name):
            setattr(dist, name, summing(getattr(dist, name)))
    from torch.distributed.fsdp import FSDPModule
    if reduce == "divide" and hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):  # (2.8 and later)
        del FSDPModule.set_force_sum_reduction_for_comms
# In one process group: an uninterrupted run, a run stopped after step 5 (checkpoint at 4), its resume.
# Then "cross" (unless told not to): a 1-process run's checkpoint, resumed by these 2 processes in this mode.
for run, kwargs in (("whole", {}), ("cut", {"stop_at": 6}), ("cut", {"resume": True}), ("cross", {"resume": True}))[:4 if cross else 3]:
    train(TrainConfig(**{**common, "out_dir": common["out_dir"] + "/" + run}), **kwargs)
# past gloo's abort at interpreter exit (end_process's docstring; 2 of 17 such tests once, AMD EPYC VM)
from pyllm.train import end_process
end_process(0)
"""


# the folder holding the pyllm under test: subprocesses started there import it (an sdist's own
# pyllm/ folder is unbuilt: its tests run against the installed one)
PYLLM_ROOT = Path(pyllm.__file__).resolve().parent.parent


def run_two_processes(args: dict, timeout: float = 150, processes: int = 2) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(processes),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", DIST_WORKER, json.dumps(args)], cwd=PYLLM_ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(processes)]
    try:
        assert [p.wait(timeout=timeout) for p in procs] == [0] * processes
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_three_ddp_processes_resume_exactly(data_dir, tmp_path):
    # On 3 processes the ring all-reduce adds each gradient element's 3 values in an order set by its
    # place in DDP's bucket (on 2, a + b is b + a): DDP's first step reduces in one bucket in parameter
    # order, the next ones in buckets rebuilt in the order the gradients became ready, so a resumed run's
    # first step (a new DDP) had summed in another order than the uninterrupted run's same step: its
    # grad norm 1e-9 off, the losses after it 1e-7 (wrap_model: find_unused_parameters, never rebuilt).
    common = dict(data_dir=str(data_dir), model=dict(TINY), device="cpu", max_steps=8, warmup_steps=1, grad_accum=2,
                  eval_every=4, eval_batches=2, ckpt_every=4, progress=False, lr=1e-2, cross=False)
    run_two_processes({**common, "out_dir": str(tmp_path), "batch_size": 2, "dist_mode": "ddp"}, processes=3)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert grad_norms(cut) == grad_norms(whole)  # bitwise
    assert losses(cut) == losses(whole)
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (whole, cut))
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


END_PROCESS_PROBE = """
import sys, tempfile, torch, torch.distributed as dist
from pyllm.train import end_process
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
x = torch.randn(1000)
dist.all_reduce(x)
del x
print("written", end="")
sys.stderr.write("said")
import atexit; atexit.register(lambda: print(" handled", end=""))
class Finalized:
    def __del__(self): print(" finalized", end="")
kept = Finalized()
end_process(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code", [0, 3])
def test_end_process_destroys_the_group_runs_atexit_flushes_and_skips_finalization(code):
    out = subprocess.run([sys.executable, "-c", END_PROCESS_PROBE, str(code)], capture_output=True, text=True,
                         timeout=120, cwd=PYLLM_ROOT)
    # atexit's handlers ran, stdout was flushed after them, and the interpreter's finalization (which
    # would collect `kept`) did not run
    # (torch 2.9's gloo prints "[Gloo] Rank 0 is connected to 0 peer ranks..." to stdout at init)
    stdout = "".join(line for line in out.stdout.splitlines(keepends=True) if not line.startswith("[Gloo] "))
    assert (out.returncode, stdout) == (code, "written handled") and "said" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("mode, kind", [("ddp", "windows"), ("fsdp", "windows"), ("zero1", "windows"),
                                        ("ddp", "conversations"), ("fsdp", "conversations"),
                                        ("zero1", "conversations"), ("ddp", "lora"), ("fsdp", "lora"),
                                        ("zero1", "lora"), ("fsdp", "fused-loss"), ("ddp", "dpo"), ("fsdp", "orpo"),
                                        ("fsdp", "dpo-lora-off"), ("ddp", "moe"), ("fsdp", "moe"), ("ddp", "distill"),
                                        ("fsdp", "distill"), ("ddp", "kto"), ("fsdp", "moe-lora"), ("ddp", "reward"),
                                        ("fsdp", "dpo-fused-loss"), ("ddp", "kto-fused-loss"), ("fsdp", "dpo-synced")])
def test_two_cpu_processes_match_one_and_resume_exactly(data_dir, chat_dir, pairs_dir, kto_dir, tmp_path, mode, kind):
    """2 gloo processes with batch 2 each = 1 process with batch 4 (to float rounding), both with 2
    micro-steps of gradient accumulation; a 2-process
    run stopped at step 6 and resumed from its step-4 checkpoint = the uninterrupted one, bitwise;
    a 1-process checkpoint resumes on 2 processes in this mode. Conversations (PackedLoader): the
    loss is over all of a step's trained tokens, which the ranks' rows hold in unequal numbers.
    LoRA: frozen weights, rank-2 updates trained (no gradients, no optimizer state for the rest);
    under fsdp per projection (lora_targets: the fused layers' block-diagonal B, the layout buffer).
    fused-loss: the loss by linear_cross_entropy (its gradients computed in the forward, on the
    gathered output layer). dpo: preference pairs, the loss a mean over all of a step's pairs, the
    reference log-probabilities computed by both ranks' rows (and kept in the checkpoint); dpo-fused-loss
    the same with the loss fused with the (gathered) output layer, pairs whole (kto-fused-loss: each
    example's, after the KL pass); orpo
    likewise without a reference; dpo-lora-off: the reference by the sharded model with its LoRA
    updates off, at each step; dpo-synced: the reference a frozen copy of the starting run (reference
    model), moved towards the policy every 2 steps (sync_ref_model: the sharded policy gathered whole on
    each rank; the moved copy in the checkpoint). moe: 4 experts, 2 per token, without the load-balancing loss (a
    statistic of each rank's micro-batch, as transformers and Megatron-LM compute it: not the same
    on 2 ranks as on 1); moe-lora: LoRA on q and every expert (each expert's own updates), fp32. distill: a teacher (a 2-step run of a wider model, whole on each rank), the
    JSD's mixture at temperature 2 and some cross-entropy. kto: its KL estimate over both ranks'
    pairs of each micro-step. reward: a reward model with untied embeddings (its unused output
    layer frozen)."""
    if mode == "fsdp" and not hasattr(torch.cpu.Stream, "record_event"):
        pytest.skip("FSDP2 on the CPU needs torch >= 2.7 (torch.cpu.Stream.record_event)")
    distill = {}
    if kind == "distill":
        trainer.train(config(data_dir, tmp_path / "teacher", model=dict(TINY, dim=96, n_heads=3, n_kv_heads=1),
                             max_steps=2))
        distill = dict(teacher=str(tmp_path / "teacher"), distill_beta=0.5, distill_temperature=2.0, distill_alpha=0.7)
    folder = {"conversations": chat_dir, "dpo": pairs_dir, "dpo-fused-loss": pairs_dir, "orpo": pairs_dir,
              "dpo-lora-off": pairs_dir, "dpo-synced": pairs_dir,
              "kto": kto_dir, "kto-fused-loss": kto_dir, "reward": pairs_dir}.get(kind, data_dir)
    moe = dict(n_experts=4, router_aux_loss_coef=0.0) if kind in ("moe", "moe-lora") else {}
    if kind == "reward":  # untied: the output layer, which scores never use, stays out of DDP's reduction
        moe = dict(tie_embeddings=False)
    start = {}
    if kind == "dpo-synced":
        trainer.train(config(data_dir, tmp_path / "base", max_steps=2))
        start = dict(init_from_run=str(tmp_path / "base"), preference="dpo", beta=0.5, reference="model",
                     sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)
    common = dict(data_dir=str(folder), model=dict(TINY, **moe), device="cpu", **distill, **start,
                  max_steps=8, warmup_steps=1, grad_accum=2, eval_every=4, eval_batches=2, ckpt_every=4,
                  progress=False, lr=1e-2, **({"lora_rank": 2, "precision": "bf16"} if kind == "lora" else {}),
                  **({"lora_targets": "q,v,gate,down"} if kind == "lora" and mode == "fsdp" else {}),
                  **({"fused_loss": True} if kind == "fused-loss" else {}),
                  **({"lora_rank": 2, "lora_targets": "q,experts"} if kind == "moe-lora" else {}),
                  **({"preference": kind, "beta": 0.5} if kind in ("dpo", "orpo", "kto") else {}),
                  **({"preference": "dpo", "beta": 0.5, "fused_loss": True} if kind == "dpo-fused-loss" else {}),
                  **({"preference": "kto", "beta": 0.5, "fused_loss": True} if kind == "kto-fused-loss" else {}),
                  **({"preference": "reward"} if kind == "reward" else {}),
                  **({"preference": "dpo", "beta": 0.5, "lora_rank": 2, "reference": "lora-off"}
                     if kind == "dpo-lora-off" else {}))
    if start:
        del common["model"]  # (a loaded model keeps its own config)
    trainer.train(TrainConfig(**common, out_dir=str(tmp_path / "one"), batch_size=4))
    trainer.train(TrainConfig(**common, out_dir=str(tmp_path / "two/cross"), batch_size=4), stop_at=6)
    # ddp and fsdp recompute their blocks in the backward (activation checkpointing): same losses
    run_two_processes({**common, "out_dir": str(tmp_path / "two"), "batch_size": 2, "dist_mode": mode,
                       "activation_checkpointing": mode != "zero1"})
    whole, cut = tmp_path / "two/whole", tmp_path / "two/cut"
    # bf16 (the LoRA runs: frozen weights held in bf16): its matmuls round per batch shape
    # reward: a loss of a few scores, each one token's hidden state (the LM losses average rounding over
    # every token): 1.1e-5 apart by step 7 once; 3.2e-5 at step 8 with the fused RMSNorm (its fp64-summed
    # weight gradient rounds differently from torch's per batch shape; steps 1-4 agree to 1e-6)
    rtol = 1e-4 if common.get("precision") == "bf16" else 6e-5 if kind == "reward" else 1e-5
    np.testing.assert_allclose(losses(whole), losses(tmp_path / "one"), rtol=rtol)
    # the gradients' scale too, which AdamW and clipping hide from the losses (torch 2.8's FSDP2 on gloo
    # summed the ranks' gradients: 2x here, the losses within these tolerances but for a resume)
    np.testing.assert_allclose(grad_norms(whole)[0], grad_norms(tmp_path / "one")[0], rtol=10 * rtol)
    # each step's tokens, every rank's summed (rank 0's documents times 2 had been counted: packed
    # rows and KTO's examples hold other lengths on each rank)
    tokens = lambda out: [json.loads(line)["tokens"] for line in (out / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert tokens(whole) == tokens(tmp_path / "one")
    assert losses(cut) == losses(whole)  # bitwise
    # TRL's step metrics are ratios over every rank's targets: the same on 2 processes as on 1 (each
    # rank's ratio, averaged, had been 2e-4 off on the conversations)
    if {"entropy", "min_reward"} & set(json.loads((whole / "log.jsonl").read_text().splitlines()[0])):
        def column(out, name):  # (KTO's logits_* are null in a step without examples of that label)
            return [math.nan if (v := json.loads(line)[name]) is None else v
                    for line in (out / "log.jsonl").read_text().splitlines()]

        first = json.loads((whole / "log.jsonl").read_text().splitlines()[0])
        for name in {"entropy", "mean_token_accuracy", "logits_chosen", "logits_rejected", "min_reward", "max_reward",
                     "mean_reward"} & set(first):
            # (a reward model's extreme scores drift apart with its weights more than the mean loss: 1e-4 at step 7)
            tol = 5 * rtol if name.endswith("_reward") else rtol
            np.testing.assert_allclose(column(whole, name), column(tmp_path / "one", name), rtol=tol, atol=1e-7)
            np.testing.assert_array_equal(column(cut, name), column(whole, name))
    np.testing.assert_allclose(losses(tmp_path / "two/cross")[4:], losses(tmp_path / "one")[4:], rtol=rtol)
    one, a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (tmp_path / "one", whole, cut))
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if kind in ("lora", "moe-lora"):  # state for the updates alone
        n_lora = sum(k.endswith(("lora_a", "lora_b")) for k in one["model"])
        assert n_lora and len(one["optimizer"]["state"]) == len(a["optimizer"]["state"]) == n_lora
    # The checkpoint holds the whole optimizer state (gathered from the shards under fsdp and zero1).
    for i, state in one["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            scale = float(state[key].abs().max())  # moments near 0 differ by rounding relative to the largest
            # bf16: gradients to ~3 significant digits (one moment of 768 1.5e-2 of the largest off on an AMD EPYC)
            near = 2e-2 if rtol > 1e-5 else 1e-4
            torch.testing.assert_close(a["optimizer"]["state"][i][key], state[key], rtol=1e-3, atol=near * scale)
            assert torch.equal(a["optimizer"]["state"][i][key], b["optimizer"]["state"][i][key])


COMPILED_FSDP_WORKER = """
import json, os, sys, torch
torch.set_num_threads(1)
import torch._dynamo
from torch._dynamo.utils import counters
from pyllm.train import TrainConfig, end_process, train
common = json.loads(sys.argv[1])
for run in ("eager", "compiled"):
    train(TrainConfig(**{**common, "out_dir": common["out_dir"] + "/" + run, "compile": run == "compiled"}))
breaks = sum(counters["graph_break"].values())
with open(common["out_dir"] + f"/compiled/dynamo{os.environ['RANK']}.json", "w") as f:
    json.dump({"graphs": counters["stats"]["unique_graphs"], "breaks": breaks,
               "limit": torch._dynamo.config.recompile_limit}, f)
end_process(0)
"""


def test_fsdp_with_compile_compiles_each_block_whole(data_dir, tmp_path):
    # FSDP2 with --compile: the whole model compiled around fully_shard had hit FSDP's dynamo-disabled hooks in the
    # block loop, skipped that frame and compiled pieces of it (12 graphs a rank here; 6 recompiles and 4 break
    # messages a rank in the compile audit's run). Each block is compiled before it is sharded (torchtitan's way):
    # one graph for training and one for eval (no_grad), no breaks, the eager run's losses.
    args = dict(data_dir=str(data_dir), out_dir=str(tmp_path), model=dict(TINY, n_layers=3), device="cpu",
                batch_size=2, max_steps=3, warmup_steps=1, lr=1e-2, eval_every=3, eval_batches=1, ckpt_every=0,
                progress=False, dist_mode="fsdp")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", COMPILED_FSDP_WORKER, json.dumps(args)], cwd=PYLLM_ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        assert [p.wait(timeout=400) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    np.testing.assert_allclose(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=1e-5)
    for rank in range(2):
        dynamo = json.loads((tmp_path / f"compiled/dynamo{rank}.json").read_text())
        assert dynamo == {"graphs": 2, "breaks": 0, "limit": 32}, (rank, dynamo)  # (room for GRPO's variants)


@pytest.mark.parametrize("reduce", ["sum", "divide"])
def test_fsdp_gradients_average_where_the_reduce_scatter_sums(data_dir, tmp_path, reduce):
    # Gloo's reduce_scatter summed under ReduceOp.AVG up to torch 2.8, and FSDP2 reduces with it:
    # wrap_model then has FSDP sum and divide (2.8: "sum") or the trainer divide (2.7: "divide"). Both
    # ways, with this torch's reduce_scatter made to sum as 2.8's did, give the 1-process gradients:
    # their norms (no clipping), the losses, and a 1-process checkpoint's resume (LoRA: frozen
    # weights, AdamW's moments carried over, which gradients of another scale would not match).
    if not hasattr(torch.cpu.Stream, "record_event"):
        pytest.skip("FSDP2 on the CPU needs torch >= 2.7 (torch.cpu.Stream.record_event)")
    common = dict(data_dir=str(data_dir), model=dict(TINY), device="cpu", max_steps=8, warmup_steps=1, grad_accum=2,
                  eval_every=4, eval_batches=2, ckpt_every=4, progress=False, lr=1e-2, grad_clip=0.0, lora_rank=2,
                  lora_targets="q,v,gate,down")
    trainer.train(TrainConfig(**common, out_dir=str(tmp_path / "one"), batch_size=4))
    trainer.train(TrainConfig(**common, out_dir=str(tmp_path / "two/cross"), batch_size=4), stop_at=6)
    run_two_processes({**common, "out_dir": str(tmp_path / "two"), "batch_size": 2, "dist_mode": "fsdp",
                       "fsdp_reduce": reduce})
    np.testing.assert_allclose(grad_norms(tmp_path / "two/whole"), grad_norms(tmp_path / "one"), rtol=1e-4)
    np.testing.assert_allclose(losses(tmp_path / "two/whole"), losses(tmp_path / "one"), rtol=1e-5)
    np.testing.assert_allclose(losses(tmp_path / "two/cross")[4:], losses(tmp_path / "one")[4:], rtol=1e-5)


def test_muon_on_two_processes(data_dir, tmp_path):
    # optimizer muon under DDP: 2 processes with batch 2 each track 1 process with batch 4 (Muon's
    # bf16 Newton-Schulz steps can round differences of the averaged grads up: 1e-4 rather than
    # AdamW's 1e-5), stop and resume bitwise, and resume a 1-process checkpoint.
    common = dict(data_dir=str(data_dir), model=dict(TINY), device="cpu", max_steps=8, warmup_steps=1, grad_accum=2,
                  eval_every=4, eval_batches=2, ckpt_every=4, progress=False, lr=1e-2, optimizer="muon")
    trainer.train(TrainConfig(**common, out_dir=str(tmp_path / "one"), batch_size=4))
    trainer.train(TrainConfig(**common, out_dir=str(tmp_path / "two/cross"), batch_size=4), stop_at=6)
    run_two_processes({**common, "out_dir": str(tmp_path / "two"), "batch_size": 2, "dist_mode": "ddp"})
    assert losses(tmp_path / "two/cut") == losses(tmp_path / "two/whole")
    # (1.2e-5 apart by step 8 on the AMD EPYC VM, 2026-12-01)
    np.testing.assert_allclose(losses(tmp_path / "two/whole"), losses(tmp_path / "one"), rtol=1e-4)
    np.testing.assert_allclose(losses(tmp_path / "two/cross")[4:], losses(tmp_path / "one")[4:], rtol=1e-4)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_draw_their_own_dropout_masks_and_resume_exactly(data_dir, tmp_path, mode):
    # Dropout (the residual branches' and the attention's) on 2 processes: each rank draws from
    # its own stream (the set-up, the initial weights, alike on both: torch.manual_seed(cfg.seed)),
    # where every rank had drawn rank 0's and so dropped the same elements of its rows; the checkpoint
    # holds both ranks' states, and a run stopped after step 5 resumes from step 4 bitwise (with rank
    # 0's state on both ranks rank 1's masks would differ from the uninterrupted run's). A 1-process
    # checkpoint resumes on 2 (each rank's stream started anew from seed, rank and step). fsdp
    # recomputes its blocks in the backward (activation checkpointing): the masks drawn again alike.
    if mode == "fsdp" and not hasattr(torch.cpu.Stream, "record_event"):
        pytest.skip("FSDP2 on the CPU needs torch >= 2.7 (torch.cpu.Stream.record_event)")
    common = dict(data_dir=str(data_dir), model=dict(TINY, dropout=0.2), device="cpu", max_steps=8, warmup_steps=1,
                  eval_every=4, eval_batches=2, ckpt_every=4, progress=False, lr=1e-2)
    trainer.train(TrainConfig(**common, out_dir=str(tmp_path / "two/cross"), batch_size=4), stop_at=6)
    run_two_processes({**common, "out_dir": str(tmp_path / "two"), "batch_size": 2, "dist_mode": mode,
                       "activation_checkpointing": mode == "fsdp"})
    assert losses(tmp_path / "two/cut") == losses(tmp_path / "two/whole")
    assert all(math.isfinite(x) for x in losses(tmp_path / "two/cross"))
    states = torch.load(tmp_path / "two/whole/checkpoint.pt", weights_only=True)["rng_ranks"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_lora_run_from_a_run_learns_with_the_base_frozen(data_dir, tmp_path, device):
    # LoRA in bf16 on each device (on the GPU: LoRALinear's bf16 frozen weights beside fp32 updates
    # under autocast, into pyllm's kernels): the val loss falls from where the base run left it, only
    # the updates have optimizer state, and the merged weights differ from the base's only in the
    # blocks' linear layers, there by a matrix of rank <= 2.
    from safetensors.torch import load_file

    before = trainer.train(config(data_dir, tmp_path / "base", device=device, max_steps=3, eval_every=0,
                                  precision="bf16"))
    summary = trainer.train(config(data_dir, tmp_path / "lora", device=device, init_from_run=str(tmp_path / "base"), model={},
                                   lora_rank=2, max_steps=30, eval_every=0, precision="bf16"))
    assert all(math.isfinite(x) for x in losses(tmp_path / "lora"))
    assert summary["val_loss"] < before["val_loss"] - 0.2  # CPU: 3.09 -> 2.52
    state = torch.load(tmp_path / "lora" / "checkpoint.pt", weights_only=True)
    assert state["model"]["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    n_lora = sum(k.endswith((".lora_a", ".lora_b")) for k in state["model"])
    assert n_lora == 8 and len(state["optimizer"]["state"]) == n_lora
    base, tuned = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(tmp_path / "lora" / "model.safetensors"))
    for name, w in base.items():
        if name.startswith("blocks.") and name.endswith(("qkv.weight", "proj.weight", "gate_up.weight", "down.weight")):
            assert 0 < torch.linalg.matrix_rank((tuned[name].double() - w.double()), rtol=1e-2).item() <= 2, name
        else:
            assert torch.equal(tuned[name], w), name
    assert summary["device"].startswith(device)


def test_bf16_lora_run_merges_into_the_weights_as_loaded(data_dir, tmp_path):
    # The frozen weights are held in bf16 while training; the merged model.safetensors adds B A to the
    # weights as loaded (PEFT's merge_and_unload), not to their bf16 copies: the k rows of a q,v run
    # are the base's exactly (an audit, 2026-12-06: they had moved 1e-4, rounded to bf16).
    from safetensors.torch import load_file

    trainer.train(config(data_dir, tmp_path / "base", max_steps=2, eval_every=0))  # (fp32 weights)
    trainer.train(config(data_dir, tmp_path / "lora", init_from_run=str(tmp_path / "base"), lora_rank=2,
                         lora_targets="q,v", max_steps=3, eval_every=0, precision="bf16"))
    base, tuned = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(tmp_path / "lora" / "model.safetensors"))
    assert not all(torch.equal(w, w.bfloat16().float()) for w in base.values())  # (bf16 would have rounded them)
    q, k = 64, 64  # (rows of q, then k, then v: 2 heads of 32, as many kv heads)
    qkv = "blocks.0.attn.qkv.weight"
    assert torch.equal(tuned[qkv][q:q + k], base[qkv][q:q + k]) and not torch.equal(tuned[qkv][:q], base[qkv][:q])
    for name, w in base.items():
        if name != qkv:
            assert torch.equal(tuned[name], w), name


def test_expert_lora_run_learns_with_the_experts_frozen(data_dir, tmp_path):
    # LoRA on a mixture of experts' experts alone (--lora-targets experts), bf16: the val loss falls
    # from the base run's, the frozen experts are held in bf16, only the updates have optimizer
    # state, the merged weights differ from the base's in the experts alone, each expert's by a
    # matrix of rank <= 2; resume is exact.
    from safetensors.torch import load_file

    moe = dict(TINY, n_experts=4, experts_per_token=2)
    before = trainer.train(config(data_dir, tmp_path / "base", model=moe, max_steps=3, eval_every=0, precision="bf16"))
    kw = dict(init_from_run=str(tmp_path / "base"), model={}, lora_rank=2, lora_targets="experts", max_steps=24, eval_every=0,
              precision="bf16", ckpt_every=4)
    summary = trainer.train(config(data_dir, tmp_path / "lora", **kw))
    assert summary["val_loss"] < before["val_loss"] - 0.2
    state = torch.load(tmp_path / "lora" / "checkpoint.pt", weights_only=True)
    assert state["model"]["blocks.0.mlp.gate_up"].dtype == torch.bfloat16
    assert sorted(k for k in state["model"] if "lora" in k) == [f"blocks.0.mlp.{n}_lora_{ab}" for n in ("down", "gate_up")
                                                                 for ab in "ab"]
    assert len(state["optimizer"]["state"]) == 4
    base, tuned = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(tmp_path / "lora" / "model.safetensors"))
    for name, w in base.items():
        if name.endswith(("mlp.gate_up", "mlp.down")):
            for e in range(4):
                assert 0 < torch.linalg.matrix_rank((tuned[name][e].double() - w[e].double()), rtol=1e-2).item() <= 2, name
        else:
            assert torch.equal(tuned[name], w), name
    trainer.train(config(data_dir, tmp_path / "cut", **kw), stop_at=6)
    trainer.train(config(data_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "lora")


def test_lora_options_are_checked(tmp_path):
    for options, message in ((dict(lora_dropout=0.1), "go with lora_rank"),
                             (dict(lora_alpha=16.0), "go with lora_rank"),  # (a full fine-tune had run)
                             (dict(lora_rank=2, lora_dropout=1.5), "lora_dropout must be in"),
                             (dict(lora_rank=2, lora_targets="q,mlp"), "LoRA targets must be among"),
                             (dict(lora_rank=2, lora_targets="q,lm_head"), "the output layer .* got lm_head$")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(out_dir=str(tmp_path), **options).validate()
    from pyllm.model import lora_targets  # PEFT's module paths name their projections
    assert lora_targets("self_attn.q_proj, mlp.down_proj,experts.gate_up_proj") == ["q", "down", "experts.gate_up"]


@pytest.mark.parametrize("logits", ["plain", "capped"])
def test_fused_loss_trains_as_the_plain_loss(data_dir, tmp_path, logits):
    # --fused-loss: the same losses to fp32 rounding (the softmax is summed chunk by chunk), also for
    # a model that caps its logits (Gemma 2's final_softcap, at a value they reach as it learns).
    model = dict(TINY, final_softcap=3.0) if logits == "capped" else TINY
    trainer.train(config(data_dir, tmp_path / "plain", model=model))
    trainer.train(config(data_dir, tmp_path / "fused", model=model, fused_loss=True))
    np.testing.assert_allclose(losses(tmp_path / "fused"), losses(tmp_path / "plain"), rtol=1e-5)


def test_token_stats_are_logged_as_trl_logs_them(data_dir, chat_dir, tmp_path):
    # TRL's SFT metrics each step (on by default): mean_token_accuracy in [0, 1] and entropy in
    # [0, log V], and at each evaluation val_ ones (TRL's eval_); at step 0 (the same weights, 2
    # micro-steps) the same from the model's logits, the fused loss and packed conversations'
    # per-token path (to fp32 rounding); none with token_stats off. A step's value is each
    # micro-step's ratio over every rank's targets, then their mean, a micro-step without targets
    # counting 0.0, as TRL's.
    first = {}
    for folder, kind in ((data_dir, "windows"), (chat_dir, "chats")):
        for how, kw in (("plain", {}), ("fused", {"fused_loss": True}), ("z", {"z_loss": 1e-3})):
            out = tmp_path / f"{kind}-{how}"
            trainer.train(config(folder, out, max_steps=2, grad_accum=2, eval_every=0, **kw))
            records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            assert all(0 <= r["mean_token_accuracy"] <= 1 and 0 < r["entropy"] <= math.log(64) for r in records)
            first[kind, how] = records[0]
            evaluated = [r for r in records if "val_loss" in r]
            assert evaluated and all(0 <= r["val_mean_token_accuracy"] <= 1 and 0 < r["val_entropy"] <= math.log(64)
                                     for r in evaluated)
        for how in ("fused", "z"):
            for name in ("entropy", "mean_token_accuracy"):
                assert first[kind, how][name] == pytest.approx(first[kind, "plain"][name], rel=1e-5), (kind, how)
    off = tmp_path / "off"
    trainer.train(config(data_dir, off, max_steps=1, eval_every=0, token_stats=False))
    assert not {"entropy", "val_entropy"} & set(json.loads((off / "log.jsonl").read_text()))
    sums = torch.tensor([[30.0, 3.0, 10.0], [0.0, 0.0, 0.0], [8.0, 4.0, 4.0]])
    assert trainer.token_stat_means(sums) == pytest.approx(((3.0 + 0.0 + 2.0) / 3, (0.3 + 0.0 + 1.0) / 3))


@pytest.mark.parametrize("fused", [False, True])
def test_z_loss_is_logged_and_added(data_dir, chat_dir, tmp_path, fused):
    # --z-loss: the loss plus z times the mean logsumexp^2, logged as z_loss: at step 0 (the same
    # weights) loss - z_loss is the run without it, in windows and in packed conversations (2
    # micro-steps: the share weighted as the loss is); the
    # fused and plain losses agree with it too (to fp32 rounding); it is refused with preference
    # tuning.
    first = {}
    for folder, kind in ((data_dir, "windows"), (chat_dir, "chats")):
        for z in (0.0, 1e-2):
            out = tmp_path / f"{kind}-{z}"
            trainer.train(config(folder, out, max_steps=3, z_loss=z, fused_loss=fused, grad_accum=2))
            first[kind, z] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        plain, zl = first[kind, 0.0][0], first[kind, 1e-2][0]
        assert "z_loss" not in plain and zl["z_loss"] > 0.05  # (log V)^2 / 100 at the start: about 0.2
        assert zl["loss"] - zl["z_loss"] == pytest.approx(plain["loss"], rel=1e-6)
    if fused:
        unfused = tmp_path / "unfused"
        trainer.train(config(data_dir, unfused, max_steps=3, z_loss=1e-2, grad_accum=2))
        np.testing.assert_allclose(losses(tmp_path / "windows-0.01"), losses(unfused), rtol=1e-5)
    with pytest.raises(ValueError, match="z_loss must be >= 0 and finite and goes with pretraining"):
        TrainConfig(out_dir=str(tmp_path), preference="dpo", z_loss=1e-4).validate()


def test_dft_loss_type_trains_every_loss_path(data_dir, chat_dir, tmp_path):
    # --loss-type dft (TRL's SFT loss_type "dft"): the logged loss is the mean of each target's
    # cross-entropy times its probability: at step 0 of a fresh model (probabilities near 1 / V)
    # about exp(-nll) * nll of the NLL run on the same batch; val_loss stays the NLL (near log V, many
    # times the DFT loss); windows by the kernel and fused, packed conversations per token
    # and fused, and with z-loss, give the same losses (fp32 rounding); refused with preference tuning.
    runs = {}
    for folder, kind in ((data_dir, "windows"), (chat_dir, "chats")):
        for name, kw in (("nll", {}), ("dft", dict(loss_type="dft")), ("fused", dict(loss_type="dft", fused_loss=True)),
                         ("z", dict(loss_type="dft", z_loss=1e-2))):
            out = tmp_path / f"{kind}-{name}"
            trainer.train(config(folder, out, max_steps=3, eval_every=2, grad_accum=2, **kw))
            runs[kind, name] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        nll, dft = runs[kind, "nll"][0]["loss"], runs[kind, "dft"][0]["loss"]
        assert dft == pytest.approx(math.exp(-nll) * nll, rel=0.05) and dft < 0.1 * nll
        assert runs[kind, "dft"][1]["val_loss"] > 10 * runs[kind, "dft"][1]["loss"]  # (the NLL, near log V)
        np.testing.assert_allclose([r["loss"] for r in runs[kind, "fused"]], [r["loss"] for r in runs[kind, "dft"]],
                                   rtol=1e-5)
        z = runs[kind, "z"][0]
        assert z["loss"] - z["z_loss"] == pytest.approx(dft, rel=1e-5) and 0 < z["z_loss"] < 0.1 * dft
    with pytest.raises(ValueError, match="loss_type must be 'nll' or 'dft', dft with pretraining and SFT"):
        TrainConfig(out_dir=str(tmp_path), preference="dpo", loss_type="dft").validate()
    # (the refusal names the run's kind, as z_loss's does)
    for kw, mode in ((dict(preference="dpo"), "preference tuning"), (dict(teacher="t"), "distillation"),
                     (dict(grpo_reward="length"), "GRPO")):
        with pytest.raises(ValueError, match=f"got 'dft' with {mode}$"):
            TrainConfig(out_dir=str(tmp_path), loss_type="dft", **kw).validate()
    with pytest.raises(ValueError, match="loss_type must be 'nll' or 'dft'"):
        TrainConfig(out_dir=str(tmp_path), loss_type="DFT").validate()


def test_a_resume_that_changes_the_loss_says_so(data_dir, tmp_path, capsys):
    # --loss-type and --z-loss are taken on resume, as the run's other options; the log's loss then
    # changes meaning at that step (a dft run resumed as nll had jumped from 0.07 to 4.0 without a word)
    trainer.train(config(data_dir, tmp_path, max_steps=2, eval_every=0, ckpt_every=2, loss_type="dft"))
    capsys.readouterr()
    trainer.train(config(data_dir, tmp_path, max_steps=3, eval_every=0, loss_type="dft"), resume=True)
    assert "training loss changes" not in capsys.readouterr().err
    trainer.train(config(data_dir, tmp_path, max_steps=4, eval_every=0, z_loss=1e-3), resume=True)
    assert ("the training loss changes at step 3: --loss-type dft --z-loss 0 before, --loss-type nll --z-loss 0.001 now"
            in capsys.readouterr().err)


# --- DPO ------------------------------------------------------------------------------------------

def formula(kind, pc, pr, nc, nr, rc, rr, beta, gamma=0.5, smoothing=0.0, tau=0.05, fdiv="reverse_kl", alpha=0.5):
    """The preference losses written out from their papers (TRL's forms), for one pair: policy and
    reference summed log-probabilities of the chosen and rejected replies, their token counts."""
    F = torch.nn.functional
    cl, rl = pc - rc, pr - rr  # (TRL 1.16's DPOTrainer: chosen_logratios, rejected_logratios)
    if fdiv != "reverse_kl":  # (f-DPO: TRL's chosen_scores / rejected_scores, f'(ratio) of the log-ratios)
        f = {"forward_kl": lambda x: 1 - torch.exp(-x), "js_divergence": lambda x: math.log(2) + F.logsigmoid(x),
             "alpha_divergence": lambda x: (torch.exp((alpha - 1) * x) - 1) / (alpha - 1)}[fdiv]
        sc, sr = f(cl), f(rl)
        if kind in ("ipo", "sigmoid_norm"):
            sc, sr = sc / nc, sr / nr
        loss = {"dpo": lambda: -F.logsigmoid(beta * (sc - sr)), "hinge": lambda: torch.relu(1 - beta * (sc - sr)),
                "ipo": lambda: (sc - sr - 1 / (2 * beta)) ** 2, "sigmoid_norm": lambda: -F.logsigmoid(beta * (sc - sr))}
        return loss[kind](), beta * cl, beta * rl
    d = beta * (cl - rl)
    trl = {  # its loss_type formulas, as its _compute_loss writes them
        "robust": lambda: (-(1 - smoothing) * F.logsigmoid(d) + smoothing * F.logsigmoid(-d)) / (1 - 2 * smoothing),
        "exo_pair": lambda: (torch.sigmoid(d) * (F.logsigmoid(d) - math.log1p(-smoothing))
                             + torch.sigmoid(-d) * (F.logsigmoid(-d) - math.log(smoothing))),
        "nca_pair": lambda: (-F.logsigmoid(beta * cl) - 0.5 * F.logsigmoid(-beta * cl) - 0.5 * F.logsigmoid(-beta * rl)),
        "bco_pair": lambda: -F.logsigmoid(beta * cl) - F.logsigmoid(-beta * rl),
        "sppo_hard": lambda: (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2,
        "apo_zero": lambda: 1 - torch.sigmoid(beta * cl) + torch.sigmoid(beta * rl),
        "apo_down": lambda: torch.sigmoid(beta * cl) + 1 - torch.sigmoid(beta * (cl - rl)),
        "discopop": lambda: (-F.logsigmoid(d) * (1 - torch.sigmoid(d / tau)) + torch.exp(-d) * torch.sigmoid(d / tau)),
        "sigmoid_norm": lambda: -F.logsigmoid(beta * (cl / nc - rl / nr))}
    if kind in trl:  # (rewards: beta times the summed log-ratios, sigmoid_norm's too)
        return trl[kind](), beta * cl, beta * rl
    if kind == "dpo":
        d = beta * ((pc - rc) - (pr - rr))
        return -(1 - smoothing) * F.logsigmoid(d) - smoothing * F.logsigmoid(-d), beta * (pc - rc), beta * (pr - rr)
    if kind == "ipo":
        d = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        return (d - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)  # (TRL's rewards: summed)
    if kind == "hinge":
        return torch.relu(1 - beta * ((pc - rc) - (pr - rr))), beta * (pc - rc), beta * (pr - rr)
    mc, mr = pc / nc, pr / nr
    if kind == "simpo":
        return -F.logsigmoid(beta * (mc - mr) - gamma), beta * mc, beta * mr
    odds = lambda m: torch.exp(m) / (1 - torch.exp(m))  # noqa: E731
    return -mc - beta * F.logsigmoid(torch.log(odds(mc)) - torch.log(odds(mr))), beta * mc, beta * mr


def batch_of_pairs(folder):
    """fp64 reference and policy models (tiny, different weights), a PackedLoader over folder's pairs
    (rows of 16, 3 a batch), the reference's log-probabilities of every document, its first batch."""
    from pyllm.model import LLM, ModelConfig

    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 64})).double()
    policy = LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 64})).double()
    loader = data.PackedLoader(folder / "train.bin", 3, 16, seed=4)
    with torch.no_grad():
        reference = trainer.reference_logps(model, folder / "train.bin", TrainConfig(batch_size=3), 16, "fp32",
                                            trainer.DistInfo())
    return model, policy, loader, reference, (*loader.next_batch(), loader.docs)


def logps_alone(loader, m, doc, length):
    """(sum of log p, count) over a document's trained targets within its first length tokens, the
    document run alone through m (as a loader batch cuts it to length)."""
    start, end = loader.offsets[doc], loader.offsets[doc + 1]
    ids = torch.from_numpy(np.asarray(loader.tokens[start:end], np.int64))
    mask = torch.from_numpy(np.asarray(loader.mask[start:end], np.int64))
    n = min(length + 1, end - start)
    logp = torch.log_softmax(m(ids[None, :min(length, n)])[0][0], -1)[torch.arange(n - 1), ids[1:n]]
    return (logp * mask[1:n]).sum(), int(mask[1:n].sum())


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("kind, options", [("dpo", {}), ("dpo", {"label_smoothing": 0.2}), ("ipo", {}), ("hinge", {}),
                                           ("simpo", {"gamma": 0.3}), ("orpo", {}), ("dpo", {"sft_weight": 0.7}),
                                           ("simpo", {"sft_weight": 0.4}), ("robust", {"label_smoothing": 0.2}),
                                           ("exo_pair", {"label_smoothing": 1e-3}), ("nca_pair", {}), ("bco_pair", {}),
                                           ("sppo_hard", {}), ("apo_zero", {}), ("apo_down", {"sft_weight": 0.3}),
                                           ("discopop", {"discopop_tau": 0.5}), ("sigmoid_norm", {}),
                                           ("dpo", {"f_divergence": "forward_kl"}),
                                           ("ipo", {"f_divergence": "js_divergence"}),
                                           ("hinge", {"f_divergence": "alpha_divergence", "f_alpha": 0.3}),
                                           ("sigmoid_norm", {"f_divergence": "alpha_divergence", "f_alpha": 1.5})])
def test_preference_batch_loss_is_each_sequence_alone(pairs_dir, kind, options, fused, monkeypatch):
    # fp64: the packed batch's loss and gradients are those of the formula on each sequence's
    # log-probability computed alone (its replies' tokens, cut as the loader cuts pairs to a row);
    # also with the loss fused with the output layer (pairs whole, their gradients in the forward),
    # in chunks of whole pairs (chunk_rows 12: the batch's 3 pairs hold 6, 4 and 10 trained tokens: 2 chunks).
    model, policy, loader, reference, batch = batch_of_pairs(pairs_dir)
    policy.fused_loss = fused
    if fused:
        from pyllm import nn as pyllm_nn
        monkeypatch.setattr("pyllm.model.linear_sequence_loss",
                            functools.partial(pyllm_nn.linear_sequence_loss, chunk_rows=12))
    beta = 0.3
    loss, stats = trainer.preference_batch_loss(policy, batch, None if kind in ("simpo", "orpo") else reference,
                                                kind=kind, beta=beta, fused=fused, **options)
    monkeypatch.undo()
    loss.backward()
    got = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    alone = functools.partial(logps_alone, loader)

    real = [d for d in batch[3] if d >= 0]
    lengths = [n for n in loader.lengths]
    assert len(real) == len(lengths) and len(real) % 2 == 0 and loader.placed == len(real) // 2
    terms, rewards, logged = [], [], []  # logged: TRL's logps/*, ORPO's nll_loss, log_odds_ratio, log_odds_chosen
    for c, r, lc, lr in zip(real[0::2], real[1::2], lengths[0::2], lengths[1::2]):
        assert loader.pairs.tolist().count([c, r]) == 1
        with torch.no_grad():
            (ref_c, _), (ref_r, _) = alone(model, c, lc), alone(model, r, lr)
        assert reference[c] == pytest.approx(float(ref_c), rel=1e-12) and reference[r] == pytest.approx(float(ref_r), rel=1e-12)
        (pc, nc), (pr, nr) = alone(policy, c, lc), alone(policy, r, lr)
        term, chosen_reward, rejected_reward = formula(kind, pc, pr, nc, nr, ref_c, ref_r, beta,
                                                       options.get("gamma", 0.5), options.get("label_smoothing", 0.0),
                                                       options.get("discopop_tau", 0.05),
                                                       options.get("f_divergence", "reverse_kl"),
                                                       options.get("f_alpha", 0.5))
        terms.append(term + options.get("sft_weight", 0.0) * -pc / nc)  # (RPO: the chosen reply's NLL per token)
        rewards.append((chosen_reward.item(), rejected_reward.item()))
        lc_, lr_ = (pc.item() / nc, pr.item() / nr) if kind in ("simpo", "orpo") else (pc.item(), pr.item())
        log_odds = (lc_ - lr_) - (math.log1p(-math.exp(lc_)) - math.log1p(-math.exp(lr_)))  # TRL's odds_ratio_loss
        logged.append((lc_, lr_) + ((-lc_, -math.log1p(math.exp(-log_odds)), log_odds) if kind == "orpo" else ()))
    want = torch.stack(terms).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    chosen, rejected = np.mean(rewards, axis=0)
    assert stats[0].item() == pytest.approx(chosen, rel=1e-10) and stats[1].item() == pytest.approx(rejected, rel=1e-10)
    assert stats[2].item() == np.mean([a > b for a, b in rewards])
    assert len(stats) == len(trainer.preference_stat_names(kind))
    np.testing.assert_allclose(stats[3:].tolist(), np.mean(logged, axis=0), rtol=1e-10)
    for g, p in zip(got, policy.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-14)


def token_logps_alone(loader, m, doc, length):
    """(each target's log p, its completion mask) over a document's first length tokens, the document
    run alone through m (logps_alone's positions): TRL's per_token_logps and shifted completion_mask."""
    start, end = loader.offsets[doc], loader.offsets[doc + 1]
    ids = torch.from_numpy(np.asarray(loader.tokens[start:end], np.int64))
    mask = torch.from_numpy(np.asarray(loader.mask[start:end], np.int64))
    n = min(length + 1, end - start)
    logp = torch.log_softmax(m(ids[None, :min(length, n)])[0][0], -1)[torch.arange(n - 1), ids[1:n]]
    return logp * mask[1:n], mask[1:n]


def ld_logps(pair, ld_alpha):
    """TRL 1.16's DPOTrainer._compute_loss lines for ld_alpha, written out for one pair: (chosen,
    rejected) of token_logps_alone's -> their LD-weighted summed log-probabilities."""
    (lc, mc), (lr, mr) = pair
    shared_len = min(int(mc.sum()), int(mr.sum()))  # torch.minimum(chosen_lens, rejected_lens)
    out = []
    for per_token_logps, completion_mask in ((lc, mc), (lr, mr)):
        comp_pos = completion_mask.cumsum(dim=0)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared_len)
        tail_mask = comp_pos > shared_len
        out.append((per_token_logps * shared_mask).sum() + ld_alpha * (per_token_logps * tail_mask).sum())
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("reference", ["precomputed", "lora-off"])
@pytest.mark.parametrize("kind, ld_alpha", [("dpo", 0.0), ("dpo", 0.5), ("ipo", 0.5), ("sigmoid_norm", 0.3)])
def test_ld_dpo_is_trls(uneven_pairs_dir, kind, ld_alpha, reference, fused, monkeypatch):
    # LD-DPO (ld_alpha): fp64, the loss and gradients of a packed batch are TRL's lines on each pair's
    # replies computed alone (comp_pos, shared_mask, tail_mask: the first min(chosen, rejected) reply
    # tokens in full, the rest times ld_alpha), the reference's alike (precomputed before training,
    # or the LoRA model with its updates off each step); ipo's and sigmoid_norm's token counts stay
    # the plain ones. Fused with the output layer (chunks of whole pairs) alike.
    model, policy, loader, _, batch = batch_of_pairs(uneven_pairs_dir)
    if reference == "lora-off":  # the policy: LoRA updates (non-zero) on the starting model, which is the reference
        policy = model
        policy.add_lora(2, 4.0)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if p.requires_grad:
                    p.copy_(0.2 * torch.randn_like(p))
        ref = trainer.lora_off_reference(policy, policy, ld_alpha)
    else:
        with torch.no_grad():
            ref = trainer.reference_logps(model, uneven_pairs_dir / "train.bin",
                                          TrainConfig(batch_size=3, preference=kind, ld_alpha=ld_alpha), 16, "fp32",
                                          trainer.DistInfo())
    policy.fused_loss = fused
    if fused:
        from pyllm import nn as pyllm_nn
        monkeypatch.setattr("pyllm.model.linear_sequence_loss",
                            functools.partial(pyllm_nn.linear_sequence_loss, chunk_rows=12))
    beta = 0.3
    loss, stats = trainer.preference_batch_loss(policy, batch, ref, kind=kind, beta=beta, fused=fused,
                                                ld_alpha=ld_alpha)
    monkeypatch.undo()
    loss.backward()
    params = [p for p in policy.parameters() if p.requires_grad]
    got = [p.grad.clone() for p in params]
    policy.zero_grad()

    real = [d for d in batch[3] if d >= 0]
    lengths = list(loader.lengths)
    terms, unequal = [], 0
    for c, r, lc, lr in zip(real[0::2], real[1::2], lengths[0::2], lengths[1::2]):
        pair = [token_logps_alone(loader, policy, c, lc), token_logps_alone(loader, policy, r, lr)]
        with torch.no_grad(), contextlib.ExitStack() as off:
            if reference == "lora-off":
                off.enter_context(policy.lora_disabled())
            ref_c, ref_r = ld_logps([token_logps_alone(loader, model, c, lc), token_logps_alone(loader, model, r, lr)],
                                    ld_alpha)
        if reference == "precomputed":
            assert ref[c] == pytest.approx(float(ref_c), rel=1e-12) and ref[r] == pytest.approx(float(ref_r), rel=1e-12)
        nc, nr = int(pair[0][1].sum()), int(pair[1][1].sum())
        unequal += nc != nr
        pc, pr = ld_logps(pair, ld_alpha)
        terms.append(formula(kind, pc, pr, nc, nr, ref_c, ref_r, beta)[0])
    assert unequal  # (pairs of replies of other lengths: the weighting has something to do)
    want = torch.stack(terms).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("reference", ["precomputed", "lora-off"])
def test_ld_alpha_1_is_plain_dpo_and_others_refuse_it(uneven_pairs_dir, reference, tmp_path):
    # ld_alpha 1 weighs nothing down: plain DPO's loss, stats and gradients bitwise, fused or not
    # (the reference's too); ld_alpha goes with the dpo family, in [0, 1].
    model, policy, loader, plain_ref, batch = batch_of_pairs(uneven_pairs_dir)
    if reference == "lora-off":
        policy = model
        policy.add_lora(2, 4.0)
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad:
                    p.copy_(0.2 * torch.randn_like(p))
        plain_ref, ld_ref = trainer.lora_off_reference(policy, policy), trainer.lora_off_reference(policy, policy, 1.0)
    else:
        with torch.no_grad():
            ld_ref = trainer.reference_logps(model, uneven_pairs_dir / "train.bin",
                                             TrainConfig(batch_size=3, preference="dpo", ld_alpha=1.0), 16, "fp32",
                                             trainer.DistInfo())
        assert np.array_equal(ld_ref, plain_ref)
    params = [p for p in policy.parameters() if p.requires_grad]
    for fused in (False, True):
        policy.fused_loss = fused
        out = []
        for ref, ld_alpha in ((plain_ref, None), (ld_ref, 1.0)):
            loss, stats = trainer.preference_batch_loss(policy, batch, ref, kind="dpo", beta=0.3, fused=fused,
                                                        ld_alpha=ld_alpha)
            loss.backward()
            out.append((loss.detach(), stats, [p.grad.clone() for p in params]))
            policy.zero_grad()
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
        assert all(torch.equal(a, b) for a, b in zip(out[0][2], out[1][2]))
    for options in (dict(preference="simpo", ld_alpha=0.5), dict(preference="orpo", ld_alpha=0.5),
                    dict(preference="kto", ld_alpha=0.5), dict(preference="reward", ld_alpha=0.5), dict(ld_alpha=0.5),
                    dict(preference="dpo", ld_alpha=1.5), dict(preference="dpo", ld_alpha=-0.1)):
        with pytest.raises(ValueError, match="ld_alpha must be in"):
            TrainConfig(out_dir=str(tmp_path), **options).validate()
    TrainConfig(out_dir=str(tmp_path), preference="ipo", ld_alpha=0.0).validate()
    with pytest.raises(ValueError, match="ld_alpha with sft_weight"):
        TrainConfig(out_dir=str(tmp_path), preference="dpo", ld_alpha=0.5, sft_weight=1.0).validate()
    with pytest.raises(ValueError, match="ld_alpha goes with the dpo family"):
        trainer.preference_batch_loss(policy, batch, None, kind="simpo", ld_alpha=0.5)


def trl_mix_loss(loss_types, loss_weights, pc, pr, nc, nr, rc, rr, beta, smoothing=0.0, fdiv="reverse_kl"):
    """TRL 1.16's DPOTrainer._compute_loss loop over loss_type with loss_weights, written out from its
    lines for a batch of pairs (each (P,): summed log-probabilities, reply token counts): the sum of
    weight * per_sequence_loss.mean(). Its sft term averages over the batch's chosen tokens; here
    each pair's NLL per token, then their mean (pyllm's, as --sft-weight's)."""
    F = torch.nn.functional
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    f = {"reverse_kl": lambda x: x, "forward_kl": lambda x: 1 - torch.exp(-x),
         "js_divergence": lambda x: math.log(2) + F.logsigmoid(x)}[fdiv]
    chosen_scores, rejected_scores = f(chosen_logratios), f(rejected_logratios)
    delta_score = chosen_scores - rejected_scores
    loss = 0.0
    for loss_type, loss_weight in zip(loss_types, loss_weights, strict=True):
        if loss_type == "sigmoid":
            per_sequence_loss = -F.logsigmoid(beta * delta_score)
        elif loss_type == "hinge":
            per_sequence_loss = torch.relu(1 - beta * delta_score)
        elif loss_type == "ipo":
            ipo_delta = chosen_scores / nc.clamp(min=1.0) - rejected_scores / nr.clamp(min=1.0)
            per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            epsilon = torch.tensor(smoothing, dtype=torch.float64)
            qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)
            ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)
            per_sequence_loss = qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
        elif loss_type == "nca_pair":
            chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
            per_sequence_loss = (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                                 - 0.5 * F.logsigmoid(-rejected_rewards))
        elif loss_type == "robust":
            clean_loss_term = -(1 - smoothing) * F.logsigmoid(beta * delta_score)
            flipped_loss_term = -smoothing * F.logsigmoid(-beta * delta_score)
            per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * smoothing)
        elif loss_type == "bco_pair":
            chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
            per_sequence_loss = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
        elif loss_type == "sppo_hard":
            per_sequence_loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type == "apo_down":
            per_sequence_loss = (torch.sigmoid(beta * chosen_logratios)
                                 + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
        elif loss_type == "sigmoid_norm":
            delta = chosen_scores / nc.clamp(min=1.0) - rejected_scores / nr.clamp(min=1.0)
            per_sequence_loss = -F.logsigmoid(beta * delta)
        else:
            assert loss_type == "sft", loss_type
            per_sequence_loss = -pc / nc.clamp(min=1.0)  # (pyllm's: each pair's NLL per token)
        loss += per_sequence_loss.mean() * loss_weight
    return loss


# pyllm's spelling of TRL's loss_type lists: (preference, its weight), preference_mix, sft_weight
MIXES = {"mpo": (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),
         "js": (["sigmoid", "ipo", "hinge", "sft"], [0.5, 0.3, 1.0, 0.4], {"fdiv": "js_divergence"}),
         "exo": (["exo_pair", "robust", "nca_pair", "sppo_hard", "apo_down"], [1.0, 0.5, 2.0, 0.01, 0.7],
                 {"smoothing": 1e-3})}


def mix_options(loss_types, loss_weights, smoothing=0.0, fdiv="reverse_kl"):
    """preference_loss's options for TRL's loss_type and loss_weights."""
    kinds = [("dpo" if k == "sigmoid" else k, w) for k, w in zip(loss_types, loss_weights) if k != "sft"]
    sft = [w for k, w in zip(loss_types, loss_weights) if k == "sft"]
    return dict(kind=kinds[0][0], weight=kinds[0][1], mix=tuple(kinds[1:]), sft_weight=sft[0] if sft else 0.0,
                label_smoothing=smoothing, f_divergence=fdiv)


@pytest.mark.parametrize("mix", list(MIXES))
def test_preference_loss_mix_is_trls(mix):
    # A mix (TRL's loss_type list with loss_weights: MPO's, f-DPO's js_divergence over all of its losses,
    # EXO's epsilon taken by exo_pair and robust): fp64, the mean loss and its gradients are TRL's loop's,
    # the rewards logged once (beta times the summed log-ratios, whichever the losses), not one per loss.
    from pyllm.nn import preference_loss

    loss_types, loss_weights, extra = MIXES[mix]
    g = torch.Generator().manual_seed(3)
    pc, pr = (-20 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(2))
    rc, rr = (p + torch.randn(6, generator=g, dtype=torch.float64) for p in (pc, pr))
    nc, nr = (torch.randint(1, 9, (6,), generator=g).to(torch.float64) for _ in range(2))
    beta = 0.3
    got_inputs = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
    losses, chosen, rejected = preference_loss(chosen_logps=got_inputs[0], rejected_logps=got_inputs[1],
                                               chosen_tokens=nc, rejected_tokens=nr, ref_chosen_logps=rc,
                                               ref_rejected_logps=rr, beta=beta,
                                               **mix_options(loss_types, loss_weights, **extra))
    losses.mean().backward()
    want_inputs = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
    want = trl_mix_loss(loss_types, loss_weights, *want_inputs, nc, nr, rc, rr, beta, **extra)
    want.backward()
    assert losses.mean().item() == pytest.approx(want.item(), rel=1e-12)
    for a, b in zip(got_inputs, want_inputs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(chosen, beta * (pc - rc), rtol=1e-15, atol=0)
    torch.testing.assert_close(rejected, beta * (pr - rr), rtol=1e-15, atol=0)


def test_preference_loss_weight_1_and_no_mix_are_todays_and_mixes_are_refused_otherwise():
    # weight 1 and no mix: every kind's losses and rewards as without them, bitwise; a weight scales
    # the kind's loss, not sft_weight's NLL; a mix takes the dpo family, each once
    from pyllm.nn import PREFERENCE_LOSSES, preference_loss

    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (-20 * torch.rand(4, generator=g, dtype=torch.float64) for _ in range(4))
    n = torch.tensor([3.0, 1.0, 5.0, 2.0], dtype=torch.float64)
    for kind in PREFERENCE_LOSSES:
        kw = dict(chosen_logps=pc, rejected_logps=pr, chosen_tokens=n, rejected_tokens=n.flip(0), ref_chosen_logps=rc,
                  ref_rejected_logps=rr, beta=0.3, label_smoothing=1e-3 if kind == "exo_pair" else 0.0,
                  desirable=torch.tensor([True, False, True, False]))
        plain, same = preference_loss(kind, **kw), preference_loss(kind, weight=1.0, mix=(), **kw)
        assert all(torch.equal(a, b) for a, b in zip(plain, same)), kind
    kw = dict(chosen_logps=pc, rejected_logps=pr, chosen_tokens=n, rejected_tokens=n, ref_chosen_logps=rc,
              ref_rejected_logps=rr, beta=0.3)
    nll = -pc / n
    torch.testing.assert_close(preference_loss("dpo", weight=0.25, sft_weight=2.0, **kw)[0],
                               0.25 * preference_loss("dpo", **kw)[0] + 2.0 * nll, rtol=1e-15, atol=0)
    for kind, mix, message in (("simpo", (("dpo", 1.0),), "takes the dpo family"),
                               ("dpo", (("kto", 1.0),), "takes the dpo family"),
                               ("dpo", (("bco_pair", 1.0), ("bco_pair", 0.5)), "each once"),
                               ("dpo", (("dpo", 0.5),), "each once")):
        with pytest.raises(ValueError, match=message):
            preference_loss(kind, mix=mix, **kw)
    with pytest.raises(ValueError, match="f_divergence .* got 'forward_kl' with bco_pair"):
        preference_loss("dpo", mix=(("bco_pair", 1.0),), f_divergence="forward_kl", **kw)
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
        preference_loss("dpo", mix=(("exo_pair", 1.0),), **kw)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_preference_batch_loss_of_a_mix_is_trls(pairs_dir, mix, fused, monkeypatch):
    # a TrainConfig's mix (preference_options: preference, preference_mix, preference_weights, sft_weight)
    # on a packed batch, fused with the output layer or not: fp64, the loss and gradients of TRL's loop on
    # each pair's log-probabilities computed alone; the rewards logged once
    loss_types, loss_weights, extra = MIXES[mix]
    options = mix_options(loss_types, loss_weights, **extra)
    cfg = TrainConfig(preference=options["kind"], preference_mix=[k for k, _ in options["mix"]],
                      preference_weights=[options["weight"], *(w for _, w in options["mix"])],
                      sft_weight=options["sft_weight"], label_smoothing=options["label_smoothing"],
                      f_divergence=options["f_divergence"], beta=0.3)
    cfg.validate()
    model, policy, loader, reference, batch = batch_of_pairs(pairs_dir)
    policy.fused_loss = fused
    if fused:
        from pyllm import nn as pyllm_nn
        monkeypatch.setattr("pyllm.model.linear_sequence_loss",
                            functools.partial(pyllm_nn.linear_sequence_loss, chunk_rows=12))
    loss, stats = trainer.preference_batch_loss(policy, batch, reference, fused=fused,
                                                **trainer.preference_options(cfg))
    monkeypatch.undo()
    loss.backward()
    got = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    real = [d for d in batch[3] if d >= 0]
    lengths = list(loader.lengths)
    each = []
    for c, r, lc, lr in zip(real[0::2], real[1::2], lengths[0::2], lengths[1::2]):
        with torch.no_grad():
            (ref_c, _), (ref_r, _) = logps_alone(loader, model, c, lc), logps_alone(loader, model, r, lr)
        (pc, nc), (pr, nr) = logps_alone(loader, policy, c, lc), logps_alone(loader, policy, r, lr)
        each.append((pc, pr, torch.tensor(float(nc), dtype=torch.float64),
                     torch.tensor(float(nr), dtype=torch.float64), ref_c, ref_r))
    pc, pr, nc, nr, rc, rr = (torch.stack(column) for column in zip(*each))
    want = trl_mix_loss(loss_types, loss_weights, pc, pr, nc, nr, rc, rr, 0.3, **extra)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert stats[0].item() == pytest.approx((0.3 * (pc - rc)).mean().item(), rel=1e-10)
    assert stats[1].item() == pytest.approx((0.3 * (pr - rr)).mean().item(), rel=1e-10)
    for g, p in zip(got, policy.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-14)


def test_a_mix_trains_and_resumes_exactly(pairs_dir, tmp_path):
    # TRL's loss_type ["sigmoid", "bco_pair"] with loss_weights [0.8, 0.2] in a run (fused): the first loss
    # at the reference is 0.8 log 2 + 0.2 * 2 log 2; a resume is bitwise; the mix and weights are taken on
    # resume as the other loss options (sft_weight, label_smoothing): a run told another mix trains with it
    kw = dict(preference="dpo", preference_mix=["bco_pair"], preference_weights=[0.8, 0.2], beta=0.5, max_steps=8,
              fused_loss=True)
    trainer.train(config(pairs_dir, tmp_path / "whole", **kw))
    log = [json.loads(line) for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(1.2 * math.log(2), abs=1e-6) and math.isfinite(log[-1]["val_loss"])
    trainer.train(config(pairs_dir, tmp_path / "cut", **kw), stop_at=4)
    trainer.train(config(pairs_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    trainer.train(config(pairs_dir, tmp_path / "other", **kw), stop_at=4)
    trainer.train(config(pairs_dir, tmp_path / "other", **{**kw, "preference_weights": [1.0, 0.0]}), resume=True)
    other = losses(tmp_path / "other")
    assert other[:4] == losses(tmp_path / "whole")[:4] and other[4] != losses(tmp_path / "whole")[4]


def test_preference_mix_options_are_checked(tmp_path):
    ok = [dict(preference="dpo", preference_mix=["bco_pair"], preference_weights=[0.8, 0.2], sft_weight=1.0),
          dict(preference="dpo", preference_weights=[0.5]),
          dict(preference="bco_pair", preference_mix=["exo_pair"], label_smoothing=0.7),  # (EXO's epsilon alone)
          dict(preference="hinge", preference_mix=["ipo", "dpo"], f_divergence="js_divergence"),
          dict(preference="nca_pair", preference_mix=["robust"], label_smoothing=0.1, ld_alpha=0.5)]
    for options in ok:
        TrainConfig(out_dir=str(tmp_path), **options).validate()
    for options, message in (
            (dict(preference="simpo", preference_mix=["dpo"]), "preference_mix: more losses of the dpo family"),
            (dict(preference_mix=["dpo"]), "got preference 'none' with"),
            (dict(preference="dpo", preference_mix=["kto"]), "preference_mix: more losses"),
            (dict(preference="dpo", preference_mix=["sft"]), r"TRL's sft: sft_weight\), got preference 'dpo'"),
            (dict(preference="dpo", preference_mix=["dpo"]), "each once"),
            (dict(preference="dpo", preference_mix=[["ipo"]]), "preference_mix: more losses"),
            (dict(preference="dpo", preference_mix=["bco_pair"], preference_weights=[1.0]),
             "for each of the 2 loss"),
            (dict(preference="dpo", preference_weights=[-1.0]), "a finite number >= 0"),
            (dict(preference="dpo", preference_weights=[math.inf]), "a finite number >= 0"),
            (dict(preference="dpo", preference_weights=[True]), "a finite number >= 0"),
            (dict(preference_weights=[1.0]), "preference_weights"),
            (dict(preference="bco_pair", preference_mix=["nca_pair"], label_smoothing=0.1),
             "label_smoothing goes with preference dpo, robust or exo_pair"),
            (dict(preference="dpo", preference_mix=["exo_pair"]), "exo_pair needs it above 0"),
            (dict(preference="dpo", preference_mix=["exo_pair"], label_smoothing=0.7), "label_smoothing must be in"),
            (dict(preference="robust", preference_mix=["exo_pair"], label_smoothing=0.5), "label_smoothing must be in"),
            (dict(preference="dpo", preference_mix=["bco_pair"], f_divergence="forward_kl"),
             "f_divergence must be one of .* got 'forward_kl' with 'dpo', 'bco_pair'"),
            (dict(preference="dpo", preference_mix=["bco_pair"], ld_alpha=0.5, sft_weight=1.0), "ld_alpha with sft")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(out_dir=str(tmp_path), **options).validate()


def token_stats_alone(loader, m, doc, length):
    """(entropy sum, argmax hits, mean-logit sum, count) over a document's trained targets within its
    first length tokens, the document run alone through m (logps_alone's positions)."""
    start, end = loader.offsets[doc], loader.offsets[doc + 1]
    ids = torch.from_numpy(np.asarray(loader.tokens[start:end], np.int64))
    mask = torch.from_numpy(np.asarray(loader.mask[start:end], np.int64))[1:min(length + 1, end - start)].bool()
    with torch.no_grad():
        logits = m(ids[None, :min(length, end - start)])[0][0][:len(mask)]  # (n, V)
    logp = torch.log_softmax(logits, -1)
    entropy, hit = -(logp.exp() * logp).sum(-1), logits.argmax(-1) == ids[1:len(mask) + 1]
    return np.array([entropy[mask].sum().item(), hit[mask].sum().item(), logits.mean(-1)[mask].sum().item(),
                     mask.sum().item()])


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("kind", ["dpo", "simpo", "kto"])
def test_preference_token_stats_are_trls(pairs_dir, kto_dir, kind, fused):
    # preference_batch_loss(token_stats=True): the sums TRL's DPOTrainer / KTOTrainer log their entropy
    # (every trained reply's tokens: KTO's examples, not its KL documents), mean_token_accuracy (the
    # chosen replies') and logits/chosen, logits/rejected (the mean logit over the vocabulary, at the
    # chosen and the rejected replies' tokens; KTO's desirable and undesirable examples') from, each
    # document computed alone in fp64; fused or not; the loss and its stats as without them.
    model, policy, loader, reference, batch = batch_of_pairs(kto_dir if kind == "kto" else pairs_dir)

    def labels_trained(batch):  # the labels of the examples with trained tokens
        tokens = trainer.sequence_logps((batch[1] != -1).double(), batch[2])
        examples = [i for i, d in enumerate(batch[3]) if d >= 0][0::2]
        return {bool(loader.labels[batch[3][i] // 2]) for i in examples if tokens[i] > 0}

    while kind == "kto" and labels_trained(batch) != {True, False}:
        batch = (*loader.next_batch(), loader.docs)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(20):  # (the batch's replies learnt a little: some targets become the argmax)
        optimizer.zero_grad()
        (-policy(*batch[:3], per_token=True)[1].sum()).backward()
        optimizer.step()
    policy.fused_loss = fused
    options = dict(kind=kind, beta=0.3, fused=fused)
    ref = None if kind == "simpo" else reference
    loss, stats, sums = trainer.preference_batch_loss(policy, batch, ref, loader.labels, token_stats=True, **options)
    plain_loss, plain_stats = trainer.preference_batch_loss(policy, batch, ref, loader.labels, **options)
    assert torch.equal(loss, plain_loss) and torch.equal(stats, plain_stats)
    real, lengths = [d for d in batch[3] if d >= 0], list(loader.lengths)
    first = [token_stats_alone(loader, policy, d, n) for d, n in zip(real[0::2], lengths[0::2])]
    second = [token_stats_alone(loader, policy, d, n) for d, n in zip(real[1::2], lengths[1::2])]
    if kind == "kto":  # the examples by label; the KL documents (second) count nowhere
        good = [bool(loader.labels[d // 2]) for d in real[0::2]]
        chosen = [f for f, g in zip(first, good) if g] or [np.zeros(4)]
        rejected = [f for f, g in zip(first, good) if not g] or [np.zeros(4)]
        everything = first
    else:
        chosen, rejected, everything = first, second, first + second
    c, r, e = (np.sum(group, axis=0) for group in (chosen, rejected, everything))
    want = [e[0], e[3], c[1], c[3], c[2], r[2], r[3]]
    np.testing.assert_allclose(sums.tolist(), want, rtol=1e-10, atol=1e-12)
    assert sums.dtype == torch.float64 and e[3] > 0 and 0 < c[1] < c[3]


def test_preference_token_means_average_micro_steps_as_trl():
    # each micro-step's ratios, then their mean: DPOTrainer's 0.0 for a micro-step without the tokens;
    # KTOTrainer's logits/* leave it out (None with none), and it logs no mean_token_accuracy
    sums = torch.tensor([[6.0, 3.0, 1.0, 2.0, 4.0, -1.0, 1.0], [0.0] * 7, [2.0, 1.0, 1.0, 1.0, 3.0, 0.0, 0.0]])
    dpo = trainer.preference_token_means(sums)
    assert dpo == pytest.approx({"entropy": (2 + 0 + 2) / 3, "mean_token_accuracy": (0.5 + 0 + 1) / 3,
                                 "logits_chosen": (2 + 0 + 3) / 3, "logits_rejected": (-1 + 0 + 0) / 3})
    kto = trainer.preference_token_means(sums, kto=True)
    assert kto == pytest.approx({"entropy": (2 + 0 + 2) / 3, "logits_chosen": (2 + 3) / 2, "logits_rejected": -1.0})
    assert trainer.preference_token_means(sums[1:2], kto=True)["logits_chosen"] is None


@pytest.mark.parametrize("kind", ["dpo", "kto", "reward"])
def test_preference_evaluation_logs_trls_eval_metrics(pairs_dir, kto_dir, tmp_path, kind):
    # evaluate_preference: val_ each of the step's metrics (TRL's eval_ ones) over the fixed val batches:
    # the rewards and log-probabilities means over the pairs (KTO's: each batch's per label, then the
    # batches'), the token metrics each batch's ratios, then their mean; in the run's log too
    folder = kto_dir if kind == "kto" else pairs_dir
    cfg = config(folder, tmp_path / "run", preference=kind, eval_batches=3, batch_size=2)
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 64}))
    if kind == "reward":
        model.add_score_head()
    reference = None
    if kind != "reward":
        reference = trainer.reference_logps(model, folder / "val.bin", cfg, 16, "fp32", trainer.DistInfo())
    got = trainer.evaluate_preference(model, folder / "val.bin", reference, cfg, 16, "fp32", trainer.DistInfo())
    loader = trainer.make_loader(folder / "val.bin", cfg, 16, cfg.seed + 1, trainer.DistInfo())
    names = trainer.preference_stat_names(kind)
    weighted, pairs, per_batch, tokens = 0, 0, [], []
    for _ in range(3):
        batch = (*loader.next_batch(), loader.docs)
        with torch.no_grad():
            loss, stats, *sums = trainer.preference_batch_loss(model, batch, reference, loader.labels, loader.margins,
                                                               token_stats=kind != "reward",
                                                               **trainer.preference_options(cfg))
        weighted = weighted + torch.cat([loss[None], stats[:len(names)]]).double() * loader.placed
        pairs += loader.placed
        per_batch.append(stats[3:10].tolist())
        tokens += sums
    means = (weighted / pairs).tolist()
    assert got["val_loss"] == pytest.approx(means[0], rel=1e-6) and pairs > 3
    assert got["val_reward_accuracy"] == pytest.approx(means[3], rel=1e-6, abs=1e-9)
    if kind == "dpo":
        assert got["val_reward_chosen"] == pytest.approx(means[1], rel=1e-6)
        assert got["val_logps_rejected"] == pytest.approx(means[5], rel=1e-6)
        assert got["val_reward_margin"] == pytest.approx(means[1] - means[2], rel=1e-6)
    if kind == "kto":  # (each batch's mean of a label's rewards, over the batches that had one)
        good = [b[0] / b[2] for b in per_batch if b[2]]
        assert got["val_reward_chosen"] == pytest.approx(sum(good) / len(good), rel=1e-6) and "val_kl" in got
    if kind != "reward":
        t = torch.stack(tokens).tolist()
        assert got["val_entropy"] == pytest.approx(sum(e / n if n else 0.0 for e, n, *_ in t) / 3, rel=1e-6)
        assert got["val_logits_chosen"] == pytest.approx(np.mean([m[4] / m[3] for m in t if m[3]]), rel=1e-5)
        assert ("val_mean_token_accuracy" in got) == (kind == "dpo")
    else:  # RewardTrainer's min_reward, max_reward: each batch's extremes, then their mean
        assert not {"val_entropy", "val_logits_chosen"} & set(got)
        assert got["val_min_reward"] == pytest.approx(-np.mean([b[0] for b in per_batch]), rel=1e-6)
        assert got["val_max_reward"] == pytest.approx(np.mean([b[1] for b in per_batch]), rel=1e-6)
        assert got["val_mean_reward"] == pytest.approx((means[1] + means[2]) / 2, rel=1e-6)
        assert got["val_min_reward"] < got["val_mean_reward"] < got["val_max_reward"]
    trainer.train(config(folder, tmp_path / "logged", preference=kind, max_steps=2, eval_every=1))
    record = json.loads((tmp_path / "logged/log.jsonl").read_text().splitlines()[0])
    assert {"val_loss", "val_reward_accuracy", "val_reward_chosen", "val_reward_margin"} <= set(record)
    assert ("val_entropy" in record) == (kind != "reward")
    assert ({"min_reward", "mean_reward", "max_reward"} <= set(record)) == (kind == "reward")
    if kind == "reward":
        assert record["min_reward"] < record["mean_reward"] < record["max_reward"]


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_preference_runs_log_trls_metrics(pairs_dir, tmp_path, kind):
    # TRL's logps/chosen, logps/rejected and ORPOTrainer's nll_loss, log_odds_ratio, log_odds_chosen
    # had not been logged (an audit against TRL 1.16, 2026-12-06, found the values equal: log odds
    # ratio -0.6140962 both); ORPO's loss is its NLL term less beta times the log odds ratio.
    beta = 0.2
    trainer.train(config(pairs_dir, tmp_path, preference=kind, beta=beta, max_steps=3, eval_every=0, grad_accum=2))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    for r in log:
        assert r["logps_chosen"] < 0 and r["logps_rejected"] < 0
        if kind == "orpo":
            assert r["loss"] == pytest.approx(r["nll_loss"] - beta * r["log_odds_ratio"], rel=1e-5)
            assert r["nll_loss"] == pytest.approx(-r["logps_chosen"], rel=1e-6) and r["log_odds_ratio"] < 0
            assert r["reward_chosen"] == pytest.approx(beta * r["logps_chosen"], rel=1e-6)
        else:
            assert "nll_loss" not in r
    if kind == "dpo":  # the policy starts as the reference: rewards 0, log-probabilities the reference's
        assert log[0]["reward_chosen"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_preference_runs_log_trls_token_metrics(pairs_dir, kto_dir, tmp_path, kind):
    # TRL's DPOTrainer's entropy, mean_token_accuracy, logits/chosen and logits/rejected (KTOTrainer's:
    # no accuracy) in every log line, by default: the same at step 0 fused or not (to fp32
    # rounding); none with --no-token-stats
    folder = kto_dir if kind == "kto" else pairs_dir
    first = {}
    for fused in (False, True):
        out = tmp_path / f"fused-{fused}"
        trainer.train(config(folder, out, preference=kind, max_steps=2, eval_every=0, grad_accum=2, fused_loss=fused))
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        for r in log:
            assert 0 < r["entropy"] <= math.log(64) and abs(r["logits_chosen"]) < 10 and abs(r["logits_rejected"]) < 10
            assert ("mean_token_accuracy" in r) == (kind != "kto") and 0 <= r.get("mean_token_accuracy", 0) <= 1
        first[fused] = log[0]
    for name in ("entropy", "mean_token_accuracy", "logits_chosen", "logits_rejected"):
        assert first[True].get(name) == pytest.approx(first[False].get(name), rel=1e-5, abs=1e-6), name
    trainer.train(config(folder, tmp_path / "off", preference=kind, max_steps=1, eval_every=0, token_stats=False))
    record = json.loads((tmp_path / "off/log.jsonl").read_text())
    assert not {"entropy", "mean_token_accuracy", "logits_chosen"} & set(record) and "reward_chosen" in record


def test_trls_other_dpo_losses_train(pairs_dir, tmp_path):
    # TRL's other DPOTrainer loss types as --preference kinds: each trains (the reference pass, its
    # metrics, the fused path) with its own first loss at the reference (the policy equal to it: every
    # log-ratio 0); robust's chosen replies come to win as dpo's do.
    at_reference = {"robust": math.log(2), "exo_pair": -math.log(2) - 0.5 * math.log(1e-3 * (1 - 1e-3)),
                    "nca_pair": 2 * math.log(2), "bco_pair": 2 * math.log(2), "sppo_hard": 2 * (0.5 / 0.1) ** 2,
                    "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * math.log(2) + 0.5, "sigmoid_norm": math.log(2)}
    for kind, first in at_reference.items():
        extra = {"label_smoothing": 1e-3} if kind == "exo_pair" else {}
        trainer.train(config(pairs_dir, tmp_path / kind, preference=kind, max_steps=2, eval_every=2,
                             fused_loss=kind in ("nca_pair", "discopop"), **extra))
        log = [json.loads(line) for line in (tmp_path / kind / "log.jsonl").read_text().splitlines()]
        assert log[0]["loss"] == pytest.approx(first, rel=1e-5), kind
        assert np.isfinite(log[-1]["val_loss"]) and 0 <= log[-1]["val_reward_accuracy"] <= 1
    kw = dict(preference="robust", label_smoothing=0.1, beta=0.5, max_steps=16, eval_every=16, lr=3e-3)
    trainer.train(config(pairs_dir, tmp_path / "learns", **kw))
    log = [json.loads(line) for line in (tmp_path / "learns/log.jsonl").read_text().splitlines()]
    assert np.mean([r["reward_accuracy"] for r in log[-8:]]) > 0.6 and log[-1]["val_reward_accuracy"] > 0.6
    for options, message in ((dict(preference="exo_pair"), "exo_pair needs it above 0"),
                             (dict(preference="dpo", discopop_tau=0.0), "discopop_tau must be positive"),
                             (dict(preference="nca_pair", f_divergence="forward_kl"), "f_divergence must be one of"),
                             (dict(preference="dpo", f_alpha=0.3), "f_alpha must be finite and goes with"),
                             (dict(preference="exo_pair", label_smoothing=1.0), "exo_pair's epsilon in .0, 1.")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(out_dir=str(tmp_path), **options).validate()
    TrainConfig(out_dir=str(tmp_path), preference="exo_pair", label_smoothing=0.7).validate()  # (TRL takes any e > 0)


def test_dpo_learns_and_resumes_exactly(pairs_dir, tmp_path):
    # The first step's loss is log 2 (the policy is the reference); the chosen replies (the phrase
    # going on) win more often as it trains; a run stopped and resumed gives the same losses, bitwise.
    kw = dict(preference="dpo", beta=0.5, max_steps=16, eval_every=8, ckpt_every=4, lr=3e-3)
    trainer.train(config(pairs_dir, tmp_path / "whole", **kw))
    log = [json.loads(line) for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(log[0]["reward_margin"]) < 1e-6
    assert np.mean([r["loss"] for r in log[-4:]]) < math.log(2) - 0.05
    assert np.mean([r["reward_accuracy"] for r in log[-8:]]) > 0.6 and log[-1]["val_reward_accuracy"] > 0.6
    assert log[-1]["val_loss"] < 0.5
    trainer.train(config(pairs_dir, tmp_path / "cut", **kw), stop_at=6)
    trainer.train(config(pairs_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_ld_dpo_trains_and_resumes_only_with_its_reference(pairs_dir, tmp_path):
    # ld_alpha in a run: the first loss is log 2 (policy and precomputed reference weighted alike),
    # val too; a resume is bitwise; the checkpoint's reference was weighted with the run's ld_alpha,
    # so a resume with another (or none) is refused, not trained against the wrong reference.
    kw = dict(preference="dpo", beta=0.5, max_steps=8, ld_alpha=0.5, fused_loss=True)
    trainer.train(config(pairs_dir, tmp_path / "whole", **kw))
    log = [json.loads(line) for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(log[-1]["val_loss"])
    trainer.train(config(pairs_dir, tmp_path / "cut", **kw), stop_at=4)
    for other in (None, 0.0):
        with pytest.raises(ValueError, match="weighted with 0.5"):
            trainer.train(config(pairs_dir, tmp_path / "cut", **{**kw, "ld_alpha": other}), resume=True)
    trainer.train(config(pairs_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_dpo_with_lora(pairs_dir, tmp_path, device):
    # LoRA: the reference is the frozen model (the updates start at 0), only the updates train. On
    # the GPU in bf16 with the fused loss (linear_token_logps there), the first loss log 2 to bf16
    # rounding (the reference pass packs the pairs into other rows).
    extra = dict(precision="bf16", fused_loss=True) if device == "cuda" else {}
    trainer.train(config(pairs_dir, tmp_path / "lora", preference="dpo", beta=0.5, lora_rank=4, max_steps=12, lr=1e-2,
                         device=device, **extra))
    log = [json.loads(line) for line in (tmp_path / "lora/log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6 if device == "cpu" else 2e-3)
    assert log[-1]["loss"] < log[0]["loss"]


def test_dpo_reference_of_a_lora_run_on_the_fly(pairs_dir, tmp_path, capsys):
    # reference lora-off: the model with its updates off at each step computes the same reference
    # as the pass before training (no such pass, nothing in the checkpoint); resume is exact.
    kw = dict(preference="dpo", beta=0.5, lora_rank=4, max_steps=8, lr=1e-2)
    trainer.train(config(pairs_dir, tmp_path / "pre", **kw))
    capsys.readouterr()
    trainer.train(config(pairs_dir, tmp_path / "fly", reference="lora-off", **kw))
    assert "reference model's log-probabilities" not in capsys.readouterr().err
    np.testing.assert_allclose(losses(tmp_path / "fly"), losses(tmp_path / "pre"), rtol=1e-5)
    assert losses(tmp_path / "fly")[0] == pytest.approx(math.log(2), abs=1e-7)
    assert "reference_logps" not in torch.load(tmp_path / "fly/checkpoint.pt", weights_only=True)
    trainer.train(config(pairs_dir, tmp_path / "cut", reference="lora-off", **kw), stop_at=6)
    trainer.train(config(pairs_dir, tmp_path / "cut", reference="lora-off", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "fly")
    with pytest.raises(ValueError, match="needs lora_rank"):
        TrainConfig(out_dir=str(tmp_path), preference="dpo", reference="lora-off").validate()


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_reference_model_on_the_fly_and_synced(data_dir, tmp_path, capsys, kind, request):
    # reference model: a frozen copy of the starting model computes each step's reference as the pass
    # before training does (no such pass, nothing in the checkpoint); with sync_ref_model (TR-DPO, TRL's
    # SyncRefModelCallback) that copy becomes alpha * policy + (1 - alpha) * itself after every
    # ref_model_sync_steps-th step, the checkpoint holding it: the update bitwise, resume exact
    data = request.getfixturevalue("pairs_dir" if kind == "dpo" else "kto_dir")
    trainer.train(config(data_dir, tmp_path / "base", max_steps=2))
    kw = dict(preference=kind, beta=0.5, max_steps=6, init_from_run=str(tmp_path / "base"), eval_every=0)
    trainer.train(config(data, tmp_path / "pre", **kw))
    capsys.readouterr()
    trainer.train(config(data, tmp_path / "fly", reference="model", **kw))
    assert "reference model's log-probabilities" not in capsys.readouterr().err
    np.testing.assert_allclose(losses(tmp_path / "fly"), losses(tmp_path / "pre"), rtol=1e-5)
    assert "reference_logps" not in torch.load(tmp_path / "fly/checkpoint.pt", weights_only=True)
    synced = dict(kw, reference="model", sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.25,
                  ckpt_every=2, keep_checkpoints=3)
    trainer.train(config(data, tmp_path / "synced", **synced))
    assert losses(tmp_path / "synced")[:2] == losses(tmp_path / "fly")[:2]
    assert losses(tmp_path / "synced")[2:] != losses(tmp_path / "fly")[2:]
    reference = LLM.load(tmp_path / "base/model.safetensors").state_dict()  # (tied weights under both names)
    for n in (2, 4, 6):
        kept = torch.load(tmp_path / f"synced/checkpoints/step_{n}.pt", weights_only=False)
        for name, weight in kept["reference_model"].items():
            want = reference[name].clone().mul_(0.75).add_(kept["model"][name].to(weight.dtype), alpha=0.25)
            assert torch.equal(weight, want), (n, name)
        reference = kept["reference_model"]
    trainer.train(config(data, tmp_path / "cut", **synced), stop_at=3)
    trainer.train(config(data, tmp_path / "cut", **synced), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "synced")
    for options, message in ((dict(preference="dpo", reference="model"), "needs a preference loss with a reference"),
                             (dict(preference="simpo", reference="model", init_from_run="x"), "needs a preference"),
                             (dict(preference="dpo", sync_ref_model=True), "it needs one of its own")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(out_dir=str(tmp_path), **options).validate()


def test_fused_preference_loss_leaves_the_balancing_loss_to_the_caller(pairs_dir):
    # A mixture of experts in training: the fused pair loss (fp64) is the unfused one, loss, stats and
    # gradients; neither includes the load-balancing loss (the training loop adds model.aux_loss once).
    from pyllm.model import LLM, ModelConfig

    got = []
    for fused in (False, True):
        torch.manual_seed(0)
        policy = LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 64, "n_experts": 4,
                                                         "router_aux_loss_coef": 0.1})).double()
        policy.fused_loss = fused
        loader = data.PackedLoader(pairs_dir / "train.bin", 3, 16, seed=4)
        batch = (*loader.next_batch(), loader.docs)
        loss, stats = trainer.preference_batch_loss(policy, batch, None, kind="simpo", beta=0.5, fused=fused)
        assert policy.aux_loss is not None and float(policy.aux_loss) > 0
        (loss + policy.aux_loss).backward()
        got.append((loss.detach(), stats, [p.grad.clone() for p in policy.parameters()]))
    assert got[1][0].item() == pytest.approx(got[0][0].item(), rel=1e-12)
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-12, atol=0)
    for a, b in zip(got[1][2], got[0][2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)


def test_dpo_with_fused_loss_trains_as_without(pairs_dir, tmp_path):
    # --fused-loss under DPO: the loss fused with the output layer, pairs whole (no logits): the same losses.
    trainer.train(config(pairs_dir, tmp_path / "plain", preference="dpo", beta=0.5))
    trainer.train(config(pairs_dir, tmp_path / "fused", preference="dpo", beta=0.5, fused_loss=True))
    np.testing.assert_allclose(losses(tmp_path / "fused"), losses(tmp_path / "plain"), rtol=1e-5)


@pytest.mark.parametrize("center,margined", [(0.0, False), (0.3, False), (0.3, True)])
def test_reward_model_batch_loss_is_each_sequence_alone(pairs_dir, center, margined):
    # fp64: a reward model's loss and gradients on a packed batch are the Bradley-Terry loss of the
    # score head at each reply's last token (+ TRL's centering term; less each pair's margin), each
    # sequence run alone; the rewards are the scores.
    _, policy, loader, _, batch = batch_of_pairs(pairs_dir)
    policy.add_score_head(1)
    torch.nn.init.normal_(policy.score.weight, std=0.5)
    margins = np.random.default_rng(3).uniform(-1, 2, len(loader.pairs)) if margined else None
    loss, stats = trainer.preference_batch_loss(policy, batch, None, margins=margins, kind="reward", center_rewards=center)
    loss.backward()
    got = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    real, lengths = [d for d in batch[3] if d >= 0], list(loader.lengths)

    def score(doc, length):
        ids = torch.from_numpy(np.asarray(loader.tokens[loader.offsets[doc]:loader.offsets[doc] + length], np.int64))
        return policy(ids[None], scores=True)[1][0, 0]

    chosen = torch.stack([score(d, n) for d, n in zip(real[0::2], lengths[0::2])])
    rejected = torch.stack([score(d, n) for d, n in zip(real[1::2], lengths[1::2])])
    margin = torch.from_numpy(margins[[d // 2 for d in real[0::2]]]) if margined else 0.0  # (pair p: documents 2p, 2p + 1)
    assert not margined or {tuple(loader.pairs[d // 2]) for d in real[0::2]} == set(zip(real[0::2], real[1::2]))
    want = (-torch.nn.functional.logsigmoid(chosen - rejected - margin).mean()
            + center * ((chosen + rejected) ** 2).mean())
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    scores = torch.cat([chosen, rejected])  # (then RewardTrainer's min_reward and max_reward: -min, max)
    np.testing.assert_allclose(stats.tolist(), [chosen.mean().item(), rejected.mean().item(),
                                                (chosen > rejected).double().mean().item(), -scores.min().item(),
                                                scores.max().item()], rtol=1e-10)
    for g, p in zip(got, policy.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-14)


def test_reward_model_trains_with_margins(pairs_dir, tmp_path):
    # A .margins.npy beside the pairs: the trainer's loss subtracts each pair's margin (a margin of
    # 0 everywhere trains as without; a large one raises the loss at the first step).
    import shutil

    for name, margin in (("zero", 0.0), ("big", 3.0)):
        shutil.copytree(pairs_dir, tmp_path / name)
        for split in ("train", "val"):
            pairs = np.load(tmp_path / name / f"{split}.pairs.npy")
            np.save(tmp_path / name / f"{split}.margins.npy", np.full(len(pairs), margin, np.float32))
        trainer.train(config(tmp_path / name, tmp_path / f"rm-{name}", preference="reward", max_steps=2))
    trainer.train(config(pairs_dir, tmp_path / "rm", preference="reward", max_steps=2))
    assert losses(tmp_path / "rm-zero") == losses(tmp_path / "rm")
    assert losses(tmp_path / "rm-big")[0] > losses(tmp_path / "rm")[0] + 1


def test_reward_model_with_lora_trains_its_head_whole(pairs_dir, tmp_path):
    # LoRA on a reward model: the new score head trains whole beside the updates (PEFT's
    # modules_to_save for sequence classification); the run's model keeps the head.
    trainer.train(config(pairs_dir, tmp_path / "rm", preference="reward", lora_rank=2, max_steps=4))
    state = torch.load(tmp_path / "rm" / "checkpoint.pt", weights_only=True)
    trained = sorted(k for k in state["model"] if k.endswith(("lora_a", "lora_b")) or k == "score.weight")
    assert "score.weight" in trained and len(state["optimizer"]["state"]) == len(trained)
    model = LLM.load(tmp_path / "rm" / "model.safetensors")
    assert model.config.num_labels == 1 and model.score is not None


@pytest.mark.parametrize("kind", ["simpo", "orpo", "reward"])
def test_reference_free_preference_losses_learn(pairs_dir, tmp_path, kind, capsys):
    # SimPO, ORPO and a reward model: no reference pass, none in the checkpoint; the chosen replies
    # come to win (rows of 48 tokens: at 16 most pairs are cut, some replies to nothing).
    trainer.train(config(pairs_dir, tmp_path / kind, preference=kind, max_steps=16, lr=3e-3,
                         model={**TINY, "block_size": 48}))
    assert "reference model" not in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / kind / "log.jsonl").read_text().splitlines()]
    assert np.mean([r["reward_accuracy"] for r in log[-8:]]) > 0.9 and log[-1]["val_reward_accuracy"] > 0.9
    assert np.mean([r["loss"] for r in log[-4:]]) < 0.7 * np.mean([r["loss"] for r in log[:4]])
    assert "reference_logps" not in torch.load(tmp_path / kind / "checkpoint.pt", weights_only=True)


def test_preference_options_are_checked(data_dir, chat_dir, pairs_dir, tmp_path):
    with pytest.raises(ValueError, match="give preference"):
        trainer.train(config(pairs_dir, tmp_path / "a"))
    for folder in (data_dir, chat_dir):
        with pytest.raises(ValueError, match="these token files hold none"):
            trainer.train(config(folder, tmp_path / "b", preference="dpo"))
    for options, message in ((dict(preference="cpo"), "preference must be one of dpo, ipo, hinge, simpo, orpo, kto"),
                             (dict(preference="kto", desirable_weight=0.0), "desirable_weight and undesirable_weight"),
                             (dict(preference="dpo", beta=-1.0), "beta and simpo_gamma must be >= 0"),
                             (dict(preference="dpo", label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
                             (dict(preference="simpo", label_smoothing=0.1), "goes with preference dpo"),
                             (dict(preference="kto", sft_weight=0.5), "sft_weight must be >= 0 and goes with"),
                             (dict(sft_weight=0.5), "sft_weight must be >= 0 and goes with"),
                             (dict(preference="dpo", center_rewards=0.1), "goes with preference reward"),
                             (dict(preference="reward", center_rewards=-1.0), "center_rewards must be >= 0")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(out_dir=str(tmp_path), **options).validate()


class CharTokenizer:
    """Characters as ids below 64: enough to write multiple-choice files for the synthetic runs."""
    vocab_size = 64

    @staticmethod
    def encode_ordinary(text):
        return [ord(c) % 64 for c in text]


def test_multiple_choice_eval_while_training(data_dir, tmp_path):
    # eval_choices: at each evaluation the examples are scored as `pyllm eval` scores them (the
    # final model's accuracies are what score_choice_files gives it afterwards), candidates longer
    # than seq_len too (rows as long as the longest).
    from pyllm import evaluate
    from pyllm.model import LLM

    rng = np.random.default_rng(3)
    examples = [{"context": "".join(chr(65 + int(c)) for c in rng.integers(0, 20, rng.integers(3, 12))),
                 "endings": ["".join(chr(65 + int(c)) for c in rng.integers(0, 20, rng.integers(1, 8))) for _ in range(4)],
                 "label": int(rng.integers(4))} for _ in range(10)]
    examples[0]["context"] = "x" * 20  # 20 + 2..8 tokens: longer than seq_len 16
    evaluate.write_choices(examples, CharTokenizer, tmp_path / "choices.bin")
    trainer.train(config(data_dir, tmp_path / "run", eval_choices=str(tmp_path / "choices.bin"), max_steps=4,
                         model={**TINY, "block_size": 32}, seq_len=16))
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [("choices_acc" in r) for r in log] == [False, False, False, True]
    final = LLM.load(tmp_path / "run/model.safetensors")
    score = evaluate.score_choice_files(final, tmp_path / "choices.bin", 32)
    assert (log[-1]["choices_acc"], log[-1]["choices_acc_norm"]) == (score["acc"], score["acc_norm"])
    # longer than the model's context (block_size 16): cut from the left as `pyllm eval` cuts it (it
    # had been refused), the same accuracies as score_choice_files gives at seq_len 16
    trainer.train(config(data_dir, tmp_path / "short", eval_choices=str(tmp_path / "choices.bin"), max_steps=4))
    log = [json.loads(line) for line in (tmp_path / "short/log.jsonl").read_text().splitlines()]
    score = evaluate.score_choice_files(LLM.load(tmp_path / "short/model.safetensors"), tmp_path / "choices.bin", 16)
    assert (log[-1]["choices_acc"], log[-1]["choices_acc_norm"]) == (score["acc"], score["acc_norm"])


@pytest.mark.parametrize("fused", [False, True])
def test_moe_trains_with_its_load_balancing_loss(data_dir, chat_dir, tmp_path, fused):
    # A mixture of experts learns; the load-balancing term is logged as aux_loss, part of loss, in
    # windows (the model's loss) and in packed conversations (the per-token loss, or the fused one,
    # plus the term): loss - aux_loss does not depend on the coefficient at step 0.
    model = dict(TINY, n_experts=4, experts_per_token=2)
    trainer.train(config(data_dir, tmp_path / "windows", model=model, max_steps=30, fused_loss=fused))
    records = [json.loads(line) for line in (tmp_path / "windows/log.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]]) - 1.0
    assert all(0.015 < r["aux_loss"] < 0.03 for r in records)  # 0.01 x about top_k = 2: kept near even
    assert abs(np.mean([r["aux_loss"] for r in records[-5:]]) - 0.02) < 0.001
    first = {}
    for coef in (0.0, 1.0):
        out = tmp_path / f"chats-{coef}"
        trainer.train(config(chat_dir, out, model=dict(model, router_aux_loss_coef=coef), max_steps=1,
                             fused_loss=fused))
        first[coef] = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert "aux_loss" not in first[0.0] and first[1.0]["aux_loss"] >= 2.0
    assert first[1.0]["loss"] - first[1.0]["aux_loss"] == pytest.approx(first[0.0]["loss"], rel=1e-6)


def _masked_balance_loss(model, router_logits, mask):
    """transformers' load_balancing_loss_func with attention_mask, in fp64: E * sum_e f_e P_e over
    every layer's tokens where mask is True."""
    cfg = model.config
    keep = mask.reshape(-1).repeat(len(router_logits))
    probs = torch.cat(router_logits).double().softmax(-1)[keep]  # (L * n, E)
    picks = torch.nn.functional.one_hot(probs.topk(cfg.experts_per_token, -1).indices, cfg.n_experts).sum(1)
    return cfg.router_aux_loss_coef * cfg.n_experts * (picks.double().mean(0) * probs.mean(0)).sum()


@pytest.mark.parametrize("fused", [False, True])
def test_moe_load_balancing_leaves_packed_padding_out(chat_dir, pairs_dir, fused):
    # The padding at the end of packed rows is not counted by a MoE's load-balancing loss, as
    # transformers' attention_mask leaves it out: SFT's packed loss, the model's own loss, and the
    # preference losses (fused or not) all take the loader's docs (-1: padding) as the mask.
    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 64, "block_size": 32, "n_experts": 4,
                                                   "experts_per_token": 2, "router_aux_loss_coef": 0.5})).double()
    model.fused_loss = fused
    logits = []
    for block in model.blocks:
        block.mlp.router.register_forward_hook(lambda m, i, o: logits.append(o.detach()))

    def real(batch):  # each token's segment a document (docs >= 0), from cu_seqlens by hand
        x, _, cu, docs = batch
        mask = torch.zeros(x.numel(), dtype=torch.bool)
        for i, d in enumerate(docs):
            mask[int(cu[i]):int(cu[i + 1])] = d >= 0
        return mask.view(x.shape)

    loader = data.PackedLoader(chat_dir / "train.bin", 3, 16, seed=2)
    batch = (*loader.next_batch(), loader.docs)
    assert loader.padding > 0
    mask = real(batch)
    assert torch.equal(trainer.batch_balance_kwargs(model, batch)["token_mask"], mask)
    for run in (lambda: trainer.packed_loss(model, batch),
                lambda: model(*batch[:3], **trainer.batch_balance_kwargs(model, batch))):
        logits.clear()
        run()
        want = _masked_balance_loss(model, logits, mask)
        assert model.aux_loss.item() == pytest.approx(want.item(), rel=1e-12)
        assert abs(model.aux_loss.item() - _masked_balance_loss(model, logits, torch.ones_like(mask)).item()) > 1e-6
    loader = data.PackedLoader(pairs_dir / "train.bin", 3, 20, seed=0)
    batch = (*loader.next_batch(), loader.docs)
    assert loader.padding > 0
    logits.clear()
    trainer.preference_batch_loss(model, batch, None, kind="simpo", fused=fused)
    assert model.aux_loss.item() == pytest.approx(_masked_balance_loss(model, logits, real(batch)).item(), rel=1e-12)
    dense = LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 64}))
    assert trainer.batch_balance_kwargs(dense, batch) == {}  # nothing reads it
    assert trainer.batch_balance_kwargs(model, batch[:3]) == {}


def test_packed_loss_is_the_models_loss(chat_dir):
    # The trainer's loss on packed conversations (the output layer at the trained positions only)
    # is the model's own loss over every position, gradients too (fp64: to rounding).
    from pyllm.model import LLM, ModelConfig

    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 64})).double()
    batch = data.PackedLoader(chat_dir / "train.bin", 3, 16, seed=2).next_batch()
    assert (batch[1] == -1).any() and (batch[1] != -1).any()
    params = list(model.parameters())
    want = model(*batch)[1]
    got = trainer.packed_loss(model, batch)
    assert got.item() == pytest.approx(want.item(), rel=1e-13)
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


@pytest.fixture(scope="module")
def kto_dir(tmp_path_factory):
    """Unpaired examples as prepare_kto writes them: a prompt of 2-10 tokens of the phrase, then a
    completion of 2-8 tokens, the phrase going on (desirable, even examples) or random tokens
    (undesirable, odd ones); each example's document followed by its KL document (its prompt with
    the next example's completion), the pairs and labels beside them."""
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("kto")
    phrase = np.array([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32])
    for name, n in (("train.bin", 200), ("val.bin", 20)):
        examples = []
        for i in range(n):
            prompt, reply = int(rng.integers(2, 11)), int(rng.integers(2, 9))
            good = np.roll(phrase, -int(rng.integers(12)))[np.arange(prompt + reply) % 12]
            completion = good[prompt:] if i % 2 == 0 else rng.integers(0, 64, reply)
            examples.append((good[:prompt], completion))
        docs, masks = [], []
        for i, (prompt, completion) in enumerate(examples):
            for doc_completion in (completion, examples[(i + 1) % n][1]):
                docs.append(np.concatenate([prompt, doc_completion]))
                masks.append((np.arange(len(docs[-1])) >= len(prompt)).astype(np.uint8))
        np.save(folder / name.replace(".bin", ".labels.npy"), np.arange(n) % 2 == 0)
        data.write_documents(folder / name, docs, masks, vocab_size=64, pairs=np.arange(2 * n).reshape(-1, 2))
    return folder


@pytest.mark.parametrize("kto_loss", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_kto_batch_loss_is_each_sequence_alone(kto_dir, fused, kto_loss, monkeypatch):
    # fp64: KTO's loss and gradients on a packed batch are TRL's formula on each sequence alone: the
    # KL estimate z from the mismatched documents (clamped, no gradient), 1 - sigmoid(beta (r - z))
    # for desirable examples and 1 - sigmoid(beta (z - r)) weighted for undesirable ones; also with
    # each example's loss fused with the output layer (z known first; chunk_rows 3: the examples hold 0, 2
    # and 4 trained tokens, 2 chunks). TRL's apo_zero_unpaired: z = 0, and no pass over the KL documents.
    model, policy, loader, reference, batch = batch_of_pairs(kto_dir)
    passes, real_segment_logps = [], trainer.segment_logps
    monkeypatch.setattr(trainer, "segment_logps", lambda *a, **kw: passes.append(1) or real_segment_logps(*a, **kw))
    policy.fused_loss = fused
    if fused:
        from pyllm import nn as pyllm_nn
        monkeypatch.setattr("pyllm.model.linear_sequence_loss",
                            functools.partial(pyllm_nn.linear_sequence_loss, chunk_rows=3))
    beta, weights = 0.3, dict(desirable_weight=1.5, undesirable_weight=0.7)
    loss, stats = trainer.preference_batch_loss(policy, batch, reference, loader.labels, kind="kto", beta=beta,
                                                fused=fused, kto_loss=kto_loss, **weights)
    monkeypatch.undo()
    assert len(passes) == (0 if fused else 1) + (kto_loss == "kto")
    loss.backward()
    got = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    def alone(m, doc, length):
        return logps_alone(loader, m, doc, length)[0]

    real, lengths = [d for d in batch[3] if d >= 0], list(loader.lengths)
    examples, kls = list(zip(real[0::2], lengths[0::2])), list(zip(real[1::2], lengths[1::2]))
    with torch.no_grad():
        z = torch.stack([alone(policy, d, n) - reference[d] for d, n in kls]).mean().clamp(min=0)
        z = z * (kto_loss == "kto")  # (apo_zero_unpaired: TRL's calculate_KL off, kl 0)
    terms, rewards = [], []
    for d, n in examples:
        with torch.no_grad():
            assert reference[d] == pytest.approx(float(alone(model, d, n)), rel=1e-12)
        r = alone(policy, d, n) - reference[d]
        good = bool(loader.labels[d // 2])
        terms.append(1.5 * (1 - torch.sigmoid(beta * (r - z))) if good else 0.7 * (1 - torch.sigmoid(beta * (z - r))))
        rewards.append((good, beta * r.item()))
    want = torch.stack(terms).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    good, bad = [r for g, r in rewards if g], [r for g, r in rewards if not g]
    assert stats[0].item() == pytest.approx(np.mean(good) if good else 0.0, rel=1e-10, abs=1e-14)
    assert stats[1].item() == pytest.approx(np.mean(bad) if bad else 0.0, rel=1e-10, abs=1e-14)
    assert stats[2].item() == pytest.approx(np.mean([(r > beta * z.item()) == g for g, r in rewards]), rel=1e-12)
    # the sums and counts the log's means are of (TRL's: over the examples of each label the step had,
    # None where it had none, not a 0 averaged in), and z, which TRL logs as kl
    # then each label's summed log-probabilities (TRL's logps/chosen and logps/rejected are their means)
    logps = [(bool(loader.labels[d // 2]), alone(policy, d, n).item()) for d, n in examples]
    np.testing.assert_allclose(stats[3:].tolist(), [sum(good), sum(bad), len(good), len(bad), z.item(),
                                                    sum(lp for g, lp in logps if g),
                                                    sum(lp for g, lp in logps if not g)], rtol=1e-10, atol=1e-14)
    for g, p in zip(got, policy.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-14)


def test_segments_alone_repacks_a_batch(kto_dir):
    # Some of a packed batch's segments packed again into rows of T, in their order (a row takes
    # the next one while it fits): each one's tokens, targets and log-probability as in the batch
    # (each segment is computed alone either way); no segments give one row of padding.
    from pyllm import nn
    from pyllm.model import LLM, ModelConfig

    torch.manual_seed(0)
    model = LLM(ModelConfig.from_preset("tiny", **{**TINY, "vocab_size": 64})).double()
    loader = data.PackedLoader(kto_dir / "train.bin", 4, 16, seed=1)
    x, y, cu = loader.next_batch()
    real = [i for i, d in enumerate(loader.docs) if d >= 0]
    logps = nn.sequence_logps(model(x, y, cu, per_token=True)[1], cu)
    for taken in (real[0::2], real[1::2], real, real[:1]):
        x2, y2, cu2, at = trainer.segments_alone(x, y, cu, taken)
        assert x2.shape[1] == 16 and x2.shape[0] <= 4 and cu2[-1] == x2.numel()
        old, new = cu.tolist(), cu2.tolist()
        for s, t in zip(taken, at):
            assert torch.equal(x.view(-1)[old[s]:old[s + 1]], x2.view(-1)[new[t]:new[t + 1]])
            assert torch.equal(y.view(-1)[old[s]:old[s + 1]], y2.view(-1)[new[t]:new[t + 1]])
        rest = np.ones(x2.numel(), bool)  # what no taken segment holds is padding: token 0, no target
        for t in at:
            rest[new[t]:new[t + 1]] = False
        assert (x2.view(-1)[rest] == 0).all() and (y2.view(-1)[rest] == -1).all()
        assert rest.sum() == x2.numel() - sum(old[s + 1] - old[s] for s in taken)
        torch.testing.assert_close(trainer.segment_logps(model, (x, y, cu), taken), logps[taken], rtol=1e-12, atol=0)
    x2, y2, cu2, at = trainer.segments_alone(x, y, cu, [])
    assert x2.shape == (1, 16) and cu2.tolist() == [0, 16] and at == [] and (y2 == -1).all()


def test_kto_runs_its_kl_documents_without_backward(kto_dir):
    # The KL documents only give the detached estimate z: their pass runs without autograd, and the
    # pass with autograd holds the examples' tokens alone (TRL's KL pass; half the backward's work).
    model, policy, loader, reference, batch = batch_of_pairs(kto_dir)
    passes = []
    policy.register_forward_hook(lambda m, args, out: passes.append(
        (torch.is_grad_enabled(), int((args[0] != 0).sum()), int((args[1] != -1).sum()))))
    trainer.preference_batch_loss(policy, batch, reference, loader.labels, kind="kto", beta=0.1)[0].backward()
    x, y, cu, docs = batch
    offsets = cu.tolist()
    segments = [i for i, d in enumerate(docs) if d >= 0]

    def count(which):  # the nonzero tokens and the targets of those segments
        return (sum(int((x.view(-1)[offsets[i]:offsets[i + 1]] != 0).sum()) for i in which),
                sum(int((y.view(-1)[offsets[i]:offsets[i + 1]] != -1).sum()) for i in which))

    assert passes == [(False, *count(segments[1::2])), (True, *count(segments[0::2]))]


def test_kto_batches_count_their_kl_documents_apart(kto_dir):
    # next_batches' lengths and targets (MFU's count) are the examples'; the KL documents', run
    # without backward, come apart as its fifth item.
    loader, replay = (data.PackedLoader(kto_dir / "train.bin", 3, 16, seed=2) for _ in range(2))
    batches, weights, lengths, outputs, kl = trainer.next_batches(loader, 2, 1)
    docs, all_lengths, targets = [], [], []
    for _ in range(2):
        replay.next_batch()
        docs += [d for d in replay.docs if d >= 0]
        all_lengths += replay.lengths
        targets += replay.doc_targets
    assert all(d % 2 == 0 for d in docs[0::2]) and all(d % 2 == 1 for d in docs[1::2])
    assert lengths == all_lengths[0::2] and outputs == sum(targets[0::2])
    assert kl == (all_lengths[1::2], sum(targets[1::2]))
    assert sum(replay.doc_targets) == replay.targets > 0


def test_kto_learns_and_resumes_exactly(kto_dir, pairs_dir, tmp_path):
    # The first loss is 0.5 (the policy is the reference: r = z = 0); desirable examples' rewards
    # rise above the undesirable ones'; bitwise resume; the data and the loss must go together.
    kw = dict(preference="kto", beta=0.5, max_steps=16, eval_every=8, ckpt_every=4, lr=3e-3)
    trainer.train(config(kto_dir, tmp_path / "whole", **kw))
    log = [json.loads(line) for line in (tmp_path / "whole/log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-6) and log[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert np.mean([r["reward_margin"] for r in log[-4:] if r["reward_margin"] is not None]) > 0
    assert log[-1]["val_reward_accuracy"] > 0.6
    # TRL's logps/chosen and logps/rejected: each label's mean summed log-probability, as its rewards
    assert all((r["logps_chosen"] is None) == (r["reward_chosen"] is None) for r in log)
    assert all(v <= 0 for r in log for v in (r["logps_chosen"], r["logps_rejected"]) if v is not None)
    trainer.train(config(kto_dir, tmp_path / "cut", **kw), stop_at=6)
    trainer.train(config(kto_dir, tmp_path / "cut", **kw), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    with pytest.raises(ValueError, match="train by preference kto"):
        trainer.train(config(kto_dir, tmp_path / "x", preference="dpo"))
    with pytest.raises(ValueError, match="preference kto trains on unpaired examples"):
        trainer.train(config(pairs_dir, tmp_path / "y", preference="kto"))


def test_ipo_rewards_are_summed_log_ratios_as_trl_logs_them():
    # IPO's loss takes log-ratios per token, but TRL logs rewards (and their accuracy) as beta times
    # the summed log-ratio: a pair whose chosen reply gains 2 nats over 10 tokens and rejected 1 over 1
    # is a right pair (accuracy 1), per token it had been a wrong one (an audit, 2026-12-06).
    from pyllm.nn import preference_loss

    d = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    losses, chosen, rejected = preference_loss("ipo", d(-8.0), d(-2.0), d(10.0), d(1.0), d(-10.0), d(-3.0), beta=0.1)
    assert chosen.item() == pytest.approx(0.2) and rejected.item() == pytest.approx(0.1)
    assert losses.item() == pytest.approx((0.2 - 1.0 - 1 / 0.2) ** 2)  # (the loss per token: 2/10 - 1/1)


@pytest.mark.parametrize("preference", ["simpo", "kto"])
def test_a_preference_step_whose_replies_are_all_cut_away_is_skipped(tmp_path, preference):
    # Pairs (or KTO's example and KL document) longer than a row are cut together to fit it; where
    # every reply of a step is cut away nothing is trained: the step is skipped (loss null, the
    # weights unmoved), as a step of conversations without a trained token (it had been stepped,
    # weight decay moving the weights; from the KTO audit)
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 8), ("val.bin", 2)):
        docs, masks = [], []
        for _ in range(2 * n):
            docs.append(rng.integers(0, 64, 30))
            masks.append((np.arange(30) >= 24).astype(np.uint8))  # a 24-token prompt, 6 reply tokens
        if preference == "kto":
            np.save(tmp_path / name.replace(".bin", ".labels.npy"), np.arange(n) % 2 == 0)
        data.write_documents(tmp_path / name, docs, masks, vocab_size=64, pairs=np.arange(2 * n).reshape(-1, 2))
    cfg = config(tmp_path, tmp_path / "run", preference=preference, max_steps=1, eval_every=0, seq_len=24,
                 weight_decay=0.5, model=dict(TINY, block_size=24))
    out = trainer.train(cfg)
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert record["skipped"] and record["loss"] is None and out["empty_steps"] == 1


def test_kto_apo_zero_unpaired_trains_without_its_kl(kto_dir, tmp_path, monkeypatch):
    # --kto-loss-type apo_zero_unpaired (TRL's KTOConfig loss_type): desirable examples' rewards rise
    # above the undesirable ones' with no KL estimate (kl 0 each step) and no pass over the KL documents
    # (its FLOPs: the examples' alone); refused without preference kto
    kw = dict(preference="kto", kto_loss_type="apo_zero_unpaired", beta=0.5, max_steps=16, eval_every=16, lr=3e-3)
    trainer.train(config(kto_dir, tmp_path / "apo", **kw))
    log = [json.loads(line) for line in (tmp_path / "apo/log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-6) and all(r["kl"] == 0.0 for r in log if r["kl"] is not None)
    assert np.mean([r["reward_margin"] for r in log[-4:] if r["reward_margin"] is not None]) > 0
    with pytest.raises(ValueError, match="kto_loss_type must be kto or apo_zero_unpaired and goes with preference kto"):
        TrainConfig(preference="dpo", kto_loss_type="apo_zero_unpaired").validate()


def test_apo_zero_unpaired_keeps_a_small_undesirable_loss_in_fp32():
    # TRL's sigmoid(beta r) for an undesirable example pushed far down (beta r = -20): 2.1e-9, and its
    # gradient; 1 - sigmoid(-beta r) had rounded both to 0 in fp32 (from the audit of the KTO option)
    from pyllm.nn import preference_loss

    r = torch.tensor([-200.0, -120.0], requires_grad=True)
    ref = torch.zeros(2)
    losses, _, _ = preference_loss("kto", chosen_logps=r, rejected_logps=r.detach(), chosen_tokens=torch.ones(2),
                                   rejected_tokens=torch.ones(2), ref_chosen_logps=ref, ref_rejected_logps=ref,
                                   beta=0.1, desirable=torch.tensor([False, False]), kto_loss="apo_zero_unpaired")
    losses.sum().backward()
    want = torch.sigmoid(0.1 * r.detach())
    torch.testing.assert_close(losses.detach(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(r.grad, 0.1 * want * (1 - want), rtol=1e-5, atol=0)


def test_kto_weight_advice_as_trls():
    # TRL's KTOTrainer warns where the labels are unbalanced and neither weight balances them (an
    # audit, 2026-12-06: 50 desirable and 10 undesirable examples had trained without a word)
    labels = np.array([True] * 50 + [False] * 10)
    assert trainer.kto_weight_advice(labels, 1.0, 1.0) == (
        "50 desirable and 10 undesirable examples: their weights balance them (TRL's advice, the KTO paper's eq. 8) "
        "with EITHER --desirable-weight in [0.2, 0.27] or --undesirable-weight in [3.76, 5.0] (not both)")
    assert trainer.kto_weight_advice(labels, 0.25, 1.0) is None and trainer.kto_weight_advice(labels, 1.0, 4.0) is None
    assert trainer.kto_weight_advice(np.array([True, False] * 5), 1.0, 1.0) is None


def test_reward_pad_id_as_trls_reward_trainer_sets_it(tmp_path):
    # TRL's RewardTrainer: config.pad_token_id = the tokenizer's pad_token, else its eos_token (where
    # transformers' classifier then reads the scores); text documents end in that eos_token, as TRL's
    # trainers append it, not config.json's first end id (Llama 3.x Instruct's <|end_of_text|> where
    # the tokenizer's is <|eot_id|>: a reward model's score had been read at that appended token,
    # not the text's last, one step's loss 0.643 where TRL's is 1.783; from the reward-model audit)
    from pyllm.cli import hf_doc_markers
    from pyllm.tokenizer import Tokenizer

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 5, "content": "<eos>"},
                                                                     {"id": 6, "content": "<pad>"}]}))
    (hf / "config.json").write_text(json.dumps({"eos_token_id": [9, 5]}))
    cfg = TrainConfig(init_from_hf=str(hf))
    assert trainer.reward_pad_id(cfg) == 9  # (no tokenizer_config.json: config.json's first eos)
    assert hf_doc_markers(hf)["doc_end"] == 9
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": None}))
    assert trainer.reward_pad_id(cfg) == 5 and hf_doc_markers(hf)["doc_end"] == 5
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": {"content": "<pad>"}}))
    assert trainer.reward_pad_id(cfg) == 6
    tok = Tokenizer.train(["some text to train on " * 20], 260, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save(str(tmp_path / "tok.bpe"))
    assert trainer.reward_pad_id(TrainConfig(tokenizer=str(tmp_path / "tok.bpe"))) == tok.special_tokens["<|endoftext|>"]
    assert trainer.reward_pad_id(TrainConfig()) is None


def test_gathered_forgets_the_sampling_forwards():
    # gathered() leaves FSDP2 no record of the sampling's forwards (their order had been kept for the
    # next backward's prefetching: 3 processes, one of which sampled nothing, hung there), checked in
    # one gloo process, so that a torch naming those internals otherwise fails here, not in a hang
    if not hasattr(torch.cpu.Stream, "record_event"):
        pytest.skip("FSDP2 on the CPU needs torch >= 2.7 (torch.cpu.Stream.record_event)")
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = LLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, block_size=16))
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        with trainer.gathered(model), torch.no_grad():
            model.generate_batch([[1, 2, 3]], 3, 1.0, generator=torch.Generator().manual_seed(0))
        assert model._get_fsdp_state()._comm_ctx.post_forward_order == []
        states = [m._get_fsdp_state() for m in model.modules() if hasattr(m, "_get_fsdp_state")]
        groups = [g for state in states for g in (getattr(state, "_fsdp_param_groups", None)
                                                  or [state._fsdp_param_group]) if g is not None]
        assert groups and all(not g._post_forward_indices for g in groups)
    finally:
        dist.destroy_process_group()


def test_loss_plot_of_a_log_without_losses_warns_nothing(tmp_path):
    # every step skipped (no loss, no val_loss): loss.png still, without matplotlib's "No artists with
    # labels" warning (from the docs audit)
    import warnings

    pytest.importorskip("matplotlib")
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 0, "loss": None}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.plot_losses(tmp_path / "log.jsonl", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
