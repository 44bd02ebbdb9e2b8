"""Token files and the batch loader.

A token file is a 64-byte header followed by the tokens, little-endian:

    offset 0   8 bytes  magic b"PYLLMTOK"
    offset 8   uint32   format version (1)
    offset 12  uint32   bytes per token (2: uint16, when the vocab fits; else 4: uint32)
    offset 16  uint64   number of tokens
    offset 24  uint32   vocab size of the tokenizer that wrote it
    offset 28  zeros up to 64

`prepare` writes train.bin and val.bin; `TokenLoader` samples (B, T+1) windows from a memmap with
its own seeded numpy generator, whose state goes into checkpoints.
"""
from __future__ import annotations

import os
import struct
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

MAGIC = b"PYLLMTOK"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQI")
EOT = "<|endoftext|>"


class TokenFileError(ValueError):
    """A token file that is missing, truncated, or not one of ours."""


# --- corpus --------------------------------------------------------------------------------------

def stdlib_corpus() -> list[Path]:
    """The interpreter's own standard-library *.py files, sorted: real text on every machine.
    Installed packages (site-packages, dist-packages) are left out: they differ per machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library folder {root}")
    return sorted(files)


def collect_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named in inputs; a folder stands for its files (recursively, sorted, hidden ones and
    binary-looking ones skipped)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            files += [p for p in found if b"\x00" not in p.read_bytes()[:1024]]
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist (give text files or folders of them)")
    if not files:
        raise FileNotFoundError(f"no text files found in {', '.join(map(str, inputs))}")
    return files


def read_texts(files: Iterable[Path]) -> Iterable[str]:
    for f in files:
        yield f.read_text(encoding="utf-8", errors="replace")


# --- token files ---------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_tokens(path, tokens: np.ndarray, vocab_size: int) -> None:
    """Writes a token file atomically (temp file, then rename)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, dtype.itemsize, tokens.size, vocab_size).ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)


def read_header(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TokenFileError(f"token file {path} does not exist; run `pyllm prepare` first")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise TokenFileError(f"{path} is not a pyllm token file (bad magic or a header shorter than {HEADER_BYTES} bytes)")
    magic, version, itemsize, count, vocab_size = _HEADER.unpack(head[:_HEADER.size])
    if version != VERSION:
        raise TokenFileError(f"{path}: token file format version {version}, this pyllm reads version {VERSION}")
    if itemsize not in (2, 4):
        raise TokenFileError(f"{path}: header says {itemsize} bytes per token, expected 2 or 4")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        raise TokenFileError(f"{path} is truncated or corrupt: header promises {count} tokens ({expected} bytes), file has {size} bytes")
    return {"count": count, "dtype": np.dtype(np.uint16 if itemsize == 2 else np.uint32), "vocab_size": vocab_size}


def open_tokens(path) -> np.memmap:
    """The tokens of a token file as a read-only memmap (checked against its header)."""
    h = read_header(path)
    if h["count"] == 0:
        return np.zeros(0, dtype=h["dtype"])
    return np.memmap(path, dtype=h["dtype"].newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(h["count"],))


# --- prepare ---------------------------------------------------------------------------------------

def _eot_id(tokenizer) -> int | None:
    """The id of <|endoftext|> when the tokenizer has it as a special token, else None."""
    try:
        ids = tokenizer.encode(EOT, allowed_special={EOT})
    except Exception:  # no such special token: documents are then simply concatenated
        return None
    return ids[0] if len(ids) == 1 else None


_EOT_IF_ANY = object()


def prepare(inputs: Sequence[str | os.PathLike] | None, tokenizer, out_dir, val_fraction: float = 0.02,
            show_progress: bool = True, batch_docs: int = 64, doc_start: Sequence[int] = (),
            doc_end=_EOT_IF_ANY) -> dict:
    """Tokenizes text files (or folders; None: the stdlib corpus) into out_dir/train.bin and
    out_dir/val.bin, each document as doc_start + its ids + doc_end: by default nothing first and
    <|endoftext|> last when the tokenizer has it (a model's own markers, e.g. Llama 3's
    <|begin_of_text|> and <|end_of_text|> ids, can be given instead; doc_end=None for none).

    The split is by document (every round(1/val_fraction)-th file goes to val) when there are at
    least 1/val_fraction files, else by position (the last val_fraction of the tokens). Returns
    {"train_tokens", "val_tokens", "files", "bytes"}.
    """
    from tqdm import tqdm

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = stdlib_corpus() if inputs is None else collect_files(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eot = _eot_id(tokenizer) if doc_end is _EOT_IF_ANY else doc_end
    start_ids = list(doc_start)
    # Ordinary encoding: a literal "<|endoftext|>" inside a file is text, not a separator.
    encode_batch = getattr(tokenizer, "encode_ordinary_batch", None) or tokenizer.encode_batch
    every = max(2, round(1 / val_fraction))
    by_document = len(files) >= every
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not show_progress)
    for start in range(0, len(files), batch_docs):
        chunk = files[start:start + batch_docs]
        texts = list(read_texts(chunk))
        for i, ids in enumerate(encode_batch(texts)):
            doc = np.asarray([*start_ids, *ids] if eot is None else [*start_ids, *ids, eot], dtype=np.int64)
            (val_parts if by_document and (start + i) % every == every - 1 else train_parts).append(doc)
        bar.update(sum(f.stat().st_size for f in chunk))
    bar.close()
    train = np.concatenate(train_parts) if train_parts else np.zeros(0, np.int64)
    val = np.concatenate(val_parts) if val_parts else np.zeros(0, np.int64)
    if not by_document:
        n_val = max(1, int(len(train) * val_fraction))
        train, val = train[:-n_val], train[-n_val:]
    write_tokens(out_dir / "train.bin", train, tokenizer.vocab_size)
    write_tokens(out_dir / "val.bin", val, tokenizer.vocab_size)
    return {"train_tokens": int(len(train)), "val_tokens": int(len(val)), "files": len(files), "bytes": total_bytes}


# --- loader ----------------------------------------------------------------------------------------

class TokenLoader:
    """Samples batches of random windows from a token file.

    Each batch is the slice [rank * B, (rank + 1) * B) of a global batch of world_size * B windows
    drawn from one generator seeded alike on every rank, so N processes with batch B see exactly
    the windows one process with batch N * B sees. state_dict() holds the generator's state.
    """

    def __init__(self, path, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device="cpu"):
        self.tokens = open_tokens(path)
        self.path, self.batch_size, self.seq_len = Path(path), batch_size, seq_len
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        if len(self.tokens) < seq_len + 1:
            raise TokenFileError(f"{path} holds {len(self.tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B, T) int64, y shifted by one."""
        n_windows = len(self.tokens) - self.seq_len
        starts = self.rng.integers(0, n_windows, size=self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(windows)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "path": str(self.path)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
