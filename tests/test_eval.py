"""`pyllm eval`: multiple-choice accuracy (each candidate's log-probability, packed, against each
run alone and against transformers) and the loss on text."""
from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch

from pyllm import cli, evaluate
from pyllm.model import LLM, ModelConfig
from pyllm.tokenizer import Tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "é", "日本", "42", "\n", "ate", "fish", "quickly"]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def setup():
    rng = random.Random(0)
    tokenizer = Tokenizer.train([sentence(rng, 40) for _ in range(50)], 290, special_tokens=["<|endoftext|>"],
                                show_progress=False)
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=2, n_heads=4, n_kv_heads=2, dim=64,
                            block_size=128)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms too, so no term hides
    examples = [{"context": sentence(rng, rng.randint(1, 12)), "endings": [sentence(rng, rng.randint(1, 6)) for _ in range(4)],
                 "label": rng.randrange(4)} for _ in range(12)]
    examples[3]["endings"][1] = "\n" + examples[3]["endings"][1]  # starts with whitespace: a space all the same
    return tokenizer, model, examples


def alone(model, ids, n_ending):
    """The summed log-probability of the last n_ending tokens of ids, the sequence run alone."""
    ids = torch.tensor(ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None])[0][0].double(), -1)
    return float(logp[torch.arange(len(ids) - n_ending - 1, len(ids) - 1), ids[-n_ending:]].sum())


def test_read_choices_formats_and_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"ctx": "a", "endings": ["b", "c"], "label": 1}, {"context": "a", "choices": ["b", "c", "d"], "gold": "2"},
            {"query": "q", "endings": ["x", "y"], "label": 0, "activity_label": "ignored"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert evaluate.read_choices(path) == [{"context": "a", "endings": ["b", "c"], "label": 1},
                                           {"context": "a", "endings": ["b", "c", "d"], "label": 2},
                                           {"context": "q", "endings": ["x", "y"], "label": 0}]
    # the field that is wrong named (HellaSwag's test split has "label": "", "²" passed isdigit())
    for bad, why in (({"ctx": "a", "endings": ["b", "c"], "label": 2}, "label 2 is not the index of one of its 2"),
                     ({"ctx": "a", "endings": ["b"], "label": 0}, "endings is not a list of 2 or more non-empty"),
                     ({"ctx": "a", "endings": ["b", ""], "label": 0}, "endings is not a list"),
                     ({"ctx": "a", "endings": ["b", "c"], "label": True}, "label True is not the index"),
                     ({"ctx": "a", "endings": ["b", "c"], "label": ""}, "label '' is not the index"),
                     ({"ctx": "a", "endings": ["b", "c"], "label": "\u00b2"}, "label '\u00b2' is not the index"),
                     ({"ctx": 3, "endings": ["b", "c"], "label": 0}, "ctx is not a string"),
                     ({"endings": ["b", "c"], "label": 0}, r"no context \(ctx, context or query\)"),
                     ({"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "1"}, "a Winogrande row")):
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"c.jsonl:2: {why}.*expected"):
            evaluate.read_choices(path)
    # lm-evaluation-harness's processed hellaswag rows keep HellaSwag's fields beside its own: its read
    harness = {"ctx": "raw. then", "endings": ["a [title]", "b"], "label": "1", "query": "Act: Raw. Then",
               "choices": ["a", "b"], "gold": 1}
    path.write_text(json.dumps(harness) + "\n")
    assert evaluate.read_choices(path) == [{"context": "Act: Raw. Then", "endings": ["a", "b"], "label": 1}]


def test_choice_documents(setup):
    tokenizer, _, examples = setup
    docs, masks = evaluate.choice_documents(examples[:4], tokenizer, prefix=[7])
    assert len(docs) == 16
    for k, (doc, mask) in enumerate(zip(docs, masks)):
        example, ending = examples[k // 4], examples[k // 4]["endings"][k % 4]
        whole = [7, *tokenizer.encode_ordinary(example["context"] + " " + ending)]  # (the harness's target_delimiter)
        # scored: past the common prefix of the whole and the context without its trailing whitespace
        # (lm-evaluation-harness moves that to the ending)
        context = [7, *tokenizer.encode_ordinary(example["context"].rstrip())]
        n = next((i for i, (a, b) in enumerate(zip(context, whole)) if a != b), len(context))
        assert doc.tolist() == whole and mask.tolist() == [0] * n + [1] * (len(whole) - n)


def test_choice_documents_score_every_character_of_an_ending(setup):
    # lm-evaluation-harness moves a context's trailing whitespace to the ending; where the context's
    # last token merges with the ending's first ("Total:" + "\n\nfoo" with a tokenizer whose
    # punctuation takes newlines), that token is scored, not left out with part of the ending; an
    # empty context starts from <|endoftext|>, so the ending's first token is predicted too.
    tokenizer, _, _ = setup
    cases = [("roof. ", "two spaces"), ("Total:", "\n\nfoo"), ("", "alpha beta")]
    docs, masks = evaluate.choice_documents([{"context": c, "endings": [e, e], "label": 0} for c, e in cases],
                                            tokenizer)
    for (context, ending), doc, mask in zip(cases, docs[::2], masks[::2]):
        scored = tokenizer.decode(doc[mask.astype(bool)].tolist())
        joined = " " + ending
        assert scored.endswith(joined) and len(scored) >= len(joined), (context, ending, scored)
    assert docs[4][0] == tokenizer.special_tokens["<|endoftext|>"] and mask_first_scored(masks[4]) == 1


def mask_first_scored(mask) -> int:
    return int(np.argmax(mask))


@pytest.mark.parametrize("seq_len, batch_size", [(128, 8), (40, 2)])
def test_score_choices_is_each_candidate_alone(setup, seq_len, batch_size):
    # Candidates packed several to a row (and rows to a batch) score what each scores alone (fp64);
    # the accuracies are the argmax of the sum, the sum per byte and the sum per token.
    tokenizer, model, examples = setup
    score = evaluate.score_choices(model, tokenizer, examples, seq_len, batch_size)
    docs, masks = evaluate.choice_documents(examples, tokenizer)
    want = np.array([alone(model, d.tolist(), int(m.sum())) for d, m in zip(docs, masks)])
    np.testing.assert_allclose(score["logps"], want, rtol=1e-12)
    right = {"acc": 0, "acc_norm": 0, "acc_bytes": 0, "acc_per_token": 0}
    for i, example in enumerate(examples):
        s = want[4 * i:4 * i + 4]
        # lm-evaluation-harness's: per character of the raw ending (no space before it), per byte
        chars, size = [len(e) for e in example["endings"]], [len(e.encode()) for e in example["endings"]]
        tokens = [int(m.sum()) for m in masks[4 * i:4 * i + 4]]
        for name, value in (("acc", s), ("acc_norm", s / np.array(chars)), ("acc_bytes", s / np.array(size)),
                            ("acc_per_token", s / tokens)):
            right[name] += int(np.argmax(value) == example["label"])
    assert score["examples"] == 12 and all(score[k] == right[k] / 12 for k in right)
    assert model.training is False  # left as it was
    with pytest.raises(ValueError, match="longer than seq_len 8"):
        evaluate.score_choices(model, tokenizer, examples, 8)


def test_score_choices_as_transformers(setup, tmp_path):
    # The same model in transformers (LLM.to_hf): each candidate's log-probability as a loop over
    # transformers' logits, one candidate at a time, computes it (lm-evaluation-harness's way).
    transformers = pytest.importorskip("transformers")
    tokenizer, model, examples = setup
    model.to_hf(tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    docs, masks = evaluate.choice_documents(examples, tokenizer)
    want = []
    with torch.no_grad():
        for doc, mask in zip(docs, masks):
            ids, n = torch.from_numpy(doc), int(mask.sum())
            logp = torch.log_softmax(theirs(ids[None]).logits[0], -1)
            want.append(float(logp[torch.arange(len(ids) - n - 1, len(ids) - 1), ids[-n:]].sum()))
    # 1e-6: transformers computes RoPE's angles in fp32 whatever the model's dtype
    np.testing.assert_allclose(evaluate.score_choices(model, tokenizer, examples, 128)["logps"], want, rtol=1e-6)


def test_text_loss(setup):
    # Windows of seq_len + 1 tokens, each text alone after the prefix, each token predicted once:
    # lm-evaluation-harness's rolling loglikelihood (a text's last, shorter window predicted after a
    # whole window of context, where it had had the few tokens before it alone): the mean over every
    # predicted token, and the bits per byte of the texts.
    tokenizer, model, _ = setup
    rng = random.Random(4)
    texts = [sentence(rng, 60), sentence(rng, 3), "x"]
    got = evaluate.text_loss(model, tokenizer, texts, seq_len=16, batch_size=3, prefix=[5])
    total, count = 0.0, 0
    for text in texts:
        ids = [5, *tokenizer.encode_ordinary(text)]
        for start in range(0, len(ids) - 1, 16):
            window = ids[start:start + 17]
            new = len(window) - 1
            total -= alone(model, ids[max(0, start + 1 + new - 17):start + 1 + new], new)
            count += new
    assert got["tokens"] == count and got["loss"] == pytest.approx(total / count, rel=1e-12)
    # no prefix: each text after <|endoftext|>, as training separated documents (every token predicted)
    got = evaluate.text_loss(model, tokenizer, texts, seq_len=16, batch_size=3)
    eot = tokenizer.special_tokens["<|endoftext|>"]
    total, count = 0.0, 0
    for text in texts:
        ids = [eot, *tokenizer.encode_ordinary(text)]
        for start in range(0, len(ids) - 1, 16):
            window = ids[start:start + 17]
            new = len(window) - 1
            total -= alone(model, ids[max(0, start + 1 + new - 17):start + 1 + new], new)
            count += new
    n_bytes = sum(len(t.encode()) for t in texts)
    assert got["tokens"] == count and got["bytes"] == n_bytes
    # start: what a text starts from where the tokenizer has no <|endoftext|> (pyllm eval: a Hugging
    # Face model's end-of-sequence id, lm-evaluation-harness's prefix token)
    assert evaluate.text_loss(model, tokenizer, texts, seq_len=16, start=[5]) == evaluate.text_loss(
        model, tokenizer, texts, seq_len=16, prefix=[5])
    assert got["loss"] == pytest.approx(total / count, rel=1e-12)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-12)
    assert got["bits_per_byte"] == pytest.approx(total / n_bytes / math.log(2), rel=1e-12)
    # lm-evaluation-harness's rolling metrics: byte perplexity, and word perplexity over its count_words
    # (re.split(r"\s+", text): a "\n" among the words joins its neighbours' spaces; " a b " is 4 pieces)
    assert got["byte_perplexity"] == pytest.approx(math.exp(total / n_bytes), rel=1e-12)
    words = sum(len(t.split()) + t[0].isspace() + t[-1].isspace() for t in texts)
    assert got["words"] == words and got["word_perplexity"] == pytest.approx(math.exp(total / words), rel=1e-12)
    assert evaluate.text_loss(model, tokenizer, [" a b "], seq_len=16)["words"] == 4


def test_eval_command(setup, tmp_path, capsys):
    tokenizer, model, examples = setup
    copy.deepcopy(model).float().save(tmp_path / "model.safetensors")
    tokenizer.save(tmp_path / "tok.bpe")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"ctx": e["context"], "endings": e["endings"],
                                                          "label": e["label"]}) + "\n" for e in examples))
    (tmp_path / "t.txt").write_text(sentence(random.Random(1), 80))
    base = ["eval", "--model", str(tmp_path / "model.safetensors"), "--tokenizer", str(tmp_path / "tok.bpe"),
            "--device", "cpu"]
    assert cli.main([*base, "--choices", str(tmp_path / "c.jsonl"), "--text", str(tmp_path / "t.txt"), "--limit", "10",
                     "--seq-len", "64", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "10 examples: acc " in out and "bits/byte" in out
    result = json.loads((tmp_path / "r.json").read_text())
    reference = evaluate.score_choices(LLM.load(tmp_path / "model.safetensors"), tokenizer, examples[:10], 64)
    assert {k: result[str(tmp_path / "c.jsonl")][k] for k in ("acc", "acc_norm")} == \
        {k: reference[k] for k in ("acc", "acc_norm")}
    assert result["text"]["tokens"] > 0 and result["seq_len"] == 64
    # LAMBADA's rows: acc and perplexity, as score_continuations gives them
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"text": e["context"] + " " + e["endings"][0]}) + "\n"
                                              for e in examples))
    assert cli.main([*base, "--continuations", str(tmp_path / "l.jsonl"), "--json", str(tmp_path / "r.json")]) == 0
    assert f"{len(examples)} examples: acc " in capsys.readouterr().out
    want = evaluate.score_continuations(LLM.load(tmp_path / "model.safetensors"), tokenizer,
                                        evaluate.read_continuations(tmp_path / "l.jsonl"), 128)
    got = json.loads((tmp_path / "r.json").read_text())[str(tmp_path / "l.jsonl")]
    assert got["acc"] == want["acc"] and got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-9)
    assert cli.main(base) == 2 and "give --choices" in capsys.readouterr().err
    assert cli.main([*base, "--text", str(tmp_path / "t.txt"), "--seq-len", "500"]) == 2
    assert "--seq-len must be in [1, 128]" in capsys.readouterr().err
    # --text files read as `pyllm prepare` reads them: CRLF kept, a {"text"} rows file a document a
    # row, a literal <|endoftext|> a document's end (rows had been scored as raw JSON, the separator
    # as 13 bytes of text)
    rng = random.Random(2)
    docs = [sentence(rng, 10), sentence(rng, 7) + "\r\n" + sentence(rng, 3)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "sep.txt").write_bytes("<|endoftext|>".join(docs).encode())
    want = evaluate.text_loss(LLM.load(tmp_path / "model.safetensors"), tokenizer, docs, 64)
    for name in ("rows.jsonl", "sep.txt"):
        assert cli.main([*base, "--text", str(tmp_path / name), "--seq-len", "64", "--json", str(tmp_path / "r.json")]) == 0
        got = json.loads((tmp_path / "r.json").read_text())["text"]
        assert got["bytes"] == sum(len(d.encode()) for d in docs) and got["tokens"] == want["tokens"], name
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), name
    # a choice too long for the model: its context cut from the left, as lm-evaluation-harness cuts
    # it (it had been refused), each ending's tokens predicted from the last 128 before them (the harness
    # keeps max_length + 1 tokens, max_length of them input)
    long = {"ctx": sentence(rng, 200), "endings": ["a b", "c d"], "label": 0}
    (tmp_path / "long.jsonl").write_text(json.dumps(examples[0] | {"ctx": examples[0]["context"]}) + "\n" + json.dumps(long) + "\n")
    assert cli.main([*base, "--choices", str(tmp_path / "long.jsonl")]) == 0
    assert "eval: 2 candidate(s) longer than seq_len 128 + 1 tokens: their contexts cut from the left" in (
        capsys.readouterr().err)
    model = LLM.load(tmp_path / "model.safetensors")
    docs, masks = evaluate.choice_documents([long | {"context": long["ctx"]}], tokenizer)
    got = evaluate.score_choices(model, tokenizer, [long | {"context": long["ctx"]}], 128)["logps"]
    for doc, trained, logp in zip(docs, masks, got):
        doc, trained = torch.tensor(doc[-129:]), torch.tensor(trained[-129:], dtype=torch.bool)
        with torch.no_grad():
            logits = model(doc[None, :-1])[0].double()
        want = logits.log_softmax(-1)[0].gather(-1, doc[1:, None])[:, 0][trained[1:]].sum()
        assert logp == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="raise --seq-len"):  # (a seq_len below the model's own: say so)
        evaluate.score_choices(model, tokenizer, [long | {"context": long["ctx"]}], 64)


def test_eval_as_the_harness_reports_and_reads(setup, tmp_path, capsys):
    # An audit against lm-evaluation-harness (2026-12-06): each accuracy's standard error (its
    # mean_stderr: sample std / sqrt(n)); a JSON Lines file of rows without "text" (its wikitext's
    # {"page"}) refused, where it had been scored as one raw text, JSON and all; HellaSwag's own rows
    # scored as they are, with a word that the harness rewrites them first.
    tokenizer, model, examples = setup
    score = evaluate.score_choices(model, tokenizer, examples, 128)
    for key in ("acc", "acc_norm", "acc_bytes", "acc_per_token"):
        right = np.array([np.argmax(score["logps"][4 * i:4 * i + 4]) == e["label"] for i, e in enumerate(examples)],
                         dtype=float) if key == "acc" else None
        if right is not None:
            assert score[key] == right.mean() and score[f"{key}_stderr"] == pytest.approx(right.std(ddof=1) / math.sqrt(12))
        p = score[key]
        assert score[f"{key}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 11))
    assert evaluate.score_choices(model, tokenizer, examples[:1], 128)["acc_stderr"] is None  # (the harness's N/A)
    copy.deepcopy(model).float().save(tmp_path / "model.safetensors")
    tokenizer.save(tmp_path / "tok.bpe")
    base = ["eval", "--model", str(tmp_path / "model.safetensors"), "--tokenizer", str(tmp_path / "tok.bpe"),
            "--device", "cpu"]
    (tmp_path / "pages.jsonl").write_text(json.dumps({"page": "the cat sat", "title": "cats"}) + "\n")
    assert cli.main([*base, "--text", str(tmp_path / "pages.jsonl")]) == 2
    assert 'pages.jsonl: a JSON Lines file whose rows have no "text" (its first has page, title)' in capsys.readouterr().err
    rows = [{"activity_label": "Cats", "ctx_a": e["context"], "ctx_b": "", "ctx": e["context"], "endings": e["endings"],
             "label": e["label"]} for e in examples[:3]]
    (tmp_path / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main([*base, "--choices", str(tmp_path / "hellaswag.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "lm-evaluation-harness's hellaswag rewrites each context first" in captured.err
    assert "3 examples: acc " in captured.out and " ± " in captured.out


def test_eval_starts_from_the_harness_prefix_token(tmp_path):
    # lm-evaluation-harness's prefix_token_id: the tokenizer's bos_token, else its eos_token (Qwen2.5-
    # Instruct: <|im_end|>), not <|endoftext|> because the vocabulary has one
    import types

    tokenizer = types.SimpleNamespace(special_tokens={"<|endoftext|>": 5, "<|im_end|>": 6, "<s>": 7})
    assert cli.harness_prefix_ids(tmp_path, tokenizer) is None  # (no tokenizer_config.json: the old rule)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    assert cli.harness_prefix_ids(tmp_path, tokenizer) == [6]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "<|im_end|>"}))
    assert cli.harness_prefix_ids(tmp_path, tokenizer) == [7]


CUT_WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "ate", "fish"]


def test_long_candidates_cut_as_the_harness_cuts():
    # lm-evaluation-harness keeps a request's last max_length + 1 tokens and feeds max_length of them
    # ((context_enc + continuation_enc)[-(max_length + 1):][:-1]): a candidate of seq_len + 1 tokens is
    # scored whole, a longer one from the seq_len before each ending token (pyllm had kept seq_len: one
    # token of context fewer, up to 5.9 nats apart on a random model).
    rng = random.Random(0)
    tok = Tokenizer.train([" ".join(rng.choice(CUT_WORDS) for _ in range(40)) for _ in range(30)], 270,
                          special_tokens=["<|endoftext|>"], show_progress=False)
    torch.manual_seed(0)
    L = 24
    model = LLM(ModelConfig(vocab_size=tok.vocab_size, n_layers=2, n_heads=4, n_kv_heads=2, dim=64, block_size=L)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    examples = [{"context": " ".join(rng.choice(CUT_WORDS) for _ in range(n)), "endings": ["cat sat", "fish"], "label": 0}
                for n in range(L - 6, L + 12)]
    got = evaluate.score_choices(model, tok, examples, L, 4)["logps"]
    docs, masks = evaluate.choice_documents(examples, tok)
    for doc, mask, logp in zip(docs, masks, got):
        doc, n = torch.tensor(doc[-(L + 1):]), int(mask.sum())  # the harness's max_length + 1
        with torch.no_grad():
            logits = model(doc[None, :-1])[0][0].log_softmax(-1)
        want = logits[-n:].gather(-1, doc[-n:, None]).sum()
        assert logp == pytest.approx(want.item(), rel=1e-12)


def test_repeated_endings_score_alike_at_every_batch_size():
    # An example's two identical endings get one score (the harness scores identical requests once
    # and argmax takes the first copy): packed at other places in the rows, rounding had picked the
    # winner, so acc moved with --batch-size (0.333 at 1, 0.367 at 2-8 in the audit that found it).
    rng = random.Random(0)
    sentence = lambda n: " ".join(rng.choice(CUT_WORDS) for _ in range(n))  # noqa: E731
    tok = Tokenizer.train([sentence(40) for _ in range(50)], 270, special_tokens=["<|endoftext|>"], show_progress=False)
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=tok.vocab_size, n_layers=2, n_heads=4, n_kv_heads=2, dim=64, block_size=32))
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    examples = [{"context": sentence(rng.randint(2, 12)), "endings": [sentence(2), "the mat", sentence(3), "the mat"],
                 "label": 1} for _ in range(12)]
    runs = [evaluate.score_choices(model, tok, examples, 32, batch_size) for batch_size in (1, 2, 3, 8)]
    for run in runs:
        logps = run["logps"].reshape(-1, 4)
        assert np.array_equal(logps[:, 1], logps[:, 3])
        assert {k: run[k] for k in ("acc", "acc_norm", "acc_bytes")} == {k: runs[0][k] for k in ("acc", "acc_norm",
                                                                                                   "acc_bytes")}


def test_continuations_as_the_harness_scores_loglikelihood(tmp_path):
    # lm-evaluation-harness's loglikelihood requests (LAMBADA's): the continuation's tokens split from
    # the whole text's, their summed log-probability, greedy when each is the top token; acc and
    # perplexity (exp of minus the mean); a long context cut to the last seq_len + 1 tokens
    rng = random.Random(1)
    sentence = lambda n: " ".join(rng.choice(CUT_WORDS) for _ in range(n))  # noqa: E731
    tok = Tokenizer.train([sentence(40) for _ in range(50)], 270, special_tokens=["<|endoftext|>"], show_progress=False)
    torch.manual_seed(1)
    L = 24
    model = LLM(ModelConfig(vocab_size=tok.vocab_size, n_layers=2, n_heads=4, n_kv_heads=2, dim=64, block_size=L))
    model = model.double().eval()
    learnt = [sentence(rng.randint(3, 8)) for _ in range(4)]  # memorised below: greedy continuations
    rows = [{"text": t} for t in learnt] + [{"text": sentence(rng.randint(2, L + 8))} for _ in range(10)]
    rows += [{"context": "the cat sat on the", "continuation": " mat"}, {"context": "", "continuation": "dog ran"}]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = [[tok.special_tokens["<|endoftext|>"], *tok.encode_ordinary(t)] for t in learnt]
    for _ in range(40):
        for seq in ids:
            seq = torch.tensor(seq)
            loss = model(seq[None, :-1], seq[None, 1:])[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = evaluate.read_continuations(path)
    assert examples[0] == {"context": " ".join(rows[0]["text"].split(" ")[:-1]),
                           "continuation": " " + rows[0]["text"].split(" ")[-1]}
    want_logps, want_greedy = [], []
    eot = tok.special_tokens["<|endoftext|>"]
    for e in examples:
        lead = [] if e["context"] else [eot]
        context = [*lead, *tok.encode_ordinary(e["context"])]
        whole = [*lead, *tok.encode_ordinary(e["context"] + e["continuation"])]
        n = len(whole) - next((i for i, (a, b) in enumerate(zip(context, whole)) if a != b), len(context))
        whole = torch.tensor(whole[-(L + 1):])  # the harness's max_length + 1
        with torch.no_grad():
            logp = model(whole[None, :-1])[0][0].log_softmax(-1)[-n:]
        target = whole[-n:]
        want_logps.append(float(logp.gather(-1, target[:, None]).sum()))
        want_greedy.append(bool((logp.argmax(-1) == target).all()))
    assert 0 < sum(want_greedy) < len(examples)
    for batch_size in (1, 3, 16):
        got = evaluate.score_continuations(model, tok, examples, L, batch_size)
        np.testing.assert_allclose(got["logps"], want_logps, rtol=1e-12)
        assert got["greedy"] == want_greedy and got["acc"] == sum(want_greedy) / len(examples)
        assert got["perplexity"] == pytest.approx(math.exp(-sum(want_logps) / len(examples)), rel=1e-12)
    with pytest.raises(ValueError, match="continuation"):
        path.write_text(json.dumps({"context": "a", "continuation": ""}) + "\n")
        evaluate.read_continuations(path)


def test_text_loss_builds_no_graph():
    # (its no_grad had slid onto read_continuations when score_continuations was put before it)
    rng = random.Random(0)
    texts = [" ".join(rng.choice("the a cat dog sat on mat".split()) for _ in range(40)) for _ in range(4)]
    tok = Tokenizer.train(texts, 270, special_tokens=["<|endoftext|>"], show_progress=False)
    model = LLM(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2, n_kv_heads=2, dim=32, block_size=64))
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    evaluate.text_loss(model, tok, texts, seq_len=16)
    assert seen and not any(seen)


def test_choice_row_with_winogrande_fields_beside_is_read(tmp_path):
    # the Winogrande message only where no context was found (it had refused a valid row carrying both)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"sentence": "x _ y", "option1": "a", "option2": "b", "answer": "1",
                                "ctx": "c", "endings": ["d", "e"], "label": 0}) + "\n")
    assert evaluate.read_choices(path) == [{"context": "c", "endings": ["d", "e"], "label": 0}]


def test_a_longrope_models_padded_rows_score_each_text_as_alone(setup):
    # LongRoPE's factors follow a sequence's length: a short text batched with one past the switch
    # had been scored under the long ones (the padded row's), so a LongRoPE model's scores moved with
    # --batch-size; each row is its own document now (packing's rule, 00a8076)
    tokenizer, _, _ = setup
    rs = dict(rope_type="longrope", short_factor=[1.0 + 0.2 * i for i in range(4)], long_factor=[4.0] * 4,
              original_max_position_embeddings=16, attention_factor=1.1)
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=2, n_heads=2, dim=16, block_size=64,
                            rope_scaling=rs)).double().eval()
    rng = random.Random(3)
    examples = [{"context": sentence(rng, n), "continuation": " " + sentence(rng, 2)} for n in (2, 30, 3, 1)]
    batched = evaluate.score_continuations(model, tokenizer, examples, 60, batch_size=4)
    single = evaluate.score_continuations(model, tokenizer, examples, 60, batch_size=1)
    assert batched["logps"] == pytest.approx(single["logps"], rel=1e-12, abs=1e-12)
    texts = [sentence(rng, 3), sentence(rng, 40), sentence(rng, 2)]
    batched = evaluate.text_loss(model, tokenizer, texts, 60, batch_size=3)
    assert batched["loss"] == pytest.approx(evaluate.text_loss(model, tokenizer, texts, 60, batch_size=1)["loss"],
                                            rel=1e-12)


# --- from an audit against lm-evaluation-harness (2026-12-07) -------------------------------------

AUDIT_WORDS = ["the", "cat", "sat", "on", "a", "mat", "日本", "42", "\n"]


def tiny_eval_model(tmp_path):
    rng = random.Random(0)
    tok = Tokenizer.train([" ".join(rng.choice(AUDIT_WORDS) for _ in range(40)) for _ in range(50)], 280,
                          special_tokens=["<|endoftext|>"], show_progress=False)
    torch.manual_seed(0)
    model = LLM(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2, n_kv_heads=2, dim=32, block_size=64))
    model.save(tmp_path / "model.safetensors")
    tok.save(tmp_path / "tok.bpe")
    return model, tok, ["eval", "--model", str(tmp_path / "model.safetensors"), "--tokenizer", str(tmp_path / "tok.bpe"),
                        "--device", "cpu"]


def test_text_without_spaces_gives_an_infinite_word_perplexity(tmp_path, capsys):
    # one "word" of 1,000 tokens: its loss is far past the 709 nats whose exp float64 holds
    model, tok, base = tiny_eval_model(tmp_path)
    text = "日本" * 1000
    got = evaluate.text_loss(model.eval(), tok, [text], seq_len=64)
    assert got["words"] == 1 and got["loss"] * got["tokens"] > 710
    assert got["word_perplexity"] == math.inf and math.isfinite(got["bits_per_byte"]) and math.isfinite(got["loss"])
    (tmp_path / "cjk.txt").write_text(text, encoding="utf-8")
    assert cli.main([*base, "--text", str(tmp_path / "cjk.txt"), "--json", str(tmp_path / "r.json")]) == 0
    assert "bits/byte, word perplexity inf" in capsys.readouterr().out
    # (null in the JSON file, as log.jsonl writes non-finite numbers: JSON has no inf)
    assert json.loads((tmp_path / "r.json").read_text())["text"]["word_perplexity"] is None


def test_seq_len_zero_is_refused(tmp_path, capsys):
    # (0 had been read as "not given": the default window)
    _, _, base = tiny_eval_model(tmp_path)
    (tmp_path / "t.txt").write_text("the cat sat on the mat")
    assert cli.main([*base, "--text", str(tmp_path / "t.txt"), "--seq-len", "0"]) == 2
    assert "--seq-len must be in [1, 64]" in capsys.readouterr().err
