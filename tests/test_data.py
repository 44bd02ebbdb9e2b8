"""Token files, prepare and the loader, with a byte-level stand-in for pyllm's tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyllm import data
from pyllm.tokenizer import Tokenizer
from pyllm.tokenizer.patterns import SAFE_CUTS, file_parts


class ByteTokenizer:
    """The tokenizer API prepare uses: bytes as ids, optionally <|endoftext|> = 256."""

    def __init__(self, with_eot=True, vocab_size=None):
        self.with_eot = with_eot
        self.vocab_size = vocab_size or 257

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def encode(self, text, allowed_special=frozenset()):
        if self.with_eot and text == data.EOT and data.EOT in allowed_special:
            return [256]
        return self.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=None):
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def make_docs(tmp_path, n):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.txt").write_text(f"document {i}\n" * (i + 1))
    (folder / ".hidden").write_text("never read")
    return folder


def test_prepare_by_document_round_trip(tmp_path):
    folder = make_docs(tmp_path, 40)
    stats = data.prepare([folder], ByteTokenizer(), tmp_path / "out", val_fraction=0.1, show_progress=False)
    train, val = data.open_tokens(tmp_path / "out/train.bin"), data.open_tokens(tmp_path / "out/val.bin")
    assert train.dtype == np.uint16 and stats["files"] == 40
    assert (stats["train_tokens"], stats["val_tokens"]) == (len(train), len(val))
    tok = ByteTokenizer()
    docs = [tok.decode(d) for d in np.split(np.asarray(train), np.flatnonzero(np.asarray(train) == 256) + 1) if len(d)]
    val_docs = [tok.decode(d) for d in np.split(np.asarray(val), np.flatnonzero(np.asarray(val) == 256) + 1) if len(d)]
    # every 10th file (9, 19, 29, 39) goes to val, the rest in order to train
    assert val_docs == [f"document {i}\n" * (i + 1) for i in (9, 19, 29, 39)]
    assert docs == [f"document {i}\n" * (i + 1) for i in range(40) if i % 10 != 9]
    assert "never read" not in "".join(docs)


def test_prepare_cuts_documents_at_a_literal_endoftext(tmp_path):
    # TinyStories' files: stories separated by "\n<|endoftext|>\n". The tokenizer trainer splits the
    # text there; prepare had encoded each separator as 13 bytes of text and the file as one document.
    stories = [f"Once upon a time {i} " * (i % 3 + 1) for i in range(20)]
    (tmp_path / "stories.txt").write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n")
    stats = data.prepare([tmp_path / "stories.txt"], ByteTokenizer(), tmp_path / "out", val_fraction=0.1,
                         show_progress=False)
    tok = ByteTokenizer()
    ids = [np.asarray(data.open_tokens(tmp_path / "out" / f"{split}.bin")) for split in ("train", "val")]
    docs = [[tok.decode(d) for d in np.split(t, np.flatnonzero(t == 256) + 1) if len(d)] for t in ids]
    assert stats["documents"] == 20  # (the trailing newline after the last separator is no document)
    pieces = [stories[0] + "\n"] + ["\n" + s + "\n" for s in stories[1:]]
    assert docs[1] == [pieces[9], pieces[19]] and docs[0] == [p for i, p in enumerate(pieces) if i % 10 != 9]
    assert all(b"<|endoftext|>" not in bytes(t[t < 256].astype(np.uint8)) for t in ids)
    data.prepare([tmp_path / "stories.txt"], ByteTokenizer(vocab_size=300), tmp_path / "own", val_fraction=0.1,
                 show_progress=False, doc_end=299)  # a model's own end: the text is the text
    own = np.concatenate([np.asarray(data.open_tokens(tmp_path / "own" / f"{split}.bin")) for split in ("train", "val")])
    assert b"<|endoftext|>" in bytes(own[own < 256].astype(np.uint8)) and (own == 299).sum() == 1  # (one document)


def test_prepare_with_a_models_document_markers(tmp_path):
    # As a Llama 3 checkpoint wants its documents: <|begin_of_text|> first, <|end_of_text|> last.
    folder = make_docs(tmp_path, 3)
    data.prepare([folder], ByteTokenizer(vocab_size=300), tmp_path / "out", val_fraction=0.1, show_progress=False,
                 doc_start=[298], doc_end=299)
    train = np.asarray(data.open_tokens(tmp_path / "out/train.bin")).tolist()
    framed = [t for i in range(3) for t in [298, *f"document {i}\n".encode() * (i + 1), 299]]
    assert train == framed[:len(train)] and len(train) > 50  # 3 files: val is the last tenth
    data.prepare([folder], ByteTokenizer(), tmp_path / "bare", val_fraction=0.1, show_progress=False, doc_end=None)
    assert 256 not in np.asarray(data.open_tokens(tmp_path / "bare/train.bin")).tolist()


def test_prepare_single_file_splits_by_position(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 1000)
    stats = data.prepare([tmp_path / "a.txt"], ByteTokenizer(with_eot=False), tmp_path / "out", 0.1, show_progress=False)
    assert (stats["train_tokens"], stats["val_tokens"]) == (900, 100)


def test_prepare_streams_and_keeps_the_old_files_when_it_fails(tmp_path):
    # prepare writes as it tokenizes (a corpus larger than memory); a failure part way (an id past
    # the vocabulary in the 30th file) leaves the folder's earlier token files as they were, no
    # temp files. The split by position moves the train file's tail, as many tokens as before.
    folder = make_docs(tmp_path, 40)
    data.prepare([folder], ByteTokenizer(), tmp_path / "out", val_fraction=0.1, show_progress=False)
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("train.bin", "val.bin")}

    class Overflowing(ByteTokenizer):
        def encode_batch(self, texts, num_threads=None):
            return [[300] if "document 30\n" in t else self.encode_ordinary(t) for t in texts]

    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 257\)"):
        data.prepare([folder], Overflowing(), tmp_path / "out", val_fraction=0.1, show_progress=False, batch_docs=4)
    assert {name: (tmp_path / "out" / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.bin", "val.bin"]
    (tmp_path / "one.txt").write_text("".join(chr(97 + i % 26) for i in range(5000)))
    stats = data.prepare([tmp_path / "one.txt"], ByteTokenizer(), tmp_path / "one", 0.25, show_progress=False)
    train, val = (np.asarray(data.open_tokens(tmp_path / f"one/{s}.bin")).tolist() for s in ("train", "val"))
    whole = [*(97 + i % 26 for i in range(5000)), 256]
    assert (stats["train_tokens"], stats["val_tokens"]) == (3751, 1250) and train + val == whole


def test_token_writer_appends_in_pieces():
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "t.bin"
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 70000, n) for n in (0, 5, 1, 1000)]
    with data.TokenWriter(path, 70000, doc_end=3) as writer:
        for piece in pieces:
            writer.append(piece)
    assert np.asarray(data.open_tokens(path)).tolist() == np.concatenate(pieces).tolist()
    assert data.read_header(path)["doc_end"] == 3 and data.open_tokens(path).dtype == np.uint32


def test_uint32_when_vocab_is_large(tmp_path):
    tokens = np.array([0, 70000, 5, 99999], dtype=np.int64)
    data.write_tokens(tmp_path / "t.bin", tokens, vocab_size=100000)
    got = data.open_tokens(tmp_path / "t.bin")
    assert got.dtype == np.uint32 and got.tolist() == tokens.tolist()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 100\)"):
        data.write_tokens(tmp_path / "u.bin", tokens, vocab_size=100)


def test_corrupt_and_truncated_files(tmp_path):
    data.write_tokens(tmp_path / "t.bin", np.arange(100), vocab_size=256)
    raw = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "trunc.bin").write_bytes(raw[:-3])
    with pytest.raises(data.TokenFileError, match="truncated or corrupt: header promises 100 tokens"):
        data.open_tokens(tmp_path / "trunc.bin")
    (tmp_path / "magic.bin").write_bytes(b"NOTATOKN" + raw[8:])
    with pytest.raises(data.TokenFileError, match="not a pyllm token file"):
        data.open_tokens(tmp_path / "magic.bin")
    (tmp_path / "short.bin").write_bytes(raw[:10])
    with pytest.raises(data.TokenFileError, match="not a pyllm token file"):
        data.open_tokens(tmp_path / "short.bin")
    with pytest.raises(data.TokenFileError, match="does not exist; run `pyllm prepare`"):
        data.open_tokens(tmp_path / "missing.bin")


def test_missing_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.prepare([tmp_path / "nope"], ByteTokenizer(), tmp_path / "out", show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no text files"):
        data.prepare([tmp_path / "empty"], ByteTokenizer(), tmp_path / "out", show_progress=False)


def test_stdlib_corpus_is_sorted_python():
    files = data.stdlib_corpus()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


def test_loader_windows_and_resumable_state(tmp_path):
    tokens = np.arange(1000) % 256
    data.write_tokens(tmp_path / "t.bin", tokens, vocab_size=256)
    loader = data.TokenLoader(tmp_path / "t.bin", batch_size=4, seq_len=16, seed=3)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x[:, :1] + torch.arange(16)) % 256, x)  # contiguous windows of the file
    state = loader.state_dict()
    after = [loader.next_batch() for _ in range(3)]
    fresh = data.TokenLoader(tmp_path / "t.bin", batch_size=4, seq_len=16, seed=99)
    fresh.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(after, [fresh.next_batch() for _ in range(3)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_ranks_split_the_global_batch(tmp_path):
    data.write_tokens(tmp_path / "t.bin", np.arange(5000) % 256, vocab_size=256)
    whole = data.TokenLoader(tmp_path / "t.bin", batch_size=6, seq_len=8, seed=1).next_batch()[0]
    parts = [data.TokenLoader(tmp_path / "t.bin", 3, 8, seed=1, rank=r, world_size=2).next_batch()[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_loader_too_few_tokens(tmp_path):
    data.write_tokens(tmp_path / "t.bin", np.arange(10), vocab_size=256)
    with pytest.raises(data.TokenFileError, match="fewer than one window"):
        data.TokenLoader(tmp_path / "t.bin", 2, 16)


def test_doc_mask_cuts_windows_after_each_document_end(tmp_path):
    # Documents of random lengths 1-12 ending in 256 (= <|endoftext|>): with doc_mask, cu_seqlens
    # holds every row start and every position right after a 256 inside a row.
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, 256, rng.integers(0, 12)), 256) for _ in range(400)]
    data.write_tokens(tmp_path / "t.bin", np.concatenate(docs), vocab_size=257, doc_end=256)
    assert data.read_header(tmp_path / "t.bin")["doc_end"] == 256
    plain = data.TokenLoader(tmp_path / "t.bin", 3, 16, seed=4)
    masked = data.TokenLoader(tmp_path / "t.bin", 3, 16, seed=4, doc_mask=True)
    for _ in range(5):
        x, y = plain.next_batch()
        xm, ym, cu = masked.next_batch()
        assert torch.equal(x, xm) and torch.equal(y, ym) and cu.dtype == torch.int32
        want = {0, 48} | {r * 16 for r in range(3)} | {r * 16 + t + 1 for r in range(3) for t in range(15) if x[r, t] == 256}
        assert cu.tolist() == sorted(want)
        assert masked.lengths == np.diff(sorted(want)).tolist() and plain.lengths is None  # for the FLOPs count


def test_doc_mask_needs_the_document_end_in_the_header(tmp_path):
    data.write_tokens(tmp_path / "t.bin", np.arange(100) % 256, vocab_size=256)
    assert data.read_header(tmp_path / "t.bin")["doc_end"] is None  # and so in files of earlier versions
    with pytest.raises(data.TokenFileError, match="records no end-of-document token"):
        data.TokenLoader(tmp_path / "t.bin", 2, 16, doc_mask=True)
    (tmp_path / "a.txt").write_text("hello\n" * 50)
    data.prepare([tmp_path / "a.txt"], ByteTokenizer(), tmp_path / "out", show_progress=False)
    assert data.read_header(tmp_path / "out" / "train.bin")["doc_end"] == 256  # prepare records <|endoftext|>


def write_llmc(path, tokens, magic=20240520, version=1, dtype=np.uint16):
    """One of llm.c's token files: 256 int32 (magic, version, count, zeros), then the tokens."""
    header = np.zeros(256, np.int32)
    header[:3] = magic, version, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype).tobytes())


def test_llmc_token_files_and_their_shards(tmp_path):
    # llm.c's header is 1 KB of int32: read as nanoGPT's bare uint16 it gave 512 garbage tokens first
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 50257, n) for n in (700, 300, 500)]
    for i, shard in enumerate(shards):
        write_llmc(tmp_path / f"fineweb_train_{i + 1:06d}.bin", shard)
    write_llmc(tmp_path / "fineweb_val_000000.bin", shards[0][:200])
    llama = tmp_path / "llama"
    llama.mkdir()
    write_llmc(llama / "train.bin", [128000, 5, 128255, 7], magic=20240801, version=7, dtype=np.uint32)
    (tmp_path / "hellaswag_val.bin").write_bytes(np.array([20240522, 1, 3], np.int32).tobytes())  # not tokens
    assert data.split_files(tmp_path, "train") == [tmp_path / f"fineweb_train_{i:06d}.bin" for i in (1, 2, 3)]
    assert data.split_files(tmp_path, "val") == [tmp_path / "fineweb_val_000000.bin"]
    header = data.read_header(tmp_path / "train.bin")  # the split, standing for its shards
    assert (header["count"], header["vocab_size"], header["doc_end"]) == (1500, 50257, 50256)
    tokens = data.open_tokens(tmp_path / "train.bin")
    whole = np.concatenate(shards)
    assert len(tokens) == 1500 and np.array_equal(tokens[650:1100], whole[650:1100])  # across two shards' ends
    assert np.array_equal(tokens[0:1500], whole) and len(tokens[5:5]) == 0
    assert np.array_equal(data.open_tokens(tmp_path / "fineweb_train_000002.bin"), shards[1])
    assert np.array_equal(data.open_tokens(llama / "train.bin"), [128000, 5, 128255, 7])
    assert data.read_header(llama / "train.bin")["vocab_size"] == 128256
    loader = data.TokenLoader(tmp_path / "train.bin", 4, 64, seed=0)
    for _ in range(20):
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])
    with open(tmp_path / "fineweb_train_000002.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(data.TokenFileError, match="llm.c header promises 300 tokens"):
        data.read_header(tmp_path / "train.bin")
    with pytest.raises(ValueError, match="llm.c's token files are read from their folder"):
        data.collect_files([tmp_path / "fineweb_val_000000.bin"])


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    # nanoGPT's bare files say nothing of what wrote them: an id past meta.pkl's vocab_size would
    # index the embedding out of bounds, thousands of steps in
    import pickle

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 28, "itos": {}, "stoi": {}}))
    tokens = np.full(3000, 5, np.uint16)
    tokens[1234] = 40
    tokens.tofile(tmp_path / "train.bin")
    tokens[:500].tofile(tmp_path / "val.bin")
    with pytest.raises(data.TokenFileError, match="token 1234 is id 40, outside its vocabulary of 28"):
        data.TokenLoader(tmp_path / "train.bin", 2, 16)
    data.TokenLoader(tmp_path / "val.bin", 2, 16)  # its ids are fine
    data.check_ids(tokens, 28, "x", limit=100)  # past the limit: left to the batches
    data.write_tokens(tmp_path / "ours.bin", np.arange(300) % 50, 50)  # a header claiming fewer ids than used
    with open(tmp_path / "ours.bin", "r+b") as f:
        f.seek(24)
        f.write(np.uint32(30).tobytes())
    loader = data.TokenLoader(tmp_path / "ours.bin", 8, 16, seed=0)
    with pytest.raises(data.TokenFileError, match=r"is id (3|4)\d, outside the vocabulary of 30 ids"):
        for _ in range(10):
            loader.next_batch()


def test_the_loader_refuses_another_files_state(tmp_path):
    data.write_tokens(tmp_path / "a.bin", np.arange(500) % 7, 7)
    data.write_tokens(tmp_path / "b.bin", np.arange(400) % 7, 7)
    state = data.TokenLoader(tmp_path / "a.bin", 2, 8).state_dict()
    with pytest.raises(data.TokenFileError, match="holds 400 tokens, the checkpoint's data .* 500"):
        data.TokenLoader(tmp_path / "b.bin", 2, 8).load_state_dict(state)
    data.TokenLoader(tmp_path / "b.bin", 2, 8).load_state_dict({"rng": state["rng"], "path": "b"})  # older checkpoints


def test_prepare_reads_text_rows_and_leaves_no_stale_files(tmp_path):
    import json

    rows = tmp_path / "hf.jsonl"  # a Hugging Face dataset's export: one document per line
    texts = [f'Café {i} says "hi"\nsecond line' for i in range(25)]
    rows.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    out.mkdir()
    for split in ("train", "val"):  # left by an earlier prepare_chat into the same folder
        (out / f"{split}.docs.npy").write_bytes(b"stale")
        (out / f"{split}.mask.npy").write_bytes(b"stale")
    stats = data.prepare([rows], ByteTokenizer(), out, val_fraction=0.1, show_progress=False)
    assert stats["documents"] == 25 and stats["files"] == 1
    tok = ByteTokenizer()

    def documents(split):
        ids = np.asarray(data.open_tokens(out / f"{split}.bin"))
        return [tok.decode(d[:-1]) for d in np.split(ids, np.flatnonzero(ids == 256) + 1) if len(d)]

    assert documents("val") == [texts[i] for i in (9, 19)]
    assert documents("train") == [t for i, t in enumerate(texts) if i % 10 != 9]
    assert not list(out.glob("*.npy"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a \"text\" string"):
        data.prepare([tmp_path / "bad.jsonl"], ByteTokenizer(), out, show_progress=False)


def test_collect_files_as_text(tmp_path):
    folder = make_docs(tmp_path, 3)
    (folder / "tokenizer.bpe").write_text("pyllm's own")  # `prepare --out` into the text's folder
    (folder / "train.rows.jsonl").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "a.txt").write_text("a")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "b.txt").write_text("b")
    (folder / "link").symlink_to(tmp_path / "more")  # a linked folder is followed
    (tmp_path / "more" / "up").symlink_to(folder)  # and a loop ends
    files = data.collect_files([folder, folder / "001.txt", str(folder) + "/"])  # named again: once
    names = [str(p.relative_to(folder)) for p in files]
    assert names == ["000.txt", "001.txt", "002.txt", "link/b.txt", "sub/a.txt"]
    assert [p.name for p in data.collect_files([str(folder / "00*.txt")])] == ["000.txt", "001.txt", "002.txt"]
    assert [p.name for p in data.collect_files([str(folder / "su*")])] == ["a.txt"]  # a folder matched: its files
    again = data.collect_files([folder / "002.txt", folder / "000.txt", folder / "002.txt"])
    assert [p.name for p in again] == ["002.txt", "000.txt"]  # each at its first naming
    (folder / "sub" / "run.json").write_text("{}")  # a corpus's own: only beside pyllm's outputs is it pyllm's
    assert "run.json" in [p.name for p in data.collect_files([folder / "sub"])]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        data.collect_files([str(folder / "*.md")])
    # CRLF kept as on disk (the tokenizer's trainer reads the bytes); other encodings warned of
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb")
    (tmp_path / "latin.txt").write_bytes("café".encode("cp1252"))
    with pytest.warns(UserWarning, match=r"latin.txt is not UTF-8 \(byte 3: b'\\xe9'\): 1 bytes"):
        texts = list(data.read_documents([tmp_path / "crlf.txt", tmp_path / "latin.txt"]))
    assert texts == ["a\r\nb", "caf\ufffd"]
    # the bytes counted, not the U+FFFD they became (a cut 3-byte sequence is one), nor a U+FFFD in the file
    (tmp_path / "cut.txt").write_bytes("\ufffd x ".encode() + b"\xe2\x82 y \xff")
    with pytest.warns(UserWarning, match=r"cut.txt is not UTF-8 \(byte 6: b'\\xe2'\): 3 bytes read as U\+FFFD"):
        assert list(data.read_documents([tmp_path / "cut.txt"])) == ["\ufffd x \ufffd y \ufffd"]


def test_doc_mask_on_nanogpts_gpt2_files(tmp_path):
    # nanoGPT's GPT-2 token files (no meta.pkl) end each document with <|endoftext|>, 50256: the
    # document mask cuts there (it had been refused, "prepare it again", which a user cannot)
    tokens = np.random.default_rng(0).integers(0, 50256, 2000).astype(np.uint16)
    tokens[[100, 700, 1500]] = 50256
    tokens.tofile(tmp_path / "train.bin")
    tokens[:600].tofile(tmp_path / "val.bin")
    assert data.read_header(tmp_path / "train.bin")["doc_end"] == 50256
    loader = data.TokenLoader(tmp_path / "train.bin", 4, 256, seed=0, doc_mask=True)
    x, y, cu = loader.next_batch()
    ends = (x.flatten()[:-1] == 50256).nonzero()[:, 0] + 1
    assert set(ends.tolist()) <= set(cu.tolist())


def test_token_writer_refuses_what_it_would_store_wrong(tmp_path):
    # float ids were truncated, 2-D arrays flattened, a doc_end past the vocabulary stored (doc_mask
    # never found it), a bad vocab_size only failed at close, after every token was written
    for tokens in (np.array([1.7, 2.2]), np.array([True, False]), np.array([[1, 2], [3, 4]])):
        with pytest.raises(ValueError, match="1-D array of int ids"):
            data.write_tokens(tmp_path / "t.bin", tokens, vocab_size=10)
    for kwargs, match in ((dict(vocab_size=10, doc_end=10), "doc_end"), (dict(vocab_size=10, doc_end=-1), "doc_end"),
                          (dict(vocab_size=0), "vocab_size"), (dict(vocab_size=2 ** 32), "vocab_size"),
                          (dict(vocab_size=10.0), "vocab_size")):
        with pytest.raises(ValueError, match=match):
            data.write_tokens(tmp_path / "t.bin", np.array([1, 2]), **kwargs)
    assert not list(tmp_path.iterdir())


def test_loaders_refuse_a_batch_or_rank_they_cannot_take(tmp_path):
    # a rank past the world had taken no rows (a batch with cu_seqlens [0]); a batch of 0 rows
    # failed deep in numpy
    data.write_tokens(tmp_path / "t.bin", np.arange(100) % 7, vocab_size=7)
    for kwargs, match in ((dict(batch_size=0), "batch_size"), (dict(seq_len=-1), "seq_len"),
                          (dict(rank=2, world_size=2), "rank"), (dict(world_size=0), "world_size"),
                          (dict(rank=-1), "rank"), (dict(batch_size=2.5), "batch_size")):
        with pytest.raises(ValueError, match=match):
            data.TokenLoader(tmp_path / "t.bin", **{"batch_size": 2, "seq_len": 8, **kwargs})
        with pytest.raises(ValueError, match=match):
            data.PackedLoader(tmp_path / "t.bin", **{"batch_size": 2, "seq_len": 8, **kwargs})


def test_packed_loader_counts_what_it_trains_on(tmp_path):
    # a mask value other than 0 / 1 (2: a hand-made mask) had been counted as trained while its
    # target came out -1: the loss's weights and the targets disagreed
    docs = [np.arange(1, 9), np.arange(2, 12)]
    masks = [np.array([0, 0, 2, 2, 1, 1, 0, 2], np.uint8), np.array([0, 1, 2, 0, 0, 1, 1, 1, 2, 2], np.uint8)]
    data.write_documents(tmp_path / "c.bin", docs, masks, vocab_size=16)
    loader = data.PackedLoader(tmp_path / "c.bin", 2, 12, shuffle=False)
    x, y, cu = loader.next_batch()
    assert loader.targets == int((y != -1).sum()) > 0


def test_document_sets_are_whole_and_their_loader_states_their_own(tmp_path):
    # From an audit of the data API (2026-12-06): a PackedLoader state of another set had given
    # all-padding batches forever (or an IndexError); a failed write_documents over an earlier set
    # had left its tokens beside the new offsets, taken as a set; masks of other lengths than their
    # documents and empty documents had been written.
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 16, n) for n in rng.integers(2, 9, 50)]
    masks = [np.ones(len(d), np.uint8) for d in docs]
    data.write_documents(tmp_path / "big.bin", docs, masks, vocab_size=16)
    data.write_documents(tmp_path / "small.bin", docs[:10], masks[:10], vocab_size=16)
    big = data.PackedLoader(tmp_path / "big.bin", 2, 12)
    for _ in range(5):
        big.next_batch()
    small = data.PackedLoader(tmp_path / "small.bin", 2, 12)
    with pytest.raises(data.TokenFileError, match="holds 10 documents of .* the state's data .* 50 of"):
        small.load_state_dict(big.state_dict())
    again = data.PackedLoader(tmp_path / "big.bin", 2, 12)
    again.load_state_dict(big.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), big.next_batch()))
    for bad_docs, bad_masks, match in (([np.array([1, 2, 3]), np.array([4])], [np.ones(2), np.ones(2)], "document 0 has 3"),
                                       ([np.array([1, 2]), np.array([], np.int64)], [np.ones(2), np.ones(0)], "document 1 has 0"),
                                       ([], [], "at least one document")):
        with pytest.raises(ValueError, match=match):
            data.write_documents(tmp_path / "small.bin", bad_docs, bad_masks, vocab_size=16)
    with pytest.raises(ValueError):  # an id past the vocabulary, over the earlier set: no set left half new
        data.write_documents(tmp_path / "small.bin", [np.array([1, 99])] * 5, [np.ones(2, np.uint8)] * 5, vocab_size=16)
    assert not (tmp_path / "small.bin").exists()
    with pytest.raises(data.TokenFileError, match="is a folder, not a token file"):
        data.open_tokens(tmp_path)
    # llm.c's shards as one sequence: single tokens and np.asarray too, as a memmap takes them
    shards = tmp_path / "llmc"
    shards.mkdir()
    tokens = rng.integers(0, 50257, 30).astype(np.uint16)
    for name, part in (("x_train_000000.bin", tokens[:12]), ("x_train_000001.bin", tokens[12:])):
        header = np.zeros(256, np.int32)
        header[:3] = 20240520, 1, len(part)
        (shards / name).write_bytes(header.tobytes() + part.tobytes())
    joined = data.open_tokens(shards / "train.bin")
    assert isinstance(joined, data.ShardedTokens) and np.array_equal(np.asarray(joined), tokens)
    assert joined[12] == tokens[12] and joined[-1] == tokens[-1] and np.array_equal(joined[10:14], tokens[10:14])


def test_token_loader_batches_are_contiguous(tmp_path):
    # as nanoGPT's get_batch stacks them: a user's model that views its targets with view(-1) takes them
    data.write_tokens(tmp_path / "t.bin", np.arange(200) % 7, vocab_size=7, doc_end=6)
    for doc_mask in (False, True):
        batch = data.TokenLoader(tmp_path / "t.bin", 3, 8, doc_mask=doc_mask).next_batch()
        assert all(t.is_contiguous() for t in batch[:2]) and torch.equal(batch[0][:, 1:], batch[1][:, :-1])
        batch[1].view(-1)


def test_a_killed_writers_temp_files_are_removed_by_the_next_one(tmp_path):
    # new_temp_file's names are unpredictable (never a planted link), so a writer killed mid-file leaves
    # one each time: the next TokenWriter of that file removes those nothing has written for 10 minutes.
    import os
    import time

    stale, fresh = tmp_path / ".train.bin.abc.tmp", tmp_path / ".train.bin.def.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    data.write_tokens(tmp_path / "train.bin", np.array([1, 2, 3]), vocab_size=10)
    assert not stale.exists() and fresh.exists() and (tmp_path / "train.bin").is_file()
    link = tmp_path / "victim.txt"
    link.write_text("keep")
    data.write_whole(tmp_path / "t.docs.npy", np.arange(3))
    (tmp_path / "t.mask.npy").symlink_to(link)  # a planted link is replaced, not written through
    data.write_whole(tmp_path / "t.mask.npy", np.zeros(3, np.uint8))
    assert link.read_text() == "keep" and np.load(tmp_path / "t.mask.npy").tolist() == [0, 0, 0]


def test_hf_to_json_export_is_rows(tmp_path):
    # datasets.Dataset.to_json("x.json") writes JSON Lines of {"text": ...}: one document per row (a .json
    # had been read as one raw text, braces and keys too; from the data audit)
    tok = Tokenizer.train(["story number %d." % i for i in range(50)], 300, special_tokens=["<|endoftext|>"],
                          show_progress=False)
    (tmp_path / "x.json").write_text("".join(json.dumps({"text": f"story number {i}."}) + "\n" for i in range(10)))
    st = data.prepare([tmp_path / "x.json"], tok, tmp_path / "out", 0.5, show_progress=False)
    assert st["documents"] == 10
    ids = np.asarray(data.open_tokens(tmp_path / "out" / "train.bin")).tolist()
    assert tok.decode(ids).startswith("story number 0.<|endoftext|>")


def test_other_json_stays_text(tmp_path):
    # a .json whose first row has no "text" (a package.json in a corpus folder) is text, not refused
    (tmp_path / "package.json").write_text('{"name": "x", "version": "1"}\n')
    assert list(data.read_documents([tmp_path / "package.json"])) == ['{"name": "x", "version": "1"}\n']


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_files_are_rows(tmp_path, indent):
    # pandas' / datasets' to_json(lines=False) and many datasets' *.json files hold one JSON array of
    # rows: its documents and conversations are read as JSON Lines' are (they had been tokenized as one
    # raw text, brackets, keys and all, or refused on line 1)
    docs = [{"text": f"story number {i}, é."} for i in range(6)]
    (tmp_path / "x.json").write_text(json.dumps(docs, indent=indent, ensure_ascii=False), encoding="utf-8")
    assert data.is_text_rows(tmp_path / "x.json")
    assert list(data.read_documents([tmp_path / "x.json"])) == [d["text"] for d in docs]
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(3)]
    (tmp_path / "c.json").write_text("\ufeff" + json.dumps(chats, indent=indent), encoding="utf-8")
    assert data.is_chat_data([tmp_path / "c.json"])
    assert [e["messages"] for e in data.read_conversations(tmp_path / "c.json")] == [c["messages"] for c in chats]
    (tmp_path / "bad.json").write_text(json.dumps([{"text": "a"}, "b"]))
    with pytest.raises(ValueError, match=r"bad.json:row 2: a JSON str, not an object"):
        list(data.read_documents([tmp_path / "bad.json"]))
    (tmp_path / "words.json").write_text('["a", "b"]')  # (no rows: text, as any other .json)
    assert list(data.read_documents([tmp_path / "words.json"])) == ['["a", "b"]']


def test_first_row_keys_of_arrays_reads_the_first_row_only(tmp_path):
    # is_chat_data and its kin ask for each file's first row's keys several times: a JSON array's had
    # been read and decoded whole each time (a 123 MB file: 0.5 s and 368 MB a call). Here a file whose
    # rest is no JSON at all gives its first row's keys. (From the review of 73b8b5b.)
    cases = {"a.json": "\ufeff  [\n " + json.dumps({"prompt": "p" * 100_000, "completion": "c"}) + ",\n" + "{broken",
             "b.jsonl": "\ufeff" + json.dumps({"text": "a\u2028b"}) + "\n" + json.dumps({"text": "c"}) + "\n",
             "c.json": "[]", "d.json": '["a", "b"]', "e.json": '{\n "data": []\n}', "f.json": "[{\"a\": 1"}
    want = {"a.json": {"prompt", "completion"}, "b.jsonl": {"text"}, "c.json": set(), "d.json": set(), "e.json": set(),
            "f.json": set()}
    for name, text in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert data._first_row_keys(tmp_path / name) == want[name], name


@pytest.mark.parametrize("part_bytes", [1 << 30, 1 << 16])
def test_one_large_file_prepares_without_a_python_int_per_token(tmp_path, monkeypatch, part_bytes):
    # A file is one document: its ids had been a Python int each, listed twice, then an int64 array,
    # beside the file's bytes and text (a 200 MB file took 2.9 GB; 1.8 GB since, encoded whole; the
    # data-scale audit, 2026-12-06). pyllm's tokenizer gives them as one numpy array, and since
    # 2026-12-07 a file larger than data.PART_BYTES is read and encoded in parts (~0.5 MB here).
    import tracemalloc

    monkeypatch.setattr(data, "PART_BYTES", part_bytes)

    text = "".join(f"def f{i}(x):\n    return x * {i} + 'caf\u00e9'\n" for i in range(100_000))  # ~3.8 MB
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer.train([text[:100_000]], 400, special_tokens=("<|endoftext|>",), show_progress=False)
    tracemalloc.start()
    data.prepare([tmp_path / "big.txt"], tok, tmp_path / "out", show_progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = len(text.encode())
    assert peak < (6 * size if part_bytes > size else size / 4), f"peak {peak / 1e6:.1f} MB for {size / 1e6:.1f} MB"
    ids = np.concatenate([data.open_tokens(tmp_path / "out" / f"{s}.bin") for s in ("train", "val")])
    assert ids.tolist() == tok.encode_ordinary(text) + [tok.encode("<|endoftext|>", allowed_special="all")[0]]


def test_examples_prepare_without_holding_them(tmp_path):
    # prepare_chat (and prepare_preferences, prepare_kto) read the lines twice, to check and count
    # them, then to tokenize and write them a batch at a time: every example's dict, ids and mask
    # had been held to the end (~14x the JSON Lines' size; 23x here).
    import tracemalloc

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i} and so on"}) + "\n"
                            for i in range(30_000)))  # ~2.2 MB
    tracemalloc.start()
    stats = data.prepare_chat([path], ByteTokenizer(), None, tmp_path / "out", show_progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < path.stat().st_size, f"peak {peak / 1e6:.1f} MB for a {path.stat().st_size / 1e6:.1f} MB file"
    assert stats["train_conversations"] + stats["val_conversations"] == 30_000


CUT_ALPHABET = list("  \t\n\n\n\r'sStTaZ09.,/-_<|>!") + [
    "é", "中", "。", "\u00a0", "\u3000", "\x85", "\u2028", "\u0301", "\u1680", "\u202f", "\u205f", "\u200b", "٣", "Ⅻ",
    "😀", "<|endoftext|>"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(st.sampled_from(CUT_ALPHABET), max_size=60).map("".join))
def test_safe_cuts_keep_every_built_in_patterns_pieces(text):
    # prepare and the tokenizer trainer read a large file in parts cut at SAFE_CUTS (the C++ encoder's
    # long-text cut, and after CRLF for cl100k's and o200k's): each built-in pattern must split the
    # parts into the whole's pieces, so that their ids (and counted pieces) are the whole's.
    import regex

    from pyllm.tokenizer.patterns import PATTERNS

    raw = text.encode("utf-8")
    for name, (pattern, _) in PATTERNS.items():
        cuts = [len(raw[:m.start()].decode("utf-8")) for m in SAFE_CUTS[name].finditer(raw)]
        parts = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert [p for part in parts for p in regex.findall(pattern, part)] == regex.findall(pattern, text), name


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "gpt4o"])
def test_a_large_file_prepares_in_parts_to_the_ids_of_the_whole(tmp_path, monkeypatch, pattern):
    # A file larger than data.PART_BYTES is read and encoded in parts (one large file had been held
    # whole, ~9x its size): the token files are those of the whole, separators and non-UTF-8 bytes too.
    import random

    rng = random.Random(0)
    words = ["Once", "upon", "a", "time", "caf\u00e9", "\u4e2d\u6587", "x = 1;", "  indented", "\r\n", "\n", "\n\n",
             "<|endoftext|>", "\n<|endoftext|>\n", "...", "\u00a0", "42"]
    text = "".join(rng.choice(words) + rng.choice([" ", "\n", ""]) for _ in range(6000))
    (tmp_path / "big.txt").write_bytes(text.encode() + b"\nbad \xff byte\nend")
    (tmp_path / "one_line.txt").write_text("no newline before a letter " * 50)
    (tmp_path / "small.txt").write_text("small\n")
    (tmp_path / "crlf.txt").write_bytes(b"Line of text.\r\n" * 100)
    (tmp_path / "cjk.txt").write_text("\u4e00\u4e2a\u53e5\u5b50\u3002\n" * 200 + "\u3000\n\u3000x\n\u00a0y\n")
    tok = Tokenizer.train([text], 400, pattern=pattern, special_tokens=("<|endoftext|>",), show_progress=False)
    out = {}
    for part_bytes in (1 << 30, 300):
        monkeypatch.setattr(data, "PART_BYTES", part_bytes)
        with pytest.warns(UserWarning, match="1 file"):
            stats = data.prepare([tmp_path], tok, tmp_path / str(part_bytes), val_fraction=0.1, show_progress=False)
        out[part_bytes] = stats, [(tmp_path / str(part_bytes) / f"{s}.bin").read_bytes() for s in ("train", "val")]
    assert out[300] == out[1 << 30] and out[300][0]["documents"] > 100
    # A token matched in ordinary text (Hugging Face's non-special added tokens) with a newline in it
    # could be split by a cut: such a tokenizer, a normalizing one and a custom pattern take files whole
    matched = Tokenizer(tok.mergeable_ranks, pattern, {"<|endoftext|>": 400, "\nOnce": 401}, matched=["\nOnce"])
    custom = Tokenizer(tok.mergeable_ranks, f"(?:{tok.pattern})", {"<|endoftext|>": 400})
    nfc = Tokenizer(tok.mergeable_ranks, pattern, {"<|endoftext|>": 400}, normalization="NFC")
    assert tok.encodes_in_parts() and not any(t.encodes_in_parts() for t in (matched, custom, nfc))
    for other in (matched, custom, nfc):
        for part_bytes in (1 << 30, 300):
            monkeypatch.setattr(data, "PART_BYTES", part_bytes)
            with pytest.warns(UserWarning, match="1 file"):
                data.prepare([tmp_path], other, tmp_path / f"o{part_bytes}", val_fraction=0.1, show_progress=False)
        assert all((tmp_path / f"o300/{s}.bin").read_bytes() == (tmp_path / f"o{1 << 30}/{s}.bin").read_bytes()
                   for s in ("train", "val"))
    parts = [p for p, _ in file_parts(tmp_path / "big.txt", 300, pattern)]
    whole = (tmp_path / "big.txt").read_bytes()
    assert b"".join(parts) == whole and len(parts) > 100
    assert all(SAFE_CUTS[pattern].match(whole, cut) for cut in np.cumsum([len(p) for p in parts[:-1]]).tolist())
    assert len(list(file_parts(tmp_path / "one_line.txt", 300, pattern))) == 1  # (no cut: whole)
    crlf = [p for p, _ in file_parts(tmp_path / "crlf.txt", 300, pattern)]  # Project Gutenberg's line ends
    assert (len(crlf) == 1) == (pattern == "gpt2") and b"".join(crlf) == (tmp_path / "crlf.txt").read_bytes()
    assert len(list(file_parts(tmp_path / "cjk.txt", 300, pattern))) > 5  # (a Chinese line after "\u3002\n")


def test_file_parts_take_no_cut_before_a_character_a_read_split(tmp_path):
    # A read ending inside a U+3000 that follows a newline: the cut's lookahead (no white space next)
    # must see the whole character, else GPT-2's "\n\u3000" piece is split (different ids; helper audit).
    import regex

    from pyllm.tokenizer.patterns import GPT2

    text = b"x" * 58 + b"ok\nq\n" + "\u3000\u3000text\n".encode()
    assert text[62:65] == b"\n\xe3\x80"
    (tmp_path / "a.txt").write_bytes(text)
    parts = [b for b, _ in file_parts(tmp_path / "a.txt", 64, "gpt2")]
    pieces = regex.compile(GPT2)
    assert [p for b in parts for p in pieces.findall(b.decode())] == pieces.findall(text.decode())


def test_file_parts_search_each_byte_about_once(tmp_path, monkeypatch):
    # A file without a cut (one long line, or CRLF lines under GPT-2's pattern) had been copied and
    # searched whole again at every read: quadratic, 188 s for 300 MB where the whole took 15 s.
    from pyllm.tokenizer import patterns

    class Counting:
        def __init__(self, regex):
            self.regex, self.scanned = regex, 0

        def finditer(self, text, pos=0):
            self.scanned += len(text) - pos
            return self.regex.finditer(text, pos)

    counting = Counting(patterns.SAFE_CUTS["gpt2"])
    monkeypatch.setitem(patterns.SAFE_CUTS, "gpt2", counting)
    for name, text in (("line.txt", b"word " * 40_000), ("crlf.txt", b"Line of text.\r\n" * 15_000),
                       ("lines.txt", b"A line.\n" * 25_000)):
        (tmp_path / name).write_bytes(text)
        counting.scanned = 0
        parts = [b for b, _ in file_parts(tmp_path / name, 1 << 12, "gpt2")]
        assert b"".join(parts) == text and counting.scanned < 3 * len(text), (name, counting.scanned / len(text))
