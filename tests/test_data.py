"""Token files, prepare and the loader, with a byte-level stand-in for pyllm's tokenizer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pyllm import data


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
