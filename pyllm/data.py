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
"""
from __future__ import annotations

import json
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


def write_tokens(path, tokens: np.ndarray, vocab_size: int, doc_end: int | None = None) -> None:
    """Writes a token file atomically (temp file, then rename); doc_end: the id that ends each
    document in it, if any (TokenLoader's doc_mask needs it)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, dtype.itemsize, tokens.size, vocab_size,
                             0 if doc_end is None else doc_end + 1).ljust(HEADER_BYTES, b"\0"))
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
    magic, version, itemsize, count, vocab_size, doc_end = _HEADER.unpack(head[:_HEADER.size])
    if version != VERSION:
        raise TokenFileError(f"{path}: token file format version {version}, this pyllm reads version {VERSION}")
    if itemsize not in (2, 4):
        raise TokenFileError(f"{path}: header says {itemsize} bytes per token, expected 2 or 4")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        raise TokenFileError(f"{path} is truncated or corrupt: header promises {count} tokens ({expected} bytes), file has {size} bytes")
    return {"count": count, "dtype": np.dtype(np.uint16 if itemsize == 2 else np.uint32), "vocab_size": vocab_size,
            "doc_end": doc_end - 1 if doc_end else None}


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
    write_tokens(out_dir / "train.bin", train, tokenizer.vocab_size, eot)
    write_tokens(out_dir / "val.bin", val, tokenizer.vocab_size, eot)
    return {"train_tokens": int(len(train)), "val_tokens": int(len(val)), "files": len(files), "bytes": total_bytes}


# --- loader ----------------------------------------------------------------------------------------

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
        self.tokens = open_tokens(path)
        self.path, self.batch_size, self.seq_len = Path(path), batch_size, seq_len
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        if len(self.tokens) < seq_len + 1:
            raise TokenFileError(f"{path} holds {len(self.tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.doc_end = read_header(path)["doc_end"] if doc_mask else None
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
        if cu_seqlens is not None:
            return batch[:, :-1], batch[:, 1:], cu_seqlens
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "path": str(self.path)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


# --- conversations -------------------------------------------------------------------------------

def read_conversations(path) -> list[dict]:
    """The examples of a JSON Lines file for fine-tuning, one per line, in the formats of OpenAI's
    fine-tuning files and Hugging Face / TRL datasets:
      {"messages": [{"role": ..., "content": ...}, ...]}     a conversation (the assistant's turns trained)
      {"prompt": [messages], "completion": [messages]}       the completion's assistant turns trained
      {"prompt": "text", "completion": "text"}               no chat template: the completion trained
    returned as {"messages": [...], "train_from": index of the first trainable message} or
    {"prompt": str, "completion": str}."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            example = _example(row) if isinstance(row, dict) else None
            if example is None:
                raise ValueError(f"{path}:{number}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}} "
                                 f"or {{\"prompt\": ..., \"completion\": ...}} (both text or both messages), got "
                                 f"{line.strip()[:80]!r}")
            examples.append(example)
    return examples


def _example(row: dict) -> dict | None:
    def messages(value):
        return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)

    if "messages" in row:
        return {"messages": row["messages"], "train_from": 0} if messages(row["messages"]) else None
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": completion}
    if messages(prompt) and messages(completion):
        return {"messages": prompt + completion, "train_from": len(prompt)}
    return None


def is_chat_data(inputs) -> bool:
    """Whether inputs are fine-tuning examples: every one a *.jsonl file whose first row has
    "messages", or "prompt" and "completion"."""
    if not inputs:
        return False
    for item in inputs:
        path = Path(item)
        if path.suffix != ".jsonl" or not path.is_file():
            return False
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            return False
        if not isinstance(row, dict) or not ("messages" in row or {"prompt", "completion"} <= row.keys()):
            return False
    return True


def example_tokens(example: dict, tokenizer, folder=None, doc_start: Sequence[int] = (),
                   doc_end: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, mask) of one of read_conversations' examples, mask 1 on the tokens trained on. Messages
    go through folder's chat template (tokenizer.hf_chat_tokens), which frames them itself; a text
    prompt and completion are doc_start + prompt + completion + doc_end (each encoded alone, so the
    completion's tokens are its own), the completion and doc_end trained on."""
    if "messages" in example:
        from pyllm.tokenizer.tokenizer import hf_chat_tokens

        if folder is None:
            raise ValueError("examples with messages need a chat template: fine-tune a Hugging Face folder that has one "
                             "(or a run fine-tuned from one)")
        return hf_chat_tokens(folder, tokenizer, example["messages"], example["train_from"])
    prompt = [*doc_start, *tokenizer.encode_ordinary(example["prompt"])]
    completion = [*tokenizer.encode_ordinary(example["completion"]), *([] if doc_end is None else [doc_end])]
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def prepare_chat(inputs: Sequence[str | os.PathLike], tokenizer, folder, out_dir, val_fraction: float = 0.02,
                 show_progress: bool = True, doc_start: Sequence[int] = (), doc_end: int | None = None) -> dict:
    """Tokenizes the examples of JSON Lines files (read_conversations; example_tokens: messages with
    a Hugging Face checkpoint folder's chat template, the ids apply_chat_template makes with the
    assistant's tokens marked) into out_dir/{train,val}.bin with their .docs.npy and .mask.npy.
    Every round(1 / val_fraction)-th example goes to val (the last one when there are fewer).
    Examples with nothing to train on are left out. Returns counts."""
    from tqdm import tqdm

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    conversations = [c for path in inputs for c in read_conversations(path)]
    if len(conversations) < 2:
        raise ValueError(f"{', '.join(map(str, inputs))}: {len(conversations)} conversation(s); at least 2 are needed "
                         "(one for validation)")
    every = max(2, round(1 / val_fraction))
    in_val = [i % every == every - 1 for i in range(len(conversations))] if len(conversations) >= every else \
        [i == len(conversations) - 1 for i in range(len(conversations))]
    parts = {"train": ([], []), "val": ([], [])}
    silent = 0
    for example, val in zip(tqdm(conversations, desc="tokenizing conversations", disable=not show_progress), in_val):
        ids, mask = example_tokens(example, tokenizer, folder, doc_start, doc_end)
        if not any(mask):
            silent += 1
            continue
        parts["val" if val else "train"][0].append(np.asarray(ids, np.int64))
        parts["val" if val else "train"][1].append(np.asarray(mask, np.uint8))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"conversations": len(conversations), "without_assistant": silent}
    for name, (docs, masks) in parts.items():
        if not docs:
            raise ValueError(f"no {name} conversation with an assistant reply left (of {len(conversations)})")
        write_documents(out_dir / f"{name}.bin", docs, masks, tokenizer.vocab_size)
        stats[f"{name}_conversations"] = len(docs)
        stats[f"{name}_tokens"] = int(sum(map(len, docs)))
        stats[f"{name}_assistant_tokens"] = int(sum(int(m.sum()) for m in masks))
    return stats


def write_documents(path, docs: Sequence[np.ndarray], masks: Sequence[np.ndarray], vocab_size: int) -> None:
    """A token file of docs, one after another, and its .docs.npy offsets and .mask.npy."""
    path = Path(path)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    np.save(path.with_suffix(".docs.npy"), offsets)
    np.save(path.with_suffix(".mask.npy"), np.concatenate(masks).astype(np.uint8))
    write_tokens(path, np.concatenate(docs), vocab_size)  # last: its presence says the set is whole


def has_documents(path) -> bool:
    return Path(path).with_suffix(".docs.npy").is_file() and Path(path).with_suffix(".mask.npy").is_file()


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
    """

    # Documents a row may choose from. 1000 of bench/bench_sft.py's conversations (log-normal
    # lengths around 200 tokens, cut to 16..1024), rows of 1024, 3 epochs: strictly in order 18.7%
    # of the positions were padding, windows of 8 / 16 / 64 / 256 left 3.6 / 2.7 / 1.8 / 1.4%
    # (2026-11-30). Choosing costs a scan of the window per placed document; the order within an
    # epoch is random anyway.
    LOOKAHEAD = 64

    def __init__(self, path, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device="cpu", lookahead: int | None = None):
        path = Path(path)
        self.tokens = open_tokens(path)
        self.offsets = np.load(path.with_suffix(".docs.npy"))
        self.mask = np.load(path.with_suffix(".mask.npy"), mmap_mode="r")
        if (self.offsets.ndim != 1 or len(self.offsets) < 2 or self.offsets[0] != 0
                or self.offsets[-1] != len(self.tokens) or len(self.mask) != len(self.tokens)
                or (np.diff(self.offsets) <= 0).any()):
            raise TokenFileError(f"{path}: its .docs.npy / .mask.npy do not describe its {len(self.tokens)} tokens; "
                                 "prepare the data again")
        self.path, self.batch_size, self.seq_len, self.seed = path, batch_size, seq_len, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.lookahead = max(1, self.LOOKAHEAD if lookahead is None else lookahead)
        self.epoch, self.cursor, self.waiting = 0, 0, []
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.offsets) - 1)

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

    def _length(self, doc: int) -> int:
        return min(int(self.offsets[doc + 1] - self.offsets[doc]), self.seq_len)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, cu_seqlens): x, y (B, T) int64 (y -1 where not trained), cu_seqlens int32.
        Sets self.targets (the trained targets in this rank's rows), self.global_targets (in all
        ranks' rows) and self.padding (this rank's padded positions): a loss averaged over all of a
        step's trained tokens weighs each batch's mean by its share; self.lengths, the lengths of
        this rank's documents (padding not counted), for the FLOPs count."""
        T = self.seq_len
        self.targets = self.global_targets = self.padding = 0
        self.lengths = []
        x = np.zeros((self.batch_size, T), np.int64)
        y = np.full((self.batch_size, T), -1, np.int64)
        cu = [0]
        for row in range(self.batch_size * self.world_size):
            mine, r = row // self.batch_size == self.rank, row % self.batch_size
            used = 0
            while True:
                self._fill_window()
                pick = next((i for i, doc in enumerate(self.waiting) if used + self._length(doc) <= T), None)
                if pick is None:
                    break
                doc = self.waiting.pop(pick)
                start, end = int(self.offsets[doc]), int(self.offsets[doc + 1])
                length = self._length(doc)
                nxt = min(start + length + 1, end)  # the targets: tokens start + 1 .. nxt - 1 of this document
                trained = int(np.count_nonzero(self.mask[start + 1:nxt]))
                self.global_targets += trained
                if mine:
                    self.targets += trained
                    x[r, used:used + length] = self.tokens[start:start + length]
                    targets = np.asarray(self.tokens[start + 1:nxt], np.int64)
                    y[r, used:used + len(targets)] = np.where(self.mask[start + 1:nxt] == 1, targets, -1)
                    cu.append(r * T + used + length)
                    self.lengths.append(length)
                used += length
                if used == T:
                    break
            if mine and used < T:
                cu.append((r + 1) * T)  # the padding, a document of its own
                self.padding += T - used
        batch_x, batch_y = torch.from_numpy(x), torch.from_numpy(y)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)
        if self.device.type == "cuda":
            batch_x, batch_y = batch_x.pin_memory().to(self.device, non_blocking=True), batch_y.pin_memory().to(
                self.device, non_blocking=True)
            cu_seqlens = cu_seqlens.pin_memory().to(self.device, non_blocking=True)
        return batch_x, batch_y, cu_seqlens

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "waiting": list(self.waiting), "path": str(self.path)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.waiting = state["epoch"], state["cursor"], list(state["waiting"])
        self._order = self._epoch_order(self.epoch)
