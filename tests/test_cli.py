"""The `pyllm` command, in process, with a byte-level stand-in for pyllm's BPE tokenizer."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path

import pytest

import pyllm
from pyllm import cli


class StandInTokenizer:
    """Tokenizer's API as the CLI uses it: bytes are ids 0..255, <|endoftext|> is 256."""

    vocab_size = 257

    @classmethod
    def train(cls, texts, vocab_size, pattern="gpt4", special_tokens=(), show_progress=True):
        assert list(texts) and vocab_size > 256
        return cls()

    def save(self, path):
        Path(path).write_text("stand-in")

    def to_hf(self, path):
        Path(path).write_text("{}")

    @classmethod
    def load(cls, path):
        if Path(path).read_text() != "stand-in":
            raise ValueError(f"{path} is not a tokenizer")
        return cls()

    def encode_ordinary(self, text):
        return list(text.encode())

    def encode(self, text, allowed_special=frozenset()):
        return [256] if text == "<|endoftext|>" and text in allowed_special else self.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=None):
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "tokenizer_class", lambda: StandInTokenizer)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(60):
        (folder / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    return folder


SMALL = ["--model", "n_layers=1", "--model", "dim=64", "--model", "n_heads=2", "--model", "block_size=32",
         "--batch-size", "4", "--eval-every", "0", "--eval-batches", "2", "--device", "cpu", "--sample-tokens", "12"]


def test_a_run_on_another_runs_token_folder_takes_its_tokenizer(corpus, tmp_path, capsys):
    # runs/main/data holds no tokenizer.bpe: its source.json names the one it was made with. A run on
    # that folder records it, samples and generates (it had recorded none: the sample skipped
    # silently, generate refused); token files whose tokenizer is unknown say why no sample comes.
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "main"), "--max-steps", "1", *SMALL]) == 0
    assert not (tmp_path / "main/data/tokenizer.bpe").exists()
    capsys.readouterr()
    assert cli.main(["train", "--data", str(tmp_path / "main/data"), "--out", str(tmp_path / "again"), "--max-steps", "1",
                     *SMALL]) == 0
    assert "sample (12 tokens" in capsys.readouterr().out
    assert Path(json.loads((tmp_path / "again/run.json").read_text())["tokenizer"]) == (tmp_path / "main/tokenizer.bpe").resolve()
    os.utime(tmp_path / "main/tokenizer.bpe", (1, 1))  # changed since, perhaps another file now: not taken
    assert cli.main(["train", "--data", str(tmp_path / "main/data"), "--out", str(tmp_path / "third"), "--max-steps", "1",
                     *SMALL]) == 0
    out = capsys.readouterr()
    assert "sample (" not in out.out and "sample skipped: no tokenizer is known" in out.err


def test_fine_tune_a_run(corpus, tmp_path, capsys):
    # --init-from-run starts from a finished run's weights (its own config) and tokenizer: on
    # prompt-completion pairs, each ends in <|endoftext|> as the run's documents did, that end and
    # the completion trained, the prompt not.
    import numpy as np
    from safetensors.torch import load_file

    base, ft = tmp_path / "base", tmp_path / "ft"
    assert cli.main(["train", "--data", str(corpus), "--out", str(base), "--max-steps", "2", *SMALL]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n", "completion": f"    return x + {i}\n"}) + "\n"
                             for i in range(40)))
    capsys.readouterr()
    # lr 1e-12: one step leaves the weights where they started, which must be the run's
    assert cli.main(["train", "--init-from-run", str(base), "--data", str(pairs), "--out", str(ft), "--max-steps", "1",
                     "--lr", "1e-12", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--eval-batches", "1",
                     "--device", "cpu", "--sample-tokens", "4"]) == 0
    assert f"training: from the run {base}" in capsys.readouterr().out
    start, after = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    assert start.keys() == after.keys()
    for name in start:
        assert (start[name] - after[name]).abs().max() < 1e-8, name
    run = json.loads((ft / "run.json").read_text())
    assert run["init_from_run"] == str(base.resolve()) and run["tokenizer"] == str((ft / "tokenizer.bpe").resolve())
    assert run["chat"] is False and not run["init_from_hf"]
    from pyllm.data import open_tokens

    ids = np.asarray(open_tokens(ft / "data" / "train.bin"))
    offsets, mask = np.load(ft / "data" / "train.docs.npy"), np.load(ft / "data" / "train.mask.npy")
    ends = offsets[1:] - 1
    assert (ids[ends] == 256).all() and mask[ends].all() and mask[offsets[:-1]].sum() == 0
    first = ids[offsets[0]:offsets[1]]
    assert bytes(first[mask[offsets[0]:offsets[1]] == 0].tolist()).decode().startswith("def f")
    assert cli.main(["generate", "--run", str(ft), "--max-new-tokens", "4", "--prompt", "def g"]) == 0
    # continued pretraining on plain text, with the run's tokenizer (none trained), by Muon
    assert cli.main(["train", "--init-from-run", str(base), "--data", str(corpus), "--out", str(tmp_path / "more"),
                     "--max-steps", "1", "--batch-size", "2", "--eval-every", "0", "--eval-batches", "1",
                     "--device", "cpu", "--sample-tokens", "0", "--optimizer", "muon", "--muon-momentum", "0.9"]) == 0
    assert "tokenizer: training" not in capsys.readouterr().out
    import torch

    saved = torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=True)
    assert saved["train_config"]["optimizer"] == "muon" and {"muon", "adamw"} <= saved["optimizer"].keys()


def test_a_moved_or_copied_run_folder_uses_its_own_files(corpus, tmp_path):
    # run.json had recorded its tokenizer and token files by absolute path: a run folder moved or
    # renamed (or copied to another machine) failed to resume ("token file ... does not exist") and
    # to sample or export; a copy read the original's files. Now the folder's own files follow it.
    import shutil

    first = tmp_path / "first"
    assert cli.main(["train", "--data", str(corpus), "--out", str(first), "--max-steps", "2", *SMALL]) == 0
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    assert cli.main(["train", "--resume", str(moved), "--max-steps", "3", "--sample-tokens", "4"]) == 0
    assert cli.main(["generate", "--run", str(moved), "--max-new-tokens", "4", "--prompt", "def g"]) == 0
    assert cli.main(["export", "--run", str(moved), "--out", str(tmp_path / "hf")]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    shutil.rmtree(moved / "data")  # (the copy must not need the original's)
    assert cli.main(["train", "--resume", str(copy), "--max-steps", "4", "--sample-tokens", "0"]) == 0
    assert [json.loads(line)["step"] for line in (copy / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    # a run.json from before it recorded its folder: its own files found beside it
    old = json.loads((copy / "run.json").read_text())
    old.pop("run_dir")
    (copy / "run.json").write_text(json.dumps(old))
    again = tmp_path / "again"
    shutil.move(copy, again)
    assert cli.main(["train", "--resume", str(again), "--max-steps", "5", "--sample-tokens", "0"]) == 0
    assert cli.read_run(again)["data_dir"] == str(again / "data")
    outside = {"run_dir": "/elsewhere/run", "tokenizer": str(corpus / "t.bpe"), "data_dir": "/elsewhere/run/data"}
    (again / "run.json").write_text(json.dumps(outside))
    run = cli.read_run(again)
    assert run["tokenizer"] == str(corpus / "t.bpe") and run["data_dir"] == str(again / "data")


def test_lora_fine_tune_of_a_run(corpus, tmp_path):
    # --lora-rank: the run's weights frozen, rank-2 updates trained on the blocks' linear layers and
    # merged into its model.safetensors (norms and embeddings bitwise the base's); resume is exact.
    import torch
    from safetensors.torch import load_file

    base = tmp_path / "base"
    assert cli.main(["train", "--data", str(corpus), "--out", str(base), "--max-steps", "2", *SMALL]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n", "completion": f"    return x + {i}\n"}) + "\n"
                             for i in range(40)))
    common = ["--init-from-run", str(base), "--data", str(pairs), "--lora-rank", "2", "--lr", "1e-2", "--batch-size", "2",
              "--seq-len", "32", "--eval-every", "0", "--eval-batches", "1", "--device", "cpu", "--sample-tokens", "0"]
    assert cli.main(["train", *common, "--out", str(tmp_path / "a"), "--max-steps", "4"]) == 0
    assert cli.main(["train", *common, "--out", str(tmp_path / "b"), "--max-steps", "2"]) == 0
    assert cli.main(["train", "--resume", str(tmp_path / "b"), "--max-steps", "4", "--sample-tokens", "0"]) == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    start, tuned = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "a" / "model.safetensors"))
    assert start.keys() == tuned.keys()
    changed = 0
    for name, w in start.items():
        delta = (tuned[name].double() - w.double())
        if name.endswith(("qkv.weight", "proj.weight", "gate_up.weight", "down.weight")) and ".blocks." in f".{name}":
            assert 0 < torch.linalg.matrix_rank(delta, rtol=1e-3).item() <= 2, name  # beyond fp32 rounding
            changed += 1
        else:
            assert torch.equal(tuned[name], w), name
    assert changed == 4
    # bf16: the frozen block weights are held in bf16 (the updates in fp32); sampling after the run
    # (outside autocast) and the merged file work
    assert cli.main(["train", *common[:-1], "4", "--out", str(tmp_path / "c"), "--max-steps", "2",
                     "--precision", "bf16"]) == 0
    state = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["model"]
    assert state["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert state["blocks.0.attn.qkv.lora_a"].dtype == state["tok_emb.weight"].dtype == torch.float32
    from pyllm.model import LLM

    LLM.load(tmp_path / "c" / "model.safetensors")


def test_generate_a_prompts_file(corpus, tmp_path, capsys):
    # --prompts-file: every prompt of a JSONL file, 2 at a time (prompts of different lengths in one
    # batch), in the file's order; greedy completions are what `generate` gives each prompt alone.
    import torch

    from pyllm.model import LLM

    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2", *SMALL]) == 0
    prompts = ["def f", "def g(x):\n    return", "x", "é"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts) + "\n")
    args = ["generate", "--run", str(run), "--prompts-file", str(tmp_path / "p.jsonl"), "--max-new-tokens", "6",
            "--temperature", "0", "--batch-size", "2"]
    assert cli.main([*args, "--out", str(tmp_path / "c.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    model, tokenizer = LLM.load(run / "model.safetensors").eval(), cli.tokenizer_class().load(str(run / "tokenizer.bpe"))
    for line in lines:
        ids = tokenizer.encode_ordinary(line["prompt"])
        alone = model.generate(torch.tensor([ids]), 6, temperature=0)[0, len(ids):].tolist()
        assert line["completion"] == tokenizer.decode(alone)
    capsys.readouterr()
    assert cli.main(args) == 0  # stdout
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    assert cli.main([*args[:4], str(tmp_path / "bad.jsonl")]) == 2
    assert 'bad.jsonl:1: expected a JSON object with a "prompt" string' in capsys.readouterr().err


GENERATE_TEXT = "hello world caf\u00e9 \u65e5\u672c\u8a9e data model token\n" * 50


@pytest.fixture
def padded_vocab(tmp_path):
    """A model of 20 ids more than its tokenizer's (nanoGPT's padded vocabulary, --model vocab_size=N),
    random weights: --model / --tokenizer flags and the tokenizer."""
    import torch

    from pyllm.model import LLM, ModelConfig
    from pyllm.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.train([GENERATE_TEXT], 280, special_tokens=("<|endoftext|>",))
    tok.save(str(tmp_path / "tok.bpe"))
    torch.manual_seed(0)
    LLM(ModelConfig(vocab_size=tok.vocab_size + 20, block_size=64, n_layers=1, n_heads=2,
                    dim=32)).save(tmp_path / "m.safetensors")
    return ["--model", str(tmp_path / "m.safetensors"), "--tokenizer", str(tmp_path / "tok.bpe")], tok


def test_generate_leaves_out_ids_past_the_tokenizer(padded_vocab, tmp_path, capsys):
    # a padding id drawn is left out of the text, as transformers' decode skips it (the run had died
    # part-way through its output with "Invalid token for decoding", a --prompts-file batch with it)
    model, _ = padded_vocab
    for seed in range(4):
        assert cli.main(["generate", *model, "--prompt", "hello", "--max-new-tokens", "40", "--top-k", "0",
                         "--temperature", "1", "--seed", str(seed)]) == 0
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n')
    assert cli.main(["generate", *model, "--prompts-file", str(tmp_path / "p.jsonl"), "--max-new-tokens", "40",
                     "--top-k", "0", "--temperature", "1"]) == 0


def test_generate_takes_min_p_and_repetition_penalty(padded_vocab, tmp_path, capsys, monkeypatch):
    # --min-p, --repetition-penalty, --no-repeat-ngram-size and --min-new-tokens reach the model's
    # sampling on each path: --prompt, --prompts-file (generate_batch, and generate() one by one past
    # block_size) and --draft; the penalty and the n-gram ban change greedy text
    from pyllm.model import LLM

    model, _ = padded_vocab
    seen, warped = [], []
    for name in ("generate", "generate_batch", "generate_speculative"):
        def recording(self, *a, _original=getattr(LLM, name), _name=name, **kw):
            seen.append((_name, kw.get("min_p"), kw.get("repetition_penalty"), kw.get("no_repeat_ngram_size"),
                         kw.get("min_new_tokens")))
            warped.append((_name, kw.get("typical_p"), kw.get("epsilon_cutoff"), kw.get("eta_cutoff")))
            return _original(self, *a, **kw)
        monkeypatch.setattr(LLM, name, recording)
    base = ["generate", *model, "--prompt", "hello", "--max-new-tokens", "24", "--temperature", "0"]

    def text(*extra):
        capsys.readouterr()
        assert cli.main([*base, *extra]) == 0
        return capsys.readouterr().out

    assert text("--repetition-penalty", "3") != text() == text("--repetition-penalty", "1")
    assert text("--repetition-penalty", "3", "--draft", model[1]) == text("--repetition-penalty", "3")
    assert text("--no-repeat-ngram-size", "2") != text()
    assert text("--no-repeat-ngram-size", "2", "--min-new-tokens", "3", "--draft", model[1]) == \
        text("--no-repeat-ngram-size", "2", "--min-new-tokens", "3")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n')
    for new in ("4", "63"):  # 63: past block_size 64, generate() one by one
        assert cli.main(["generate", *model, "--prompts-file", str(tmp_path / "p.jsonl"), "--max-new-tokens", new,
                         "--min-p", "0.2", "--repetition-penalty", "1.5", "--no-repeat-ngram-size", "3",
                         "--min-new-tokens", "2"]) == 0
    assert seen == [("generate", None, 3.0, 0, 0), ("generate", None, 1.0, 0, 0), ("generate", None, 1.0, 0, 0),
                    ("generate_speculative", None, 3.0, 0, 0), ("generate", None, 3.0, 0, 0),
                    ("generate", None, 1.0, 2, 0), ("generate", None, 1.0, 0, 0),
                    ("generate_speculative", None, 1.0, 2, 3), ("generate", None, 1.0, 2, 3),
                    ("generate_batch", 0.2, 1.5, 3, 2), ("generate", 0.2, 1.5, 3, 2)]
    # transformers' typical_p / epsilon_cutoff / eta_cutoff warpers, each path
    warped.clear()
    warp = ["--temperature", "1", "--typical-p", "0.5", "--epsilon-cutoff", "0.001", "--eta-cutoff", "0.002"]
    text(*warp)
    text(*warp, "--draft", model[1])
    assert cli.main(["generate", *model, "--prompts-file", str(tmp_path / "p.jsonl"), "--max-new-tokens", "4",
                     *warp]) == 0
    assert warped == [(name, 0.5, 0.001, 0.002) for name in ("generate", "generate_speculative", "generate_batch")]
    for bad in (["--min-p", "1.5"], ["--repetition-penalty", "0"], ["--no-repeat-ngram-size", "-1"],
                ["--min-new-tokens", "1.5"], ["--typical-p", "0"], ["--epsilon-cutoff", "1"]):
        with pytest.raises(SystemExit):
            cli.main([*base, *bad])


def test_generate_samples_of_one_seed_are_one_stream(padded_vocab, capsys):
    # --num-samples draws every sample from one generator, as nanoGPT's sample.py: the first is the
    # seed's own, the second no other seed's first (seed + i had made --seed 1's first --seed 0's second)
    model, _ = padded_vocab
    args = ["generate", *model, "--prompt", "hello", "--max-new-tokens", "24", "--top-k", "0", "--temperature", "1"]

    def samples(*extra):
        capsys.readouterr()
        assert cli.main([*args, *extra]) == 0
        return [s.strip() for s in capsys.readouterr().out.split("-" * 60) if s.strip()]

    two = samples("--seed", "0", "--num-samples", "2")
    assert len(two) == 2 and two[0] == samples("--seed", "0")[0] and two[1] != samples("--seed", "1")[0]
    assert two == samples("--seed", "0", "--num-samples", "2")


def test_generate_prompts_file_lines_end_at_newlines_only(padded_vocab, tmp_path, capsys):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+0085 raw inside strings, as --out does; they
    # had split a line (refused as "not a JSON line")
    model, _ = padded_vocab
    rows = [{"prompt": "one\u2028two"}, {"prompt": "a\x85b"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["generate", *model, "--prompts-file", str(tmp_path / "p.jsonl"), "--max-new-tokens", "2",
                     "--temperature", "0", "--ignore-eos"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.split("\n") if line]
    assert [o["prompt"] for o in out] == [r["prompt"] for r in rows]


def cut_at_stop_string(tokenizer, tokens: list[int], stop_strings, prompt: str = "") -> list[int]:
    """tokens cut after the one that completes one of stop_strings in their text, which may begin in
    the prompt's (kept, as transformers' generate keeps the token its StopStringCriteria stops at),
    or all of them: what --prompts-file had done after generating each batch in full."""
    if not cli.has_stop_string(cli.decode_known(tokenizer, tokens), stop_strings, prompt):
        return tokens
    return tokens[:next(n for n in range(1, len(tokens) + 1)
                        if cli.has_stop_string(cli.decode_known(tokenizer, tokens[:n]), stop_strings, prompt))]


def test_generate_prompts_file_ends_rows_and_batches_at_stop_strings(padded_vocab, tmp_path, monkeypatch):
    # --stop with --prompts-file: a row ends with the token that completes a stop string, as at a stop
    # token, and a batch once every row has (each batch had been decoded to --max-new-tokens, then cut):
    # the completions of generating in full and cutting (cut_at_stop_string), greedy and sampled,
    # --batch-size 1 and 3, stop strings across token boundaries, past block_size (one prompt at a time)
    import torch

    from pyllm.model import LLM, until_stop

    flags, tok = padded_vocab
    model = LLM.load(flags[1]).eval()
    eot = tok.encode("<|endoftext|>", allowed_special="all")[0]
    prompts = ["hello", "data model", "caf\u00e9 "]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    ids = [tok.encode_ordinary(p) for p in prompts]
    calls = []
    for name in ("decode_step", "forward_cached"):
        monkeypatch.setattr(LLM, name, lambda self, *a, _f=getattr(LLM, name), **k:
                            calls.append(_f.__name__) or _f(self, *a, **k))
    for temperature, batch, new in (("0", 1, 30), ("0", 3, 30), ("1", 3, 30), ("0", 3, 70)):
        if new > 64:  # past block_size 64: generate() slides, a prompt at a time
            full = [until_stop(model.generate(torch.tensor([p]), new, float(temperature), stop_tokens=[eot])[0, len(p):]
                               .tolist(), {eot}) for p in ids]
        else:
            full = model.generate_batch(ids, new, float(temperature), generator=torch.Generator().manual_seed(0),
                                        stop_tokens=[eot])
        stops = set()
        for row in full:  # in each row, the two characters either side of a boundary between tokens
            text = cli.decode_known(tok, row)
            for k in range(3, 12):
                head = cli.decode_known(tok, row[:k])
                if (head and text.startswith(head) and len(text) > len(head)
                        and "\ufffd" not in text[len(head) - 1:][:2]):
                    stops.add(text[len(head) - 1:len(head) + 1])
                    break
        cut = [cut_at_stop_string(tok, [t for t in row if t != eot], stops, p) for row, p in zip(full, prompts)]
        ends = [len(c) if len(c) < len([t for t in row if t != eot]) else len(row) for c, row in zip(cut, full)]
        assert stops and max(ends) < new  # (every row ends early)
        calls.clear()
        assert cli.main(["generate", *flags, "--prompts-file", str(tmp_path / "p.jsonl"), "--max-new-tokens", str(new),
                         "--temperature", temperature, "--top-k", "0", "--batch-size", str(batch), "--out",
                         str(tmp_path / "c.jsonl"), *(f"--stop={s}" for s in sorted(stops))]) == 0
        lines = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
        assert [line["completion"] for line in lines] == [cli.decode_known(tok, c) for c in cut]
        if new > 64:  # one forward per token of each row
            assert calls.count("forward_cached") == sum(ends)
        else:  # after a batch's prefill, a decode step per token of its longest row but the last
            assert calls.count("decode_step") == sum(max(ends[i:i + batch]) - 1 for i in range(0, len(ids), batch))


@pytest.mark.parametrize("flags", [["--out", "x.jsonl"], ["--batch-size", "4"], ["--draft-tokens", "3"]])
def test_generate_refuses_flags_it_would_ignore(padded_vocab, flags, capsys):
    model, _ = padded_vocab
    assert cli.main(["generate", *model, "--prompt", "hello", "--max-new-tokens", "2", *flags]) == 2
    assert flags[0] in capsys.readouterr().err


def test_generate_refuses_a_draft_of_another_tokenizer(padded_vocab, tmp_path, capsys):
    # a draft run whose tokenizer has the size of the model's and other ids: its drafts were never kept
    # (0% accepted, silently); its own tokenizer is taken
    import shutil

    from pyllm.tokenizer.tokenizer import Tokenizer

    model, tok = padded_vocab
    other = Tokenizer.train(["the quick brown fox jumps over the lazy dog, 0123456789 " * 80], tok.vocab_size,
                            special_tokens=("<|endoftext|>",))
    assert other.vocab_size == tok.vocab_size
    other.save(str(tmp_path / "other.bpe"))
    draft = tmp_path / "draft"
    draft.mkdir()
    shutil.copy(tmp_path / "m.safetensors", draft / "model.safetensors")
    (draft / "run.json").write_text(json.dumps({"tokenizer": str(tmp_path / "other.bpe")}))
    capsys.readouterr()
    args = ["generate", *model, "--prompt", "hello", "--max-new-tokens", "4", "--temperature", "0", "--draft", str(draft)]
    assert cli.main(args) == 2
    assert "--draft " in (err := capsys.readouterr().err) and "is not this run's" in err
    (draft / "run.json").write_text(json.dumps({"tokenizer": str(tmp_path / "tok.bpe")}))
    assert cli.main(args) == 0


def test_generate_reads_special_token_text_in_a_prompt_as_the_token(padded_vocab, monkeypatch):
    # as transformers' tokenizer(prompt) and nanoGPT's sample.py (allowed_special) encode it: a
    # hand-written ChatML prompt's markers had been spelled byte by byte
    from pyllm.model import LLM, ModelConfig

    _, tok = padded_vocab
    seen = []
    model = LLM(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layers=1, n_heads=2, dim=32))
    monkeypatch.setattr(LLM, "generate", lambda self, idx, *a, **k: seen.append(idx[0].tolist()) or idx)
    cli.stream_sample(model, tok, "a<|endoftext|>b", 1, 0.0, None, None, seed=0)
    assert seen == [tok.encode("a<|endoftext|>b", allowed_special="all")]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [tok.vocab_size - 1]


def test_generate_ends_documents_and_reads_generation_configs(corpus, tmp_path, capsys, monkeypatch):
    # As transformers' generate: a model trained here stops at <|endoftext|> (--ignore-eos goes on),
    # an empty prompt starts a document (from <|endoftext|>, not id 0), --top-k 0 is no top-k, and a
    # Hugging Face folder's generation_config.json gives the sampling defaults. --num-samples with
    # --prompts-file gives that many completions of each; prompts whose completion passes block_size
    # slide past it (generate()) instead of failing.
    import argparse
    import types

    from pyllm.model import LLM

    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2", *SMALL]) == 0
    monkeypatch.setattr(StandInTokenizer, "special_tokens", {"<|endoftext|>": 256}, raising=False)
    calls, generate = [], LLM.generate

    def recording(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, **kw):
        calls.append(dict(idx=idx.tolist(), temperature=temperature, top_k=top_k, stops=list(kw.get("stop_tokens", []))))
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, **kw)

    monkeypatch.setattr(LLM, "generate", recording)
    assert cli.main(["generate", "--run", str(run), "--prompt", "", "--max-new-tokens", "3"]) == 0
    assert calls[-1] == dict(idx=[[256]], temperature=0.8, top_k=50, stops=[256])
    assert cli.main(["generate", "--run", str(run), "--prompt", "x", "--max-new-tokens", "3", "--ignore-eos",
                     "--top-k", "0", "--temperature", "0"]) == 0
    assert calls[-1] == dict(idx=[[120]], temperature=0.0, top_k=None, stops=[])
    (tmp_path / "p.jsonl").write_text('{"prompt": "def f"}\n{"prompt": "x"}\n')
    out = tmp_path / "c.jsonl"
    for new in ("4", "40"):  # 40: past block_size 32, one prompt at a time through generate()
        assert cli.main(["generate", "--run", str(run), "--prompts-file", str(tmp_path / "p.jsonl"), "--num-samples",
                         "2", "--max-new-tokens", new, "--out", str(out)]) == 0
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["prompt"] for line in lines] == ["def f", "def f", "x", "x"]
    assert len(calls) == 2 + 4
    nothing = argparse.Namespace(temperature=None, top_k=None, top_p=None)
    cli.resolve_sampling(nothing, tmp_path)  # a Hugging Face folder without generation_config.json: greedy, as there
    assert nothing.temperature == 0.0
    for config, want in (({"do_sample": False, "temperature": 0.6}, (0.0, 50, 1.0)),
                         ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, (0.6, 50, 0.9)),
                         ({"do_sample": True, "top_k": 0}, (1.0, None, 1.0))):
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
        args = argparse.Namespace(temperature=None, top_k=None, top_p=None)
        cli.resolve_sampling(args, tmp_path)
        assert (args.temperature, args.top_k, args.top_p) == want
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))  # GPT-2's: no do_sample
    asked = argparse.Namespace(temperature=None, top_k=40, top_p=None)  # --top-k asks to sample
    cli.resolve_sampling(asked, tmp_path)
    assert (asked.temperature, asked.top_k) == (1.0, 40)
    plain = argparse.Namespace(temperature=None, top_k=None, top_p=None)
    cli.resolve_sampling(plain, tmp_path)
    assert plain.temperature == 0.0  # do_sample left out: greedy, as transformers
    assert "does not apply" not in capsys.readouterr().err
    # what transformers' generate would apply and pyllm's sampling does not: said (it had been dropped);
    # repetition_penalty, no_repeat_ngram_size, min_new_tokens (greedy too) and min_p, typical_p,
    # epsilon_cutoff, eta_cutoff (sampling; each flag asks to sample) are taken
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.05, "min_new_tokens": 2,
                                                                 "no_repeat_ngram_size": 3, "min_p": 0.1,
                                                                 "typical_p": 0.9, "eta_cutoff": 3e-4,
                                                                 "min_length": 5}))
    taken = argparse.Namespace(temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                               no_repeat_ngram_size=None, min_new_tokens=None)
    cli.resolve_sampling(taken, tmp_path)
    err = capsys.readouterr().err
    assert "sets min_length=5, which pyllm's sampling does not apply" in err
    assert "penalty" not in err and "ngram" not in err and "min_new" not in err and "typical" not in err
    assert (taken.temperature, taken.min_p, taken.repetition_penalty) == (0.0, 0.1, 1.05)
    assert (taken.no_repeat_ngram_size, taken.min_new_tokens) == (3, 2)
    assert cli.warpers_of(taken) == {"typical_p": 0.9, "epsilon_cutoff": 0.0, "eta_cutoff": 3e-4}
    asked = argparse.Namespace(temperature=None, top_k=None, top_p=None, epsilon_cutoff=0.01)
    cli.resolve_sampling(asked, tmp_path)  # (a warper given asks to sample)
    assert (asked.temperature, asked.epsilon_cutoff, asked.typical_p) == (1.0, 0.01, 0.9)
    given = argparse.Namespace(temperature=None, top_k=None, top_p=None, min_p=0.2, repetition_penalty=1.3,
                               no_repeat_ngram_size=0, min_new_tokens=5)
    cli.resolve_sampling(given, tmp_path)
    assert (given.temperature, given.min_p, given.repetition_penalty) == (1.0, 0.2, 1.3)
    assert (given.no_repeat_ngram_size, given.min_new_tokens) == (0, 5)
    (tmp_path / "generation_config.json").unlink()
    mine = argparse.Namespace(temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None)
    cli.resolve_sampling(mine, None)  # a model of pyllm's own: neither
    assert (mine.temperature, mine.min_p, mine.repetition_penalty) == (0.8, None, 1.0)
    assert (mine.no_repeat_ngram_size, mine.min_new_tokens) == (0, 0)
    assert cli.warpers_of(mine) == {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
    # the stream prints what is returned, an incomplete last character too (it had been held back for
    # good); --draft past block_size names the flags
    import torch

    model = LLM.load(run / "model.safetensors")

    def two_tokens(self, idx, max_new_tokens, *args, callback=None, **kw):
        for token in (0xC3, 0xA9, 0xC3):  # "é", then the first byte of another
            callback(torch.tensor([token]))
    monkeypatch.setattr(LLM, "generate", two_tokens)
    capsys.readouterr()
    text = cli.stream_sample(model, StandInTokenizer(), "x", 3, 0.0, None, None, seed=0)
    assert capsys.readouterr().out == text == "x\u00e9\ufffd"
    with pytest.raises(ValueError, match="--max-new-tokens 40 are more than the models' block_size .32.: lower"):
        cli.stream_sample(model, StandInTokenizer(), "x", 40, 0.0, None, None, seed=0, draft=model)
    # under do_sample false too (greedy had ignored the flag); a null in the config is its default
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    asked = argparse.Namespace(temperature=None, top_k=None, top_p=0.5)
    cli.resolve_sampling(asked, tmp_path)
    assert (asked.temperature, asked.top_p) == (0.6, 0.5)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": None, "top_k": None}))
    nulls = argparse.Namespace(temperature=None, top_k=None, top_p=None)
    cli.resolve_sampling(nulls, tmp_path)
    assert (nulls.temperature, nulls.top_k, nulls.top_p) == (1.0, 50, 1.0)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 0}))
    given = argparse.Namespace(temperature=0.3, top_k=7, top_p=None)
    cli.resolve_sampling(given, tmp_path)
    assert (given.temperature, given.top_k, given.top_p) == (0.3, 7, 1.0)
    assert cli.start_ids(types.SimpleNamespace(encode_ordinary=lambda t: [10])) == [10]  # no <|endoftext|>: "\n"

    def no_newline(text):
        raise ValueError("not in the vocabulary")

    assert cli.start_ids(types.SimpleNamespace(encode_ordinary=no_newline)) == [0]  # characters without "\n"


def test_keep_best_from_the_cli(corpus, tmp_path, capsys):
    # --keep-best: model.safetensors holds the lowest val loss's weights, and the closing sample is
    # drawn from them (not from the last step's weights still in memory)
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "3", *SMALL, "--eval-every", "1",
                     "--keep-best"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors: the weights of the lowest val loss" in out
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    best = min(r["val_loss"] for r in records)
    assert f"lowest val loss, {best:.4f}" in out
    assert load_file(run / "model.safetensors")


def test_init_from_run_errors(corpus, tmp_path, capsys):
    assert cli.main(["train", "--init-from-run", str(tmp_path), "--data", str(corpus), "--out", str(tmp_path / "r"),
                     "--device", "cpu"]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
    assert cli.main(["train", "--init-from-run", str(tmp_path), "--init-from-hf", str(tmp_path), "--data", str(corpus),
                     "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert "not both" in capsys.readouterr().err


def test_train_end_to_end_cache_resume_generate(corpus, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "6", "--ckpt-every", "3", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: training" in out and "val loss" in out and "sample (12 tokens after 'def '" in out
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6)) and all("loss" in r for r in records)
    for name in ("checkpoint.pt", "model.safetensors", "loss.png", "tokenizer.bpe", "data/train.bin", "data/val.bin"):
        assert (run / name).exists(), name

    # a second run reuses the tokenizer and the token files
    assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: reusing" in out and "data: reusing" in out

    # resume continues from the checkpoint (step 2) up to the new --max-steps
    assert cli.main(["train", "--resume", str(run), "--max-steps", "4", "--sample-tokens", "0"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    capsys.readouterr()
    # a resume at or past its --max-steps, or one that would change the run's model, data or optimizer,
    # is refused with a line that says so (an option equal to the run's own passes)
    assert cli.main(["train", "--resume", str(run), "--max-steps", "4"]) == 2
    assert f"{run} is at step 4 already: give --max-steps above it" in capsys.readouterr().err
    for extra, flag in ((["--optimizer", "muon"], "--optimizer"), (["--model", "n_layers=3"], "--model"),
                        (["--data", str(tmp_path)], "--data"), (["--preset", "tiny-moe"], "--preset")):
        assert cli.main(["train", "--resume", str(run), "--max-steps", "5", *extra]) == 2
        err = capsys.readouterr().err
        assert "--resume continues the run as it was made" in err and f"leave out {flag}" in err, extra
    # (the run's own data given again, as its config file would: taken)
    assert cli.main(["train", "--resume", str(run), "--max-steps", "5", "--optimizer", "adamw", "--sample-tokens", "0",
                     "--data", str(corpus)]) == 0
    capsys.readouterr()

    assert cli.main(["generate", "--run", str(run), "--max-new-tokens", "8", "--prompt", "def g"]) == 0
    assert capsys.readouterr().out.startswith("def g")
    assert cli.main(["generate", "--run", str(run), "--max-new-tokens", "8", "--prompt", "def g", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("def g")
    assert cli.main(["generate", "--run", str(run), "--chat", "--prompt", "hi"]) == 2  # no chat template here
    assert "--chat needs --hf DIR, or a --run fine-tuned from one" in capsys.readouterr().err
    assert cli.main(["generate", "--run", str(run), "--max-new-tokens", "4", "--cuda-graph"]) == 2  # (CUDA only)
    assert "cuda_graph" in capsys.readouterr().err
    # --draft: speculative decoding, the run drafting for itself: greedily the same text, every draft kept
    assert cli.main(["generate", "--run", str(run), "--max-new-tokens", "8", "--prompt", "def g", "--temperature", "0"]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["generate", "--run", str(run), "--max-new-tokens", "8", "--prompt", "def g", "--temperature", "0",
                     "--draft", str(run), "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "speculative: 6 of 6 drafted tokens kept (100%) in 2 rounds" in out.err

    # export: a Hugging Face folder transformers loads as the same function (a LLaMA config), with the
    # tokenizer as tokenizer.json (the stand-in's: Tokenizer.to_hf is tested in test_bpe.py) and pyllm's own
    transformers = pytest.importorskip("transformers")
    import torch

    from pyllm.model import LLM

    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert "a llama config" in capsys.readouterr().out
    assert (tmp_path / "hf/tokenizer.json").exists() and (tmp_path / "hf/tokenizer.bpe").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = LLM.load(run / "model.safetensors").eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ours(idx)[0], rtol=1e-4, atol=1e-5)
    # a tokenizer with <|endoftext|>: transformers' generation ends there too (the config had LLaMA's
    # default ids 1 and 2, bytes in this vocabulary)
    monkeypatch.setattr(StandInTokenizer, "special_tokens", {"<|endoftext|>": 256}, raising=False)
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "hf2"), "--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "hf2/generation_config.json").read_text())["eos_token_id"] == 256
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf2").eos_token_id == 256
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf2").eos_token_id == 256
    # (byte-level ids decode to the text as it was: transformers 4.x's default had cleaned " ," to ",")
    assert json.loads((tmp_path / "hf2/tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is False
    # An audit (2026-12-06): --force into the run itself had deleted its weights and tokenizer before
    # reading them; a run whose tokenizer is gone had left a half-written folder behind
    capsys.readouterr()
    assert cli.main(["export", "--run", str(run), "--out", str(run), "--force"]) == 2
    assert "is --run, which the export reads: give a new folder" in capsys.readouterr().err
    assert (run / "model.safetensors").is_file()
    tokenizer = Path(json.loads((run / "run.json").read_text())["tokenizer"])
    tokenizer.rename(tokenizer.with_suffix(".away"))
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "hf3")]) == 2
    assert "is gone (run.json names it)" in capsys.readouterr().err and not (tmp_path / "hf3").exists()
    tokenizer.with_suffix(".away").rename(tokenizer)


def test_nanogpt_python_config_is_refused_with_pyllms_names(tmp_path, capsys):
    # nanoGPT's config/*.py (Python its configurator execs) had failed as TOML at `wandb_log = False`
    (tmp_path / "train_shakespeare_char.py").write_text("out_dir = 'out'\nwandb_log = False\nlearning_rate = 1e-3\n")
    assert cli.main(["train", "--config", str(tmp_path / "train_shakespeare_char.py")]) == 2
    err = capsys.readouterr().err
    assert "is a Python file: pyllm does not run config code" in err and "learning_rate -> lr" in err


def test_config_file_with_cli_override(corpus, tmp_path):
    (tmp_path / "c.toml").write_text(
        f'max_steps = 5\nlr = 0.01\ndata = ["{corpus}"]\nout = "{tmp_path / "r"}"\n[model]\nn_layers = 2\ndim = 64\nn_heads = 2\nblock_size = 16\n'
        'sliding_window = 4\n')
    assert cli.main(["train", "--config", str(tmp_path / "c.toml"), "--max-steps", "3", "--batch-size", "2",
                     "--eval-batches", "1", "--device", "cpu", "--sample-tokens", "0", "--model", "window_layers=[1]"]) == 0
    records = [json.loads(line) for line in (tmp_path / "r/log.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[-1]["lr"] < 0.01
    from pyllm.model import LLM

    cfg = LLM.load(tmp_path / "r/model.safetensors").config
    assert (cfg.n_layers, cfg.sliding_window, cfg.window_layers) == (2, 4, [1])


def test_config_files_data_dir_is_the_data(corpus, tmp_path, capsys):
    # data_dir (a TrainConfig field) in a config file names the data as --data does; it had been
    # overwritten by the run's own folder, and the tokenizer trained on the standard library.
    (tmp_path / "c.toml").write_text(f'data_dir = "{corpus}"\nout = "{tmp_path / "r"}"\nmax_steps = 1\n')
    assert cli.main(["train", "--config", str(tmp_path / "c.toml"), *SMALL, "--sample-tokens", "0"]) == 0
    run = json.loads((tmp_path / "r/run.json").read_text())
    assert json.loads((tmp_path / "r/data/source.json").read_text())  # made from the corpus's files
    assert "m00.py" in (tmp_path / "r/data/source.json").read_text() and run["data_dir"] == str((tmp_path / "r/data").resolve())
    capsys.readouterr()
    (tmp_path / "both.toml").write_text(f'data_dir = "{corpus}"\ndata = "{corpus}"\nmax_steps = 1\n')
    assert cli.main(["train", "--config", str(tmp_path / "both.toml"), "--out", str(tmp_path / "r2"), *SMALL]) == 2
    assert "give the data once" in capsys.readouterr().err
    # the command's --data overrides the file's data_dir, as every flag overrides the file
    assert cli.main(["train", "--config", str(tmp_path / "c.toml"), "--data", str(tmp_path / "r/data"), "--out",
                     str(tmp_path / "r3"), *SMALL, "--sample-tokens", "0"]) == 0
    assert json.loads((tmp_path / "r3/run.json").read_text())["data_dir"] == str((tmp_path / "r/data").resolve())


def test_init_from_run_refuses_token_files_of_another_tokenizer(corpus, tmp_path, capsys):
    # A token folder made with another tokenizer than the run's: its ids would be other tokens to
    # the model (it trained, silently). The run's own tokenizer beside them is taken.
    import shutil

    base = tmp_path / "base"
    assert cli.main(["train", "--data", str(corpus), "--out", str(base), "--max-steps", "1", *SMALL]) == 0
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder, tokenizer in ((ours, "stand-in"), (theirs, "another tokenizer")):
        shutil.copytree(base / "data", folder)
        (folder / "tokenizer.bpe").write_text(tokenizer)
    capsys.readouterr()
    common = ["--init-from-run", str(base), "--max-steps", "1", "--batch-size", "2", "--eval-every", "0",
              "--eval-batches", "1", "--device", "cpu", "--sample-tokens", "0"]
    assert cli.main(["train", "--data", str(theirs), "--out", str(tmp_path / "a"), *common]) == 2
    assert "not with the tokenizer of --init-from-run" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(ours), "--out", str(tmp_path / "b"), *common]) == 0


def test_config_file_keys_are_read_or_refused(corpus, tmp_path, capsys, monkeypatch):
    # From an audit of --config (2026-12-06): keys that had been ignored without a word (another
    # config, model_overrides, out beside out_dir), values of the wrong kind that had failed in a
    # traceback (some after training), a JSON file read as TOML, eval_choices (what --eval-choices
    # names) taken for the tokenized file; a relative data_dir given again on resume had been
    # refused; a new muon_momentum on resume recorded and not used.
    import torch

    config = tmp_path / "c.toml"
    for body, said in (('config = "other.toml"', "a config file does not include another"),
                       ('model_overrides = ["n_layers=2"]', "go in its [model] table"),
                       ('out = "a"\nout_dir = "b"', "out and out_dir are one option"),
                       ('model = "tiny"', "model must be a table of ModelConfig fields"),
                       ('tokenizer_train_bytes = "5"', "tokenizer_train_bytes must be an integer >= 0, got '5'"),
                       ("vocab_size = 300.0", "vocab_size must be an integer >= 1, got 300.0"),
                       ("val_fraction = 1.5", "val_fraction must be a number in (0, 1), got 1.5"),
                       ("prompt = 5", "prompt must be a string, got 5"),
                       ("max-steps = 3", "unknown option(s) max-steps (spelled max_steps)")):
        config.write_text(body + "\n")
        assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "x"), *SMALL]) == 2, body
        assert said in capsys.readouterr().err, body
    assert not (tmp_path / "x").exists()  # refused before the run folder was made
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps({"data": str(corpus), "out": "r", "max_steps": 1, "optimizer": "muon"}))
    assert cli.main(["train", "--config", "c.json", *SMALL]) == 0
    (tmp_path / "d.toml").write_text('data_dir = "r/data"\nout = "d"\nmax_steps = 2\noptimizer = "muon"\n')
    assert cli.main(["train", "--config", "d.toml", *SMALL]) == 0
    assert cli.main(["train", "--resume", "d", "--config", "d.toml", "--max-steps", "3", *SMALL]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", "d", "--max-steps", "4", "--muon-momentum", "0.5", *SMALL]) == 2
    assert "leave out --muon-momentum" in capsys.readouterr().err
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["step"] == 3
    (tmp_path / "e.toml").write_text('eval_choices = "hellaswag.jsonl"\n')  # what --eval-choices names
    assert cli.config_file_options(tmp_path / "e.toml") == {"eval_choices_file": "hellaswag.jsonl"}


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("max_steps: 7\nmodel:\n  n_layers: 2\n")
    assert cli.load_config_file(tmp_path / "c.yaml") == {"max_steps": 7, "model": {"n_layers": 2}}


def test_prepare_and_tokenizer_train(corpus, tmp_path):
    tok = tmp_path / "tok.bpe"
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    before = tok.read_bytes()  # a failed retraining (a typo in --input) leaves the file it had
    assert cli.main(["tokenizer", "train", "--input", str(tmp_path / "typo"), "--vocab-size", "300", "--out", str(tok)]) == 2
    assert tok.read_bytes() == before
    assert cli.main(["prepare", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "d")]) == 0
    from pyllm import data

    assert len(data.open_tokens(tmp_path / "d/train.bin")) > len(data.open_tokens(tmp_path / "d/val.bin")) > 0


def test_clear_errors(corpus, tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "gpt5", "--data", str(corpus), "--out", str(tmp_path / "r")]) == 2
    assert "unknown model preset" in capsys.readouterr().err
    assert cli.main(["train", "--model", "n_heads=5", "--data", str(corpus), "--out", str(tmp_path / "r"), "--max-steps", "1"]) == 2
    assert "n_heads (5) must divide dim (128)" in capsys.readouterr().err
    assert cli.main(["train", "--model", "window_layers=[1,", "--data", str(corpus), "--out", str(tmp_path / "r")]) == 2
    assert "--model window_layers: '[1,' is not a JSON list" in capsys.readouterr().err
    assert cli.main(["train", "--lr", "-1", "--data", str(corpus), "--out", str(tmp_path / "r")]) == 2
    assert "TrainConfig.lr must be > 0, got -1" in capsys.readouterr().err

    # config files: bad syntax, an unknown option, a wrongly typed one
    for name, text, message in [("a.toml", "max_steps = = 3", "is not valid TOML"),
                                ("b.yaml", "max_steps: [3", "is not valid YAML"),
                                ("c.toml", "max_step = 3", "unknown option.*max_step"),
                                ("d.toml", 'max_steps = "ten"', "max_steps must be of type int, got 'ten'")]:
        if name.endswith(".yaml"):
            pytest.importorskip("yaml")
        (tmp_path / name).write_text(text)
        assert cli.main(["train", "--config", str(tmp_path / name), "--data", str(corpus), "--out", str(tmp_path / "r")]) == 2
        assert re.search(message, capsys.readouterr().err), name
    assert cli.main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert re.search("config file .*none.toml does not exist", capsys.readouterr().err)

    # a token folder with a corrupt train.bin; a corrupt checkpoint
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "train.bin").write_bytes(b"PYLLMTOK" + b"\0" * 40)
    (tokens / "val.bin").write_bytes(b"not tokens")
    assert cli.main(["train", "--data", str(tokens), "--out", str(tmp_path / "r2"), "--device", "cpu"]) == 2
    assert "not a pyllm token file" in capsys.readouterr().err
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3/checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    assert cli.main(["train", "--resume", str(tmp_path / "r3")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_interrupted_training_says_where_to_go_on(corpus, tmp_path, capsys, monkeypatch):
    # Ctrl-C: no traceback, the checkpoint's step and the command that resumes from it; exit 130
    import pyllm.train

    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2", *SMALL]) == 0
    capsys.readouterr()

    def interrupted(cfg, resume):
        raise KeyboardInterrupt

    monkeypatch.setattr(pyllm.train, "train", interrupted)
    assert cli.main(["train", "--resume", str(run), "--max-steps", "9"]) == 130
    assert f"interrupted; its checkpoint is at step 2: go on with `pyllm train --resume {run}`" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "new"), *SMALL]) == 130
    assert "interrupted; no checkpoint in" in capsys.readouterr().err


def test_sigterm_checkpoints_the_step_and_says_where_to_go_on(corpus, tmp_path, capsys, monkeypatch):
    # What SLURM / Kubernetes / torchrun send before a kill: the step under way ends and is
    # checkpointed (ckpt_every says later), exit 143, and the handler is put back afterwards.
    import os
    import signal

    import pyllm.train

    real_lr_at = pyllm.train.lr_at

    def lr_and_term(step, cfg):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(step, cfg)

    monkeypatch.setattr(pyllm.train, "lr_at", lr_and_term)
    before = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "9", *SMALL]) == 143
    err = capsys.readouterr().err
    assert f"stopped (SIGTERM) after step 2; its checkpoint is at step 2: go on with `pyllm train --resume {run}`" in err
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_during_prepare_leaves_no_temp_files(corpus, tmp_path, capsys, monkeypatch):
    # Killed by SIGTERM's default action, a prepare (or a train preparing its data) had left its hidden
    # temp token files, gigabytes, for the next prepare to remove 10 minutes later: main() raises it.
    import os
    import signal

    from pyllm import data

    tok = tmp_path / "tok.bpe"
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    real_append, calls = data.TokenWriter.append, []

    def append_and_term(self, tokens):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_append(self, tokens)

    monkeypatch.setattr(data.TokenWriter, "append", append_and_term)
    before = signal.getsignal(signal.SIGTERM)
    for argv in (["prepare", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "d")],
                 ["train", "--data", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "run"), *SMALL]):
        calls.clear()
        assert cli.main(argv) == 143
        assert "terminated (SIGTERM)" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is before
        folder = tmp_path / ("d" if argv[0] == "prepare" else "run/data")
        assert len(calls) == 3 and folder.is_dir()
        assert not list(folder.glob(".*.tmp")) and not (folder / "train.bin").exists(), sorted(folder.iterdir())


def test_a_second_sigterm_ends_a_command_stuck_in_its_clean_up(monkeypatch):
    # main's handler raises Terminated; the same signal again within 5 s is the same request (SLURM and
    # torchrun each send one), later the default action (as train.request_stop; from the audit).
    import signal

    calls, now = [], [100.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(cli.signal, "signal", lambda signum, handler: calls.append(("signal", handler)))
    monkeypatch.setattr(cli.signal, "raise_signal", lambda signum: calls.append(("raise", signum)))
    monkeypatch.setattr(cli, "_terminated_at", [])
    with pytest.raises(cli.Terminated):
        cli._terminate(signal.SIGTERM, None)
    now[0] += 1.0
    cli._terminate(signal.SIGTERM, None)
    assert calls == []
    now[0] += 5.0
    cli._terminate(signal.SIGTERM, None)
    assert calls == [("signal", signal.SIG_DFL), ("raise", signal.SIGTERM)]


def test_a_run_that_mostly_skipped_its_steps_says_why(corpus, tmp_path, capsys, monkeypatch):
    import pyllm.train

    real = pyllm.train.train
    monkeypatch.setattr(pyllm.train, "train", lambda cfg, resume: {**real(cfg, resume=resume), "skipped_steps": 2})
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "r"), "--max-steps", "4", *SMALL]) == 0
    assert "warning: 2 of 4 steps were skipped (non-finite gradients): the learning rate" in capsys.readouterr().err
    monkeypatch.setattr(pyllm.train, "train", lambda cfg, resume: {**real(cfg, resume=resume), "skipped_steps": 1})
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "s"), "--max-steps", "4", *SMALL]) == 0
    assert "warning" not in capsys.readouterr().err


def test_beta_zero_in_a_config_file_is_refused(tmp_path):
    # as --beta 0: TrainConfig's 0 stands for the loss's default (from the review)
    (tmp_path / "c.toml").write_text('preference = "orpo"\nbeta = 0\n')
    with pytest.raises(ValueError, match="beta = 0 would train with the loss's default"):
        cli.config_file_options(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text("beta = 0\n")  # (a file listing the defaults)
    assert cli.config_file_options(tmp_path / "d.toml") == {"beta": 0}


def test_bad_numbers_and_paths_are_one_line_errors(corpus, tmp_path, capsys):
    # argparse's own line (exit 2) for numbers out of range; a missing --run folder, a path that is no
    # folder (not tried as a hub id), a CUDA device on a torch without one, an empty --text: a line each
    for argv, message in [
            (["generate", "--run", "x", "--top-k", "-1"], "argument --top-k: must be an integer >= 0, got -1"),
            (["generate", "--run", "x", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
            (["generate", "--run", "x", "--temperature", "-1"], "argument --temperature: must be a finite number >= 0.0"),
            (["generate", "--run", "x", "--num-samples", "0"], "argument --num-samples: must be an integer >= 1"),
            (["generate", "--run", "x", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be an integer >= 1"),
            (["eval", "--run", "x", "--text", "y", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
            (["eval", "--run", "x", "--choices", "y", "--limit", "-1"], "argument --limit: must be an integer >= 1"),
            (["plan", "--params", "1M", "--gpus", "0"], "argument --gpus: must be an integer >= 1, got 0"),
            # (0 had been read as "the loss's default", 0.1, silently; from the ORPO / SimPO audit)
            (["train", "--preference", "orpo", "--beta", "0"], "argument --beta: must be a finite number > 0, got 0"),
            (["plan", "--params", "1M", "--tokens-per-param", "-20"], "argument --tokens-per-param: must be a finite number > 0"),
            (["plan", "--params", "1M", "--flops-per-s", "0"], "--flops-per-s must be a finite number > 0, got '0'"),
            (["plan", "--compute", "-1"], "--compute: must be positive, got '-1'"),
            (["plan", "--compute", "1e400"], "--compute must be a finite number > 0, got '1e400'"),
            (["plan", "--params", "1M", "--flops-per-s", ""], "--flops-per-s: not a number: ''"),
            (["plan", "--params", "1..5"], "--params: not a number: '1..5'"),
            (["generate", "--run", str(tmp_path / "nope")], "no such folder (give a folder `pyllm train` wrote)"),
            (["generate", "--hf", "./nope"], "./nope: no such folder"),
            (["generate", "--hf", "runs/a/b"], "runs/a/b: no such folder")]:
        with pytest.raises(SystemExit) if "argument" in message else contextlib.nullcontext():
            assert cli.main(argv) == 2
        assert message in capsys.readouterr().err, argv
    import torch

    if not torch.cuda.is_available():
        assert cli.main(["train", "--device", "cuda", "--data", str(corpus), "--out", str(tmp_path / "r")]) == 2
        assert "--device cuda: " in capsys.readouterr().err
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "1", *SMALL]) == 0
    capsys.readouterr()
    (tmp_path / "empty.txt").write_text("")
    assert cli.main(["eval", "--run", str(run), "--text", str(tmp_path / "empty.txt")]) == 2
    assert "no tokens to predict (empty files?)" in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(run), "--choices", str(tmp_path / "empty.txt")]) == 2
    assert "no examples in it" in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(run), "--text", str(tmp_path)]) == 2  # a folder: the OSError's line
    assert "Is a directory" in capsys.readouterr().err
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    assert cli.main(["generate", "--run", str(run), "--prompts-file", str(tmp_path / "prompts.jsonl")]) == 2
    assert "prompts.jsonl:2: not JSON" in capsys.readouterr().err


def test_what_a_nanogpt_user_tries(corpus, tmp_path, capsys):
    # A badly typed --model value is one error line (a TypeError traceback before; "no" a truthy flag);
    # a val split too short for a window is refused before training, not at the first evaluation;
    # `pyllm prepare`'s folder carries its tokenizer, which the run records; FILE: prompts (sample.py's).
    for value, message in (("dim=abc", "ModelConfig.dim must be int, got 'abc'"),
                           ("bias=no", "ModelConfig.bias must be bool, got 'no'"),
                           ("dropout=abc", "ModelConfig.dropout must be float, got 'abc'")):
        assert cli.main(["train", "--model", value, "--data", str(corpus), "--out", str(tmp_path / "r")]) == 2
        assert message in capsys.readouterr().err, value
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n" * 40)
    assert cli.main(["train", "--data", str(short), "--out", str(tmp_path / "s"), "--max-steps", "20", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "val.bin holds" in err and "fewer than one window" in err
    assert not (tmp_path / "s" / "log.jsonl").exists()  # (no step was trained)
    tok = tmp_path / "tok.bpe"
    assert cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert cli.main(["prepare", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "tokenizer.bpe").read_text() == tok.read_text()
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(tmp_path / "d"), "--out", str(run), "--max-steps", "2", "--beta2", "0.99",
                     *SMALL]) == 0
    assert json.loads((run / "run.json").read_text())["tokenizer"] == str((tmp_path / "d" / "tokenizer.bpe").resolve())
    import torch

    assert torch.load(run / "checkpoint.pt", weights_only=True)["train_config"]["beta2"] == 0.99
    assert cli.main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "b"), "--beta1", "1.5"]) == 2
    assert "beta1 must be in [0, 1)" in capsys.readouterr().err
    capsys.readouterr()
    (tmp_path / "prompt.txt").write_text("def h")
    assert cli.main(["generate", "--run", str(run), "--max-new-tokens", "4", "--prompt", f"FILE:{tmp_path / 'prompt.txt'}"]) == 0
    assert capsys.readouterr().out.startswith("def h")
    assert cli.main(["generate", "--run", str(run), "--prompt", "FILE:" + str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    data = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**data, "tokenizer": None}))
    assert cli.main(["generate", "--run", str(run), "--max-new-tokens", "4"]) == 2
    assert "records no tokenizer" in capsys.readouterr().err


def test_train_on_nanogpts_token_files(tmp_path, capsys):
    # nanoGPT's prepare.py output: bare uint16 train.bin / val.bin, a meta.pkl for a character vocabulary
    # (none for GPT-2's BPE: 50,257 ids). The folder trains as it is; a .bin named as a text file is refused.
    import pickle

    import numpy as np

    from pyllm import data

    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, 65, 3000, dtype=np.uint16).tofile(folder / "train.bin")
    rng.integers(0, 65, 400, dtype=np.uint16).tofile(folder / "val.bin")
    chars = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # nanoGPT's Shakespeare's 65
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "itos": dict(enumerate(chars)),
                                                    "stoi": {c: i for i, c in enumerate(chars)}}))
    tokens = data.open_tokens(folder / "train.bin")
    assert data.read_header(folder / "val.bin")["vocab_size"] == 65 and tokens.dtype == np.uint16
    assert np.array_equal(tokens, np.fromfile(folder / "train.bin", dtype=np.uint16))
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(folder), "--out", str(run), "--max-steps", "2", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "nanoGPT's bare uint16 token files: vocab 65 (its meta.pkl's characters)" in out
    assert "sample (12 tokens after 'def '" in out  # decoded by its characters
    from pyllm.model import LLM

    assert LLM.load(run / "model.safetensors").config.vocab_size == 65
    assert cli.main(["generate", "--run", str(run), "--max-new-tokens", "5", "--prompt", "ROMEO:"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and set(text.split("\n")[0][6:]) <= set(chars)
    assert cli.main(["generate", "--run", str(run), "--prompt", "é"]) == 2
    assert "'é' is not in this character vocabulary" in capsys.readouterr().err
    # the run keeps its own copy of the characters; export carries them; a resume keeps its optimizer's
    # betas (its state_dict's), and a run on characters is no tokenizer for new text
    assert json.loads((run / "run.json").read_text())["tokenizer"] == str((run / "meta.pkl").resolve())
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "hf" / "meta.pkl").read_bytes() == (folder / "meta.pkl").read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--max-steps", "3", "--beta2", "0.9"]) == 2
    assert "leave out --beta2" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("ROMEO: hello\n" * 50)
    assert cli.main(["train", "--init-from-run", str(run), "--data", str(tmp_path / "t.txt"), "--out",
                     str(tmp_path / "ft"), "--max-steps", "1"]) == 2
    assert "does not tokenize text with them" in capsys.readouterr().err
    (folder / "meta.pkl").unlink()
    assert data.read_header(folder / "train.bin")["vocab_size"] == data.GPT2_VOCAB
    assert cli.main(["train", "--data", str(folder / "train.bin"), "--out", str(tmp_path / "r2")]) == 2
    assert "looks binary" in capsys.readouterr().err
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "at": pytest.raises}))  # code, not data
    with pytest.raises(data.TokenFileError, match="holds a .*raises; nanoGPT's meta.pkl is a dict of plain values"):
        data.read_header(folder / "train.bin")
    (folder / "val.bin").write_bytes(b"x")  # not a pair of bare uint16 files: not nanoGPT's
    with pytest.raises(data.TokenFileError, match="nor one of nanoGPT's"):
        data.read_header(folder / "train.bin")


def test_nanogpt_folders_as_nanogpt_reads_them(corpus, tmp_path, capsys):
    # What nanoGPT's own folders may hold, each read as nanoGPT reads it (an audit, 2026-12-05):
    # another folder's characters under the same vocab size are another vocabulary to a run's model;
    # a meta.pkl of a vocab_size alone is no tokenizer; a stale tokenizer.bpe is not the bare files';
    # a vocabulary without "def " samples from a document's start; itos may be a list.
    import pickle

    import numpy as np

    from pyllm import data
    from pyllm.model import LLM

    def folder(name, chars, meta=True, itos_list=False):
        path = tmp_path / name
        path.mkdir()
        rng = np.random.default_rng(0)
        rng.integers(0, len(chars), 3000, dtype=np.uint16).tofile(path / "train.bin")
        rng.integers(0, len(chars), 400, dtype=np.uint16).tofile(path / "val.bin")
        if meta:
            itos = list(chars) if itos_list else dict(enumerate(chars))
            (path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(chars), "itos": itos,
                                                          "stoi": {c: i for i, c in enumerate(chars)}}))
        return path

    lower = folder("lower", "\n abcdefghijklmnopqrstuvwxyz.", itos_list=True)
    upper = folder("upper", "\n ABCDEFGHIJKLMNOPQRSTUVWXYZ.")
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(upper), "--out", str(run), "--max-steps", "1", *SMALL]) == 0
    out = capsys.readouterr().out  # no 'd', 'e', 'f': the sample starts a document ("\n", nanoGPT's start)
    assert "sample (12 tokens after ''" in out
    assert cli.main(["generate", "--run", str(run), "--max-new-tokens", "3"]) == 0
    assert set(capsys.readouterr().out.split("-" * 60)[0]) <= set("\n ABCDEFGHIJKLMNOPQRSTUVWXYZ.")
    assert cli.main(["train", "--data", str(lower), "--out", str(tmp_path / "ft"), "--init-from-run", str(run),
                     "--max-steps", "1", "--device", "cpu"]) == 2  # 29 characters either way, 26 of them others
    assert "not with the tokenizer of --init-from-run" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(lower), "--out", str(tmp_path / "lr"), "--max-steps", "1", *SMALL]) == 0
    assert "sample (12 tokens after 'def '" in capsys.readouterr().out  # (itos a list)
    sized = folder("sized", "x" * 300, meta=False)
    (sized / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 300}))
    (sized / "tokenizer.bpe").write_bytes(_standin(tmp_path).read_bytes())  # stale: not the bare files'
    assert cli.main(["train", "--data", str(sized), "--out", str(tmp_path / "s"), "--max-steps", "1", *SMALL]) == 0
    assert "vocab 300 (its meta.pkl's vocab_size, no characters in it; give --tokenizer" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "run.json").read_text())["tokenizer"] is None
    (sized / "meta.pkl").unlink()
    assert cli.main(["train", "--data", str(sized), "--out", str(tmp_path / "s2"), "--tokenizer",
                     str(_standin(tmp_path)), *SMALL]) == 2  # read as GPT-2's ids without a meta.pkl
    assert "write its vocab_size there (pickle.dump({'vocab_size': 257}" in capsys.readouterr().err
    assert cli.main(["prepare", "--input", str(corpus), "--tokenizer", str(upper / "meta.pkl"), "--out",
                     str(tmp_path / "p")]) == 2
    assert "is nanoGPT's character vocabulary (meta.pkl): pyllm reads it beside" in capsys.readouterr().err
    # --vocab-size sizes a tokenizer trained on --data; with token files (or --tokenizer) it had been
    # ignored without a word
    assert cli.main(["train", "--data", str(upper), "--out", str(tmp_path / "v"), "--vocab-size", "64", *SMALL]) == 2
    assert "--vocab-size 64 sizes the tokenizer trained on --data; this run's tokens are --data's token" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(corpus), "--tokenizer", str(_standin(tmp_path)), "--vocab-size", "300",
                     "--out", str(tmp_path / "v"), *SMALL]) == 2
    assert "this run's tokens are --tokenizer's" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(upper), "--out", str(tmp_path / "v"), "--max-steps", "1", *SMALL,
                     "--model", "vocab_size=64"]) == 0
    assert LLM.load(tmp_path / "v" / "model.safetensors").config.vocab_size == 64
    (upper / "val.bin").write_bytes(b"abc")
    with pytest.raises(data.TokenFileError, match="val.bin has an odd number of bytes"):
        data.read_header(upper / "train.bin")


def test_tokenizer_training_sample_spreads_over_the_bytes(tmp_path):
    # --train-bytes: about that many bytes from every file by its size, whole lines from all through
    # it (every k-th whole file had been taken: a single large file read whole, of a small and a
    # large file only the small one)
    small, big, rows = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.jsonl"
    small.write_text("".join(f"small {i}\n" for i in range(400)))
    big.write_text("".join(f"line {i} of the big file\n" for i in range(40000)))
    rows.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20000)))
    files = [small, big, rows]
    assert cli.training_sample(files, 0) == (files, "3 of 3 files")
    assert cli.training_sample(files, 10**9)[0] == files
    total = sum(f.stat().st_size for f in files)
    texts, what = cli.training_sample(files, total // 10)
    assert "spread over 3 files" in what and 0.8 * total / 10 < sum(map(len, texts)) <= total / 10
    lines = [line for t in texts for line in t.splitlines()]
    numbers = sorted(int(line.split()[1]) for line in lines if line.startswith("line"))
    assert any(line.startswith("small") for line in lines) and any(line.startswith("row") for line in lines)
    assert numbers[0] < 4000 and numbers[-1] > 36000  # (the big file's beginning to end)
    assert all(line.split()[-1] == "file" for line in lines if line.startswith("line"))  # whole lines
    one, _ = cli.training_sample([big], 50_000)
    assert 40_000 < sum(map(len, one)) <= 50_000


def test_llmc_shards_nanogpt_would_refuse(tmp_path):
    # llm.c exits on a shard whose header it does not know; such a file had been left out of its split
    import numpy as np

    from pyllm import data

    def shard(name, magic=20240520, version=1, n=100):
        header = np.zeros(256, np.int32)
        header[:3] = magic, version, n
        (tmp_path / name).write_bytes(header.tobytes() + np.arange(n, dtype=np.uint16).tobytes())

    shard("fw_train_000001.bin")
    shard("fw_val_000000.bin")
    shard("hellaswag_val.bin", magic=20240522)  # llm.c's eval file: not a token shard, left out
    assert data.split_files(tmp_path, "val") == [tmp_path / "fw_val_000000.bin"]
    for magic, version in ((20240520, 2), (0, 0)):
        shard("fw_train_000002.bin", magic, version)
        with pytest.raises(data.TokenFileError, match="fw_train_000002.bin named as llm.c's train shards but without"):
            data.read_header(tmp_path / "train.bin")


def test_data_folders_as_given(corpus, tmp_path, capsys, monkeypatch):
    # A token folder is read alone and whole; a run records it absolute (a resume from another
    # folder reads the same files); changed text is tokenized again; another vocabulary is refused.
    tokens = tmp_path / "tok"
    assert cli.main(["prepare", "--input", str(corpus), "--tokenizer", str(_standin(tmp_path)), "--out", str(tokens)]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("notes\n" * 100)
    capsys.readouterr()
    assert cli.main(["train", "--data", str(tokens), str(other), "--out", str(tmp_path / "r0"), *SMALL]) == 2
    assert "is a folder of token files: give it alone" in capsys.readouterr().err
    (other / "train.bin").write_bytes((tokens / "train.bin").read_bytes())  # a split without the other
    assert cli.main(["train", "--data", str(other), "--out", str(tmp_path / "r0"), *SMALL]) == 2
    assert "holds train token files (train.bin) but no val split" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", "tok", "--out", "run", "--max-steps", "1", *SMALL]) == 0
    assert json.loads((run / "run.json").read_text())["data_dir"] == str(tokens)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main(["train", "--resume", str(run), "--max-steps", "2"]) == 0
    capsys.readouterr()
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.py").write_text("def a():\n    return 1\n" * 1000)
    args = ["train", "--data", str(text), "--out", str(tmp_path / "t"), "--max-steps", "1", *SMALL]
    assert cli.main(args) == 0
    assert cli.main(args) == 0
    assert "data: reusing" in capsys.readouterr().out
    (text / "a.py").write_text("def b():\n    return 2\n" * 1000)  # edited: not the same data
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "reusing" not in out and "tokenizer: training" in out
    ids = __import__("numpy").asarray(__import__("pyllm.data").data.open_tokens(tmp_path / "t" / "data" / "train.bin"))
    assert b"def b()" in bytes(ids[ids < 256].astype("uint8"))
    was = (text / "a.py").stat()
    (text / "a.py").write_text("def c():\n    return 3\n" * 1000)  # the same size, its time put back (cp -p)
    __import__("os").utime(text / "a.py", ns=(was.st_atime_ns, was.st_mtime_ns))
    assert cli.main(args) == 0 and "data: reusing" not in capsys.readouterr().out
    ids = __import__("numpy").asarray(__import__("pyllm.data").data.open_tokens(tmp_path / "t" / "data" / "train.bin"))
    assert b"def c()" in bytes(ids[ids < 256].astype("uint8"))


def _standin(tmp_path):
    path = tmp_path / "standin.bpe"
    StandInTokenizer().save(path)
    return path


def test_token_files_of_another_vocabulary(corpus, tmp_path, capsys):
    tokens = tmp_path / "tok"
    assert cli.main(["prepare", "--input", str(corpus), "--tokenizer", str(_standin(tmp_path)), "--out", str(tokens)]) == 0
    from pyllm import data

    ids = data.open_tokens(tokens / "train.bin")
    data.write_tokens(tokens / "train.bin", ids, 300)  # as if another tokenizer of 300 ids wrote them
    capsys.readouterr()
    assert cli.main(["train", "--data", str(tokens), "--out", str(tmp_path / "r"), *SMALL]) == 2
    assert ("was tokenized with a 300-id tokenizer, and the tokenizer given "
            f"({tokens / 'tokenizer.bpe'}) has 257 ids") in capsys.readouterr().err
    # a fine-tune of a run on token files without their tokenizer beside them (llm.c's, nanoGPT's
    # GPT-2 ids) records the run's, which its samples decode by (it had recorded none)
    data.write_tokens(tokens / "train.bin", ids, 257)
    (tokens / "tokenizer.bpe").unlink()
    assert cli.main(["train", "--data", str(tokens), "--tokenizer", str(_standin(tmp_path)), "--out", str(tmp_path / "a"),
                     "--max-steps", "1", *SMALL]) == 0
    assert cli.main(["train", "--data", str(tokens), "--init-from-run", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                     "--max-steps", "1", "--device", "cpu", "--sample-tokens", "0"]) == 0
    recorded = [json.loads((tmp_path / run / "run.json").read_text())["tokenizer"] for run in ("a", "b")]
    assert recorded[0] == recorded[1] == str(_standin(tmp_path).resolve())


def test_train_on_llmc_token_files(tmp_path, capsys):
    # llm.c's dev/data scripts: NAME_train_*.bin shards and NAME_val_*.bin, a 1 KB int32 header each
    import numpy as np

    rng = np.random.default_rng(0)
    for name, count in (("fineweb_train_000001", 2000), ("fineweb_train_000002", 1500), ("fineweb_val_000000", 600)):
        header = np.zeros(256, np.int32)
        header[:3] = 20240520, 1, count
        (tmp_path / f"{name}.bin").write_bytes(header.tobytes() + rng.integers(0, 50257, count, dtype=np.uint16).tobytes())
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--max-steps", "1", *SMALL,
                     "--sample-tokens", "0"]) == 0
    assert "llm.c's token files (2 train and 1 val shards, 3,500 train tokens): vocab 50,257" in capsys.readouterr().out


def test_resume_as_the_run_was_made(corpus, tmp_path, capsys):
    # The run's own config file given again is what it was made with (it had been refused as a
    # change of --data and --model); the seed (the loaders' orders) and a LoRA scale are the run's;
    # a run killed between its last checkpoint and its weights writes them on resume.
    config = tmp_path / "run.toml"
    body = (f'data = "{corpus}"\nmax_steps = 2\nbatch_size = 4\neval_every = 0\neval_batches = 2\n'
            'device = "cpu"\nsample_tokens = 0\nvocab_size = 300\nval_fraction = 0.05\n'
            '[model]\nn_layers = 1\ndim = 64\nn_heads = 2\nblock_size = 32\n')
    config.write_text(body)
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--out", str(run)]) == 0
    assert cli.main(["train", "--config", str(config), "--resume", str(run), "--max-steps", "3"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--max-steps", "4", "--seed", "7"]) == 2
    assert "leave out --seed" in capsys.readouterr().err
    config.write_text(body.replace("dim = 64", "dim = 32"))
    assert cli.main(["train", "--config", str(config), "--resume", str(run), "--max-steps", "4"]) == 2
    assert "leave out --model (its config file's)" in capsys.readouterr().err
    # another batch size (or number of processes): the run goes on with another global batch, and
    # says so (it had gone on without a word; from the 3-process audit)
    assert cli.main(["train", "--resume", str(run), "--max-steps", "4", "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert ("the run goes on with 2 sequences a step (1 process(es) x --batch-size 2 x --grad-accum 1) where it had "
            "4 (1 x 4 x 1): --batch-size is each process's; --batch-size 4 keeps the run's") in err
    assert "sample (" not in out  # (the run's sample_tokens = 0, kept on resume: it had sampled 200 tokens)
    (run / "model.safetensors").unlink()
    assert cli.main(["train", "--resume", str(run)]) == 0  # at its max_steps, 4
    assert (run / "model.safetensors").is_file()
    err = capsys.readouterr().err
    assert "without model.safetensors: writing it from the checkpoint" in err and "sequences a step" not in err


def test_every_option_has_help():
    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif action.help in (None, "") and action.dest != "help":
                yield f"{path} {action.option_strings or action.dest}"

    assert list(walk(cli.build_parser(), "pyllm")) == []
    # a switch a config file or a resumed run turned on can be turned off from the command line
    args = cli.build_parser().parse_args(["train", "--no-compile", "--fused-loss", "--no-keep-best"])
    assert (args.compile, args.fused_loss, args.keep_best, args.doc_mask) == (False, True, False, None)


def test_choices_are_the_libraries_own_lists():
    # The parser is built without importing torch, so it spells the losses out; they are the lists
    # TrainConfig checks against (a kind added to one and not the other would be refused or unlisted)
    from pyllm.nn import PREFERENCE_LOSSES
    from pyllm.train import GRPO_LOSS_TYPES

    train = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    choices = {a.dest: a.choices for a in train._actions}
    assert sorted(choices["preference"]) == sorted(PREFERENCE_LOSSES + ("sft",))  # (sft: TRL's, a mix's NLL term)
    assert sorted(choices["grpo_loss_type"]) == sorted(GRPO_LOSS_TYPES)


def test_generate_streams_text_as_tokens_come(monkeypatch, capsys):
    """stream_sample writes each token's text as it is sampled (a UTF-8 character split over byte
    tokens is written once it is whole), and the pieces add up to the returned text."""
    import torch

    from pyllm.model import LLM, ModelConfig

    model = LLM(ModelConfig(vocab_size=257, block_size=16, n_layers=1, n_heads=2, dim=64)).eval()
    writes, real_write = [], sys.stdout.write

    def recording_write(text):
        writes.append(text)
        return real_write(text)

    monkeypatch.setattr(sys.stdout, "write", recording_write)
    # Tokens: the bytes of "é" (2 tokens), then "x".
    forced = iter([0xC3, 0xA9, ord("x")] + [ord("y")] * 20)
    # (generation samples through _sample: its settings checked once, not per token)
    monkeypatch.setattr("pyllm.model._sample", lambda logits, *a, **k: torch.tensor([next(forced)]))
    text = cli.stream_sample(model, StandInTokenizer(), "ab", 5, 0.8, None, None, seed=0)
    assert text == "abéxyy"
    assert writes == ["ab", "é", "x", "y", "y"]


def test_plan_measures_throughput_here(capsys):
    # The plan of the measured model itself takes its tokens over its tokens/s: the measured FLOP/s
    # count 6N a token as C = 6ND does (the PaLM count, with attention, had made it 9% short here)
    from pyllm.model import LLM, ModelConfig

    params = LLM(ModelConfig.from_preset("tiny")).num_params()
    assert cli.main(["plan", "--params", str(params), "--preset", "tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{params / 1e6:.3g}M params, {20 * params / 1e6:.3g}M tokens" in out
    found = re.search(r"measured: preset tiny on cpu, ([0-9,]+) tokens/s, 6N FLOPs a token as C counts them\) x 1: "
                      r"about ([0-9.]+) (s|minutes|hours|days)", out)
    assert found, out
    seconds = float(found[2]) * {"s": 1, "minutes": 60, "hours": 3600, "days": 86400}[found[3]]
    assert seconds == pytest.approx(20 * params / float(found[1].replace(",", "")), rel=0.01)


def test_plan(capsys):
    assert cli.main(["plan", "--params", "124M", "--flops-per-s", "4e14"]) == 0
    out = capsys.readouterr().out
    assert "124M params, 2.48B tokens, 1.85e+18 FLOPs" in out and "hours" in out
    assert cli.main(["plan", "--compute", "6e18", "--flops-per-s", "1e15", "--tokens-per-param", "20"]) == 0
    assert "224M params" in capsys.readouterr().out
    assert cli.main(["plan", "--compute", "1e18", "--params", "1B"]) == 2
    assert cli.main(["plan", "--params", "999.6M", "--flops-per-s", "1e15"]) == 0  # (rounded, then the unit)
    assert "1B params, 20B tokens" in capsys.readouterr().out
    assert cli.main(["plan", "--params", "1e15", "--flops-per-s", "1e15"]) == 0
    assert "1e+15 params, 2e+16 tokens" in capsys.readouterr().out


def test_bench_names_the_scripts_that_failed(tmp_path, capsys):
    # `pyllm bench` had OR-ed the scripts' exit codes (a killed one: 247), naming none
    (tmp_path / "bench_a.py").write_text("import sys; print('a', sys.argv[1:])")
    (tmp_path / "bench_b.py").write_text("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    (tmp_path / "bench_c.py").write_text("raise SystemExit(3)")
    assert cli.main(["bench", "--dir", str(tmp_path), "--quick"]) == 1
    captured = capsys.readouterr()
    assert "pyllm bench: 2 of 3 scripts failed: bench_b.py (killed by signal 9), bench_c.py (exit 3)" in captured.err


def test_plan_api_refuses_what_is_no_plan():
    from pyllm import plan

    assert plan.human_time(3599) == "1 hours" and plan.human(999_950) == "1M"
    for kwargs in (dict(params=1e9, tokens_per_param=-20), dict(params=1e9, tokens_per_param=0),
                   dict(params=float("nan")), dict(compute=float("inf")), dict(compute="1e21")):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            plan.chinchilla(**kwargs)


@pytest.mark.parametrize("argv", [[], ["train"], ["prepare"], ["tokenizer", "train"], ["generate"], ["plan"], ["info"], ["bench"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    assert "--help" in capsys.readouterr().out


def test_info_still_works(capsys, monkeypatch):
    assert cli.main(["info"]) == 0
    assert "swiglu" in capsys.readouterr().out
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # no AMX line where there is no AMX
    assert cli.main(["info"]) == 0
    assert "bf16 attention forward and backward: fp32 tiles (AMX is x86's)" in capsys.readouterr().out


def test_output_piped_into_a_reader_that_stops_early():
    # `pyllm info | head -1`: the reader closes the pipe; pyllm stops quietly (no traceback).
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1")  # line by line, so most lines come after the close
    proc = subprocess.Popen([sys.executable, "-m", "pyllm", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert first.startswith(b"pyllm ")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode in (0, 141)


def test_torchrun_two_cpu_processes_end_to_end(tmp_path):
    """`torchrun --nproc_per_node 2 -m pyllm train --device cpu` with pyllm's real tokenizer: rank 0
    alone trains the tokenizer, prepares the data and writes the log, plot, checkpoint and sample;
    then a torchrun --resume under FSDP2 continues it and samples from the weights rank 0 wrote (the
    trained model's parameters are shards of a process group gone by then: the sample had failed,
    and the job with it, after a finished run)."""
    import os

    from helpers import run_torchrun

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    run = tmp_path / "run"
    root = Path(pyllm.__file__).resolve().parent.parent  # the pyllm under test (an sdist's pyllm/ is unbuilt)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    small = ["--model", "n_layers=1", "--model", "dim=64", "--model", "n_heads=2", "--model", "block_size=32",
             "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu"]

    def torchrun(*args):
        done = run_torchrun(2, ["-m", "pyllm", "train", *args], cwd=root, env=env, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    out = torchrun("--data", str(corpus), "--out", str(run), "--vocab-size", "300", "--max-steps", "4",
                   "--ckpt-every", "2", "--sample-tokens", "8", *small)
    for once in ("tokenizer: training", "data: 60 files", "training: preset tiny", "step 2: val loss", "step 4: val loss",
                 "done in", "sample (8 tokens"):
        assert out.count(once) == 1, (once, out)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for name in ("checkpoint.pt", "model.safetensors", "loss.png", "tokenizer.bpe", "data/train.bin", "run.json"):
        assert (run / name).stat().st_size > 0, name
    assert not list(run.rglob("*.tmp"))

    out = torchrun("--resume", str(run), "--max-steps", "6", "--dist-mode", "fsdp", "--sample-tokens", "8")
    assert out.count("done in") == 1 and out.count("step 6: val loss") == 1 and out.count("sample (8 tokens") == 1
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    import torch

    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6


def two_ranks(commands: list, env: dict, root, local_ranks=(0, 1)):
    """`pyllm train` as ranks 0 and 1 of a process group without torchrun (each its own command):
    the processes and their stderr, each given 150 s."""
    import subprocess
    import sys

    from helpers import free_port

    env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "pyllm", "train", *command], cwd=root,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(local_ranks[r])}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r, command in enumerate(commands)]
    try:
        return procs, [p.communicate(timeout=150)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()


@pytest.mark.parametrize("kind", ["no text", "folder in use", "resumed folder in use"])
def test_what_stops_rank_0_ends_every_rank(tmp_path, kind):
    """2 processes started without torchrun (its agent ends the others when one fails; srun or a
    hand-made launch does not). Rank 0 alone prepares the data: its error (a corpus without text)
    reaches rank 1, which had failed at a barrier with gloo's "Connection closed by peer" (under
    nccl: waited for the watchdog's timeout). Rank 0 alone locks the run's folder: its refusal (the
    folder another run's) reaches rank 1, which had waited at the rendezvous for rank 0, gone
    before it, until the rendezvous' timeout; on --resume too."""
    import fcntl
    import os
    import subprocess
    import sys

    corpus, run = tmp_path / "corpus", tmp_path / "run"
    corpus.mkdir()
    if kind != "no text":
        for i in range(20):
            (corpus / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    root = Path(pyllm.__file__).resolve().parent.parent  # the pyllm under test (an sdist's pyllm/ is unbuilt)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    args = ["--data", str(corpus), "--out", str(run), "--vocab-size", "270", "--max-steps", "1", *SMALL[:-2],
            "--sample-tokens", "0"]
    if kind == "resumed folder in use":
        done = subprocess.run([sys.executable, "-m", "pyllm", "train", *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        args = ["--resume", str(run), "--max-steps", "2"]
    held = None
    if kind != "no text":
        run.mkdir(exist_ok=True)
        held = open(run / ".lock", "a")  # another run's
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
    try:
        procs, errs = two_ranks([args, args], env, root, local_ranks=(0, 1))
    finally:
        if held is not None:
            held.close()
    why = "no text files found" if kind == "no text" else "is in use by another `pyllm train`"
    assert procs[0].returncode and why in errs[0], errs[0][-2000:]
    theirs = "rank 0 could not resume" if kind == "resumed folder in use" else "rank 0 could not start the run"
    assert procs[1].returncode and theirs in errs[1], errs[1][-2000:]
    assert "Traceback" not in errs[0] + errs[1], errs


@pytest.mark.parametrize("kind", ["fresh", "resume without the checkpoint", "resume of other checkpoints"])
def test_nodes_without_a_shared_folder_end_every_rank(tmp_path, kind):
    """Two processes, each with its own --out (two nodes without a shared filesystem; an audit of
    multi-node torchrun, 2026-12-06): rank 1 had failed with a KeyError and SIGABRT (a fresh run),
    or left at once while rank 0 waited at the rendezvous for 30 minutes (its folder without the
    checkpoint), or trained on from its own checkpoint of another step, its replica's optimizer and
    schedule out of step with rank 0's. Every rank now ends with the reason."""
    import os
    import shutil
    import subprocess
    import sys

    import torch

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    root = Path(pyllm.__file__).resolve().parent.parent  # the pyllm under test (an sdist's pyllm/ is unbuilt)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    folders = [tmp_path / "node0", tmp_path / "node1"]
    args = ["--data", str(corpus), "--vocab-size", "270", "--max-steps", "2", *SMALL[:-2], "--sample-tokens", "0"]
    if kind != "fresh":
        done = subprocess.run([sys.executable, "-m", "pyllm", "train", *args, "--out", str(folders[0])], cwd=root,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        if kind == "resume of other checkpoints":
            shutil.copytree(folders[0], folders[1])
            checkpoint = torch.load(folders[1] / "checkpoint.pt", weights_only=True)
            checkpoint["step"] = 1  # (an older checkpoint of the run)
            torch.save(checkpoint, folders[1] / "checkpoint.pt")
        else:
            folders[1].mkdir()
    commands = [[*args, "--out", str(folder)] if kind == "fresh" else ["--resume", str(folder), "--max-steps", "3"]
                for folder in folders]
    procs, errs = two_ranks(commands, env, root, local_ranks=(0, 0))  # (two nodes of one process each)
    assert procs[0].returncode and procs[1].returncode, errs
    assert "must be a folder on a filesystem every node shares" in errs[1], errs[1][-2000:]
    if kind == "resume of other checkpoints":
        assert "the ranks read different checkpoints: rank 1's" in errs[0] and "step 1" in errs[0], errs[0][-2000:]
    else:
        assert f"rank 1 could not {'start the run' if kind == 'fresh' else 'resume'}" in errs[0], errs[0][-2000:]
    assert "Traceback" not in errs[0] + errs[1], errs
    if kind != "fresh":  # (no step taken)
        assert torch.load(folders[0] / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_torchrun_restart_goes_on_from_its_jobs_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    # torchrun --max-restarts runs the same command again: it had set the job's checkpoint aside and
    # trained from step 0. A restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) of the job that
    # wrote the checkpoint (TORCHELASTIC_RUN_ID) goes on from it; another job's is set aside as before.
    import torch

    run = tmp_path / "run"
    args = ["train", "--data", str(corpus), "--out", str(run), *SMALL]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert cli.main([*args, "--max-steps", "2"]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["elastic_run_id"] == "job-1"
    capsys.readouterr()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert cli.main([*args, "--max-steps", "3"]) == 0
    assert "torchrun restart 1: going on from" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [0, 1, 2]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")  # another job's checkpoint: a new run
    assert cli.main([*args, "--max-steps", "4"]) == 0
    assert "holds an earlier run's checkpoint" in capsys.readouterr().err
    assert (run / "checkpoint.previous.pt").is_file()
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_train_init_from_hf_and_generate(tmp_path, capsys, kind):
    # Fine-tuning a Hugging Face checkpoint folder: its weights start the run, its tokenizer.json
    # tokenizes --data (pyllm's real tokenizer here, not the stand-in): GPT-2's byte-level BPE, or
    # Llama 2's SentencePiece-style one (Prepend + Replace normalizer, byte fallback, <s> ... </s>).
    transformers, tokenizers = pytest.importorskip("transformers"), pytest.importorskip("tokenizers")
    import numpy as np
    import torch

    from pyllm.model import LLM
    from pyllm.tokenizer import Tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    texts = [p.read_text() for p in corpus.iterdir()]
    if kind == "byte-level":
        hf_tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        hf_tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf_tokenizer.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>", "<|begin|>", "<|end|>"], show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
        begin_text, end_text = "<|begin|>", "<|end|>"
    else:
        hf_tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        hf_tokenizer.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Prepend("\u2581"),
                                                                   tokenizers.normalizers.Replace(" ", "\u2581")])
        hf_tokenizer.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)],
            show_progress=False))
        begin_text, end_text = "<s>", "</s>"
    begin = hf_tokenizer.token_to_id(begin_text)  # put before every text, as Llama 3's <|begin_of_text|>
    hf_tokenizer.post_processor = tokenizers.processors.TemplateProcessing(single=f"{begin_text} $A",
                                                                           special_tokens=[(begin_text, begin)])
    hf_dir = tmp_path / "hf"
    eos = hf_tokenizer.token_to_id(end_text)  # the model's own end-of-sequence, not pyllm's default
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=hf_tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, eos_token_id=eos)).save_pretrained(hf_dir)
    hf_tokenizer.save(str(hf_dir / "tokenizer.json"))

    run = tmp_path / "run"
    argv = ["train", "--init-from-hf", str(hf_dir), "--data", str(corpus), "--out", str(run), "--max-steps", "1",
            "--lr", "1e-12", "--warmup-steps", "0", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
            "--eval-batches", "1", "--device", "cpu", "--sample-tokens", "4"]
    assert cli.main(argv) == 0
    assert f"training: from {hf_dir}" in capsys.readouterr().out
    trained, start = LLM.load(run / "model.safetensors"), LLM.from_hf(hf_dir)
    assert trained.config == start.config
    for (name, a), b in zip(trained.state_dict().items(), start.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)  # one step of lr 1e-12 from the checkpoint
    # documents end with the config's end-of-sequence id, one per file, and not with <|endoftext|>
    from pyllm import data

    tokens = np.concatenate([np.asarray(data.open_tokens(run / "data" / f)) for f in ("train.bin", "val.bin")])
    assert (tokens == eos).sum() == 40 and (tokens == (hf_tokenizer.token_to_id("<|endoftext|>") or -1)).sum() == 0
    assert (tokens == begin).sum() == 40 and json.loads((run / "run.json").read_text())["prompt_prefix"] == [begin]
    ids = Tokenizer.load(str(run / "tokenizer.bpe")).encode_ordinary("def g(y):\n    return y")
    assert [begin, *ids] == hf_tokenizer.encode("def g(y):\n    return y").ids
    assert cli.main(argv) == 0 and "tokenizer: reusing" in capsys.readouterr().out
    assert cli.main(["generate", "--hf", str(hf_dir), "--max-new-tokens", "6", "--prompt", "def g"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def g") and "pass the model's context" not in out.err
    # past max_position_embeddings pyllm slides on (nanoGPT's way), transformers keeps the whole context: said
    assert cli.main(["generate", "--hf", str(hf_dir), "--max-new-tokens", "70", "--prompt", "def g"]) == 0
    assert "+ --max-new-tokens 70 pass the model's context (64 tokens" in capsys.readouterr().err
    # export: the source's config.json and tokenizer.json, the fine-tuned weights (bf16 by default)
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out/tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert next(iter(back.parameters())).dtype == torch.float32 and json.loads(
        (tmp_path / "out/config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        idx = torch.tensor([ids])
        want = trained.to(torch.bfloat16).float()(idx)[0]
        torch.testing.assert_close(back(idx).logits, want, rtol=1e-4, atol=1e-4)


def test_stream_sample_starts_with_the_prefix(capsys):
    import torch

    seen = {}

    class Model:
        def parameters(self):
            yield torch.zeros(1)

        def generate(self, idx, max_new_tokens, **kwargs):
            seen["idx"] = idx.tolist()

    assert cli.stream_sample(Model(), StandInTokenizer(), "ab", 3, 0.8, None, None, 0, prefix_ids=[256]) == "ab"
    assert seen["idx"] == [[256, 97, 98]]


def test_generate_chat_renders_the_template_as_transformers(tmp_path, capsys, monkeypatch):
    # An instruct model's folder: ChatML turn markers as added tokens, a chat template and eos in
    # tokenizer_config.json. `--chat` puts the prompt in the template (ids as transformers'
    # apply_chat_template makes them) and the reply ends at <|im_end|>.
    transformers, tokenizers = pytest.importorskip("transformers"), pytest.importorskip("tokenizers")
    from pyllm.tokenizer import Tokenizer
    from pyllm.tokenizer.tokenizer import hf_chat_prompt, hf_stop_ids

    hf_tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf_tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = tokenizers.decoders.ByteLevel()
    hf_tokenizer.train_from_iterator([f"def f{i}(x):\n    return x + {i}\n" * 20 for i in range(40)],
                                     tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "hf"
    end = hf_tokenizer.token_to_id("<|im_end|>")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=hf_tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=128, eos_token_id=end)).save_pretrained(folder)
    hf_tokenizer.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] | trim }}{% endgeneration %}{% else %}{{ m['content'] | trim }}{% endif %}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": "<|im_end|>"}))
    messages = [{"role": "user", "content": " def f(x): "}, {"role": "assistant", "content": "return x"},
                {"role": "user", "content": " def g(y): "}]
    ours = Tokenizer.from_hf(folder / "tokenizer.json").encode(hf_chat_prompt(folder, messages), allowed_special="all")
    theirs = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours == list(theirs) and hf_stop_ids(folder) == [end]
    assert cli.main(["generate", "--hf", str(folder), "--chat", "--prompt", " def g(y): ", "--max-new-tokens", "5"]) == 0
    assert "<|im_start|>" not in capsys.readouterr().out  # the reply alone
    # --chat-template-kwargs: the template's variables (Qwen3's enable_thinking), as apply_chat_template's
    from pyllm.tokenizer import tokenizer as tokenizer_module

    seen = []
    real = tokenizer_module.hf_chat_prompt
    monkeypatch.setattr(tokenizer_module, "hf_chat_prompt", lambda *a, **kw: (seen.append(kw), real(*a, **kw))[1])
    assert cli.main(["generate", "--hf", str(folder), "--chat", "--prompt", "hi", "--max-new-tokens", "2",
                     "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    assert seen == [{"enable_thinking": False}]
    assert cli.main(["generate", "--hf", str(folder), "--prompt", "hi", "--chat-template-kwargs", "{}"]) == 2
    assert "--chat-template-kwargs goes with --chat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--hf", str(folder), "--chat", "--prompt", "hi", "--chat-template-kwargs", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err
    # a run fine-tuned from the folder chats with its template too
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def f(x):\n    return x\n" * 200)
    run = tmp_path / "run"
    assert cli.main(["train", "--init-from-hf", str(folder), "--data", str(corpus), "--out", str(run), "--max-steps", "1",
                     "--lr", "1e-12", "--warmup-steps", "0", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
                     "--eval-batches", "1", "--device", "cpu", "--sample-tokens", "0"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--run", str(run), "--chat", "--prompt", "hi", "--max-new-tokens", "4"]) == 0
    assert "<|im_start|>" not in capsys.readouterr().out


def test_train_scores_multiple_choice_examples_at_each_eval(corpus, tmp_path, capsys):
    # --eval-choices: the JSONL file tokenized once into the run's data folder (its first
    # --eval-choices-limit examples), scored at each evaluation, acc / acc_norm in log.jsonl.
    rows = [{"ctx": f"def f{i}(x):\n    return", "endings": [f" x + {i}", " y", " 1 / 0"], "label": 0} for i in range(6)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2", *SMALL, "--eval-every", "1",
                     "--eval-choices", str(tmp_path / "c.jsonl"), "--eval-choices-limit", "4"]) == 0
    assert "step 2: 4 multiple-choice examples: acc " in capsys.readouterr().out
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(0 <= r["choices_acc"] <= 1 and "choices_acc_norm" in r for r in log)
    assert json.loads((run / "data" / "choices.choices.json").read_text())["labels"] == [0] * 4


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_preference_tuning_a_run_on_text_pairs(corpus, tmp_path, capsys, loss):
    # --init-from-run with text preference pairs: each side prompt + reply + <|endoftext|> (as the
    # run's documents end), the replies and that end marked; the pairs' documents side by side.
    import numpy as np

    base, ft = tmp_path / "base", tmp_path / "ft"
    assert cli.main(["train", "--data", str(corpus), "--out", str(base), "--max-steps", "2", *SMALL]) == 0
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n", "chosen": f"    return x + {i}\n",
                                         "rejected": "    pass\n"}) + "\n" for i in range(40)))
    capsys.readouterr()
    assert cli.main(["train", "--init-from-run", str(base), "--data", str(prefs), "--out", str(ft), "--max-steps", "2",
                     "--preference", loss, "--batch-size", "2", "--seq-len", "32", "--eval-every", "0",
                     "--eval-batches", "1", "--device", "cpu", "--sample-tokens", "0"]) == 0
    assert "40 preference pairs -> " in capsys.readouterr().out
    from pyllm.data import open_tokens

    ids = np.asarray(open_tokens(ft / "data" / "train.bin"))
    offsets, mask = np.load(ft / "data" / "train.docs.npy"), np.load(ft / "data" / "train.mask.npy")
    pairs = np.load(ft / "data" / "train.pairs.npy")
    assert (pairs == np.arange(len(offsets) - 1).reshape(-1, 2)).all()
    ends = offsets[1:] - 1
    assert (ids[ends] == 256).all() and mask[ends].all() and mask[offsets[:-1]].sum() == 0
    rejected = ids[offsets[1]:offsets[2]]
    assert bytes(rejected[mask[offsets[1]:offsets[2]] == 1][:-1].tolist()).decode() == "    pass\n"
    log = [json.loads(line) for line in (ft / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and "reward_accuracy" in log[-1] and log[-1]["val_loss"] is not None


def test_resume_runs_reward_code_only_when_named_again():
    # A checkpoint is data: a downloaded run whose train_config names "rewards.py:fn" must not run that
    # file on --resume unless the command names the same rewards; reward models (paths) need nothing.
    saved = {"grpo_reward": "rewards.py:fn,/no/such/model:dir"}
    with pytest.raises(ValueError, match=r"rewards include Python code \(rewards.py:fn, /no/such/model:dir\).*"
                                         r"give --grpo-reward"):
        cli.check_reward_code(saved, {})
    cli.check_reward_code(saved, {"grpo_reward": saved["grpo_reward"]})
    cli.check_reward_code({"grpo_reward": None}, {})


def test_a_second_run_in_a_running_runs_folder_writes_nothing_there(corpus, tmp_path, capsys):
    # The CLI locks the run's folder before it writes run.json, a tokenizer or token files into it.
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as held:  # the running one's
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2", *SMALL]) == 2
    assert "is in use by another `pyllm train`" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_resume_takes_a_file_only_as_a_kept_checkpoint(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"x")
    assert cli.main(["train", "--resume", str(tmp_path / "run" / "checkpoint.pt")]) == 2
    assert "give a run folder, or a checkpoint its --keep-checkpoints kept" in capsys.readouterr().err
    assert not (tmp_path / ".lock").exists()  # (refused before any folder was locked)
    # a kept checkpoint that is not there: named as a missing file, with the ones kept (it had
    # said "step_2.pt is no folder"; from the 3-process audit)
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "step_4.pt").write_bytes(b"x")
    assert cli.main(["train", "--resume", str(tmp_path / "run" / "checkpoints" / "step_2.pt")]) == 2
    assert "no file " + str(tmp_path / "run" / "checkpoints" / "step_2.pt") + " (kept there: step_4.pt)" \
        in capsys.readouterr().err


def test_char_tokenizer_decodes_ids_as_nanogpt_and_refuses_float_ids():
    # nanoGPT's decode is ''.join(itos[i] for i in ids); an id past itos (a padded table) is U+FFFD,
    # and a float id is refused rather than truncated to another character's id
    import numpy as np
    import torch

    from pyllm.tokenizer.chars import CharTokenizer

    tok = CharTokenizer({"a": 0, "b": 1}, {0: "a", 1: "b"}, 2)
    assert tok.decode([1, 0, np.int64(1), torch.tensor(0)]) == "baba"
    assert tok.decode([0, 5]) == "a\ufffd"
    with pytest.raises(TypeError):
        tok.decode([1.7])


@pytest.mark.parametrize("argv, hint", [
    (["train", "--min-lr", "6e-5"], "nanoGPT's min_lr: pyllm's --min-lr-ratio"),
    (["train", "--decay", "0.1"], "did you mean --decay-frac or --weight-decay?"),
    (["train", "--warmup", "5"], "did you mean --warmup-steps?"),
    (["train", "--max_iters=5"], "pyllm's --max-steps"), (["train", "--max_steps=5"], "--max-steps, with dashes"),
    (["train", "--max-step", "3"], "did you mean --max-steps?"), (["generate", "--max_iters", "3"], None),
    (["tokenizer", "train", "--out", "t.bpe", "--train_bytes", "5"], "pyllm's --train-bytes, with dashes")])
def test_flags_are_taken_by_their_whole_names(argv, hint, capsys):
    # argparse's prefix matching had taken nanoGPT's absolute --min-lr 6e-5 as --min-lr-ratio 6e-5 (the
    # cosine ending at lr * 6e-5) and --decay as --decay-frac, without a word (from the train-loop audit)
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    flag = next(a for a in argv if a.startswith("--") and "_" in a or a in ("--min-lr", "--decay", "--warmup",
                                                                                "--max-step"))
    assert e.value.code == 2 and f"unrecognized arguments: {flag}" in err
    assert (hint in err) if hint else "(" not in err.splitlines()[-1]  # (a hint only where the command has the flag)
    # the command's usage and name, as its other errors (pyllm's list of commands had been printed)
    command = "pyllm tokenizer train" if argv[0] == "tokenizer" else f"pyllm {argv[0]}"
    assert err.startswith(f"usage: {command} ") and err.splitlines()[-1].startswith(f"{command}: error: unrecognized")
    args = cli.build_parser().parse_args(["train", "--min-lr-ratio", "0.1", "--decay-frac", "0.2", "--warmup-steps", "5"])
    assert (args.min_lr_ratio, args.decay_frac, args.warmup_steps) == (0.1, 0.2, 5)


@pytest.mark.parametrize("flags, named", [(["--decay-frac", "0.9"], "decay_frac (--decay-frac) goes with schedule wsd"),
                                          (["--schedule", "constant", "--min-lr-ratio", "0.5"], "min_lr_ratio"),
                                          (["--muon-momentum", "0.5"], "optimizer muon"),
                                          (["--beta", "0.5"], "beta (--beta) goes with a preference loss"),
                                          (["--ld-alpha", "0.5"], "ld_alpha must be in [0, 1] (or None: off)"),
                                          (["--grpo-temperature", "0.5"], "grpo_reward (GRPO)"),
                                          (["--ref-model-sync-steps", "4"],
                                           "goes with sync_ref_model,"),
                                          (["--sync-ref-model"], "it needs one of its own"),
                                          (["--preference", "reward", "--no-token-stats"],
                                           "token_stats (--token-stats) goes with pretraining, SFT or preference")])
def test_options_a_run_would_not_read_are_refused(corpus, tmp_path, capsys, flags, named):
    # (each had been taken silently, the run the same as without it; from the train-loop audit)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(out), "--max-steps", "1", *SMALL, *flags]) == 2
    assert named in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()


def test_a_config_file_may_list_options_at_their_defaults(corpus, tmp_path, capsys):
    # a file listing every option (decay_frac at its default with a cosine run) is not refused; another
    # value is, as the flag
    (tmp_path / "all.toml").write_text("decay_frac = 0.2\nmuon_momentum = 0.95\n")
    assert cli.main(["train", "--config", str(tmp_path / "all.toml"), "--data", str(corpus), "--out",
                     str(tmp_path / "run"), "--max-steps", "1", *SMALL]) == 0
    (tmp_path / "other.toml").write_text("decay_frac = 0.5\n")
    assert cli.main(["train", "--config", str(tmp_path / "other.toml"), "--data", str(corpus), "--out",
                     str(tmp_path / "run2"), "--max-steps", "1", *SMALL]) == 2
    assert "decay_frac" in capsys.readouterr().err


def test_options_a_run_would_not_read_are_refused_too(corpus, tmp_path, capsys):
    # --beta of a reward model (its Bradley-Terry loss has no beta), --eval-choices-limit without
    # --eval-choices and --val-fraction on token files had been taken and ignored without a word.
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "base"), "--max-steps", "1", *SMALL]) == 0
    pairs = tmp_path / "prefs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n", "chosen": f"    return x + {i}\n",
                                         "rejected": f"    return x - {i}\n"}) + "\n" for i in range(20)))
    capsys.readouterr()
    common = ["--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--eval-batches", "1",
              "--device", "cpu", "--sample-tokens", "0"]
    assert cli.main(["train", "--init-from-run", str(tmp_path / "base"), "--data", str(pairs), "--preference", "reward",
                     "--beta", "0.5", "--out", str(tmp_path / "rm"), *common]) == 2
    assert "beta (--beta) goes with a preference loss other than reward" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "r"), "--eval-choices-limit", "3",
                     *common]) == 2
    assert "--eval-choices-limit goes with --eval-choices" in capsys.readouterr().err
    assert cli.main(["train", "--init-from-run", str(tmp_path / "base"), "--data", str(tmp_path / "base" / "data"),
                     "--val-fraction", "0.3", "--out", str(tmp_path / "t"), *common]) == 2
    assert "--val-fraction holds out a share of text --data tokenizes" in capsys.readouterr().err
    # still taken: --beta with dpo, --val-fraction on text
    assert cli.main(["train", "--init-from-run", str(tmp_path / "base"), "--data", str(pairs), "--preference", "dpo",
                     "--beta", "0.5", "--out", str(tmp_path / "dpo"), *common]) == 0
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "vf"), "--val-fraction", "0.1",
                     *common]) == 0


def test_a_resume_refuses_eval_choices_limit_without_eval_choices(corpus, tmp_path, capsys):
    # (a new run's refusal had not been a resume's: the option taken and ignored)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(out), "--max-steps", "1", *SMALL]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--max-steps", "2", "--eval-choices-limit", "3"]) == 2
    assert "--eval-choices-limit goes with --eval-choices" in capsys.readouterr().err


def test_generation_config_stop_strings_are_taken_and_top_h_said(tmp_path, capsys):
    # transformers' generate applies both: stop_strings are taken (--stop over them), top_h, which
    # pyllm's sampling does not apply, is said, as repetition_penalty is (both had been dropped without
    # a word; from the generation audit)
    def resolved(config: dict, stop=None):
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
        args = argparse.Namespace(temperature=None, top_k=None, top_p=None, stop=stop)
        cli.resolve_sampling(args, tmp_path)
        return args.stop, capsys.readouterr().err

    stop, err = resolved({"stop_strings": ["</answer>"], "top_h": 0.4})
    assert stop == ["</answer>"] and "top_h=0.4" in err and "does not apply" in err and "stop_strings" not in err
    assert resolved({"stop_strings": "</a>"})[0] == ["</a>"] and resolved({"stop_strings": "</a>"}, ["x"])[0] == ["x"]
    assert resolved({"stop_strings": None, "top_h": None}) == ([], "")
    with pytest.raises(ValueError, match="an empty string would end every sample"):
        resolved({}, ["x", ""])


def test_generate_stops_at_a_stop_string(corpus, tmp_path, capsys):
    # --stop TEXT: a sample ends with the token that completes TEXT in it, that token kept (transformers'
    # stop_strings), streamed and in --prompts-file completions alike; TEXT may begin in the prompt's
    # text (transformers' StopStringCriteria reads the whole sequence), not lie in it alone
    import torch

    from pyllm.model import LLM

    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(run), "--max-steps", "2", *SMALL]) == 0
    model = LLM.load(run / "model.safetensors").eval()
    tokenizer = cli.tokenizer_class().load(str(run / "tokenizer.bpe"))
    ids = tokenizer.encode_ordinary("def f")
    tokens = model.generate(torch.tensor([ids]), 20, temperature=0)[0, len(ids):].tolist()
    middle = len(tokenizer.decode(tokens[:8]))
    stop = tokenizer.decode(tokens)[middle:middle + 2]
    first = tokenizer.decode(tokens[:1])
    for stop in (stop, "f" + first[:1], "def"):  # (the second begins in the prompt; the third lies in it alone)
        # (the first token completing it, over the prompt's text and the sample's)
        n = next((n for n in range(1, 21) if stop in ("def f" + tokenizer.decode(tokens[:n]))[5 - len(stop) + 1:]), 20)
        assert len(stop) == 2 and n < 20 if stop != "def" else n == 20 or "def" in tokenizer.decode(tokens)
        base = ["generate", "--run", str(run), "--max-new-tokens", "20", "--temperature", "0", "--stop", stop]
        capsys.readouterr()
        assert cli.main([*base, "--prompt", "def f"]) == 0
        assert capsys.readouterr().out.split("\n" + "-" * 60)[0] == "def f" + tokenizer.decode(tokens[:n])
        (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "def f"}) + "\n")
        assert cli.main([*base, "--prompts-file", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "c.jsonl")]) == 0
        assert json.loads((tmp_path / "c.jsonl").read_text())["completion"] == tokenizer.decode(tokens[:n])


def test_generate_prompts_file_stop_strings_decode_linearly_past_padding_ids(padded_vocab, tmp_path, monkeypatch):
    # --stop with --prompts-file asks after each token whether a row's text holds a stop string: a row
    # holding ids past the tokenizer (a padded vocabulary's, which a sample may draw) must not be
    # decoded one id at a time again at every step (decode_known's fallback: quadratic in the length)
    import torch

    from pyllm import model as model_module
    from pyllm.tokenizer.tokenizer import Tokenizer

    flags, tok = padded_vocab
    pad = tok.vocab_size + 3  # (an id of the model's, past the tokenizer's)
    monkeypatch.setattr(model_module, "_sample", lambda logits, *a, **k: torch.full(logits.shape[:1], pad))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    calls = []
    decode = Tokenizer.decode
    monkeypatch.setattr(Tokenizer, "decode", lambda self, ids, *a, **k: calls.append(1) or decode(self, ids, *a, **k))
    assert cli.main(["generate", *flags, "--prompts-file", str(tmp_path / "p.jsonl"), "--max-new-tokens", "50",
                     "--out", str(tmp_path / "c.jsonl"), "--stop", "never seen"]) == 0
    assert json.loads((tmp_path / "c.jsonl").read_text())["completion"] == ""  # (50 padding ids: no text)
    assert len(calls) < 200  # (a decode per step and a few; ~1,300 had been made, one per id per step)


def test_stop_string_may_begin_at_the_start_of_a_short_prompt():
    # A prompt shorter than the longest stop string less one: a stop string beginning in it was looked
    # for after its last (longest - 1 - len(prompt)) characters alone (a negative slice start), so one
    # beginning earlier in it was missed, and generation ran on past it (transformers' generate stops).
    assert cli.has_stop_string("i>", ["abcdei>"], "abcde")
    assert cli.has_stop_string("i", ["cdei", "zzzzzzz"], "abcde")
    assert not cli.has_stop_string("i", ["abcde", "zzzzzzz"], "abcde")  # (in the prompt alone)


def preference_opts(argv, config=None):
    """train's options as cmd_train makes them of argv (and a config file's): TrainConfig's names."""
    args = cli.build_parser().parse_args(["train", *argv])
    explicit = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command")}
    opts = dict(config or {})
    opts.update(explicit)
    return cli.preference_list_options(opts, explicit)


def test_preference_takes_trls_loss_type_list():
    # --preference NAME [NAME ...] --preference-weights W [W ...]: TRL's loss_type and loss_weights (MPO's
    # recipe, TRL's sigmoid being dpo); sft the chosen replies' NLL, sft_weight; a name alone as before
    from pyllm.train import TrainConfig

    opts = preference_opts(["--preference", "dpo", "bco_pair", "sft", "--preference-weights", "0.8", "0.2", "1.0"])
    assert (opts["preference"], opts["preference_mix"], opts["preference_weights"], opts["sft_weight"]) == (
        "dpo", ["bco_pair"], [0.8, 0.2], 1.0)
    TrainConfig.from_dict({k: v for k, v in opts.items() if k not in cli._CLI_KEYS}).validate()
    opts = preference_opts(["--preference", "ipo", "sft", "hinge"])  # (without weights: 1 each, sft's too)
    assert (opts["preference"], opts["preference_mix"], opts["preference_weights"], opts["sft_weight"]) == (
        "ipo", ["hinge"], [], 1.0)
    opts = preference_opts(["--preference", "dpo"])
    assert (opts["preference"], opts["preference_mix"], opts["preference_weights"]) == ("dpo", [], [])
    assert "sft_weight" not in opts
    assert preference_opts(["--preference", "dpo", "--sft-weight", "0.5"])["sft_weight"] == 0.5
    assert preference_opts(["--preference", "kto", "--preference-weights", "2"])["preference_weights"] == [2.0]
    # a config file's list as the flag's; its text preference with preference_mix, TrainConfig's own
    assert preference_opts([], {"preference": ["dpo", "sft"], "preference_weights": [0.5, 2.0]})["sft_weight"] == 2.0
    text = {"preference": "dpo", "preference_mix": ["bco_pair"], "preference_weights": [0.8, 0.2]}
    assert preference_opts([], text) == text
    # a config file's text preference (and its mix) weighed by the flag (it had been refused as without one)
    opts = preference_opts(["--preference-weights", "0.5", "0.25"], {"preference": "dpo", "preference_mix": ["ipo"]})
    assert (opts["preference"], opts["preference_mix"], opts["preference_weights"]) == ("dpo", ["ipo"], [0.5, 0.25])
    for argv, message in ((["--preference", "sft"], "a pair loss first"),
                          (["--preference", "sft", "dpo"], "a pair loss first"),
                          (["--preference", "dpo", "sft", "sft"], "sft once"),
                          (["--preference", "dpo", "sft", "--sft-weight", "1"], "give its weight once"),
                          (["--preference", "dpo", "bco_pair", "sft", "--preference-weights", "0.8", "0.2"],
                           r"one weight per --preference name \(dpo bco_pair sft: 3\), got 2: 0.8 0.2"),
                          (["--preference", "orpo", "sft"], "sft .* goes with simpo and the dpo family .*, not orpo"),
                          (["--preference-weights", "0.8"], "--preference-weights goes with --preference")):
        with pytest.raises(ValueError, match=message):
            preference_opts(argv)


def test_a_preference_mix_is_checked_before_any_work(tmp_path, capsys):
    # the CLI's refusals of a mix, and TrainConfig's, before the run's folder holds anything
    out = tmp_path / "run"
    for flags, message in ((["--preference", "sft", "dpo"], "a pair loss first"),
                           (["--preference", "dpo", "bco_pair", "--preference-weights", "1"], "one weight per"),
                           (["--preference", "dpo", "bco_pair", "--f-divergence", "js_divergence"],
                            "got 'js_divergence' with 'dpo', 'bco_pair'"),
                           (["--preference", "simpo", "dpo"], "preference_mix: more losses of the dpo family"),
                           (["--preference", "dpo", "--discopop-tau", "0.1"], "discopop_tau (--discopop-tau) goes")):
        assert cli.main(["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(out), *flags]) == 2
        assert message in capsys.readouterr().err, flags
        assert not out.exists() or not any(p.name != ".lock" for p in out.iterdir())
    from pyllm.train import TrainConfig

    opts = preference_opts(["--preference", "dpo", "discopop", "--discopop-tau", "0.1"])
    cfg = TrainConfig.from_dict({k: v for k, v in opts.items() if k not in cli._CLI_KEYS})
    cli.check_options_used(cfg, opts, opts)  # (discopop in the mix takes its tau)
