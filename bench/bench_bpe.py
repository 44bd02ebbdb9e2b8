"""BPE tokenizer, ours vs tiktoken (same ranks, built in memory) vs HF tokenizers (when installed).

One process. Data: the Python standard library's .py files, shuffled with a fixed seed; the first
10 MB (--quick: 1 MB) are held out for encoding, the rest (--quick: 4 MB) trains a 32768-id
vocabulary (--quick: 8192) with the gpt4 (cl100k) pattern. Rows: training time (ours vs HF's
BpeTrainer), encoding MB/s on 1 thread and on all threads, whether the ids equal tiktoken's, and
1 MB of one repeated character (no spaces: one piece) against the per-byte time of normal text.
SentencePiece-style rows (with HF tokenizers installed): a byte-fallback BPE that HF trains on the
same training text, read by Tokenizer.from_hf in two forms (Llama 2's Prepend + Replace normalizer;
Mistral v0.3's Metaspace with prepend_scheme "first"; each encodes a whole text as one piece), ours
vs HF's encode on the held-out files, ids compared with HF's.
HF tokenizers slows down in a process that already ran large encodes, so the encoders run
interleaved, round by round, and the median is taken; HF trains first.
"""
from __future__ import annotations

import glob
import os
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pyllm.tokenizer import Tokenizer  # noqa: E402
from pyllm.tokenizer.patterns import GPT4  # noqa: E402


def stdlib_split(held_out_bytes: int, train_bytes: int | None):
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True) if "site-packages" not in f)
    random.Random(0).shuffle(files)
    held, train, size = [], [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if size < held_out_bytes:
            held.append(text)
            size += len(text.encode())
        elif train_bytes is None or sum(map(len, train)) < train_bytes:
            train.append(text)
    return held, train


def hf_tokenizer(tok: Tokenizer):
    """HF tokenizers with our vocabulary: byte-level BPE, merges in rank order of the merged token."""
    try:
        from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return None
    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()  # not ordered; rebuild GPT-2's table
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {b: chr(c) for b, c in zip(bs, cs)}
    assert set(table.values()) == set(byte_to_unicode)
    as_str = lambda b: "".join(table[x] for x in b)  # noqa: E731
    ranks = tok.mergeable_ranks
    vocab = {as_str(b): r for b, r in ranks.items()}
    merges = []
    for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(b) < 2:
            continue
        splits = [(ranks[b[:k]], ranks[b[k:]]) for k in range(1, len(b)) if b[:k] in ranks and b[k:] in ranks]
        for left, right in sorted(s for s in splits if max(s) < r):
            merges.append((r, left, right))
    merges.sort()
    inv = {r: b for b, r in ranks.items()}
    model = models.BPE(vocab=vocab, merges=[(as_str(inv[a]), as_str(inv[b])) for _, a, b in merges])
    hf = HFTokenizer(model)
    # Oniguruma reads \p{N}{1,3}+ as a repetition, not a possessive quantifier: drop that '+'.
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def hf_train_seconds(texts, vocab_size: int):
    try:
        from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    except ImportError:
        return None
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.perf_counter()
    hf.train_from_iterator(texts, trainer=trainer)
    return time.perf_counter() - t0


class _unpack:
    """Compares equal to a list of id lists without building one inside the timed call."""

    def __init__(self, ids, offsets):
        self.ids, self.offsets = ids, offsets

    def __eq__(self, lists):
        return len(lists) + 1 == len(self.offsets) and all(
            self.ids[self.offsets[k]:self.offsets[k + 1]].tolist() == x for k, x in enumerate(lists))


def sentencepiece_rows(train, held, held_bytes, vocab_size, n_threads, repeat) -> list[dict]:
    try:
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    except ImportError:
        return []
    import json
    import tempfile

    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    hf.train_from_iterator([line for t in train for line in t.splitlines() if line.strip()], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)],
        limit_alphabet=1000, show_progress=False))
    base = json.loads(hf.to_str())
    base["added_tokens"] = [t for t in base["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    forms = {
        "llama2": dict(normalizer={"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}, pre_tokenizer=None),
        "mistral-v0.3": dict(normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": "\u2581",
                                                             "prepend_scheme": "first", "split": False}),
    }
    rows = []
    for form, change in forms.items():
        data = {**base, **change}
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "tokenizer.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f)
            ours, theirs = Tokenizer.from_hf(path), HFTokenizer.from_file(path)
        reference = [e.ids for e in theirs.encode_batch(held, add_special_tokens=False)]
        # HF always splits its added tokens out of the text (the held-out source has a literal
        # "<unk>"): ours with allowed_special="all" is the same rule.
        impls = {("pyllm", 1): lambda: [ours.encode(t, allowed_special="all") for t in held],
                 ("hf tokenizers", 1): lambda: [theirs.encode(t, add_special_tokens=False).ids for t in held],
                 ("pyllm", n_threads): lambda: ours.encode_batch(held, num_threads=n_threads, allowed_special="all"),
                 ("hf tokenizers", n_threads): lambda: [e.ids for e in theirs.encode_batch(held, add_special_tokens=False)]}
        times = {k: [] for k in impls}
        identical = {}
        for _ in range(repeat):
            for key, fn in impls.items():
                t0 = time.perf_counter()
                out = fn()
                times[key].append(time.perf_counter() - t0)
                identical[key] = out == reference
        for (name, th), ts in times.items():
            s = common.timing(ts)
            peer = statistics.median(times[("hf tokenizers", th)])
            rows.append({"task": f"encode sentencepiece-style ({form})", "impl": name, "threads": th, "s": round(s, 3),
                         "MB/s": round(held_bytes / 1e6 / s, 1), "vs peer": f"{peer / s:.2f}x HF",
                         "ids == HF": identical[(name, th)], **common.spread(s)})
    return rows


def main() -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if common.peer_module("tiktoken", "bench_bpe", "tiktoken is not installed; nothing to compare with") is None:
        return 0  # (the encoder's timings are read against tiktoken's, and its ids checked against them)
    quick = args.quick
    held, train = stdlib_split(1 << 20 if quick else 10 << 20, 4 << 20 if quick else None)
    vocab_size = 8192 if quick else 32768
    n_threads = len(os.sched_getaffinity(0))
    held_bytes = sum(len(t.encode()) for t in held)
    train_bytes = sum(len(t.encode()) for t in train)
    print(f"# bpe on {common.device_description('cpu')}: vocab {vocab_size}, gpt4 pattern, train "
          f"{train_bytes / 1e6:.1f} MB, held-out {held_bytes / 1e6:.1f} MB in {len(held)} files, {n_threads} threads")

    rows = []
    hf_train = hf_train_seconds(train, vocab_size)  # first: before any large encode in this process
    if hf_train is None:
        print("# skipped: tokenizers not installed: no HF rows (training, encoding, sentencepiece-style)")
    t0 = time.perf_counter()
    tok = Tokenizer.train(train, vocab_size, pattern="gpt4", show_progress=False)
    ours_train = time.perf_counter() - t0
    rows.append({"task": "train", "impl": "pyllm", "threads": n_threads, "s": round(ours_train, 2),
                 "MB/s": round(train_bytes / 1e6 / ours_train, 1),
                 "vs peer": f"{hf_train / ours_train:.2f}x HF" if hf_train else ""})
    if hf_train:
        rows.append({"task": "train", "impl": "hf tokenizers", "threads": n_threads, "s": round(hf_train, 2),
                     "MB/s": round(train_bytes / 1e6 / hf_train, 1)})

    enc = tok.to_tiktoken("bench")
    hf = hf_tokenizer(tok)
    reference = [enc.encode_ordinary(t) for t in held]
    impls = {
        ("pyllm", 1): lambda: [tok.encode_ordinary(t) for t in held],
        ("tiktoken", 1): lambda: [enc.encode_ordinary(t) for t in held],
        ("pyllm", n_threads): lambda: tok.encode_ordinary_batch(held, num_threads=n_threads),
        ("tiktoken", n_threads): lambda: enc.encode_ordinary_batch(held, num_threads=n_threads),
        # Same ids as numpy (ids, offsets): no Python int per token.
        ("pyllm packed", n_threads): lambda: _unpack(*tok.encode_batch_packed(held, num_threads=n_threads,
                                                                             disallowed_special=())),
    }
    if hf is not None:
        impls[("hf tokenizers", 1)] = lambda: [e.ids for e in map(hf.encode, held)]
        impls[("hf tokenizers", n_threads)] = lambda: [e.ids for e in hf.encode_batch(held)]
    cuda_kernel_ms = []
    if args.device == "cuda":
        from pyllm.ops import _util

        if _util.cuda_usable():
            def cuda_encode():
                out = tok.encode_batch(held, num_threads=n_threads, device="cuda")
                cuda_kernel_ms.append(tok._cuda_encoder[1].last_kernel_ms())
                return out

            impls[("pyllm cuda", n_threads)] = cuda_encode
    times = {k: [] for k in impls}
    identical = {}
    for _ in range(args.repeat):  # interleaved rounds
        for key, fn in impls.items():
            t0 = time.perf_counter()
            out = fn()
            times[key].append(time.perf_counter() - t0)
            identical[key] = out == reference
    base = {th: statistics.median(times[("tiktoken", th)]) for th in {1, n_threads}}
    for (name, th), ts in times.items():
        s = common.timing(ts)
        rows.append({"task": "encode", "impl": name, "threads": th, "s": round(s, 3),
                     "MB/s": round(held_bytes / 1e6 / s, 1), "vs peer": f"{base[th] / s:.2f}x tiktoken",
                     "ids == tiktoken": identical[(name, th)], **common.spread(s)})

    if cuda_kernel_ms:
        ms = statistics.median(cuda_kernel_ms)
        rows.append({"task": "encode, GPU kernels only", "impl": "pyllm cuda", "threads": "",
                     "s": round(ms / 1e3, 4), "MB/s": round(held_bytes / 1e3 / ms, 1)})
        base_cpu = statistics.median(times[("pyllm", n_threads)])
        for r in rows:
            if r["impl"] == "pyllm cuda" and r["task"] == "encode":
                r["vs peer"] += f", {base_cpu / statistics.median(times[('pyllm cuda', n_threads)]):.2f}x pyllm CPU"

    # One piece of 1 MB: per-byte cost against the per-byte cost of normal text (1 thread).
    normal_s_per_byte = statistics.median(times[("pyllm", 1)]) / held_bytes
    long_text = "a" * (1 << 20)
    for name, fn in (("pyllm", tok.encode_ordinary), ("tiktoken", enc.encode_ordinary)):
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn(long_text)
            ts.append(time.perf_counter() - t0)
        s = common.timing(ts)
        ref_normal = normal_s_per_byte if name == "pyllm" else statistics.median(times[("tiktoken", 1)]) / held_bytes
        rows.append({"task": "1 MB of 'a'", "impl": name, "threads": 1, "s": round(s, 3),
                     "MB/s": round(len(long_text) / 1e6 / s, 1),
                     "vs peer": f"{s / len(long_text) / ref_normal:.2f}x own normal-text per-byte time",
                     "ids == tiktoken": out == enc.encode_ordinary(long_text) if name == "pyllm" else "",
                     **common.spread(s)})

    rows += sentencepiece_rows(train, held, held_bytes, vocab_size, n_threads, args.repeat)
    common.print_table(rows, ["task", "impl", "threads", "s", "MB/s", "vs peer", "ids == tiktoken", "ids == HF"])
    common.write_json(args.json, "bpe", "cpu", rows, {"vocab_size": vocab_size, "held_out_MB": held_bytes / 1e6,
                                                     "train_MB": train_bytes / 1e6})
    return 0


if __name__ == "__main__":
    sys.exit(main())
