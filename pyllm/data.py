"""Token files and the batch loader.

A token file is a 64-byte header followed by the tokens, little-endian:

    offset 0   8 bytes  magic b"PYLLMTOK"
    offset 8   uint32   format version (1)
    offset 12  uint32   bytes per token (2: uint16, when the vocab fits; else 4: uint32)
    offset 16  uint64   number of tokens
    offset 24  uint32   vocab size of the tokenizer that wrote it
    offset 28  uint32   the id ending each document, plus 1 (0: none recorded, as in files of
                        earlier pyllm versions, whose header was zeros from here)
    offset 32  zeros up to 64

`prepare` writes train.bin and val.bin; `TokenLoader` samples (B, T+1) windows from a memmap with
its own seeded numpy generator, whose state goes into checkpoints.

Conversations for fine-tuning (`prepare_chat`) are token files too, each beside two numpy files:
NAME.docs.npy, the int64 offsets where each conversation starts (and the total last), and
NAME.mask.npy, uint8 per token, 1 where the token is the assistant's (trained on). `PackedLoader`
packs whole conversations into rows and gives the model their offsets (LLM.forward's cu_seqlens).
Preference pairs for DPO (`prepare_preferences`) add NAME.pairs.npy, the (P, 2) int64 indices of
each pair's chosen and rejected documents, which PackedLoader then places side by side in one row.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import math
import numbers
import os
import struct
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from pyllm.tokenizer.patterns import text_parts

MAGIC = b"PYLLMTOK"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQII")
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


def _looks_binary(path: Path) -> bool:
    """A NUL byte in the first KB (read alone: a folder may hold a 17 GB token file)."""
    with open(path, "rb") as f:
        return b"\x00" in f.read(1024)


def new_temp_file(path) -> tuple[int, Path]:
    """(fd, path) of a new temp file beside path, to write whole and rename into place: created
    exclusively under an unpredictable name (O_EXCL: a symlink planted at a fixed temp name in a
    downloaded folder, train.bin.tmp, had been written through, overwriting what it pointed to), with
    the mode any new file gets (mkstemp's own is 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError:  # (a file system that takes no modes: the file as made)
        pass
    return fd, Path(tmp)


def discard_temp_file(file, tmp: Path) -> None:
    """A writer's open temp file closed and removed: on a full disk close's flush fails again (the
    descriptor is closed all the same), and the file had been left, hidden, on the disk that is full."""
    try:
        file.close()
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def write_whole(path, data: bytes | str | np.ndarray) -> None:
    """path written through new_temp_file, fsync and a rename: bytes or text as they are, an array
    as np.save writes it (never through a planted link, never half a file)."""
    fd, tmp = new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, np.ndarray):
                np.save(f, data)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(path, older_than_s: float = 600.0) -> None:
    """new_temp_file's leftovers beside path that nothing has written for older_than_s (a writer
    killed mid-file: a prepare OOM-killed while tokenizing left gigabytes, hidden, each time); 0:
    all of them (a caller that holds the folder's lock: no other writer of it runs)."""
    path = Path(path)
    now = time.time()
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - stale.stat().st_mtime >= older_than_s:
                stale.unlink()
        except OSError:
            pass


def _umask() -> int:
    """The process's umask, read without setting it where Linux says it (os.umask sets it, for a
    moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


# What pyllm writes beside token files and tokenizers (`pyllm prepare --out` may be the text's own
# folder, as nanoGPT's layout has it): never read back as text. These names only where pyllm's
# token files or tokenizer are beside them (a corpus may hold a run.json of its own).
_OWN_FILES_BESIDE = {"source.json", "run.json", "log.jsonl"}


def _own_file(path: Path) -> bool:
    """pyllm's side files: tokenizer.bpe (and its .json), rows and temp files anywhere, the rest
    beside pyllm's token files or tokenizer."""
    if path.name in ("tokenizer.bpe", "tokenizer.bpe.json") or path.name.endswith((".rows.jsonl", ".bin.tmp")) or (
            path.name.startswith(".") and path.name.endswith(".tmp")):  # (new_temp_file's)
        return True
    return path.name in _OWN_FILES_BESIDE and (path.with_name("train.bin").is_file()
                                               or path.with_name("tokenizer.bpe").is_file())


def _folder_files(folder: Path) -> list[Path]:
    """A folder's files, recursively and sorted, symlinked folders followed (once each), hidden
    ones left out."""
    found, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / n for n in names if not n.startswith(".")]
    return sorted(p for p in found if p.is_file())


def collect_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named in inputs; a folder stands for its files (recursively, sorted; hidden ones,
    binary-looking ones and pyllm's own side files skipped); a pattern (*, ?, [...]) for the files
    it matches. A file named twice (a folder and a file in it) is taken once."""
    import glob

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists() and glob.has_magic(str(item)):  # quoted, so the shell left it: as it would expand
            matched = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matched:
                raise FileNotFoundError(f"input pattern {str(item)!r} matches no file")
            paths += matched
        else:
            paths.append(path)
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += [p for p in _folder_files(path) if not _looks_binary(p) and not _own_file(p)]
        elif path.is_file():
            if _looks_binary(path):  # as a folder's binary files are skipped, but named: said
                raise ValueError(f"{str(path)!r} looks binary (a NUL byte in its first KB), not text"
                                 + _token_file_hint(path))
            files.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist (give text files or folders of them)")
    first: dict[Path, Path] = {}
    for f in files:  # a file named twice is taken at its first naming (the order decides the val split)
        first.setdefault(f.resolve(), f)
    unique = list(first.values())
    if not unique:
        raise FileNotFoundError(f"no text files found in {', '.join(map(str, inputs))}")
    return unique


def _token_file_hint(path: Path) -> str:
    """What to do with a token file named where text was expected."""
    if llmc_format(path) is not None:
        return (f": llm.c's token files are read from their folder (--data {str(path.parent)!r}, which holds "
                "*_train*.bin and *_val*.bin)")
    if path.suffix == ".bin":
        return f": token files are read from their folder (--data {str(path.parent)!r}, with train.bin and val.bin)"
    return ""


def is_text_rows(path) -> bool:
    """Whether path is a JSON Lines file of documents, {"text": ...} per line (a Hugging Face
    dataset's export): each line's text is a document. ValueError for a *.jsonl file of rows
    without "text" ({"page": ...}, {"content": ...}): it had been read as one text, JSON and all."""
    keys = _first_row_keys(path)
    if keys and "text" not in keys and Path(path).suffix == ".json":  # (a .json of other rows: left as text)
        return False
    if keys and "text" not in keys:
        raise ValueError(f"{path}: a JSON Lines file whose rows have no \"text\" (its first has "
                         f"{', '.join(sorted(keys)[:6])}{' ...' if len(keys) > 6 else ''}): write each document as a "
                         "{\"text\": ...} row (lm-evaluation-harness's wikitext: its \"page\"), or give a plain "
                         "text file")
    return bool(keys)


def read_documents(files: Iterable[Path], not_utf8: list | None = None) -> Iterable[str]:
    """The documents of files: each file's text, or each line's "text" of a JSON Lines file of
    {"text": ...} rows. Text is read as it is on disk (CRLF kept, as the tokenizer's trainer reads
    files in C++); bytes that are not UTF-8 become U+FFFD, with a warning naming the file (or the
    file appended to not_utf8, for the caller to say once); a rows file not UTF-8 is refused
    (ValueError naming it)."""
    for text, _ in read_document_parts(files, not_utf8):
        yield text


# A large file's parts: about 16 MiB each, so that preparing one holds a few parts' bytes, text and
# ids (a whole 200 MB file had taken 1.8 GB); the encoder still spreads a part over every thread.
PART_BYTES = 1 << 24


def read_document_parts(files: Iterable[Path], not_utf8: list | None = None, part_bytes: int | None = None,
                        pattern: str = "gpt2") -> Iterator[tuple[str, bool]]:
    """read_documents' documents as (text, last) pairs: a plain text file of more than part_bytes
    in parts cut where the built-in split pattern's pieces are those of the whole (file_parts), last
    True on its final part; every other document (part_bytes None, a JSON Lines row) whole."""
    for f in files:
        if is_text_rows(f):
            for number, row, _ in _jsonl_rows(f):
                text = row.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"{f}:{number}: expected a \"text\" string in every line, as the first line has, "
                                     f"got {type(text).__name__}")
                yield text, True
            continue
        bad: dict = {}
        for text, last in text_parts(f, part_bytes, pattern, bad):
            if last and bad and not_utf8 is not None:
                not_utf8.append(f)
            elif last and bad:
                import warnings

                start, byte, replaced = bad[f]
                warnings.warn(f"{f} is not UTF-8 (byte {start}: {byte!r}): {replaced} bytes read as U+FFFD; "
                              "convert it first (iconv -f cp1252 -t utf-8 ...)", stacklevel=3)
            yield text, last


# --- token files ---------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_tokens(path, tokens: np.ndarray, vocab_size: int, doc_end: int | None = None) -> None:
    """Writes a token file atomically (temp file, then rename); doc_end: the id that ends each
    document in it, if any (TokenLoader's doc_mask needs it)."""
    with TokenWriter(path, vocab_size, doc_end) as writer:
        writer.append(tokens)


class TokenWriter:
    """A token file written as its ids come: each append checked against the vocabulary and stored
    in the file's dtype, the header's count written at close and the file renamed into place
    (atomic, as write_tokens); an exception inside `with` leaves no file. Memory: what one append
    holds, not the file (prepare of a corpus larger than RAM)."""

    def __init__(self, path, vocab_size: int, doc_end: int | None = None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or not 1 <= vocab_size < 2 ** 32:
            # (< 2^32: the header keeps it in 32 bits; a failure at close had come after every token was written)
            raise ValueError(f"{path}: vocab_size must be an int in [1, 2^32), got {vocab_size!r}")
        if doc_end is not None and (isinstance(doc_end, bool) or not isinstance(doc_end, numbers.Integral)
                                    or not 0 <= doc_end < vocab_size):
            raise ValueError(f"{path}: doc_end (the id ending each document) must be None or an id in "
                             f"[0, {vocab_size}), got {doc_end!r}")
        self.path, self.vocab_size, self.doc_end = Path(path), int(vocab_size), doc_end
        self.dtype = token_dtype(vocab_size).newbyteorder("<")
        remove_stale_temp_files(self.path)
        fd, self.tmp = new_temp_file(self.path)
        self.count = 0
        self._file = os.fdopen(fd, "wb")
        self._file.write(b"\0" * HEADER_BYTES)  # the header, once the count is known

    def append(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer)):
            raise ValueError(f"{self.path}: tokens must be a 1-D array of int ids, got {tokens.dtype} of shape "
                             f"{tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{self.path}: token ids must lie in [0, {self.vocab_size}), got "
                             f"[{tokens.min()}, {tokens.max()}]")
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.count += tokens.size

    def move_tail(self, n: int, other: "TokenWriter", chunk: int = 1 << 24) -> None:
        """The last n ids written here appended to other instead (a split by position)."""
        n = min(n, self.count)
        self._file.flush()
        start = self.count - n
        ids = np.memmap(self.tmp, dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=(self.count,))
        for i in range(start, self.count, chunk):
            other.append(np.array(ids[i:i + chunk]))
        del ids
        self._file.truncate(HEADER_BYTES + start * self.dtype.itemsize)
        self._file.seek(0, os.SEEK_END)
        self.count = start

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count, self.vocab_size,
                                      0 if self.doc_end is None else self.doc_end + 1).ljust(HEADER_BYTES, b"\0"))
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        discard_temp_file(self._file, self.tmp)

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        self.abort() if kind is not None else self.close()


# nanoGPT's prepare.py scripts write train.bin and val.bin as bare uint16 tokens, with a meta.pkl
# beside them for a character vocabulary (its vocab_size) and none for GPT-2's BPE (50,257 ids).
NANOGPT_SPLITS = ("train.bin", "val.bin")
GPT2_VOCAB = 50257


def nanogpt_vocab(path) -> int | None:
    """The vocab size when path is one of nanoGPT's bare token files (train.bin or val.bin without
    pyllm's header, beside the other one, also bare): meta.pkl's, else GPT-2's; None otherwise."""
    path = Path(path)
    if path.name not in NANOGPT_SPLITS:
        return None
    for split in NANOGPT_SPLITS:
        other = path.with_name(split)
        if not other.is_file() or other.stat().st_size % 2:
            return None
        with open(other, "rb") as f:
            if f.read(8) == MAGIC:
                return None
        if llmc_format(other) is not None:
            return None
    meta = path.with_name("meta.pkl")
    return read_nanogpt_meta(meta)["vocab_size"] if meta.is_file() else GPT2_VOCAB


def _nanogpt_pair_problem(path: Path) -> str:
    """Why path, bare, is not read as nanoGPT's: what is wrong with it or the other split beside it."""
    if path.name not in NANOGPT_SPLITS:
        return ""
    for split in NANOGPT_SPLITS:
        other = path.with_name(split)
        if not other.is_file():
            return f": {split} is missing beside it"
        if other.stat().st_size % 2:
            return f": {other} has an odd number of bytes ({other.stat().st_size}), not uint16 tokens"
        with open(other, "rb") as f:
            if f.read(8) == MAGIC:
                return f": {other} has pyllm's header and {path.name} not (prepare both splits again together)"
    return ""


def read_nanogpt_meta(meta) -> dict:
    """nanoGPT's meta.pkl (vocab_size, and a character vocabulary's itos / stoi), unpickling plain
    containers, strings and numbers only: a pickle can run code."""
    import pickle

    meta = Path(meta)

    class Plain(pickle.Unpickler):
        def find_class(self, module, name):
            raise TokenFileError(f"{meta}: holds a {module}.{name}; nanoGPT's meta.pkl is a dict of plain values")

    with open(meta, "rb") as f:
        try:
            info = Plain(f).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise TokenFileError(f"{meta}: not a readable pickle ({e})") from None
    size = info.get("vocab_size") if isinstance(info, dict) else None
    if not isinstance(size, int) or not 0 < size <= 1 << 16:
        raise TokenFileError(f"{meta}: expected nanoGPT's dict with a vocab_size in [1, 65536], got {size!r}")
    return info


# llm.c's token files (its dev/data scripts): a header of 256 int32 (magic, version, token count,
# zeros) and then the tokens: GPT-2's as uint16 (magic 20240520, version 1; each document starts
# with <|endoftext|>, 50256) and Llama 3's as uint32 (20240801, version 7; each starts with
# <|begin_of_text|>). Named NAME_train*.bin / NAME_val*.bin, several shards to a split for the
# large corpora.
LLMC_HEADER_BYTES = 1024
_LLMC_FORMATS = {(20240520, 1): (np.dtype(np.uint16), GPT2_VOCAB, 50256), (20240801, 7): (np.dtype(np.uint32), 128256, None)}


def llmc_format(path) -> tuple[np.dtype, int, int | None] | None:
    """(token dtype, vocab size, end-of-document id) of one of llm.c's token files; None for any other file."""
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) < 12:
        return None
    return _LLMC_FORMATS.get(struct.unpack("<ii", head[:8]))


def split_files(folder, split: str) -> list[Path]:
    """The token files of a split ("train" or "val") in a folder: SPLIT.bin (pyllm's or nanoGPT's),
    else llm.c's shards (*_SPLIT*.bin with llm.c's header), sorted; [] when there are none."""
    folder = Path(folder)
    if (folder / f"{split}.bin").is_file():
        return [folder / f"{split}.bin"]
    if not folder.is_dir():
        return []
    named = sorted(p for p in folder.glob(f"*_{split}*.bin") if p.is_file())
    shards = [p for p in named if llmc_format(p) is not None]
    # A file named as a shard that is not one would be left out of the split without a word (llm.c
    # itself exits on its header); llm.c's HellaSwag file (magic 20240522) is no token shard.
    odd = [p for p in named if p not in shards and (_llmc_magic(p) in _LLMC_TOKEN_MAGICS
                                                     or (shards and _llmc_magic(p) != LLMC_HELLASWAG_MAGIC))]
    if odd:
        raise TokenFileError(f"{folder}: {', '.join(p.name for p in odd)} named as llm.c's {split} shards but without "
                             "the header of one this pyllm reads (int32 magic and version: 20240520 and 1, GPT-2's "
                             "uint16 tokens; 20240801 and 7, Llama 3's uint32): write it again with llm.c's dev/data "
                             "scripts, or move it out of the folder")
    return shards


LLMC_HELLASWAG_MAGIC = 20240522
_LLMC_TOKEN_MAGICS = {magic for magic, _ in _LLMC_FORMATS}


def _llmc_magic(path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(4)
    return struct.unpack("<i", head)[0] if len(head) == 4 else None


def read_header(path) -> dict:
    """What a token file holds: {"count", "dtype", "vocab_size", "doc_end", "offset"} (+ "shards":
    [(path, header)] where FOLDER/SPLIT.bin stands for llm.c's shards of that split)."""
    path = Path(path)
    if not path.is_file():
        shards = split_files(path.parent, path.stem) if path.name in NANOGPT_SPLITS else []
        if not shards and path.is_dir():
            raise TokenFileError(f"{path} is a folder, not a token file: give one of its files ({path / 'train.bin'}, "
                                 f"{path / 'val.bin'})")
        if not shards:
            raise TokenFileError(f"token file {path} does not exist; run `pyllm prepare` first")
        headers = [(shard, read_header(shard)) for shard in shards]
        first = headers[0][1]
        if any((h["dtype"], h["vocab_size"]) != (first["dtype"], first["vocab_size"]) for _, h in headers):
            raise TokenFileError(f"{path.parent}: its {path.stem} shards mix llm.c's GPT-2 and Llama 3 formats")
        return {**first, "count": sum(h["count"] for _, h in headers), "shards": headers}
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:8] != MAGIC and (llmc := llmc_format(path)) is not None:
        dtype, vocab, doc_end = llmc
        count = struct.unpack("<i", head[8:12])[0]
        if size != LLMC_HEADER_BYTES + count * dtype.itemsize:
            raise TokenFileError(f"{path} is truncated or corrupt: its llm.c header promises {count} tokens "
                                 f"({LLMC_HEADER_BYTES + count * dtype.itemsize} bytes), file has {size} bytes")
        return {"count": count, "dtype": dtype, "vocab_size": vocab, "doc_end": doc_end, "offset": LLMC_HEADER_BYTES}
    if head[:8] != MAGIC and (vocab := nanogpt_vocab(path)) is not None:
        # GPT-2's files (no meta.pkl) end each document with <|endoftext|> (nanoGPT's openwebtext)
        return {"count": size // 2, "dtype": np.dtype(np.uint16), "vocab_size": vocab,
                "doc_end": 50256 if vocab == GPT2_VOCAB and not path.with_name("meta.pkl").is_file() else None,
                "offset": 0, "bare": True}
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise TokenFileError(f"{path} is not a pyllm token file (bad magic or a header shorter than {HEADER_BYTES} "
                             "bytes), nor one of nanoGPT's (train.bin and val.bin, bare uint16, in one folder) or "
                             "llm.c's" + _nanogpt_pair_problem(path))
    magic, version, itemsize, count, vocab_size, doc_end = _HEADER.unpack(head[:_HEADER.size])
    if version != VERSION:
        raise TokenFileError(f"{path}: token file format version {version}, this pyllm reads version {VERSION}")
    if itemsize not in (2, 4):
        raise TokenFileError(f"{path}: header says {itemsize} bytes per token, expected 2 or 4")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        raise TokenFileError(f"{path} is truncated or corrupt: header promises {count} tokens ({expected} bytes), file has {size} bytes")
    return {"count": count, "dtype": np.dtype(np.uint16 if itemsize == 2 else np.uint32), "vocab_size": vocab_size,
            "doc_end": doc_end - 1 if doc_end else None, "offset": HEADER_BYTES}


class ShardedTokens:
    """Several token files read as one sequence (llm.c's shards of a split): len(), slices and
    single tokens, what the loaders take of a memmap (np.asarray reads it whole). A window may run
    from one shard into the next, as it runs from one document into the next within a shard."""

    def __init__(self, parts: list[np.memmap]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts], dtype=np.int64)  # (numpy 1's int32 on Windows)
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[0:len(self)]
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, index: slice | int) -> np.ndarray:
        if isinstance(index, (int, np.integer)):  # (a memmap's single token: a numpy scalar)
            at = int(index) + len(self) if index < 0 else int(index)
            if not 0 <= at < len(self):
                raise IndexError(f"token {index} of {len(self)}")
            return self[at:at + 1][0]
        if not isinstance(index, slice):
            raise TypeError(f"ShardedTokens takes an int or a contiguous slice, got {type(index).__name__}")
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("ShardedTokens takes contiguous slices")
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            part = self.parts[first]
            end = min(stop, int(self.starts[first + 1]))
            pieces.append(part[start - self.starts[first]:end - self.starts[first]])
            start, first = end, first + 1
        if not pieces:
            return np.zeros(0, self.dtype)
        return np.concatenate(pieces) if len(pieces) != 1 else np.asarray(pieces[0])


def open_tokens(path) -> np.memmap | ShardedTokens:
    """The tokens of a token file as a read-only memmap (checked against its header); llm.c's
    shards of a split (read_header) as one ShardedTokens."""
    h = read_header(path)
    if "shards" in h:
        parts = [open_tokens(shard) for shard, _ in h["shards"]]
        return parts[0] if len(parts) == 1 else ShardedTokens(parts)
    if h["count"] == 0:
        return np.zeros(0, dtype=h["dtype"])
    return np.memmap(path, dtype=h["dtype"].newbyteorder("<"), mode="r", offset=h["offset"], shape=(h["count"],))


def check_ids(tokens, vocab_size: int, path, limit: int = 1 << 27) -> None:
    """TokenFileError when a token file holds an id outside [0, vocab_size): checked whole at
    first for files of up to `limit` tokens (bare files carry no record of what wrote them), and
    per batch by TokenLoader (a 9B-token file is not read whole before the first step)."""
    if 0 < len(tokens) <= limit:
        whole = np.asarray(tokens[0:len(tokens)])
        if whole.max() >= vocab_size:
            at = int(np.flatnonzero(whole >= vocab_size)[0])
            raise TokenFileError(f"{path}: token {at} is id {whole[at]}, outside its vocabulary of {vocab_size} ids "
                                 "(meta.pkl's vocab_size, or GPT-2's 50,257 without one): not the ids of its tokenizer")


# --- prepare ---------------------------------------------------------------------------------------

def eot_id(tokenizer) -> int | None:
    """The id of <|endoftext|> when the tokenizer has it as a special token, else None."""
    try:
        ids = tokenizer.encode(EOT, allowed_special={EOT})
    except Exception:  # no such special token: documents are then simply concatenated
        return None
    return ids[0] if len(ids) == 1 else None


_EOT_IF_ANY = object()
# What prepare_chat / prepare_preferences / prepare_kto write beside NAME.bin.
CONVERSATION_FILES = (".docs.npy", ".mask.npy", ".pairs.npy", ".labels.npy", ".margins.npy", ".rows.jsonl")


def split_at_separator(documents: Iterable[str], separator: str) -> Iterator[str]:
    """Each document cut at the separator's occurrences, pieces of whitespace alone left out where it
    cut (the newlines around TinyStories' separators)."""
    for piece, _ in split_parts_at_separator(((text, True) for text in documents), separator):
        yield piece


def split_parts_at_separator(parts: Iterable[tuple[str, bool]], separator: str) -> Iterator[tuple[str, bool]]:
    """split_at_separator over read_document_parts' (text, last) parts: the same documents, those
    of a file in parts still in parts (last True at each one's end). A separator never spans two
    parts (a cut follows a newline, which no separator has), and a document running on past a
    part's end is never whitespace alone (the next part starts with a character that is not)."""
    open_document = False  # (its start yielded, with last False)
    for text, last in parts:
        pieces = text.split(separator)
        if len(pieces) == 1:  # (a document without the separator: kept even when only whitespace)
            yield text, last
        else:
            for k, piece in enumerate(pieces):
                if k == len(pieces) - 1 and not last:
                    yield piece, False
                elif (k == 0 and open_document) or piece.strip():
                    yield piece, True
        open_document = not last


def _take_parts(parts: Iterator[tuple[str, bool]], count: int, characters: int) -> list[tuple[str, bool]]:
    """The next count parts, or fewer that make characters (at least one; none at the end)."""
    batch, size = [], 0
    for part in parts:
        batch.append(part)
        size += len(part[0])
        if len(batch) == count or size >= characters:
            break
    return batch


def prepare(inputs: Sequence[str | os.PathLike] | None, tokenizer, out_dir, val_fraction: float = 0.02,
            show_progress: bool = True, batch_docs: int = 64, doc_start: Sequence[int] = (),
            doc_end=_EOT_IF_ANY) -> dict:
    """Tokenizes text files (or folders; None: the stdlib corpus) into out_dir/train.bin and
    out_dir/val.bin, each document as doc_start + its ids + doc_end: by default nothing first and
    <|endoftext|> last when the tokenizer has it (a model's own markers, e.g. Llama 3's
    <|begin_of_text|> and <|end_of_text|> ids, can be given instead; doc_end=None for none).

    The split is by document (every round(1/val_fraction)-th document goes to val: 0.3 holds out a
    third, anything from 0.4 up a half) when there are at
    least 1/val_fraction documents, else by position (the last val_fraction of the tokens). A file
    is a document, or each line of a JSON Lines file of {"text": ...} rows is (read_documents); with
    the default doc_end, a literal "<|endoftext|>" in the text also ends one (TinyStories' files
    separate their stories so; the tokenizer trainer splits there too), pieces of whitespace alone
    dropped. A large file is read and encoded in parts (PART_BYTES) where the tokenizer is pyllm's
    with a built-in split pattern, which gives the parts the ids of the whole (read_document_parts).
    Returns {"train_tokens", "val_tokens", "files", "documents", "bytes"}.
    """
    from tqdm import tqdm

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = stdlib_corpus() if inputs is None else collect_files(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eot = eot_id(tokenizer) if doc_end is _EOT_IF_ANY else doc_end
    start_ids = list(doc_start)
    # Ordinary encoding: no special token is read from the text (a literal "<|endoftext|>" with the
    # default end is a separator, cut first: it had been encoded as 13 bytes of text, and a file of
    # stories one document)
    encode_batch = getattr(tokenizer, "encode_ordinary_batch", None) or tokenizer.encode_batch
    packed = getattr(tokenizer, "encode_batch_packed", None)  # (pyllm's Tokenizer: ids as one numpy array)
    every = max(2, round(1 / val_fraction))
    n_docs = 0
    not_utf8: list[Path] = []  # said once, after
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not show_progress)
    # Written as they are tokenized (memory: a batch of documents, not the corpus)
    train_file = TokenWriter(out_dir / "train.bin", tokenizer.vocab_size, eot)
    val_file = TokenWriter(out_dir / "val.bin", tokenizer.vocab_size, eot)
    # Lazily: a file, a JSON Lines row, or a part of a large file at a time; cut only where the parts
    # give the ids of the whole (pyllm's own tokenizers, most of them; others take a file whole)
    cuts = getattr(tokenizer, "encodes_in_parts", lambda: False)()
    parts = read_document_parts(files, not_utf8, *((PART_BYTES, tokenizer.pattern_name) if cuts else ()))
    if doc_end is _EOT_IF_ANY and eot is not None:
        parts = split_parts_at_separator(parts, EOT)
    starts = True  # (the next part starts a document)
    try:
        # A batch: batch_docs parts, or fewer making half a part's characters (a large file's part alone)
        while batch := _take_parts(parts, batch_docs, PART_BYTES // 2):
            texts = [text for text, _ in batch]
            if packed is not None:  # numpy ids: no Python int per token (a 200 MB file had taken 2.9 GB)
                ids_all, offsets = packed(texts, disallowed_special=())
                docs = [ids_all[offsets[k]:offsets[k + 1]] for k in range(len(texts))]
                del ids_all  # (its views in docs: gone with them, before the next batch is encoded)
            else:
                docs = encode_batch(texts)
            for ids, (_, last) in zip(docs, batch):
                split = val_file if n_docs % every == every - 1 else train_file
                for part in (start_ids if starts else [], ids, [] if eot is None or not last else [eot]):
                    split.append(part)
                n_docs += last
                starts = last
            bar.update(min(sum(map(len, texts)), bar.total - bar.n))  # (characters: about the bytes read)
            del texts, batch, docs
        bar.update(bar.total - bar.n)
        bar.close()
        if n_docs < every:  # too few documents to hold some out: the last val_fraction of the tokens
            train_file.move_tail(max(1, int(train_file.count * val_fraction)), val_file)
        for split in ("train", "val"):  # a folder prepared from conversations before: their files would describe other tokens
            for side in CONVERSATION_FILES:
                (out_dir / f"{split}{side}").unlink(missing_ok=True)
    except BaseException:
        train_file.abort()
        val_file.abort()
        raise
    train_file.close()
    val_file.close()
    if not_utf8 and inputs is not None:  # (the stdlib corpus: 4 test files in other encodings, on purpose)
        import warnings

        warnings.warn(f"{len(not_utf8)} file(s) are not UTF-8 ({not_utf8[0]} first): their other bytes were read as "
                      "U+FFFD; convert them first (iconv -f cp1252 -t utf-8 ...)", stacklevel=2)
    return {"train_tokens": train_file.count, "val_tokens": val_file.count, "files": len(files), "documents": n_docs,
            "bytes": total_bytes}


# --- loader ----------------------------------------------------------------------------------------

def check_batching(op: str, batch_size, seq_len, rank, world_size) -> None:
    """ValueError unless a loader's batch (B >= 1 rows of seq_len >= 1) and its rank's place among
    world_size processes can be: a rank past the world had taken no rows, silently."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size:
        raise ValueError(f"{op}: rank must be an int in [0, world_size = {world_size}), got {rank!r}")


class TokenLoader:
    """Samples batches of random windows from a token file.

    Each batch is the slice [rank * B, (rank + 1) * B) of a global batch of world_size * B windows
    drawn from one generator seeded alike on every rank, so N processes with batch B see exactly
    the windows one process with batch N * B sees. state_dict() holds the generator's state.

    doc_mask: each batch also gives cu_seqlens, a document starting after every end-of-document
    token (the id the file's header records) in a window, so that LLM.forward keeps each
    document's tokens from attending to the one before it in the same window (as Llama 3 was
    trained) and starts its positions at 0. The targets stay the stream's.
    """

    def __init__(self, path, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device="cpu", doc_mask: bool = False):
        check_batching("TokenLoader", batch_size, seq_len, rank, world_size)
        self.tokens = open_tokens(path)
        self.path, self.batch_size, self.seq_len = Path(path), batch_size, seq_len
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        if len(self.tokens) < seq_len + 1:
            raise TokenFileError(f"{path} holds {len(self.tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        header = read_header(path)
        self.vocab_size = header["vocab_size"]
        if header.get("bare"):  # nanoGPT's: no header says what wrote them
            check_ids(self.tokens, self.vocab_size, path)
        self.doc_end = header["doc_end"] if doc_mask else None
        self.lengths = None
        if doc_mask and self.doc_end is None:
            raise TokenFileError(f"{path} records no end-of-document token, which doc_mask needs: prepare it again "
                                 "with this pyllm (with a tokenizer that has <|endoftext|>, or a model's end-of-sequence id)")
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(x, y), each (B, T) int64, y shifted by one; with doc_mask (x, y, cu_seqlens) and
        self.lengths, the documents' lengths (for the FLOPs count; None without doc_mask: rows of T)."""
        n_windows = len(self.tokens) - self.seq_len
        starts = self.rng.integers(0, n_windows, size=self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        if windows.max() >= self.vocab_size:  # cheap beside the step; an embedding would read out of bounds
            row, col = divmod(int(np.flatnonzero(windows >= self.vocab_size)[0]), self.seq_len + 1)
            raise TokenFileError(f"{self.path}: token {starts[row] + col} is id {windows[row, col]}, outside the "
                                 f"vocabulary of {self.vocab_size} ids its header (or meta.pkl) gives")
        batch = torch.from_numpy(windows)
        cu_seqlens = None
        if self.doc_end is not None:
            T = self.seq_len
            ends = np.flatnonzero(windows[:, :T - 1] == self.doc_end)  # in the rows' first T - 1: one starts after
            starts_after = (ends // (T - 1)) * T + ends % (T - 1) + 1
            cu_seqlens = torch.from_numpy(np.union1d(starts_after, np.arange(0, len(windows) * T + 1, T)).astype(np.int32))
            self.lengths = np.diff(cu_seqlens.numpy()).tolist()
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
            if cu_seqlens is not None:
                cu_seqlens = cu_seqlens.pin_memory().to(self.device, non_blocking=True)
        # contiguous, as nanoGPT's get_batch stacks them: a model of the user's own may view(-1) its targets
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        return (x, y, cu_seqlens) if cu_seqlens is not None else (x, y)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "path": str(self.path), "tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("tokens", len(self.tokens)) != len(self.tokens):  # (checkpoints before it was recorded: unchecked)
            raise TokenFileError(f"{self.path} holds {len(self.tokens):,} tokens, the checkpoint's data ({state['path']}) "
                                 f"{state['tokens']:,}: the token files changed since, or are another folder's")
        self.rng.bit_generator.state = state["rng"]


# --- conversations -------------------------------------------------------------------------------

def read_conversations(path) -> list[dict]:
    """The examples of a JSON Lines file for fine-tuning, one per line, in the formats of OpenAI's
    fine-tuning files and Hugging Face / TRL datasets:
      {"messages": [{"role": ..., "content": ...}, ...]}     a conversation (the assistant's turns trained)
      {"prompt": [messages], "completion": [messages]}       the completion's assistant turns trained
      {"prompt": "text", "completion": "text"}               no chat template: the completion trained
      {"prompt": "text" or [messages]} (other keys ignored)  a prompt alone (GRPO's, TRL's prompt-only
                                                             format): an empty completion (text: the
                                                             end-of-document id alone; messages: an
                                                             empty assistant turn) for samples to replace
    returned as {"messages": [...], "train_from": index of the first trainable message} or
    {"prompt": str, "completion": str}, with "columns": the row's other keys where it has any (what
    GRPO's reward functions are given, as TRL's). A conversation's "tools" and
    "chat_template_kwargs" columns reach its chat template, as TRL passes them to
    apply_chat_template (a function-calling row's tool schemas; enable_thinking=)."""
    return [example for example, _ in _conversations(path)]


def _conversations(path) -> Iterator[tuple[dict, str]]:
    """read_conversations' examples one at a time, each with its "path:line" (prepare_chat holds
    none of them: a file's examples, held, had taken ~14x its size)."""
    for number, row, line in _jsonl_rows(path):
        example = _example(row)
        if example is None:
            raise ValueError(f"{path}:{number}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}} "
                             f"or {{\"prompt\": ..., \"completion\": ...}} (both text or both messages), got "
                             f"{line.strip()[:80]!r}")
        if "messages" in example:
            example.update(_template_args(row, f"{path}:{number}"))
        columns = {k: v for k, v in row.items() if k not in ("messages", "prompt", "completion")}
        yield ({**example, "columns": columns} if columns else example), f"{path}:{number}"


def _template_args(row: dict, where: str) -> dict:
    """{"template": the chat template's extra inputs} of a row, where it has any: its "tools" (a list
    of tool schemas) and its "chat_template_kwargs" (a dict of template variables), as TRL hands
    them to apply_chat_template. A row without them: {}."""
    tools, extra = row.get("tools"), row.get("chat_template_kwargs")
    if isinstance(tools, str):  # a JSON string, as datasets often store it (TRL's SFTTrainer json.loads it)
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: \"tools\" is a string that is not JSON ({e})") from None
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"{where}: \"tools\" must be a list of tool schemas, got {type(tools).__name__}")
    if extra is not None and not (isinstance(extra, dict) and all(isinstance(k, str) for k in extra)):
        raise ValueError(f"{where}: \"chat_template_kwargs\" must be an object of template variables, got {extra!r}")
    template = {**({"tools": tools} if tools is not None else {}), **(extra or {})}
    return {"template": template} if template else {}


def example_row(example: dict) -> dict:
    """What a reward function is told of a conversation (read_conversations' example) besides the
    samples: "prompt", what comes before its last reply (text, or the messages before the last
    assistant message), and the row's other columns."""
    if "messages" in example:
        messages = example["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
        prompt = messages[:last]
    else:
        prompt = example["prompt"]
    return {**example.get("columns", {}), "prompt": prompt}


def read_rows(path) -> list[dict] | None:
    """The rows beside a token file of conversations (its .rows.jsonl: example_row of each
    document, in order), or None where there is none (data prepared before they were kept).
    TokenFileError when they are not one per document of its .docs.npy."""
    path = Path(path)
    rows_path = path.with_suffix(".rows.jsonl")
    if not rows_path.is_file():
        return None
    with open(rows_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    documents = len(np.load(path.with_suffix(".docs.npy"), mmap_mode="r")) - 1
    if len(rows) != documents:
        raise TokenFileError(f"{rows_path}: {len(rows)} rows for {documents} conversations; prepare the data again")
    return rows


def _json_array_text(path, errors: str = "strict") -> str | None:
    """The text of a file whose first non-blank character is "[" (one JSON array: pandas' and
    datasets' to_json(lines=False), many datasets' *.json files), None for any other."""
    with open(path, encoding="utf-8-sig", errors=errors) as f:
        head = f.read(4096)
        return head + f.read() if head.lstrip().startswith("[") else None


def _jsonl_rows(path):
    """(line number, the line's object, the line) for each non-blank line (a UTF-8 byte-order mark
    before the first skipped, as Notepad writes one); ValueError naming the line that is not a JSON
    object, or the file where it is not UTF-8. A file of one JSON array gives its objects, "row N"
    for the line number."""
    number = 0
    try:
        text = _json_array_text(path)
        try:
            rows = None if text is None else json.loads(text)
        except json.JSONDecodeError:
            rows = None  # (JSON Lines whose lines are arrays, or a broken array: refused line by line below)
        if isinstance(rows, list):
            for number, row in enumerate(rows, 1):
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:row {number}: a JSON {type(row).__name__}, not an object: the array "
                                     "must hold one {...} object per example")
                yield f"row {number}", row, json.dumps(row, ensure_ascii=False)
            return
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):  # (a .json file of one array: its first line "[")
                    raise ValueError(f"{path}:{number}: a JSON {type(row).__name__}, not an object: JSON Lines "
                                     "holds one {...} object per line")
                yield number, row, line
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start:e.start + 1].hex()} on line {number + 1} or "
                         f"later); save it as UTF-8") from None


def _is_messages(value) -> bool:
    """Whether value is a list of chat messages (dicts with a "role")."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _example(row: dict) -> dict | None:
    if "messages" in row:
        return {"messages": row["messages"], "train_from": 0} if _is_messages(row["messages"]) else None
    if _prompt_only(set(row)):
        row = {**row, "completion": [{"role": "assistant", "content": ""}] if _is_messages(row["prompt"]) else ""}
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": completion}
    if _is_messages(prompt) and _is_messages(completion):
        return {"messages": prompt + completion, "train_from": len(prompt)}
    return None


def _first_row_keys(item) -> set:
    """The keys of a *.jsonl (or *.json) file's first row when it is a JSON object (an empty set for
    anything else)."""
    path = Path(item)
    # (*.json too: Hugging Face datasets' Dataset.to_json writes JSON Lines by default, to any name)
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return set()
    # (bytes not UTF-8 are refused by _jsonl_rows, naming the file; a BOM read past as it reads it)
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        text = f.read(1 << 16)
        try:
            if not text.lstrip().startswith("["):
                f.seek(0)
                row = json.loads(next((line for line in f if line.strip()), ""))
            else:  # one JSON array: its first element, read as far as it goes (not the whole file: is_chat_data
                start = text.index("[") + 1  # and its kin ask for each file's keys several times)
                while True:
                    first = start + len(text[start:]) - len(text[start:].lstrip())
                    try:
                        row = json.JSONDecoder().raw_decode(text, first)[0]
                        break
                    except json.JSONDecodeError:
                        more = f.read(max(len(text), 1 << 16))
                        if not more:
                            raise
                        text += more
        except json.JSONDecodeError:
            return set()
    return set(row) if isinstance(row, dict) else set()


def _prompt_only(keys: set) -> bool:
    return "prompt" in keys and not keys & {"messages", "completion", "chosen", "rejected", "label"}


def is_chat_data(inputs) -> bool:
    """Whether inputs are fine-tuning examples: every one a *.jsonl file whose first row has
    "messages", or "prompt" and "completion", or a "prompt" alone."""
    return bool(inputs) and all("messages" in keys or {"prompt", "completion"} <= keys or _prompt_only(keys)
                                for keys in map(_first_row_keys, inputs))


def is_prompt_data(inputs) -> bool:
    """Whether inputs are prompts alone (rows of "prompt" without a completion): replies to sample."""
    return bool(inputs) and all(_prompt_only(keys) for keys in map(_first_row_keys, inputs))


def example_tokens(example: dict, tokenizer, folder=None, doc_start: Sequence[int] = (),
                   doc_end: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, mask) of one of read_conversations' examples, mask 1 on the tokens trained on. Messages
    go through folder's chat template (tokenizer.hf_chat_tokens), which frames them itself; a text
    prompt and completion are doc_start + prompt + completion + doc_end (each encoded alone, so the
    completion's tokens are its own; a SentencePiece-style tokenizer's completion without the "▁" it
    puts before a text of its own: the prompt's continuation), the completion and doc_end trained on."""
    if "messages" in example:
        from pyllm.tokenizer.tokenizer import hf_chat_tokens

        if folder is None:
            raise ValueError("examples with messages need a chat template: fine-tune a Hugging Face folder that has one "
                             "(or a run fine-tuned from one)")
        return hf_chat_tokens(folder, tokenizer, example["messages"], example["train_from"],
                              **example.get("template", {}))
    prompt = [*doc_start, *tokenizer.encode_ordinary(example["prompt"])]
    # (the completion continues the prompt: a SentencePiece-style tokenizer puts no "▁" before it)
    continuation = getattr(tokenizer, "_encode_continuation", None)
    ids = (continuation(example["completion"], example["prompt"]) if continuation is not None else
           tokenizer.encode_ordinary(example["completion"]))
    completion = [*ids, *([] if doc_end is None else [doc_end])]
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def _val_split(n: int, val_fraction: float, inputs, what: str) -> list[bool]:
    """Which of n examples go to val: every round(1 / val_fraction)-th (the last one when there are
    fewer). ValueError for a bad fraction or fewer than 2 examples."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"{', '.join(map(str, inputs))}: {n} {what}; at least 2 are needed (one for validation)")
    every = max(2, round(1 / val_fraction))
    return [i % every == every - 1 if n >= every else i == n - 1 for i in range(n)]


def prepare_chat(inputs: Sequence[str | os.PathLike], tokenizer, folder, out_dir, val_fraction: float = 0.02,
                 show_progress: bool = True, doc_start: Sequence[int] = (), doc_end: int | None = None,
                 rows: bool = True) -> dict:
    """Tokenizes the examples of JSON Lines files (read_conversations; example_tokens: messages with
    a Hugging Face checkpoint folder's chat template, the ids apply_chat_template makes with the
    assistant's tokens marked) into out_dir/{train,val}.bin with their .docs.npy and .mask.npy.
    Every round(1 / val_fraction)-th example goes to val (the last one when there are fewer).
    Examples with nothing to train on are left out. rows: each kept one's example_row in
    {train,val}.rows.jsonl too (GRPO's reward functions get them). Returns counts.

    The files are read twice, a line at a time: first to check every line (before anything is
    written) and count them (the val split needs the count), then to tokenize and write them."""
    inputs = list(inputs)  # (read twice)
    n = sum(1 for path in inputs for _ in _conversations(path))
    in_val = _val_split(n, val_fraction, inputs, "conversation(s)")
    units = (((c,), where) for path in inputs for c, where in _conversations(path))
    parts, silent = _write_units(units, in_val, tokenizer, folder, out_dir, show_progress, doc_start, doc_end,
                                 "conversation(s)", "conversation with an assistant reply", rows=rows)
    stats = {"conversations": n, "without_assistant": silent}
    for name, part in parts.items():
        stats[f"{name}_conversations"] = part["docs"]
        stats[f"{name}_tokens"] = part["tokens"]
        stats[f"{name}_assistant_tokens"] = part["trained"]
    return stats


class _StreamedFile:
    """One of _write_units' files written as its values come, to a temp file beside path renamed
    into place at close (fsync first, as write_whole): text lines, or with a dtype the .npy np.save
    writes of them (width: values per row, 0 for a 1-D array), its header written first with no
    rows and again at close with their count: numpy pads it to 64 bytes, 128 for ours, with room to
    spare for any count's digits (numpy 1.23 on reserves 21 for arrays that grow)."""

    def __init__(self, path, dtype=None, width: int = 0):
        self.path, self.dtype, self.width, self.count = Path(path), dtype, width, 0
        remove_stale_temp_files(self.path)
        fd, self.tmp = new_temp_file(self.path)
        self._file = os.fdopen(fd, "w+b")
        self._reserved = self._file.write(self._header()) if dtype is not None else 0

    def _header(self) -> bytes:
        f = io.BytesIO()
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype)),
                                                 "fortran_order": False,
                                                 "shape": (self.count, self.width) if self.width else (self.count,)})
        return f.getvalue()

    def append(self, values) -> None:
        if self.dtype is None:
            self._file.write("".join(line + "\n" for line in values).encode("utf-8"))
            return
        values = np.asarray(values, self.dtype)
        self._file.write(values.tobytes())
        self.count += len(values)

    def close(self) -> None:
        if self.dtype is not None:
            header = self._header()
            if len(header) != self._reserved:  # (it would overwrite values or leave a gap)
                raise RuntimeError(f"{self.path}: numpy's .npy header for {self.count} rows is not as long as for 0")
            self._file.seek(0)
            self._file.write(header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        discard_temp_file(self._file, self.tmp)


def _write_units(units: Iterable[tuple[tuple, str | None]], in_val: Sequence[bool], tokenizer, folder, out_dir,
                 show_progress: bool, doc_start: Sequence[int], doc_end: int | None, what: str, kept: str,
                 labels: Sequence[bool] | None = None, rows: bool = False, margins: bool = False,
                 batch_docs: int = 512) -> tuple[dict, int]:
    """Tokenizes units of examples (example_tokens; a conversation alone, or a preference pair's
    chosen and rejected sides), each given with its "file:line" (named where the chat template fails
    on it; None: not named), into out_dir/{train,val}.bin and write_documents' files, each unit's
    documents one after the other, and with pairs the .pairs.npy naming them; labels (one per unit,
    KTO's): a .labels.npy of the units kept; margins (preference pairs'): a .margins.npy of the
    kept ones' (their chosen example's "margin"); rows (conversations): a .rows.jsonl of each kept
    one's example_row (read_rows). A unit with a side that has nothing to train on is left out.
    Written as the units come, batch_docs documents at a time, to temp files renamed into place once
    every unit is tokenized, each split's token file last (removed first: its presence says the set
    is whole, as write_documents'): memory holds a batch, not the set (every example's ids and masks
    had been held to the end). Returns ({split: {"docs", "tokens", "trained"}}, units left out)."""
    from tqdm import tqdm

    changed = (f"the {what.replace('(s)', 's')}' files changed while they were prepared (their lines are read twice: "
               "counted, then tokenized); prepare them again once nothing writes them")
    units = iter(units)
    first = next(units, None)  # (its size: pairs, or documents alone)
    if first is None:
        raise ValueError(changed)
    size = len(first[0])
    written = {".docs.npy": np.int64, ".mask.npy": np.uint8, **({".pairs.npy": np.int64} if size > 1 else {}),
               **({".labels.npy": np.bool_} if labels is not None else {}),
               **({".margins.npy": np.float32} if margins else {}), **({".rows.jsonl": None} if rows else {})}
    counts = {name: {"docs": 0, "tokens": 0, "trained": 0} for name in ("train", "val")}
    pending = {name: {side: [] for side in (".bin", *written)} for name in counts}
    files, silent = {}, 0
    out_dir = Path(out_dir)
    made = [p for p in (out_dir, *out_dir.parents) if not p.is_dir()]  # (removed again where nothing is written)
    out_dir.mkdir(parents=True, exist_ok=True)

    def flush(name: str) -> None:
        batch, count = pending[name], counts[name]
        if not batch[".bin"]:
            return
        lengths = np.fromiter(map(len, batch[".bin"]), np.int64, len(batch[".bin"]))
        batch[".bin"], batch[".mask.npy"] = np.concatenate(batch[".bin"]), np.concatenate(batch[".mask.npy"])
        batch[".docs.npy"] = count["tokens"] + np.cumsum(lengths)
        if size > 1:
            batch[".pairs.npy"] = np.arange(count["docs"], count["docs"] + len(lengths)).reshape(-1, size)
        for side, values in batch.items():
            files[name, side].append(values)
        count["docs"] += len(lengths)
        count["tokens"] += int(lengths.sum())
        count["trained"] += int(batch[".mask.npy"].sum())
        pending[name] = {side: [] for side in batch}

    try:
        for name in counts:
            files[name, ".bin"] = TokenWriter(out_dir / f"{name}.bin", tokenizer.vocab_size)
            for side, dtype in written.items():
                files[name, side] = _StreamedFile(out_dir / f"{name}{side}", dtype, size if side == ".pairs.npy" else 0)
            files[name, ".docs.npy"].append([0])
        for i, (unit, where) in enumerate(tqdm(itertools.chain([first], units), total=len(in_val),
                                               desc=f"tokenizing {what.replace('(s)', 's')}",
                                               disable=not show_progress)):
            if i >= len(in_val):
                raise ValueError(changed)
            val = in_val[i]
            try:
                sides = [example_tokens(example, tokenizer, folder, doc_start, doc_end) for example in unit]
            except Exception as e:  # a template's raise_exception, an undefined field: name the line it failed on
                import jinja2

                if where is None or not isinstance(e, (ValueError, TypeError, jinja2.TemplateError)):
                    raise
                kind = "" if isinstance(e, ValueError) else f"the chat template failed ({type(e).__name__}): "
                raise ValueError(f"{where}: {kind}{e}") from e
            if not all(any(mask) for _, mask in sides):
                silent += 1
                continue
            name = "val" if val else "train"
            batch = pending[name]
            for ids, mask in sides:
                batch[".bin"].append(np.asarray(ids, np.int64))
                batch[".mask.npy"].append(np.asarray(mask, np.uint8))
            if labels is not None:
                batch[".labels.npy"].append(bool(labels[i]))
            if rows:
                batch[".rows.jsonl"].append(json.dumps(example_row(unit[0]), ensure_ascii=False))
            if margins:
                batch[".margins.npy"].append(unit[0]["margin"])
            if len(batch[".bin"]) >= batch_docs:
                flush(name)
        if i + 1 != len(in_val):
            raise ValueError(changed)
        for name in counts:
            flush(name)
            if not counts[name]["docs"]:
                raise ValueError(f"no {name} {kept} left (of {len(in_val)})")
        for name in counts:
            (out_dir / f"{name}.bin").unlink(missing_ok=True)
            for side in CONVERSATION_FILES:
                if (name, side) in files:
                    files[name, side].close()
                else:  # (one an earlier set left: it would describe other tokens)
                    (out_dir / f"{name}{side}").unlink(missing_ok=True)
            files[name, ".bin"].close()  # last: its presence says the set is whole
    except BaseException:
        for f in files.values():
            f.abort()
        for folder_made in made:  # this run's folders, innermost first, while they are empty
            try:
                folder_made.rmdir()
            except OSError:
                break
        raise
    return counts, silent


# --- preference pairs (DPO) --------------------------------------------------------------------------

def read_preferences(path) -> list[tuple[dict, dict]]:
    """The preference pairs of a JSON Lines file, in TRL's formats, one per line:
      {"prompt": "text", "chosen": "text", "rejected": "text"}                 text (no chat template)
      {"prompt": [messages], "chosen": [messages], "rejected": [messages]}     conversations
      {"chosen": [messages], "rejected": [messages]}                           the prompt: their common first messages
    returned as (chosen, rejected) examples in read_conversations' form (the chosen and the rejected
    reply each after the same prompt, the replies trained); a line's "margin" (a number: how much
    better chosen is, TRL's RewardTrainer column) as the chosen example's "margin"."""
    return list(_preference_pairs(path))


def _preference_pairs(path) -> Iterator[tuple[dict, dict]]:
    """read_preferences' pairs one at a time (prepare_preferences holds none of them)."""
    for number, row, line in _jsonl_rows(path):
        prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
        pair = None
        if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
            pair = ({"prompt": prompt, "completion": chosen}, {"prompt": prompt, "completion": rejected})
        elif _is_messages(chosen) and _is_messages(rejected) and (prompt is None or _is_messages(prompt)):
            if prompt is None:  # TRL's implicit prompt: the messages both sides start with
                common = 0
                while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
                    common += 1
                prompt, chosen, rejected = chosen[:common], chosen[common:], rejected[common:]
            if prompt and chosen and rejected:
                template = _template_args(row, f"{path}:{number}")
                pair = tuple({"messages": prompt + reply, "train_from": len(prompt), **template}
                             for reply in (chosen, rejected))
        margin = row.get("margin")
        if pair is not None and "margin" in row:
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise ValueError(f"{path}:{number}: \"margin\" must be a finite number, got {margin!r}")
            pair[0]["margin"] = float(margin)
        if pair is None:
            raise ValueError(f"{path}:{number}: expected {{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}} "
                             "(all text, or all lists of messages) or {\"chosen\": [messages], \"rejected\": "
                             f"[messages]}} with a prompt in common, got {line.strip()[:80]!r}")
        yield pair


def is_preference_data(inputs) -> bool:
    """Whether inputs are preference pairs: every one a *.jsonl file whose first row has "chosen"
    and "rejected"."""
    return bool(inputs) and all(_first_row_keys(item) >= {"chosen", "rejected"} for item in inputs)


def prepare_preferences(inputs: Sequence[str | os.PathLike], tokenizer, folder, out_dir, val_fraction: float = 0.02,
                        show_progress: bool = True, doc_start: Sequence[int] = (), doc_end: int | None = None) -> dict:
    """prepare_chat for preference pairs (read_preferences): each pair's chosen and rejected
    sequences are two documents, one after the other, in out_dir/{train,val}.bin with their
    .docs.npy and .mask.npy (the replies' tokens marked), and .pairs.npy, the (P, 2) document
    indices of each pair. A pair with nothing to train on either side is left out. With a "margin"
    on every line, a .margins.npy of the kept pairs' (float32). Returns counts. The files are read
    twice, a line at a time, as prepare_chat reads them."""
    inputs = list(inputs)  # (read twice)
    n = with_margin = 0
    for chosen, _ in (pair for path in inputs for pair in _preference_pairs(path)):
        n, with_margin = n + 1, with_margin + ("margin" in chosen)
    in_val = _val_split(n, val_fraction, inputs, "preference pair(s)")
    if 0 < with_margin < n:
        raise ValueError(f"{with_margin} of {n} preference pairs have a \"margin\": give it on every line "
                         "or on none")
    pairs = ((pair, None) for path in inputs for pair in _preference_pairs(path))
    parts, silent = _write_units(pairs, in_val, tokenizer, folder, out_dir, show_progress, doc_start, doc_end,
                                 "preference pair(s)", "pair with a reply on both sides", margins=with_margin > 0)
    stats = {"pairs": n, "without_reply": silent}
    for name, part in parts.items():
        stats[f"{name}_pairs"] = part["docs"] // 2
        stats[f"{name}_tokens"] = part["tokens"]
    return stats


# --- unpaired examples (KTO) ----------------------------------------------------------------------

def read_kto(path) -> list[tuple[dict, bool]]:
    """The examples of a JSON Lines file in TRL's unpaired preference format, one per line:
      {"prompt": "text", "completion": "text", "label": true}                  text
      {"prompt": [messages], "completion": [messages], "label": false}         conversations
    as (example in read_conversations' form, desirable)."""
    return list(_kto_examples(path))


def _kto_examples(path) -> Iterator[tuple[dict, bool]]:
    """read_kto's examples one at a time (prepare_kto holds none of them)."""
    for number, row, line in _jsonl_rows(path):
        prompt, completion, label = row.get("prompt"), row.get("completion"), row.get("label")
        example = None
        if isinstance(prompt, str) and isinstance(completion, str):
            example = {"prompt": prompt, "completion": completion}
        elif _is_messages(prompt) and _is_messages(completion) and prompt and completion:
            example = {"messages": prompt + completion, "train_from": len(prompt),
                       **_template_args(row, f"{path}:{number}")}
        if example is None or not isinstance(label, bool):
            raise ValueError(f"{path}:{number}: expected {{\"prompt\": ..., \"completion\": ..., \"label\": true or "
                             f"false}} (text, or lists of messages), got {line.strip()[:80]!r}")
        yield example, label


def is_kto_data(inputs) -> bool:
    """Whether inputs are unpaired preference examples: every one a *.jsonl file whose first row has
    "prompt", "completion" and "label"."""
    return bool(inputs) and all(_first_row_keys(item) >= {"prompt", "completion", "label"} for item in inputs)


def _mismatched(example: dict, other: dict) -> dict:
    """example's prompt with other's completion (KTO's KL term's input)."""
    if "messages" in example:
        return {"messages": example["messages"][:example["train_from"]] + other["messages"][other["train_from"]:],
                "train_from": example["train_from"], **{k: v for k, v in example.items() if k == "template"}}
    return {"prompt": example["prompt"], "completion": other["completion"]}


def prepare_kto(inputs: Sequence[str | os.PathLike], tokenizer, folder, out_dir, val_fraction: float = 0.02,
                show_progress: bool = True, doc_start: Sequence[int] = (), doc_end: int | None = None) -> dict:
    """prepare_preferences for KTO's unpaired examples (read_kto): each example is written with its
    KL example, its prompt followed by the previous example's completion in its split (completions
    rotated by one, as TRL's KL dataset, though TRL rotates them within each batch: the packed loader
    shuffles the pairs, so a batch's KL completions are mostly not its own), as a pair of documents (.pairs.npy) the loader places
    side by side, and its label in .labels.npy. Returns counts. The files are read twice, a line at a
    time, as prepare_chat reads them."""
    inputs = list(inputs)  # (read twice)

    def examples() -> Iterator[tuple[dict, bool]]:
        return (e for path in inputs for e in _kto_examples(path))

    # The first pass keeps the labels and, of the examples, those that may end a split (its first
    # one's KL completion is the last one's): each split's last two as if there were at least
    # `every` examples (the split then does not depend on their count), else the last two of all.
    every = max(2, round(1 / val_fraction)) if 0.0 < val_fraction < 1.0 else 2  # (else _val_split says so)
    labels, kinds, ends = [], set(), {True: [], False: []}
    for i, (example, label) in enumerate(examples()):
        labels.append(label)
        kinds.add("messages" in example)
        ends[i % every == every - 1] = [*ends[i % every == every - 1][-1:], example]
    if len(kinds) > 1:  # a KL example joins one's prompt to another's completion
        raise ValueError("KTO examples must be all text or all lists of messages, not both")
    in_val = _val_split(len(labels), val_fraction, inputs, "example(s)")
    previous = ({True: ends[True][-1], False: ends[False][-1]} if len(labels) >= every
                else {True: ends[False][-1], False: ends[False][-2]})

    def units():
        # the previous example's completion in its split (the last one's for the first): TRL's
        # rotation [y_n, y_1, ..., y_{n-1}], so a batch of the whole split has TRL's KL pairs
        for i, (example, label) in enumerate(examples()):
            if i >= len(labels) or label != labels[i]:  # (the first pass's labels would go with other examples)
                raise ValueError("the KTO examples' files changed while they were prepared (their lines are read "
                                 "twice); prepare them again once nothing writes them")
            val = in_val[i]
            yield (example, _mismatched(example, previous[val])), None
            previous[val] = example

    parts, silent = _write_units(units(), in_val, tokenizer, folder, out_dir, show_progress, doc_start, doc_end,
                                 "example(s)", "example with a completion", labels=labels)
    stats = {"examples": len(labels), "desirable": sum(labels), "without_completion": silent}
    for name, part in parts.items():
        stats[f"{name}_examples"] = part["docs"] // 2
        stats[f"{name}_tokens"] = part["tokens"]
    return stats


def write_documents(path, docs: Sequence[np.ndarray], masks: Sequence[np.ndarray], vocab_size: int,
                    pairs: np.ndarray | None = None) -> None:
    """A token file of docs, one after another, and its .docs.npy offsets and .mask.npy; with pairs
    ((P, 2) document indices) a .pairs.npy too (else one left by earlier data is removed). Each
    document has at least one token and a mask of its length (ValueError naming it). An earlier
    set's token file is removed first: the token file, written last, says the set is whole (a
    failed write over an earlier set had left its tokens beside the new offsets, taken as a set)."""
    path = Path(path)
    if not len(docs) or len(docs) != len(masks):
        raise ValueError(f"write_documents: {len(docs)} documents and {len(masks)} masks: give one mask per "
                         "document, and at least one document")
    for i, (doc, mask) in enumerate(zip(docs, masks)):
        if not len(doc) or len(mask) != len(doc):
            raise ValueError(f"write_documents: document {i} has {len(doc)} tokens and a mask of {len(mask)}: every "
                             "document has at least one token and a mask of its length")
    path.unlink(missing_ok=True)
    if pairs is not None:
        write_whole(path.with_suffix(".pairs.npy"), np.asarray(pairs, np.int64))
    else:
        path.with_suffix(".pairs.npy").unlink(missing_ok=True)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)])
    write_whole(path.with_suffix(".docs.npy"), offsets)
    write_whole(path.with_suffix(".mask.npy"), np.concatenate(masks).astype(np.uint8))
    write_tokens(path, np.concatenate(docs), vocab_size)  # last: its presence says the set is whole


def has_documents(path) -> bool:
    return Path(path).with_suffix(".docs.npy").is_file() and Path(path).with_suffix(".mask.npy").is_file()


def pair_lengths(chosen: int, rejected: int, seq_len: int) -> tuple[int, int]:
    """How many tokens of a preference pair's two sequences fit one row of seq_len together: both
    whole when they fit; else the shorter whole if it is at most half the row and the longer cut
    to the rest, or both cut to half (their ends, the replies, are what is cut)."""
    if chosen + rejected <= seq_len:
        return chosen, rejected
    half = seq_len // 2
    if min(chosen, rejected) <= half:
        return (chosen, seq_len - chosen) if chosen <= rejected else (seq_len - rejected, rejected)
    return half, seq_len - half


class PackedLoader:
    """Batches of whole documents (conversations) packed into rows, for fine-tuning.

    Documents are drawn in a shuffled order, every one once per epoch (a new order each epoch,
    started when the last one is placed), into a window of the next LOOKAHEAD of them; each row takes the window's documents first-fit in
    their order (the first one that fits what is left of the row, until none does), so a row starts
    with the oldest waiting document and no document waits long; one longer than seq_len is cut to
    it; what is left of a row is padding. Targets are -1 except where the next token of the same
    document is marked in the mask (the assistant's tokens): the loss is the assistant's alone.
    cu_seqlens gives the model the offsets of the documents (and of each row's padding) in the
    batch's B * T tokens, so each is computed alone. As TokenLoader: a global batch of world_size *
    B rows is built alike on every rank and this rank takes rows [rank * B, (rank + 1) * B);
    state_dict() is the epoch, the position in its order and the waiting documents.

    Preference pairs (a .pairs.npy beside the token file: prepare_preferences) are placed as one:
    a pair's two documents go into the same row one after the other (chosen, then rejected), cut
    together to fit a row when they do not (pair_lengths). shuffle=False takes documents (pairs) in
    their order into the window, from which rows still choose what fits (the placed order is not
    the file's: read loader.docs for each row's documents; reference_logps' pass over a set).
    """

    # Documents a row may choose from. 1000 of bench/bench_sft.py's conversations (log-normal
    # lengths around 200 tokens, cut to 16..1024), rows of 1024, 3 epochs: strictly in order 18.7%
    # of the positions were padding, windows of 8 / 16 / 64 / 256 left 3.6 / 2.7 / 1.8 / 1.4%
    # (2026-11-30). Choosing costs a scan of the window per placed document; the order within an
    # epoch is random anyway.
    LOOKAHEAD = 64

    def __init__(self, path, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device="cpu", lookahead: int | None = None, shuffle: bool = True):
        check_batching("PackedLoader", batch_size, seq_len, rank, world_size)
        path = Path(path)
        self.tokens = open_tokens(path)
        self.offsets = np.load(path.with_suffix(".docs.npy"))
        self.mask = np.load(path.with_suffix(".mask.npy"), mmap_mode="r")
        if (self.offsets.ndim != 1 or len(self.offsets) < 2 or self.offsets[0] != 0
                or self.offsets[-1] != len(self.tokens) or len(self.mask) != len(self.tokens)
                or (np.diff(self.offsets) <= 0).any()):
            raise TokenFileError(f"{path}: its .docs.npy / .mask.npy do not describe its {len(self.tokens)} tokens; "
                                 "prepare the data again")
        self.pairs = None  # (P, 2) document indices, or None: every document on its own
        if path.with_suffix(".pairs.npy").is_file():
            self.pairs = np.load(path.with_suffix(".pairs.npy"))
            n = len(self.offsets) - 1
            if self.pairs.ndim != 2 or self.pairs.shape[1] != 2 or not np.array_equal(np.sort(self.pairs, None), np.arange(n)):
                raise TokenFileError(f"{path}: its .pairs.npy does not pair up its {n} documents; prepare the data again")
        self.labels = None  # KTO: each pair's (example's) label, from a .labels.npy
        if path.with_suffix(".labels.npy").is_file():
            self.labels = np.load(path.with_suffix(".labels.npy"))
            if self.pairs is None or self.labels.shape != (len(self.pairs),):
                raise TokenFileError(f"{path}: its .labels.npy does not label its pairs; prepare the data again")
        self.margins = None  # reward models: each pair's margin, from a .margins.npy
        if path.with_suffix(".margins.npy").is_file():
            self.margins = np.load(path.with_suffix(".margins.npy"))
            if self.pairs is None or self.labels is not None or self.margins.shape != (len(self.pairs),):
                raise TokenFileError(f"{path}: its .margins.npy does not go with its pairs; prepare the data again")
        self.path, self.batch_size, self.seq_len, self.seed = path, batch_size, seq_len, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.lookahead = max(1, self.LOOKAHEAD if lookahead is None else lookahead)
        self.shuffle = shuffle
        self.epoch, self.cursor, self.waiting = 0, 0, []
        self._order = self._epoch_order(0)

    @property
    def units(self) -> int:
        """What is placed as one: pairs, or documents."""
        return len(self.offsets) - 1 if self.pairs is None else len(self.pairs)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.units)
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.units)

    def _fill_window(self) -> None:
        """Tops the window up from this epoch's order; the next epoch starts once the window is
        empty, so epochs do not mix and every document is placed once in each."""
        if not self.waiting and self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        take = min(self.lookahead - len(self.waiting), len(self._order) - self.cursor)
        if take > 0:
            self.waiting += self._order[self.cursor:self.cursor + take].tolist()
            self.cursor += take

    def _placed(self, unit: int) -> list[tuple[int, int]]:
        """(document, tokens of it placed) for each document of a unit."""
        if self.pairs is None:
            return [(unit, min(int(self.offsets[unit + 1] - self.offsets[unit]), self.seq_len))]
        docs = [int(d) for d in self.pairs[unit]]
        lengths = pair_lengths(*(int(self.offsets[d + 1] - self.offsets[d]) for d in docs), self.seq_len)
        return list(zip(docs, lengths))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, cu_seqlens): x, y (B, T) int64 (y -1 where not trained), cu_seqlens int32.
        Sets self.targets (the trained targets in this rank's rows), self.global_targets (in all
        ranks' rows) and self.padding (this rank's padded positions): a loss averaged over all of a
        step's trained tokens weighs each batch's mean by its share; self.lengths, the lengths of
        this rank's documents (padding not counted), for the FLOPs count, and self.doc_targets,
        their trained targets; self.docs, the document index of each of cu_seqlens' segments (-1:
        padding); self.placed / self.global_placed, the
        units (documents, or pairs) in this rank's rows / all ranks'."""
        T = self.seq_len
        self.targets = self.global_targets = self.padding = self.placed = self.global_placed = 0
        self.lengths, self.docs, self.doc_targets = [], [], []
        x = np.zeros((self.batch_size, T), np.int64)
        y = np.full((self.batch_size, T), -1, np.int64)
        cu = [0]
        for row in range(self.batch_size * self.world_size):
            mine, r = row // self.batch_size == self.rank, row % self.batch_size
            used = 0
            while True:
                self._fill_window()
                pick = next((i for i, unit in enumerate(self.waiting)
                             if used + sum(n for _, n in self._placed(unit)) <= T), None)
                if pick is None:
                    break
                unit = self.waiting.pop(pick)
                self.global_placed += 1
                self.placed += mine
                for doc, length in self._placed(unit):
                    start, end = int(self.offsets[doc]), int(self.offsets[doc + 1])
                    nxt = min(start + length + 1, end)  # the targets: tokens start + 1 .. nxt - 1 of this document
                    trained = int(np.count_nonzero(self.mask[start + 1:nxt]))
                    self.global_targets += trained
                    if mine:
                        self.targets += trained
                        x[r, used:used + length] = self.tokens[start:start + length]
                        targets = np.asarray(self.tokens[start + 1:nxt], np.int64)
                        y[r, used:used + len(targets)] = np.where(self.mask[start + 1:nxt] != 0, targets, -1)
                        cu.append(r * T + used + length)
                        self.lengths.append(length)
                        self.docs.append(doc)
                        self.doc_targets.append(trained)
                    used += length
                if used == T:
                    break
            if mine and used < T:
                cu.append((r + 1) * T)  # the padding, a document of its own
                self.docs.append(-1)
                self.padding += T - used
        batch_x, batch_y = torch.from_numpy(x), torch.from_numpy(y)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)
        if self.device.type == "cuda":
            batch_x, batch_y = batch_x.pin_memory().to(self.device, non_blocking=True), batch_y.pin_memory().to(
                self.device, non_blocking=True)
            cu_seqlens = cu_seqlens.pin_memory().to(self.device, non_blocking=True)
        return batch_x, batch_y, cu_seqlens

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "waiting": list(self.waiting), "path": str(self.path),
                "seed": self.seed, "units": self.units, "tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:  # the cursor points into the seed's order of the epoch
            raise ValueError(f"this loader's seed is {self.seed}, the state's {state['seed']}: its place in the epoch "
                             "is in that seed's order of the documents (resume with the run's seed)")
        # Another set's place (as TokenLoader's check): a cursor past this set's end had given
        # all-padding batches forever, an index past it an IndexError; states before 2026-12-06
        # recorded no sizes, and are checked by their cursor and waiting documents alone.
        units, tokens = state.get("units", self.units), state.get("tokens", len(self.tokens))
        if (units, tokens) != (self.units, len(self.tokens)) or not 0 <= state["cursor"] <= self.units or any(
                not 0 <= u < self.units for u in state["waiting"]):
            raise TokenFileError(f"{self.path} holds {self.units:,} {'pairs' if self.pairs is not None else 'documents'} "
                                 f"of {len(self.tokens):,} tokens, the state's data ({state.get('path')}) {units:,} of "
                                 f"{tokens:,}: the files changed since, or are another set's")
        self.epoch, self.cursor, self.waiting = state["epoch"], state["cursor"], list(state["waiting"])
        self._order = self._epoch_order(self.epoch)
