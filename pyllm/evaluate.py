"""Evaluating a finished model: multiple-choice accuracy, continuations' accuracy and perplexity on
text (`pyllm eval`).

Multiple choice (HellaSwag and the like): each example's context followed by each of its endings is
a document; the model's log-probability of each ending's tokens is summed, and the example counts
as right when the labelled ending scores highest: by the sum (`acc`), by the sum per character of
the ending (`acc_norm`, lm-evaluation-harness's: the raw ending, without the space before it), per
UTF-8 byte of it (`acc_bytes`, the harness's too) and per token (`acc_per_token`, what llm.c's
HellaSwag eval calls acc_norm), with each accuracy's standard error (the harness's: the scores'
sample standard deviation over sqrt(n)). The files are read as they are (llm.c's way):
lm-evaluation-harness's hellaswag task first rewrites HellaSwag's contexts (activity label, bracket
removal), so its numbers differ; its processed rows ({"query", "choices", "gold"}) give its numbers.
No few-shot examples: each row is scored alone (a few-shot context written into its "ctx" is scored
as any context). The candidates are packed into rows and computed each alone (the varlen
attention), as training packs conversations, so short candidates cost no padding.

Continuations (LAMBADA's): a context and one continuation, scored as the harness's loglikelihood
requests: the continuation's summed log-probability and whether each of its tokens is the model's
top token; acc (the share that is greedy) and perplexity.

Text: the mean loss over windows of seq_len tokens, each token predicted once (from the ones
before it in its window; a text's first one from <|endoftext|>, as the documents were separated in
training, where the tokenizer has it; a text's last, shorter window given a whole window of the
text before it as context, lm-evaluation-harness's rolling loglikelihood), as nats per token,
perplexity and bits per byte (the summed loss over the text's UTF-8 bytes: comparable across
tokenizers; the harness's byte_perplexity is 2 ** bits per byte). Three differences from the harness's
numbers remain: a tokenizer that adds a BOS (Llama's) gets it once here, where the harness puts its
prefix token before the BOS the tokenizer already added (log p(BOS | BOS) scored, the windows one
token later); the default window is min(block_size, 2048) tokens, where the harness takes the
model's max_position_embeddings (give --seq-len for its number); and where a context's last token
merges with a continuation's first (one given without a leading space, "a a" + "the" with GPT-2's
merges; multiple choice always puts a space between), the merged token is scored as the
continuation's, where the harness splits the whole text's tokens at the context's length
(choice_documents).
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pyllm import data
from pyllm.train import DistInfo, document_logps

_CONTEXT_KEYS, _ENDING_KEYS, _LABEL_KEYS = ("ctx", "context", "query"), ("endings", "choices"), ("label", "gold")
# lm-evaluation-harness's processed documents (its hellaswag task's process_docs keeps HellaSwag's
# own fields beside them): read as the harness scores them when a row has all three
_HARNESS_KEYS = ("query", "choices", "gold")


def read_choices(path) -> list[dict]:
    """The examples of a JSON Lines file of multiple-choice questions, one per line:
    {"ctx": "text", "endings": ["text", ...], "label": i} (HellaSwag's own files; "context" or
    "query" for "ctx", "choices" for "endings", "gold" for "label" too), label the index of the
    right ending (an int or a string of one). A row of lm-evaluation-harness's processed documents
    (query, choices and gold beside HellaSwag's own ctx, endings and label) is read by those, as the
    harness scores it. Returned as {"context", "endings", "label"}."""
    examples = []
    for number, row, line in data._jsonl_rows(path):
        keys = [(k,) for k in _HARNESS_KEYS] if all(k in row for k in _HARNESS_KEYS) else [
            _CONTEXT_KEYS, _ENDING_KEYS, _LABEL_KEYS]
        (context_key, context), (endings_key, endings), (label_key, label) = (
            next(((k, row[k]) for k in names if k in row), (names[0], None)) for names in keys)
        if isinstance(label, str) and label.strip().isascii() and label.strip().isdigit():
            label = int(label)
        wrong = ("a Winogrande row (sentence, option1, option2): its options change the context, not the ending (the "
                 "harness's partial scoring), which this format cannot say" if context is None and context_key not in
                 row and {"sentence", "option1"} <= set(row) else
                 "no context (ctx, context or query)" if context is None and context_key not in row else
                 f"{context_key} is not a string" if not isinstance(context, str) else
                 "no endings (endings or choices)" if endings is None else
                 f"{endings_key} is not a list of 2 or more non-empty strings" if not (
                     isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) and e for e in endings))
                 else f"{label_key} {label!r} is not the index of one of its {len(endings)} endings" if not (
                     isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(endings)) else None)
        if wrong:
            raise ValueError(f"{path}:{number}: {wrong} (expected {{\"ctx\": \"text\", \"endings\": [\"text\", ...], "
                             f"\"label\": index of the right one}}); the line starts {line.strip()[:80]!r}")
        examples.append({"context": context, "endings": endings, "label": label})
    return examples


def _exp(x: float) -> float:
    """math.exp, inf past float64's range: a word perplexity of text with few spaces (CJK, code:
    over 709 nats per word) had raised OverflowError, losing the loss and bits per byte with it."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _row_documents(model, lengths: Sequence[int], T: int) -> torch.Tensor | None:
    """cu_seqlens of right-padded rows (each row's text, then its padding, as documents) for a
    LongRoPE model, whose factors follow a sequence's length: each text's own, as alone (the padded
    row's had given a short text the long factors where a longer one shared its batch). None for
    the others (the causal attention never reads the padding)."""
    cfg = getattr(model, "module", model).config
    if (cfg.rope_scaling or {}).get("rope_type") != "longrope":
        return None
    edges = [0]
    for n in lengths:
        edges += [edges[-1] + n, edges[-1] + T]
    return torch.tensor(edges, dtype=torch.int32)


def _start_token(tokenizer, start: Sequence[int] | None = None) -> list[int]:
    """What a text starts from: start when given (`pyllm eval`: a Hugging Face model's BOS or EOS
    where its tokenizer has no <|endoftext|>, as lm-evaluation-harness's prefix token), else
    <|endoftext|>, which the model saw before every document, where the tokenizer has it."""
    if start is not None:
        return list(start)
    eot = data.eot_id(tokenizer)
    return [] if eot is None else [eot]


def choice_documents(examples: Sequence[dict], tokenizer, prefix: Sequence[int] = (),
                     start: Sequence[int] | None = None, delimiter: str = " ") -> tuple[list, list]:
    """(docs, masks): for each example, for each ending, prefix + the tokens of the context and
    the ending written together, the ending's marked, as lm-evaluation-harness splits them
    (encoding the ending alone would differ where a tokenizer treats a text's start specially:
    SentencePiece-style ones put a "▁" first): the context's trailing whitespace moved to the
    ending, and the ending's tokens those past the context's tokens' common prefix with the whole
    (where the context's last token merges with the ending's first, "Answer:\n" + "\nbar", that
    token is scored: the harness's split by length would leave part of the ending unscored). Every
    ending gets delimiter before it, whatever it starts with: one space, the harness's target_delimiter,
    as llm.c's HellaSwag eval joins them too (an ending starting with whitespace had been given none,
    another text than both score); "" for a loglikelihood request's continuation. An empty context
    (no prefix either) starts from <|endoftext|> (or start), so the ending's first token is predicted
    too."""
    docs, masks = [], []
    for example in examples:
        context = example["context"].rstrip()
        moved = example["context"][len(context):]  # trailing whitespace: the ending's
        lead = list(prefix) or ([] if context else _start_token(tokenizer, start))
        context_ids = [*lead, *tokenizer.encode_ordinary(context)]
        for ending in example["endings"]:
            whole = [*lead, *tokenizer.encode_ordinary(context + moved + delimiter + ending)]
            first = next((i for i, (a, b) in enumerate(zip(context_ids, whole)) if a != b), len(context_ids))
            first = max(min(first, len(whole) - 1), 1 if len(whole) > 1 else 0)  # a scored token has one before it
            docs.append(np.asarray(whole, np.int64))
            masks.append(np.asarray([0] * first + [1] * (len(whole) - first), np.uint8))
    return docs, masks


def write_choices(examples: Sequence[dict], tokenizer, path, prefix: Sequence[int] = (),
                  start: Sequence[int] | None = None) -> None:
    """Tokenizes multiple-choice examples (read_choices) into a document file (choice_documents'
    candidates, write_documents) and its .choices.json (each example's label, number of endings and
    the raw endings' sizes in characters and in bytes): what score_choice_files, and the trainer's
    --eval-choices, read."""
    docs, masks = choice_documents(examples, tokenizer, prefix, start)
    path = Path(path)
    path.with_suffix(".choices.json").write_text(json.dumps({
        "labels": [e["label"] for e in examples],
        "chars": [[len(x) for x in e["endings"]] for e in examples],
        "bytes": [[len(x.encode("utf-8")) for x in e["endings"]] for e in examples]}))
    data.write_documents(path, docs, masks, max(tokenizer.vocab_size, 1))


@torch.no_grad()
def score_choice_files(model, path, seq_len: int, batch_size: int = 8, precision: str = "fp32",
                       info: DistInfo | None = None) -> dict:
    """score_choices on write_choices' files: acc, acc_norm, acc_bytes, acc_per_token, examples, logps. With
    info, every rank of a process group takes its share of the rows (document_logps)."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".choices.json").read_text())
    offsets = np.load(path.with_suffix(".docs.npy"))
    mask = np.load(path.with_suffix(".mask.npy"))
    # a candidate of seq_len + 1 tokens takes seq_len positions (its last token is a target only: the
    # loader predicts all seq_len of its tokens after the first), lm-evaluation-harness's max_length + 1
    longest = int(np.diff(offsets).max()) - 1
    block_size = getattr(model, "module", model).config.block_size  # (the trainer's may be DDP's wrapper)
    if longest > seq_len and seq_len < min(longest, block_size):
        raise ValueError(f"example {_example_of(meta, int(np.argmax(np.diff(offsets)))) + 1} (in file order): a "
                         f"context with its ending is {longest + 1} tokens, longer than seq_len {seq_len} + 1: raise --seq-len "
                         f"(up to the model's block_size, {block_size})")
    info = info or DistInfo(device=next(model.parameters()).device)
    with tempfile.TemporaryDirectory() as folder:
        if longest > seq_len:  # past seq_len + 1 tokens: cut from the left, as lm-evaluation-harness cuts
            cut = _left_cut(path, meta, offsets, mask, seq_len, Path(folder) / "cut.bin", info.is_main)  # (refused before)
        logps = document_logps(model, cut if longest > seq_len else path, batch_size, seq_len, precision, info)
    _same_scores_for_same_candidates(logps, path, meta, offsets, mask)
    tokens = np.add.reduceat(mask.astype(np.int64), offsets[:-1])  # each candidate's ending tokens
    right = {"acc": 0, "acc_norm": 0, "acc_bytes": 0, "acc_per_token": 0}
    start = 0
    chars = meta.get("chars", meta["bytes"])  # (files written before 2026-12-03: bytes with the space)
    for label, n_chars, n_bytes in zip(meta["labels"], chars, meta["bytes"]):
        n = len(n_bytes)
        scores = logps[start:start + n]
        for name, value in (("acc", scores), ("acc_norm", scores / np.array(n_chars)),
                            ("acc_bytes", scores / np.array(n_bytes)),
                            ("acc_per_token", scores / tokens[start:start + n])):
            right[name] += int(np.argmax(value) == label)
        start += n
    n_examples = len(meta["labels"])
    accs = {k: v / max(n_examples, 1) for k, v in right.items()}
    # lm-evaluation-harness's stderr of a mean (api/metrics.py mean_stderr: the sample standard
    # deviation, Bessel's n - 1, over sqrt(n)); for 0/1 scores sqrt(p (1 - p) / (n - 1)); None (the
    # harness's N/A) for one example
    stderrs = {f"{k}_stderr": math.sqrt(p * (1 - p) / (n_examples - 1)) if n_examples > 1 else None
               for k, p in accs.items()}
    return {"examples": n_examples, **accs, **stderrs, "logps": logps}


def _same_scores_for_same_candidates(logps: np.ndarray, path: Path, meta: dict, offsets: np.ndarray,
                                     mask: np.ndarray) -> None:
    """An example's identical candidates (a repeated ending) get the first one's score, in place:
    lm-evaluation-harness scores identical requests once, so argmax takes the first copy; here the
    copies sit at other places in the packed rows, and rounding there (1e-14 in fp64, more in bf16)
    had picked the winner, so acc depended on --batch-size."""
    tokens = data.open_tokens(path)
    start = 0
    for endings in meta["bytes"]:
        seen = {}
        for j in range(start, start + len(endings)):
            key = (np.asarray(tokens[offsets[j]:offsets[j + 1]]).tobytes(), mask[offsets[j]:offsets[j + 1]].tobytes())
            logps[j] = logps[seen.setdefault(key, j)]
        start += len(endings)


def _example_of(meta: dict, candidate: int) -> int:
    """The example (0-based, file order) a candidate document belongs to."""
    return int(np.searchsorted(np.cumsum([len(c) for c in meta["bytes"]]), candidate, side="right"))


def _harness_cut(doc: np.ndarray, trained: np.ndarray, seq_len: int, what) -> tuple[np.ndarray, np.ndarray]:
    """doc and its trained mask cut to their last seq_len + 1 tokens where longer, as
    lm-evaluation-harness cuts a request (it keeps the last max_length + 1 tokens, max_length of them
    input); ValueError where the ending does not fit after one token of context (what(): whose
    ending, worked out only then)."""
    if len(doc) <= seq_len + 1:
        return doc, trained
    if trained[-seq_len - 1]:  # (the first token kept is never predicted)
        raise ValueError(f"{what()} of {int(trained.sum())} tokens does not fit seq_len {seq_len} after its context")
    return doc[-seq_len - 1:], trained[-seq_len - 1:]


def _left_cut(path: Path, meta: dict, offsets: np.ndarray, mask: np.ndarray, seq_len: int, out: Path,
              say: bool = True) -> Path:
    """write_choices' documents at out with each one longer than seq_len + 1 cut to its last
    seq_len + 1 tokens (its context's first tokens dropped, its ending whole), as lm-evaluation-harness
    cuts a request (it keeps the last max_length + 1 tokens, max_length of them input; the loader
    places such a document in seq_len positions); ValueError for an ending that does not fit after one
    token of context. Says how many were cut. (Until 2026-12-06 the cut kept seq_len tokens: one
    token of context fewer than the harness, and a candidate of seq_len + 1 cut that it keeps whole.)"""
    import sys

    tokens = data.open_tokens(path)
    docs, masks, cut = [], [], 0
    for i in range(len(offsets) - 1):
        doc, trained = np.asarray(tokens[offsets[i]:offsets[i + 1]]), mask[offsets[i]:offsets[i + 1]]
        cut += len(doc) > seq_len + 1
        doc, trained = _harness_cut(doc, trained, seq_len,
                                    lambda: f"example {_example_of(meta, i) + 1} (in file order): an ending")
        docs.append(doc)
        masks.append(np.asarray(trained))
    data.write_documents(out, docs, masks, data.read_header(path)["vocab_size"])
    if say:
        print(f"eval: {cut} candidate(s) longer than seq_len {seq_len} + 1 tokens: their contexts cut from the left "
              "to fit (lm-evaluation-harness's truncation: the last seq_len + 1 kept)", file=sys.stderr)
    return out


@torch.no_grad()
def score_choices(model, tokenizer, examples: Sequence[dict], seq_len: int, batch_size: int = 8,
                  prefix: Sequence[int] = (), precision: str = "fp32", start: Sequence[int] | None = None) -> dict:
    """Accuracy of model on multiple-choice examples (read_choices): acc, acc_norm, acc_per_token
    (see the module's docstring), the number of examples, and logps, each candidate's summed
    log-probability (examples in order, each one's endings in order). A candidate longer than
    seq_len: ValueError when seq_len is below the model's block_size (raise it), else its context
    cut from the left, as lm-evaluation-harness cuts it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "choices.bin"
        write_choices(examples, tokenizer, path, prefix, start)
        return score_choice_files(model, path, seq_len, batch_size, precision)


def read_continuations(path) -> list[dict]:
    """The examples of a JSON Lines file of single continuations, one per line: {"context": "text",
    "continuation": "text"} (lm-evaluation-harness's loglikelihood requests: the two joined as they
    are, no space put between), or {"text": "text"}, LAMBADA's rows, split as the harness's lambada
    tasks split them: the context the text before its last " ", the continuation " " and the last
    word. Returned as {"context", "continuation"}."""
    examples = []
    for number, row, line in data._jsonl_rows(path):
        context, continuation = row.get("context"), row.get("continuation")
        if context is None and continuation is None and isinstance(row.get("text"), str):
            words = row["text"].split(" ")
            context, continuation = " ".join(words[:-1]), " " + words[-1]
        if not (isinstance(context, str) and isinstance(continuation, str) and continuation):
            raise ValueError(f"{path}:{number}: expected {{\"context\": \"text\", \"continuation\": \"non-empty text\"}} "
                             f"or {{\"text\": \"text\"}} (LAMBADA's: its last word the continuation); the line starts "
                             f"{line.strip()[:80]!r}")
        examples.append({"context": context, "continuation": continuation})
    return examples


@torch.no_grad()
def score_continuations(model, tokenizer, examples: Sequence[dict], seq_len: int, batch_size: int = 8,
                        prefix: Sequence[int] = (), precision: str = "fp32", start: Sequence[int] | None = None) -> dict:
    """Each example's continuation scored after its context as lm-evaluation-harness scores a
    loglikelihood request (LAMBADA's): the log-probability of its tokens (split from the whole as
    choice_documents splits them, no space added) and whether each of them is the model's top
    token (greedy). Gives acc (the share whose continuation is greedy), its standard error,
    perplexity (exp of minus the mean log-probability: the harness's lambada perplexity), examples
    and logps. A context past seq_len + 1 tokens with its continuation is cut from the left, as the
    harness cuts it. One row per example, padded after its end (the causal attention never reads
    the padding), the output layer at the continuation's positions only."""
    from pyllm.train import autocast

    docs, masks = choice_documents([{"context": e["context"], "endings": [e["continuation"]]} for e in examples],
                                   tokenizer, prefix, start, delimiter="")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logps, greedy = [], []
    for i in range(0, len(docs), batch_size):
        group = [_harness_cut(doc, mask, seq_len, lambda: f"example {i + k + 1}: a continuation")
                 for k, (doc, mask) in enumerate(zip(docs[i:i + batch_size], masks[i:i + batch_size]))]
        T = max(len(d) for d, _ in group) - 1
        x = torch.zeros(len(group), T, dtype=torch.long)
        y = torch.full((len(group), T), -1, dtype=torch.long)
        for r, (doc, mask) in enumerate(group):
            x[r, :len(doc) - 1] = torch.from_numpy(doc[:-1])
            y[r, :len(doc) - 1] = torch.from_numpy(np.where(mask[1:] != 0, doc[1:], -1))
        with autocast(precision, device):
            cu = _row_documents(model, [len(d) - 1 for d, _ in group], T)
            hidden = model(x.to(device), y.to(device), None if cu is None else cu.to(device),
                           hidden=True)[1]  # (N, C): the targets, row by row
            logits = getattr(model, "module", model)._logits(hidden)
        token_logps = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)  # (N, V)
        targets = y[y != -1].to(device)
        picked = token_logps.gather(-1, targets[:, None])[:, 0].double().cpu()
        top = (token_logps.argmax(-1) == targets).cpu()
        at = 0
        for doc, mask in group:
            n = int(mask[1:].sum())
            logps.append(float(picked[at:at + n].sum()))
            greedy.append(bool(top[at:at + n].all()))
            at += n
    model.train(was_training)
    n = len(examples)
    acc = sum(greedy) / max(n, 1)
    return {"examples": n, "acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else None,
            "perplexity": _exp(-sum(logps) / max(n, 1)), "logps": np.array(logps), "greedy": greedy}


@torch.no_grad()
def text_loss(model, tokenizer, texts: Sequence[str], seq_len: int, batch_size: int = 8, prefix: Sequence[int] = (),
              precision: str = "fp32", start: Sequence[int] | None = None) -> dict:
    """The model's loss on texts, each tokenized alone after prefix (none: <|endoftext|>, or start,
    as the training documents were separated, so the text's first token is predicted too) and cut
    into windows of seq_len + 1 tokens, each token predicted once: non-overlapping windows, whose
    first token is not predicted, and a text's last, shorter one as a whole window ending at the
    text's end whose earlier targets are the window before's (lm-evaluation-harness's rolling
    loglikelihood: the last tokens had been predicted from the few before them alone): nats per
    predicted token, perplexity, bits per byte of the texts, the harness's byte and word perplexity,
    and the counts."""
    from pyllm.train import autocast

    device = next(model.parameters()).device
    windows = []  # (tokens, targets left unscored at its start: the window before predicted them)
    for text in texts:
        ids = [*(list(prefix) or _start_token(tokenizer, start)), *tokenizer.encode_ordinary(text)]
        for i in range(0, max(len(ids) - 1, 0), seq_len):
            if i and len(ids) - i < seq_len + 1:  # the last, shorter window: a whole window's context
                windows.append((ids[len(ids) - seq_len - 1:], i - (len(ids) - seq_len - 1)))
            else:
                windows.append((ids[i:i + seq_len + 1], 0))
    total, predicted = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        T = max(len(w) for w, _ in group) - 1
        x = torch.zeros(len(group), T, dtype=torch.long)
        y = torch.full((len(group), T), -1, dtype=torch.long)
        for r, (w, seen) in enumerate(group):
            x[r, :len(w) - 1], y[r, seen:len(w) - 1] = torch.tensor(w[:-1]), torch.tensor(w[1 + seen:])
        with autocast(precision, device):
            cu = _row_documents(model, [len(w) - 1 for w, _ in group], T)
            logps = model(x.to(device), y.to(device), None if cu is None else cu.to(device), per_token=True)[1]
        total -= float(logps.double().sum())
        predicted += int((y != -1).sum())
    model.train(was_training)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    # lm-evaluation-harness's words (count_words: re.split(r"\s+", text), a leading or trailing
    # space's empty piece counted too): word_perplexity, wikitext's headline number, comparable
    # across tokenizers as bits per byte is
    n_words = sum(len(re.split(r"\s+", t)) for t in texts)
    loss = total / max(predicted, 1)
    return {"loss": loss, "perplexity": _exp(loss), "bits_per_byte": total / (max(n_bytes, 1) * math.log(2)),
            "byte_perplexity": _exp(total / max(n_bytes, 1)), "word_perplexity": _exp(total / max(n_words, 1)),
            "tokens": predicted, "bytes": n_bytes, "words": n_words}
