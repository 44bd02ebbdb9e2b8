"""Preparing one large text file into token files: pyllm prepare vs nanoGPT's prepare.py, time and
peak memory.

The text: the Python standard library's .py files (bytes that are not UTF-8 replaced), repeated to
--mb MB (default 200; --quick 20) in one file, as a corpus shipped as one file is (enwik8/9,
shakespeare's input.txt, a dump). The tokenizer: a 32768-id vocabulary (--quick: 8192) with GPT-2's
split pattern, trained by pyllm on the first 20 MB (--quick: 4) and given to tiktoken as the same
ranks, so both sides write the same ids. Each side runs in a process of its own, one after the other per round
(--repeat rounds), after its imports and the tokenizer's load:
  pyllm     pyllm.data.prepare([file], tokenizer, out): parts of the file tokenized as they are read
            (data.PART_BYTES), ids written as they come, on all threads
  nanoGPT   data/shakespeare/prepare.py's way: the file read whole, tiktoken's encode_ordinary on
            it (one thread: one text), np.array(ids, uint16).tofile (openwebtext's prepare.py maps
            the same call over documents with datasets; a single file is one call)
Rows: seconds, MB/s, the process's peak RSS and its peak over the RSS it had before the work (its
imports and tokenizer), whether its ids (train.bin then val.bin for pyllm: one document, split by
position) equal the other's, <|endoftext|> last.
"""
from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import numpy as np  # noqa: E402


def worker(side: str, text_path: str, tokenizer_path: str, out: str) -> None:
    """One side's prepare, in this process: prints {"s", "rss_before_mb"} as JSON."""
    from pyllm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_path)
    if side == "nanoGPT":
        enc = tok.to_tiktoken("bench")
        eot = enc.encode_single_token("<|endoftext|>")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if side == "pyllm":
        from pyllm import data

        data.prepare([text_path], tok, out, show_progress=False)
    else:
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
        ids = enc.encode_ordinary(text)
        ids.append(eot)
        np.array(ids, dtype=np.uint16).tofile(os.path.join(out, "train.bin"))
    print(json.dumps({"s": time.perf_counter() - t0, "rss_before_mb": before}))


def run_side(side: str, text_path: Path, tokenizer_path: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--worker", side, str(text_path), str(tokenizer_path), str(out)],
                            stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{side}: exit {proc.returncode}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_mb": usage.ru_maxrss / 1024}


def ids_of(side: str, out: Path) -> np.ndarray:
    if side == "nanoGPT":
        return np.fromfile(out / "train.bin", dtype=np.uint16)
    from pyllm import data

    return np.concatenate([np.asarray(data.open_tokens(out / f"{s}.bin")) for s in ("train", "val")])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
        return 0
    parser = common.base_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--mb", type=int, help="the file's size in MB (default 200; --quick 20)")
    args = parser.parse_args()
    if args.device != "cpu":  # (bench/gpu_check.sh runs every script with --device cuda: no GPU time spent here)
        print("# bench_prepare: data preparation runs on the CPU; skipped with --device cuda")
        return 0
    if common.peer_module("tiktoken", "bench_prepare", "tiktoken is not installed; nothing to compare with") is None:
        return 0
    from pyllm import data
    from pyllm.tokenizer import Tokenizer

    size = (args.mb or (20 if args.quick else 200)) * 10 ** 6
    vocab_size = 8192 if args.quick else 32768
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text_path = tmp / "corpus.txt"
        # So that both sides tokenize the same text, as one document: a literal <|endoftext|> (in a few of
        # its files) ends a document for pyllm, as in TinyStories' files, and nanoGPT's text-mode open()
        # reads CRLF as LF where pyllm reads the bytes as they are: both left out
        pieces = [f.read_bytes().decode("utf-8", "replace").replace("<|endoftext|>", "").replace("\r", "").encode()
                  for f in data.stdlib_corpus()]
        with open(text_path, "wb") as f:
            written = 0
            for piece in itertools.cycle(pieces):  # (whole files: no character cut at the end)
                if written >= size:
                    break
                f.write(piece)
                written += len(piece)
        size = written
        with open(text_path, encoding="utf-8") as f:
            head = f.read((4 if args.quick else 20) * 10 ** 6)
        tok = Tokenizer.train([head], vocab_size, pattern="gpt2", special_tokens=("<|endoftext|>",),
                              show_progress=False)
        tokenizer_path = tmp / "tok.bpe"
        tok.save(tokenizer_path)
        print(f"# prepare on {common.device_description('cpu')}: one {size / 1e6:.0f} MB file, vocab {vocab_size}, "
              f"gpt2 pattern, {len(os.sched_getaffinity(0))} threads for pyllm, {args.repeat} rounds")
        runs: dict[str, list[dict]] = {"pyllm": [], "nanoGPT": []}
        for _ in range(args.repeat):  # interleaved rounds
            for side in runs:
                runs[side].append(run_side(side, text_path, tokenizer_path, tmp / side))
        same = bool(np.array_equal(ids_of("pyllm", tmp / "pyllm"), ids_of("nanoGPT", tmp / "nanoGPT")))
    rows = []
    for side, samples in runs.items():
        s = common.timing([r["s"] for r in samples])
        peak = max(r["peak_mb"] for r in samples)
        over = max(r["peak_mb"] - r["rss_before_mb"] for r in samples)
        rows.append({"impl": side, "s": round(s, 2), "MB/s": round(size / 1e6 / s, 1), "peak RSS MB": round(peak),
                     "over its start MB": round(over), "ids equal": same, **common.spread(s)})
    base = rows[1]
    for r in rows:
        # (MB rounded: both under 1 MB over their start, a tiny --mb, read 1.0x, not 0.0x)
        memory = max(base["over its start MB"], 1) / max(r["over its start MB"], 1)
        r["vs nanoGPT"] = f"{base['s'] / r['s']:.2f}x time, {memory:.1f}x memory"
    common.print_table(rows, ["impl", "s", "MB/s", "peak RSS MB", "over its start MB", "vs nanoGPT", "ids equal"])
    common.write_json(args.json, "prepare", "cpu", rows, {"file_MB": size / 1e6, "vocab_size": vocab_size,
                                                          "part_bytes": data.PART_BYTES})
    return 0


if __name__ == "__main__":
    sys.exit(main())
