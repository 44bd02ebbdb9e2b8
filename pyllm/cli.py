"""The `pyllm` command (also `python -m pyllm`)."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from pyllm.data import eot_id, write_whole  # (importing pyllm, this module's package, has loaded torch and numpy already)


def cmd_info(args) -> int:
    import torch

    import pyllm
    from pyllm import _C, _cpu_guard
    from pyllm.ops import BACKENDS, _util

    print(f"pyllm {pyllm.__version__}  (torch {torch.__version__}, python {sys.version.split()[0]})")
    if _util.HAS_CUDA_KERNELS:
        print(f"CUDA kernels: built for sm {_util.CUDA_ARCHS.replace(',', ', ')} (CUDA runtime {_C.cuda_runtime_version()}, static)")
        n = _C.cuda_device_count()
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        if _util.cuda_usable():
            old = [f"cuda:{i} (sm {'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
                   for i in range(len(gpus)) if not _util.gpu_runs_kernels(i)]
            print(f"GPU usable now: yes, {n} device(s): {', '.join(gpus)}"
                  + (f"; {', '.join(old)} older than the kernels need: torch's ops run there" if old else ""))
        else:
            if torch.version.cuda is None:
                why = "torch is a CPU-only build"
            elif not torch.cuda.is_available():
                why = f"torch (CUDA {torch.version.cuda}) sees no GPU"
            else:
                why = "no device visible to pyllm"
            print(f"GPU usable now: no ({why}; the CUDA runtime counts {n} device(s): 0 also when no driver is installed)")
    else:
        print("CUDA kernels: not built (no nvcc at build time, or PYLLM_CUDA=off)")
        print(f"GPU usable now: no (torch.cuda.is_available() = {torch.cuda.is_available()})")
    n_threads = torch.get_num_threads()
    threads = (f"OpenMP, {n_threads} thread{'s' if n_threads != 1 else ''}" if _C.cpu_openmp
               else "one thread (built without OpenMP)")
    built_with = _cpu_guard.build_flags()
    if len(_C.cpu_levels) > 1:  # a dispatch build: say which copy runs
        levels = ", ".join(name if runs else f"{name} (not on this CPU)" for name, runs in _C.cpu_levels)
        print(f"CPU kernels: level {_C.cpu_level} of {levels} (PYLLM_CPU_LEVEL picks one), compiled paths "
              f"{_C.cpu_isa}; base level built with {built_with or 'compiler default flags'}; {threads}")
    else:
        print(f"CPU kernels: compiled paths {_C.cpu_isa} ({built_with or 'compiler default flags'}); {threads}")
    if "avx512bf16" in _C.cpu_isa:
        how = "vdpbf16ps dot products" if _C.flash_attn_cpu_bf16_dot() else "fp32 tiles (vdpbf16ps is slow on this CPU)"
        print(f"  bf16 attention scores: {how}; PYLLM_ATTN_CPU_BF16_DOT=0/1 overrides")
    if platform.machine().lower() in ("aarch64", "arm64"):
        print("  bf16 attention forward and backward: fp32 tiles (AMX is x86's)")
    else:
        amx = {"on": "AMX tiles", "off": "AMX tiles off (PYLLM_ATTN_CPU_AMX=0)",
               "unavailable": "no AMX (not in this build's -march, or the CPU or kernel does not allow it)"}
        print(f"  bf16 attention forward and backward: {amx[_C.flash_attn_cpu_amx()]}; PYLLM_ATTN_CPU_AMX=0 turns them off")
    print("ops:")
    for op, by_device in BACKENDS.items():
        for device, dtypes in by_device.items():
            built = device == "cpu" or _util.HAS_CUDA_KERNELS
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            print(f"  {op:<14} {device:<5} {'built' if built else 'not built':<10} {names}")
    return 0


def cmd_bench(args) -> int:
    bench_dir = Path(args.dir) if args.dir else Path(__file__).resolve().parent.parent / "bench"
    if not bench_dir.is_dir() or not any(bench_dir.glob("bench_*.py")):
        print(f"pyllm bench runs the scripts in bench/ of a source checkout; none in {bench_dir}: give a clone's "
              "with --dir CLONE/bench (it measures this installed pyllm unless the clone is built)", file=sys.stderr)
        return 2
    scripts = sorted(bench_dir.glob("bench_*.py"))
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        extra = (["--quick"] if args.quick else []) + (["--device", args.device] if args.device else [])
        code = subprocess.call([sys.executable, str(script), *extra])
        if code:  # (a killed script's -9 had been OR-ed into exit 247, with no word of which)
            failed.append(f"{script.name} ({f'killed by signal {-code}' if code < 0 else f'exit {code}'})")
    if failed:
        print(f"pyllm bench: {len(failed)} of {len(scripts)} scripts failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0



# --- config files --------------------------------------------------------------------------------

def load_config_file(path) -> dict:
    """A TOML (.toml), YAML (.yaml/.yml) or JSON (.json) file of training options; a [model] table
    holds ModelConfig overrides. Relative paths in it are the working directory's, as a flag's are."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix.lower() == ".json":  # (HfArgumentParser's other format; it had been read as TOML)
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    elif path.suffix.lower() == ".py":  # nanoGPT's config/*.py (Python assignments, exec'd by its configurator.py)
        raise ValueError(f"{path} is a Python file: pyllm does not run config code (nanoGPT's configurator execs it); "
                         f"write a TOML file instead, with pyllm's names: {_nanogpt_keys()}, and in the [model] table "
                         "block_size, bias, dropout, mlp = \"gelu_exact\" (nanoGPT's nn.GELU), norm = \"layernorm\", "
                         "positions = \"learned\" (or preset = \"gpt2-124m\" with mlp = \"gelu_exact\")")
    elif path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise RuntimeError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a .toml file") from e
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from e
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError as e:
                raise RuntimeError(f"{path}: reading TOML on Python 3.10 needs tomli (pip install tomli), or use YAML") from e
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a table of options at the top level, got {type(doc).__name__}")
    return doc


def parse_overrides(items) -> dict:
    """['n_layers=2', 'dropout=0.1', 'bias=true', 'window_layers=[1, 3]'] -> {'n_layers': 2,
    'dropout': 0.1, 'bias': True, 'window_layers': [1, 3]}."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--model takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        low = value.strip().lower()
        if low.startswith("["):
            try:
                out[key] = json.loads(value)
            except ValueError as e:
                raise ValueError(f"--model {key}: {value!r} is not a JSON list ({e})") from None
        elif low in ("true", "false"):
            out[key] = low == "true"
        elif low in ("none", "null"):
            out[key] = None
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


# --- tokenizer and data for `train` ------------------------------------------------------------------

def tokenizer_class():
    """pyllm's BPE tokenizer class (a seam for tests)."""
    from pyllm.tokenizer import Tokenizer

    return Tokenizer


def load_tokenizer(path):
    """A run's tokenizer: pyllm's file, or nanoGPT's meta.pkl (a character vocabulary) for a run
    trained on nanoGPT's token files."""
    from pyllm.tokenizer.chars import CharTokenizer, is_nanogpt_meta

    return CharTokenizer.load(path) if is_nanogpt_meta(path) else tokenizer_class().load(str(path))


def text_tokenizer(path, flag: str):
    """A pyllm tokenizer to tokenize text with; nanoGPT's meta.pkl refused with what to do."""
    from pyllm.tokenizer.chars import is_nanogpt_meta

    if is_nanogpt_meta(path):
        raise ValueError(f"{flag} {path} is nanoGPT's character vocabulary (meta.pkl): pyllm reads it beside nanoGPT's "
                         "token files (--data FOLDER) and does not tokenize text with it; give a pyllm tokenizer "
                         "(`pyllm tokenizer train`, or Tokenizer.from_tiktoken / Tokenizer.from_hf saved)")
    return tokenizer_class().load(str(path))


def is_char_meta(path) -> bool:
    """Whether a nanoGPT meta.pkl holds a character vocabulary (stoi / itos), not a vocab_size alone."""
    from pyllm.tokenizer.chars import CharTokenizer

    try:
        CharTokenizer.load(path)
    except Exception:
        return False
    return True


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizer files (pyllm's, or nanoGPT's meta.pkl) make the same ids: the same
    bytes, else the same definition (merges, pattern, special tokens, normalization; characters)."""
    if Path(a).read_bytes() == Path(b).read_bytes():
        return True
    definition = lambda tok: (tok.stoi if hasattr(tok, "stoi")  # noqa: E731  (nanoGPT's characters)
                              else {k: v for k, v in tok.__getstate__().items() if k != "name"})
    try:
        return definition(load_tokenizer(a)) == definition(load_tokenizer(b))
    except Exception:  # one of them not a tokenizer at all: not the same
        return False


SAMPLE_WINDOW = 1 << 14  # bytes: the sample's pieces, short enough to spread through a file, long enough for its words


def training_sample(files, max_bytes: int) -> tuple[list, str]:
    """What the tokenizer trains on, (file paths or texts, what they are): every file when max_bytes
    is 0 or they hold no more; else about max_bytes spread evenly over the corpus, each file giving
    its share by size as windows of whole lines (a JSON Lines file's rows: their "text") at evenly
    spaced offsets, so that tokenizer training sees the whole corpus's variety at a fraction of its
    cost. (Every k-th whole file had been taken: one large file was read whole, and of a small
    file and a large one only the small one.)"""
    import math

    from pyllm import data

    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    if max_bytes <= 0 or total <= max_bytes:
        return files, f"{len(files)} of {len(files)} files"
    texts = []
    for f, size in zip(files, sizes):
        share = size * max_bytes / total
        n = max(1, math.ceil(share / SAMPLE_WINDOW))
        width = max(1, int(share / n))
        rows = data.is_text_rows(f)
        with open(f, "rb") as fh:
            for i in range(n):
                start = max(0, min(size - width, int(size * (i + 0.5) / n - width / 2)))
                fh.seek(start)
                chunk = fh.read(width)
                for sep in (b"\n",) if rows else (b"\n", b" "):  # cut at a line's (else a word's) edge
                    first = chunk.find(sep) + 1 if start > 0 else 0
                    last = chunk.rfind(sep) + 1 if start + len(chunk) < size else len(chunk)
                    if 0 <= first < last and (start == 0 or first > 0) and last > 0:
                        chunk = chunk[first:last]
                        break
                else:
                    continue  # (no line, nor word, whole in the window)
                text = chunk.decode("utf-8", errors="replace")
                if rows:
                    for line in text.splitlines():
                        try:
                            row = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(row, dict) and isinstance(row.get("text"), str):
                            texts.append(row["text"])
                else:
                    texts.append(text)
    return texts, f"about {sum(map(len, texts)):,} characters spread over {len(files)} files"


def copy_into(source, dest) -> None:
    """source copied to dest through a new temp file renamed into place: a symlink at dest (in a
    downloaded folder) is replaced, never written through, and a reader never sees half a file."""
    from pyllm.data import new_temp_file

    dest = Path(dest)
    fd, tmp = new_temp_file(dest)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path) -> dict:
    """One of the JSON files pyllm writes beside a run or its data (run.json, source.json, a
    tokenizer's .json), with a message naming it when it does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): restore it (a data folder's source.json or a tokenizer's "
                         ".json may be deleted instead: pyllm then prepares that again)") from e


def read_run(run_dir) -> dict:
    """A run folder's run.json ({} without one), its paths into the folder itself followed to where the
    folder is now: a run folder moved, renamed or copied elsewhere (another machine) resumes, samples
    and exports from its own tokenizer and token files (it had looked for them where it was written,
    and failed there, or read the original's). "was" is where the folder was written."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    was = run.get("run_dir")
    if was is None:  # (written before run.json said where its folder was: its tokenizer.bpe's or data/'s parent)
        guesses = [Path(p).parent for p, name in ((run.get("tokenizer"), "tokenizer.bpe"), (run.get("data_dir"), "data"))
                   if p and Path(p).name == name and not Path(p).exists()]
        was = str(guesses[0]) if guesses else None
    run["was"] = was
    for key in ("tokenizer", "data_dir"):
        moved = in_run_folder(run.get(key), was, run_dir)
        if moved != run.get(key) and (run.get("run_dir") or Path(moved).exists()):
            run[key] = moved
    return run


def in_run_folder(path, was, run_dir) -> str:
    """path, recorded by a run folder written at was, where it is now (read_run): one inside the folder
    follows it to run_dir; any other stays as it is."""
    if not path or not was:
        return path
    try:
        inside = Path(path).relative_to(was)
    except ValueError:
        return path
    return str((Path(run_dir) / inside).resolve())


def write_json(path, obj) -> None:
    """path written whole or not at all (a temp file renamed into place): a kill or a full disk
    mid-write had left an empty run.json / source.json that every later run failed to read."""
    write_whole(path, json.dumps(obj))


def ensure_tokenizer(inputs, path: Path, vocab_size: int, max_bytes: int, retrain: bool = False):
    """Trains a BPE tokenizer on inputs (None: the stdlib corpus) unless path already holds one
    trained on the same inputs and vocab size (or retrain). The file is replaced only once training
    succeeded."""
    from pyllm import data

    meta_path = path.with_name(path.name + ".json")
    files = data.stdlib_corpus() if inputs is None else data.collect_files(inputs)
    meta = {"inputs": [str(Path(p).resolve()) for p in inputs] if inputs else "stdlib", "vocab_size": vocab_size,
            "train_bytes": max_bytes, **({"files": files_stamp(files)} if inputs else {})}
    Tokenizer = tokenizer_class()
    if not retrain and path.exists() and meta_path.exists() and read_json(meta_path) == meta:
        print(f"tokenizer: reusing {path}")
        return Tokenizer.load(str(path))
    meta_path.unlink(missing_ok=True)  # until the new file is whole: a kill in between must not leave a stale match
    sample, what = training_sample(files, max_bytes)
    print(f"tokenizer: training a {vocab_size}-token BPE on {what}", flush=True)
    t0 = time.perf_counter()
    # File paths are read as they are (the pair counting runs in C++); JSON Lines files of {"text": ...}
    # rows are their texts
    texts = data.read_documents(sample) if sample is files and any(map(data.is_text_rows, sample)) else sample
    with warnings.catch_warnings():
        if inputs is None:  # (the stdlib corpus: 4 test files in other encodings, on purpose; as prepare)
            warnings.filterwarnings("ignore", message=".*are not UTF-8")
        tok = Tokenizer.train(texts, vocab_size, special_tokens=(data.EOT,))
    tok.save(str(path))
    write_json(meta_path, meta)
    print(f"tokenizer: trained in {time.perf_counter() - t0:.1f} s, saved to {path}")
    return tok


def files_stamp(files) -> list:
    """What tells a reuse that its inputs changed: each file's path, size, modification time and
    status-change time (an edit that kept the size and put the time back, cp -p or rsync -t over the
    file, had been reused stale; only a change of metadata, a chmod, costs a tokenization more)."""
    return [[str(Path(f).resolve()), (st := Path(f).stat()).st_size, st.st_mtime_ns, st.st_ctime_ns] for f in files]


def ensure_hf_tokenizer(folder: Path, path: Path):
    """The tokenizer.json of a Hugging Face checkpoint folder, in pyllm's format at path (converted
    again only when the source changed: the token files' reuse is keyed on path)."""
    source = folder / "tokenizer.json"
    if not source.is_file():
        raise ValueError(f"{folder}: no tokenizer.json to tokenize --data with (or give --tokenizer)")
    meta_path = path.with_name(path.name + ".json")
    config = folder / "tokenizer_config.json"  # (its tokenizer_class and legacy change the encoding too)
    meta = {"hf_tokenizer": str(source.resolve()), "mtime": source.stat().st_mtime,
            "config_mtime": config.stat().st_mtime if config.is_file() else None,
            # (config.json's model_type decides transformers' tokenizer class before tokenizer_class does)
            "model_config_mtime": ((folder / "config.json").stat().st_mtime if (folder / "config.json").is_file()
                                   else None),
            # from_hf's reading of the files: raised when it changes what an existing folder encodes to
            # (2: transformers 5's GemmaTokenizer class rebuild, 2026-12-06), so runs convert again
            # 3: config.json's model_type (Mistral's, Phi-3's: the tokenizer.json as it is), 2026-12-07
            "from_hf": 3}
    Tokenizer = tokenizer_class()
    if path.exists() and meta_path.exists() and read_json(meta_path) == meta:
        print(f"tokenizer: reusing {path}")
        return Tokenizer.load(str(path))
    meta_path.unlink(missing_ok=True)  # (as ensure_tokenizer)
    tok = Tokenizer.from_hf(source)
    tok.save(str(path))
    write_json(meta_path, meta)
    print(f"tokenizer: {source} ({tok.vocab_size} ids), saved to {path}")
    return tok


def hf_doc_markers(folder: Path) -> dict:
    """A Hugging Face model's document markers for data.prepare: what its tokenizer.json puts before
    a text (Llama 3's <|begin_of_text|>) and its tokenizer's eos_token after, as TRL's trainers
    append it (else its config's end-of-sequence id, the first of a list). (The config's first had
    been taken: Llama 3.x Instruct's <|end_of_text|>, where TRL appends its tokenizer's <|eot_id|>; a
    reward model's score, read at the last token that is not its pad, the tokenizer's eos_token,
    had been read at that end token instead of the text's last.)"""
    from pyllm.tokenizer.tokenizer import hf_prefix_ids, hf_special_token_id

    eos = hf_special_token_id(folder, "eos_token")
    if eos is None:
        eos = json.loads((folder / "config.json").read_text()).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
    return {"doc_start": hf_prefix_ids(folder / "tokenizer.json"), "doc_end": eos}


def recorded_tokenizer(data_dir: Path) -> Path | None:
    """The tokenizer file a run's data folder was made with (runs/main/data: ensure_token_files'
    source.json names it; no copy lies beside the token files), where it is as it was then."""
    source = data_dir / "source.json"
    meta = read_json(source) if source.is_file() else {}
    path = Path(meta["tokenizer"]) if isinstance(meta.get("tokenizer"), str) else None
    if path is not None and path.is_file() and path.stat().st_mtime == meta.get("tokenizer_mtime"):
        return path
    return None


def ensure_token_files(inputs, tokenizer, tokenizer_path: Path, out_dir: Path, val_fraction: float,
                       doc_markers: dict | None = None, chat_folder: Path | None = None, rows: bool = True) -> Path:
    """out_dir/train.bin and val.bin for inputs, reused when made from the same inputs, tokenizer
    file and document markers (data.prepare's doc_start / doc_end; None: its defaults). With
    chat_folder, or when inputs are fine-tuning examples, they are tokenized by data.prepare_chat (messages
    with chat_folder's chat template). rows: conversations keep their lines' prompts and other keys
    beside the token files (train.rows.jsonl: GRPO's reward functions read them; a later GRPO run
    may take a fine-tuning run's token files)."""
    from pyllm import data

    meta_path = out_dir / "source.json"
    meta = {"inputs": [str(Path(p).resolve()) for p in inputs] if inputs else "stdlib",
            "tokenizer": str(tokenizer_path.resolve()), "tokenizer_mtime": tokenizer_path.stat().st_mtime,
            "val_fraction": val_fraction, **({"doc_markers": doc_markers} if doc_markers else {}),
            "header": 3,  # files from before the header recorded the end-of-document id (2), or before the rows (3), are made again
            **({"files": files_stamp(data.collect_files(inputs))} if inputs else {})}
    preferences = data.is_preference_data(inputs)
    kto = data.is_kto_data(inputs)
    examples = chat_folder is not None or preferences or kto or data.is_chat_data(inputs)  # text pairs need no template
    if examples:
        meta["chat_template_of"] = str(Path(chat_folder).resolve()) if chat_folder is not None else None
        if chat_folder is not None:  # (its text: a template edited, or another --chat-template, tokenizes again)
            from pyllm.tokenizer.tokenizer import chat_template_sha1

            meta["chat_template_sha1"] = chat_template_sha1(chat_folder)
        meta["rows"] = rows
        meta["inputs_mtime"] = [Path(p).stat().st_mtime for p in inputs]
    if meta_path.exists() and read_json(meta_path) == meta:
        try:
            data.read_header(out_dir / "train.bin"), data.read_header(out_dir / "val.bin")
            print(f"data: reusing {out_dir}/train.bin, val.bin")
            return out_dir
        except data.TokenFileError as e:
            print(f"data: {e}; preparing again")
    # Gone until both token files are whole again: a kill between their renames had left one of the
    # new data beside one of the old under the old source.json, reused as if it were the old data.
    meta_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    kind = "kto" if kto else "preferences" if preferences else "chat" if examples else None
    if kind is not None:  # fine-tuning examples: prepare_kto / prepare_preferences / prepare_chat
        prepare = {"kto": data.prepare_kto, "preferences": data.prepare_preferences, "chat": data.prepare_chat}[kind]
        stats = prepare(inputs, tokenizer, chat_folder, out_dir, val_fraction, **(doc_markers or {}),
                        **({"rows": rows} if kind == "chat" else {}))
        write_json(meta_path, meta)
        print(f"data: {_examples_line(kind, stats)} in {time.perf_counter() - t0:.1f} s")
        return out_dir
    stats = data.prepare(inputs, tokenizer, out_dir, val_fraction, **(doc_markers or {}))
    write_json(meta_path, meta)
    print(f"data: {stats['files']} files, {stats['bytes'] / 1e6:.1f} MB -> {stats['train_tokens']:,} train and "
          f"{stats['val_tokens']:,} val tokens in {time.perf_counter() - t0:.1f} s")
    return out_dir


def _examples_line(kind: str, stats: dict) -> str:
    """What prepare_kto / prepare_preferences / prepare_chat made of the examples, for the log."""
    if kind == "kto":
        line = (f"{stats['examples']:,} unpaired examples ({stats['desirable']:,} desirable) -> {stats['train_examples']:,} "
                f"train ({stats['train_tokens']:,} tokens, their KL examples too) and {stats['val_examples']:,} val")
        dropped, why = stats["without_completion"], "without a completion"
    elif kind == "preferences":
        line = (f"{stats['pairs']:,} preference pairs -> {stats['train_pairs']:,} train ({stats['train_tokens']:,} "
                f"tokens) and {stats['val_pairs']:,} val")
        dropped, why = stats["without_reply"], "without a reply on both sides"
    else:
        line = (f"{stats['conversations']:,} conversations -> {stats['train_conversations']:,} train "
                f"({stats['train_tokens']:,} tokens, {stats['train_assistant_tokens']:,} the assistant's, trained on) "
                f"and {stats['val_conversations']:,} val")
        dropped, why = stats["without_assistant"], "without an assistant reply"
    return line + (f"; {dropped} {why} left out" if dropped else "")


def is_token_dir(path) -> bool:
    """Whether path is a folder of token files: train.bin and val.bin (pyllm's or nanoGPT's), or llm.c's shards."""
    from pyllm import data

    return path is not None and Path(path).is_dir() and all(data.split_files(path, split) for split in ("train", "val"))


def check_token_dirs(data_list) -> None:
    """ValueError for a token folder given beside other data, or one with a split missing: either
    would otherwise be read as a folder of text."""
    from pyllm import data

    for item in data_list:
        splits = {split: data.split_files(item, split) for split in ("train", "val")} if Path(item).is_dir() else {}
        if any(splits.values()) and not all(splits.values()):
            have, lack = ("train", "val") if splits["train"] else ("val", "train")
            raise ValueError(f"--data {item} holds {have} token files ({splits[have][0].name}) but no {lack} split "
                             f"({lack}.bin, or llm.c's *_{lack}*.bin): give it one (nanoGPT's prepare.py writes both)")
        if all(splits.values()) and len(data_list) > 1:
            raise ValueError(f"--data {item} is a folder of token files: give it alone (token folders are not mixed "
                             "with other data; `pyllm prepare --input ...` tokenizes several sources into one)")


# --- train ---------------------------------------------------------------------------------------------

# CLI-only keys (the rest are TrainConfig fields): where the text comes from and what to do after.
_CLI_KEYS = {"data": None, "tokenizer": None, "vocab_size": None, "tokenizer_train_bytes": 0,
             "val_fraction": 0.02, "sample_tokens": 200, "prompt": None, "config": None, "resume": None,
             "model_overrides": None, "eval_choices_file": None, "eval_choices_limit": None, "chat_template": None}


def check_eval_choices_limit(cli: dict) -> None:
    """ValueError for --eval-choices-limit without --eval-choices (a new run's or a resume's)."""
    if cli["eval_choices_limit"] is not None and not cli["eval_choices_file"]:
        raise ValueError("--eval-choices-limit goes with --eval-choices (without it, it would be ignored): "
                         "leave it out")


def setup_run_data(cfg, cli: dict) -> None:
    """Finds or makes the token files (and the tokenizer) for a new run; records them in
    out_dir/run.json."""
    from pyllm.model import PRESETS
    from pyllm.tokenizer.tokenizer import hf_has_chat_template

    out = Path(cfg.out_dir)
    data_arg = cli["data"]
    data_list = None if data_arg is None else (data_arg if isinstance(data_arg, list) else [data_arg])
    tokenizer_path, vocab_size, doc_markers, chat_folder = cli["tokenizer"], None, None, None
    source_run = source_run_info(cfg.init_from_run, tokenizer_path) if cfg.init_from_run else {}
    # A run fine-tuned from a Hugging Face model passes it on: its chat template, markers, config.
    hf_source = cfg.init_from_hf or source_run.get("init_from_hf", "")
    if data_list is not None:
        check_token_dirs(data_list)
    token_dir = data_list is not None and len(data_list) == 1 and is_token_dir(data_list[0])
    if cli["chat_template"] and (not hf_source or tokenizer_path or token_dir):
        # (it would have been left unread without a word)
        raise ValueError("--chat-template renders the conversations of --data with an --init-from-hf model's "
                         "tokenizer; this run's " + ("token files are made already" if token_dir else
                                                     "tokenizer is --tokenizer's" if tokenizer_path else
                                                     "has no --init-from-hf model") + ": leave it out")
    check_eval_choices_limit(cli)
    if token_dir and cli["val_fraction"] != _CLI_KEYS["val_fraction"]:
        # (the token files' val split is theirs; the share had been ignored without a word)
        raise ValueError(f"--val-fraction holds out a share of text --data tokenizes; {data_list[0]} holds token "
                         "files, their val split made already: leave it out")
    if cli["vocab_size"] is not None and (token_dir or tokenizer_path or hf_source or cfg.init_from_run):
        # (it had been ignored without a word: the run's ids are another tokenizer's, of its own size)
        whose = ("--data's token files'" if token_dir else "--tokenizer's" if tokenizer_path
                 else f"--init-from-hf {hf_source}'s" if hf_source else f"--init-from-run {cfg.init_from_run}'s")
        raise ValueError(f"--vocab-size {cli['vocab_size']} sizes the tokenizer trained on --data; this run's tokens "
                         f"are {whose}: leave it out (a larger embedding table than the tokenizer's: --model vocab_size=N)")
    if token_dir:
        data_dir = str(Path(data_list[0]).resolve())  # a resume from another folder reads the same files
        from pyllm import data

        header = data.read_header(Path(data_dir) / "train.bin")
        train_files = data.split_files(data_dir, "train")
        bare = bool(header.get("bare"))  # nanoGPT's
        own = not bare and data.llmc_format(train_files[0]) is None  # pyllm's header
        meta = Path(data_dir) / "meta.pkl"
        char = bare and meta.is_file() and is_char_meta(meta)
        # The folder's own tokenizer, unless one is given: `pyllm prepare`'s copy (a stale one beside
        # nanoGPT's files is not theirs), nanoGPT's characters.
        found = tokenizer_path or (Path(data_dir) / "tokenizer.bpe" if own and (Path(data_dir) / "tokenizer.bpe").is_file()
                                   else meta if char else recorded_tokenizer(Path(data_dir)) if own else None)
        if cfg.init_from_run and found and source_run.get("tokenizer") and not same_tokenizer(
                found, source_run["tokenizer"]):
            raise ValueError(f"--data {data_list[0]} was tokenized with {found}, not with the tokenizer of "
                             f"--init-from-run {cfg.init_from_run} ({source_run['tokenizer']}): its ids would be other "
                             "tokens to that model (prepare the data with the run's tokenizer)")
        if own:
            tokenizer_path = found
        given = tokenizer_path or source_run.get("tokenizer")
        if given:
            if (vocab := load_tokenizer(given).vocab_size) != header["vocab_size"]:
                raise ValueError(f"--data {data_list[0]} was tokenized with a {header['vocab_size']:,}-id tokenizer, and "
                                 f"the tokenizer given ({given}) has {vocab:,} ids: its samples and prompts would be "
                                 "another vocabulary's (prepare the data with this tokenizer)"
                                 + (f"; nanoGPT's bare files without a meta.pkl are read as GPT-2's ids: for another "
                                    f"tokenizer's, write its vocab_size there (pickle.dump({{'vocab_size': {vocab}}}, "
                                    "open('meta.pkl', 'wb')))" if bare and not meta.is_file() else ""))
        if tokenizer_path is None and not char and source_run.get("tokenizer"):  # (llm.c's, GPT-2's bare files:
            tokenizer_path = Path(source_run["tokenizer"])  # the run's own, checked above, decodes its samples)
        if (llmc := data.llmc_format(train_files[0])) is not None:
            print(f"data: {data_dir} holds llm.c's token files ({len(train_files)} train and "
                  f"{len(data.split_files(data_dir, 'val'))} val shards, "
                  f"{header['count']:,} train tokens): vocab {llmc[1]:,} "
                  + ("(GPT-2 BPE; give --tokenizer, a pyllm tokenizer of GPT-2's ids made by "
                     "Tokenizer.from_tiktoken(tiktoken.get_encoding('gpt2')).save(path), to decode its samples)"
                     if llmc[1] == data.GPT2_VOCAB else "(Llama 3's; give --tokenizer, its tokenizer.json converted "
                     "with Tokenizer.from_hf(path).save(path), to decode its samples)"))
        elif (nanogpt := data.nanogpt_vocab(Path(data_dir) / "train.bin")) is not None:
            if char and tokenizer_path is None:  # its characters: prompts encoded and samples decoded by them,
                # a copy in the run (the data folder's may be made again or moved)
                tokenizer_path = out / "meta.pkl"
                copy_into(meta, tokenizer_path)
            print(f"data: {data_dir} holds nanoGPT's bare uint16 token files: vocab {nanogpt:,} "
                  + ("(its meta.pkl's characters)" if char else
                     "(its meta.pkl's vocab_size, no characters in it; give --tokenizer, a pyllm tokenizer of the "
                     "data's ids, to decode its samples)" if meta.is_file() else
                     "(no meta.pkl: GPT-2 BPE; give --tokenizer, a pyllm tokenizer of GPT-2's ids made by "
                     "Tokenizer.from_tiktoken(tiktoken.get_encoding('gpt2')).save(path), to decode its samples)"))
    else:
        from pyllm import data

        examples = data.is_chat_data(data_list) or data.is_preference_data(data_list) or data.is_kto_data(data_list)
        if examples and not (cfg.init_from_hf or cfg.init_from_run):
            raise ValueError("--data holds fine-tuning examples ({\"messages\": [...]}, {\"prompt\": ..., "
                             "\"completion\": ...} or {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...} lines): "
                             "fine-tuning on them needs --init-from-hf DIR (or --init-from-run DIR), whose tokenizer "
                             "(and chat template, for messages) make their tokens")
        if tokenizer_path:
            tokenizer = text_tokenizer(tokenizer_path, "--tokenizer")
        elif hf_source:
            from pyllm.model import hf_folder

            folder, tokenizer_path = hf_folder(hf_source), out / "tokenizer.bpe"
            tokenizer = ensure_hf_tokenizer(folder, tokenizer_path)
            doc_markers = hf_doc_markers(folder)  # the chat template frames conversations itself
            chat_folder = folder if examples else None
            if cli["chat_template"]:
                if chat_folder is None:
                    raise ValueError("--chat-template renders fine-tuning examples ({\"messages\": [...]} lines and "
                                     "their kin); --data holds none: leave it out")
                chat_folder = training_chat_folder(folder, Path(cli["chat_template"]), out / "chat_template")
        elif cfg.init_from_run:  # the run's own tokenizer, copied: the new run stands alone
            from pyllm.tokenizer.chars import is_nanogpt_meta

            if is_nanogpt_meta(source_run["tokenizer"]):
                raise ValueError(f"--init-from-run {cfg.init_from_run} trained on nanoGPT's character tokens: pyllm "
                                 "does not tokenize text with them; give --data a folder of nanoGPT's token files")
            source, tokenizer_path = Path(source_run["tokenizer"]), out / "tokenizer.bpe"
            if not tokenizer_path.exists() or tokenizer_path.read_bytes() != source.read_bytes():
                copy_into(source, tokenizer_path)
            tokenizer = tokenizer_class().load(str(tokenizer_path))
            # Prompt-completion pairs end as its pretraining documents did, so it learns to stop.
            doc_markers = {"doc_start": [], "doc_end": eot_id(tokenizer)}
        else:
            wanted = cli["vocab_size"] or cfg.model.get("vocab_size") or PRESETS.get(cfg.preset, PRESETS["tiny"])["vocab_size"]
            tokenizer_path = out / "tokenizer.bpe"
            tokenizer = ensure_tokenizer(data_list, tokenizer_path, wanted, cli["tokenizer_train_bytes"])
        data_dir = str(ensure_token_files(data_list, tokenizer, Path(tokenizer_path), out / "data", cli["val_fraction"],
                                          doc_markers, chat_folder).resolve())
        vocab_size = tokenizer.vocab_size
    if cfg.teacher and tokenizer_path:
        check_teacher_tokenizer(cfg.teacher, tokenizer_path)
    write_json(out / "run.json", {
        "run_dir": str(out.resolve()),  # (read_run: the folder's own files followed wherever it goes)
        "tokenizer": str(Path(tokenizer_path).resolve()) if tokenizer_path else None,
        "data_dir": data_dir, "vocab_size": vocab_size,
        "prompt_prefix": doc_markers["doc_start"] if doc_markers else [],  # samples start as documents do
        "chat": chat_folder is not None and hf_has_chat_template(chat_folder),  # on conversations: the sample is a reply
        "sample_tokens": cli["sample_tokens"], "prompt": cli["prompt"],  # (its closing sample: a resume's too)
        # `pyllm export` writes the source's config.json: a local folder recorded absolute (as typed, an
        # export from another directory had read another folder of that name, or failed)
        "init_from_hf": str(Path(hf_source).resolve()) if hf_source and Path(hf_source).is_dir() else hf_source,
        **({"init_from_run": str(Path(cfg.init_from_run).resolve())} if cfg.init_from_run else {})})


def training_chat_folder(folder: Path, template: Path, into: Path) -> Path:
    """A folder of folder's tokenizer_config.json and special_tokens_map.json with template (a .jinja
    file, or a tokenizer_config.json whose chat_template it is) as its chat_template.jinja: the
    conversations of a run given --chat-template are rendered with it (TRL's chat_template_path: a
    training variant with {% generation %} marks, as TRL's trl/chat_templates/*_training.jinja;
    Qwen3's keeps every turn's reasoning, which its own template drops). Generation and export keep
    the model folder's own template."""
    if not template.is_file():
        raise FileNotFoundError(f"--chat-template {template}: no such file (a .jinja chat template)")
    text = template.read_text(encoding="utf-8")
    if template.suffix == ".json":
        text = json.loads(text).get("chat_template")
        if not isinstance(text, str):
            raise ValueError(f"--chat-template {template}: a JSON file without a chat_template string")
    into.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            copy_into(folder / name, into / name)
        else:
            (into / name).unlink(missing_ok=True)
    write_whole(into / "chat_template.jinja", text)  # (the file wins over the config's, as in transformers)
    return into


def check_teacher_tokenizer(teacher, tokenizer_path, flag: str = "--teacher",
                            why: str = "distillation compares the two models' next-token distributions id by id, so "
                                       "they must share the tokenizer (train the student with --tokenizer of the "
                                       "teacher's)") -> None:
    """ValueError where a distillation teacher (or generate's --draft: flag, why) that is a pyllm
    run makes its ids with another tokenizer than this run's (same_tokenizer): load_teacher compares
    vocabulary sizes only, and two runs' tokenizers trained on different text have the same size and
    other ids (the student had learnt the teacher's distribution over other words without a word). A
    Hugging Face teacher keeps the size check alone (its tokenizer a family's, shared by its sizes)."""
    folder = Path(teacher)
    if not (folder.is_dir() and not (folder / "config.json").exists() and (folder / "model.safetensors").is_file()):
        return
    try:
        theirs = source_run_info(folder)["tokenizer"]
    except ValueError:  # (its tokenizer gone: nothing to compare)
        return
    if theirs and not same_tokenizer(theirs, tokenizer_path):
        raise ValueError(f"{flag} {teacher}: its tokenizer ({theirs}) is not this run's ({tokenizer_path}): {why}")


def source_run_info(run_dir, given_tokenizer=None) -> dict:
    """What a new run takes from a folder `pyllm train` wrote: its tokenizer file (run.json's, else
    the folder's tokenizer.bpe) and the Hugging Face model it was itself fine-tuned from, if any."""
    run_dir = Path(run_dir)
    from pyllm.train import source_run_weights

    source_run_weights(run_dir)  # the folder is a finished run
    info = read_run(run_dir)
    tokenizer = next((Path(p) for p in (info.get("tokenizer"), run_dir / "tokenizer.bpe", run_dir / "meta.pkl",
                                        given_tokenizer) if p and Path(p).is_file()), None)
    if tokenizer is None:  # (a folder holding LLM.from_nanogpt(...).save(...) has no run.json: --tokenizer names it)
        raise ValueError(f"{run_dir}: its tokenizer is gone (run.json names {info.get('tokenizer')!r}, and there is no "
                         "tokenizer.bpe or meta.pkl): give the one it was trained with as --tokenizer")
    return {"tokenizer": str(tokenizer), "init_from_hf": info.get("init_from_hf") or ""}


# What makes a run what it is: a resume keeps the checkpoint's (its weights and optimizer state are
# of that model, data and optimizer) and refuses another value rather than ignore it.
# (beta1, beta2, eps, weight_decay, muon_momentum: the optimizer's state_dict brings the checkpoint's
# back on resume; a new muon_momentum had been recorded and not used)
# seed: the loaders' orders (a packed loader's cursor points into its epoch's permutation of the
# seed); lora_alpha: the adapters' scale, part of the function; doc_mask: what attends to what.
_RUN_DEFINING = ("preset", "init_from_hf", "init_from_run", "init_adapter", "lora_rank", "lora_targets", "lora_alpha",
                 "optimizer", "preference", "teacher", "grpo_reward", "data_dir", "beta1", "beta2", "eps", "weight_decay",
                 "muon_momentum", "seed", "doc_mask")


def run_record(run_dir) -> dict:
    """What a run recorded of the CLI keys that made it (run.json, its token files' source.json and
    its tokenizer's .json), each key's values that stand for it (paths as lists of resolved paths): a
    resume given the same (its own config file again) changes nothing."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    data_dir = Path(run["data_dir"]).resolve() if run.get("data_dir") else None  # (relative to the cwd in old runs)
    source = data_dir / "source.json" if data_dir else None
    source = read_json(source) if source and source.is_file() else {}
    tokenizer = Path(run["tokenizer"]) if run.get("tokenizer") else None
    meta = tokenizer.with_name(tokenizer.name + ".json") if tokenizer else None
    meta = read_json(meta) if meta and meta.is_file() else {}
    inputs = source.get("inputs")
    return {"data": [[str(data_dir)]] + ([inputs] if isinstance(inputs, list) else []),
            "tokenizer": [[str(tokenizer.resolve())]] if tokenizer else [],
            "vocab_size": [run.get("vocab_size"), meta.get("vocab_size")],
            "val_fraction": [source.get("val_fraction")], "tokenizer_train_bytes": [meta.get("train_bytes")]}


def check_reward_code(saved: dict, opts: dict) -> None:
    """A resumed run whose GRPO rewards are Python code (module:function, path/to/file.py:function)
    runs that code only when this command names it too: a checkpoint is data (torch.load's
    weights_only), and one downloaded with a rewards.py beside it had run that file on --resume."""
    from pyllm.train import _is_function_spec

    code = [spec for spec in (saved.get("grpo_reward") or "").split(",") if _is_function_spec(spec)]
    if code and opts.get("grpo_reward") != saved.get("grpo_reward"):
        raise ValueError(f"--resume: this run's rewards include Python code ({', '.join(code)}), which a checkpoint "
                         f"alone does not get to run: give --grpo-reward {saved['grpo_reward']!r} to resume with it")


def check_resume_options(saved: dict, opts: dict, model: dict, cli: dict, run_dir=None, config_keys=()) -> None:
    """ValueError naming the options a resume cannot change (the model, its data, its optimizer);
    the values the run was made with are taken (its config file given again)."""
    def saved_differs(key) -> bool:  # (a relative data_dir is the saved, resolved one: the run's own file again)
        if key == "data_dir" and isinstance(opts[key], str) and saved.get(key):
            return Path(opts[key]).resolve() != Path(saved[key]).resolve()
        return opts[key] != saved.get(key)

    changed = [k for k in _RUN_DEFINING if k in opts and saved_differs(k)]
    recorded = run_record(run_dir) if run_dir is not None else {}

    def same(key, value) -> bool:  # (paths compared resolved, as lists: --data takes several)
        if key in ("data", "tokenizer"):
            value = [str(Path(v).resolve()) for v in (value if isinstance(value, list) else [value])]
        return value in recorded.get(key, [])

    changed += [k for k in ("data", "tokenizer", "vocab_size", "tokenizer_train_bytes", "val_fraction")
                if cli[k] != _CLI_KEYS[k] and not same(k, cli[k])]
    if any(saved.get("model", {}).get(k, object()) != v for k, v in model.items()):
        changed.append("model")
    if changed:
        flags = ", ".join(("data_dir" if k == "data_dir" else "--" + k.replace("_", "-"))  # (no --data-dir flag)
                          + (" (its config file's)" if k in config_keys else "")
                          for k in changed)
        raise ValueError(f"--resume continues the run as it was made (its model, data and optimizer); leave out {flags} "
                         "(or start a new run, e.g. with --init-from-run)")


def last_checkpoint_note(run_dir) -> str:
    """Where an interrupted run can go on from: its checkpoint's step (read without loading the weights)."""
    import torch

    from pyllm.train import CHECKPOINT

    path = Path(run_dir) / CHECKPOINT
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:  # none yet, or torn: the trainer writes it whole or not at all (save_checkpoint)
        return f"no checkpoint in {run_dir} yet (one is written every --ckpt-every steps)"
    return f"its checkpoint is at step {step}: go on with `pyllm train --resume {run_dir}`"


def kept_checkpoint_run(kept: Path) -> Path:
    """The run folder of RUN/checkpoints/step_N.pt (a checkpoint --keep-checkpoints kept), or ValueError."""
    kept = Path(kept).resolve()
    if kept.parent.name != "checkpoints" or not re.fullmatch(r"step_\d+\.pt", kept.name):
        raise ValueError(f"--resume {kept}: give a run folder, or a checkpoint its --keep-checkpoints kept "
                         "(RUN/checkpoints/step_N.pt)")
    return kept.parent.parent


def install_kept_checkpoint(kept: Path) -> str:
    """`--resume RUN/checkpoints/step_N.pt` (--keep-checkpoints): that checkpoint made RUN's
    checkpoint.pt (a new link or copy renamed into place: the kept file and its siblings untouched),
    and RUN returned. A kept file is a hard link of the checkpoint.pt it was; a plain `cp` over
    checkpoint.pt writes into the newest kept file too (the step it held is lost)."""
    from pyllm.train import CHECKPOINT, link_or_copy

    run_dir = kept_checkpoint_run(kept)
    tmp = run_dir / f".{CHECKPOINT}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    link_or_copy(kept, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)
    print(f"resume: {kept} is now {run_dir / CHECKPOINT}", file=sys.stderr)
    return str(run_dir)


def config_file_options(path) -> dict:
    """A training config file's options under the names the flags' values have: ValueError for the
    keys that would be ignored or taken without a word (another config, a second spelling of out)."""
    import dataclasses

    from pyllm.train import TrainConfig

    doc = dict(load_config_file(path))
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(_CLI_KEYS) | {"out"}
    if unknown := sorted(set(doc) - known):
        named = [f"{k} (spelled {k.replace('-', '_')})" if k.replace("-", "_") in known else k for k in unknown]
        raise ValueError(f"{path}: unknown option(s) {', '.join(named)}; a file's keys are the flags' names with _ "
                         f"for -: {', '.join(sorted(known - {'config', 'model_overrides'}))}")
    if "config" in doc:
        raise ValueError(f"{path}: config = {doc['config']!r}: a config file does not include another (give one --config)")
    if "model_overrides" in doc:  # (the --model flag's values)
        raise ValueError(f"{path}: model_overrides: a config file's ModelConfig fields go in its [model] table")
    if "out" in doc and "out_dir" in doc:
        raise ValueError(f"{path}: out and out_dir are one option (the run folder): give one")
    if "beta" in doc and not isinstance(doc["beta"], bool) and doc["beta"] == 0 and doc.get("preference"):
        # (as --beta 0: TrainConfig's 0 stands for the loss's default, which it would have trained with)
        raise ValueError(f"{path}: beta = 0 would train with the loss's default beta (0.1; simpo 2.0), not 0: give a "
                         "beta > 0, or leave it out for the default")
    if "model" in doc and not isinstance(doc["model"], dict):
        raise ValueError(f"{path}: model must be a table of ModelConfig fields ([model] in TOML, a mapping in "
                         f"YAML), got {type(doc['model']).__name__} {doc['model']!r}")
    choices = doc.get("eval_choices")
    if isinstance(choices, str) and not Path(choices).with_suffix(".choices.json").is_file():
        # what --eval-choices names (a JSONL file of examples), not TrainConfig's tokenized one
        if "eval_choices_file" in doc:
            raise ValueError(f"{path}: eval_choices and eval_choices_file are one option: give one")
        doc["eval_choices_file"] = doc.pop("eval_choices")
    return doc


# The CLI keys' kinds, checked where a config file gives them (argparse checks the flags'): a string
# for a number had failed in a traceback, some after training.
_CLI_KINDS = {"data": "paths", "tokenizer": "path", "resume": "path", "prompt": "text", "eval_choices_file": "path",
              "vocab_size": (int, 1), "tokenizer_train_bytes": (int, 0), "sample_tokens": (int, 0),
              "eval_choices_limit": (int, 1), "val_fraction": (float, None)}


def check_cli_kinds(cli: dict, path) -> None:
    for key, kind in _CLI_KINDS.items():
        value = cli.get(key)
        if value is None:
            continue
        if kind == "paths":
            ok = isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
            want = "a path or a list of paths"
        elif kind in ("path", "text"):
            ok, want = isinstance(value, str), f"a {'path' if kind == 'path' else 'string'}"
        elif kind[0] is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= kind[1]
            want = f"an integer >= {kind[1]}"
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
            want = "a number in (0, 1)"
        if not ok:
            raise ValueError(f"{path}: {key} must be {want}, got {value!r}")


def cmd_train(args) -> int:
    from pyllm.train import TrainConfig, run_lock

    explicit = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command")}
    opts = config_file_options(args.config) if args.config else {}
    if "out" in opts:
        opts["out_dir"] = opts.pop("out")
    model = dict(opts.pop("model", {}) or {})
    model.update(parse_overrides(explicit.pop("model_overrides", None)))
    if "out" in explicit:
        explicit["out_dir"] = explicit.pop("out")
    opts.update(explicit)
    preference_list_options(opts, explicit)
    cli = {k: opts.pop(k, default) for k, default in _CLI_KEYS.items()}
    check_cli_kinds(cli, args.config or "train")
    # The run's folder locked before anything is written into it (run.json, the tokenizer, the token
    # files, a kept checkpoint made checkpoint.pt): a second run aimed at a running one had rewritten
    # its data before train()'s lock refused it.
    out_dir = opts.get("out_dir") or TrainConfig.__dataclass_fields__["out_dir"].default
    if not cli["resume"]:
        cli["resume"] = elastic_restart_resume(out_dir)
    resume = cli["resume"]
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    refused = None
    try:
        if resume and Path(resume).is_file():
            run_dir = kept_checkpoint_run(Path(resume))
        elif resume:
            run_dir = Path(resume)
        else:
            run_dir = Path(out_dir)
        if resume and not run_dir.is_dir() and run_dir.suffix == ".pt":  # (a kept checkpoint's file, named wrong)
            kept = sorted(p.name for p in run_dir.parent.glob("*.pt")) if run_dir.parent.is_dir() else []
            raise FileNotFoundError(f"no checkpoint to resume from: no file {run_dir}"
                                    + (f" (kept there: {', '.join(kept)})" if kept else "") + _SHARED_HINT * several)
        if resume and not run_dir.is_dir():
            raise FileNotFoundError(f"no checkpoint to resume from: {run_dir} is no folder" + _SHARED_HINT * several)
        run_dir.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        # Several processes: told to the others in their first collective (raised here alone, the
        # others had waited for this rank at the rendezvous until its timeout: 30 minutes)
        if not several:
            raise
        refused = e
    with contextlib.ExitStack() as held:
        try:
            if refused is None:
                held.enter_context(run_lock(run_dir, is_main=int(os.environ.get("RANK", "0")) == 0))
        except RuntimeError as e:
            # Several processes: rank 0 meets the others first and tells them (gone before the
            # rendezvous, it had left them waiting for it there until its timeout, without torchrun)
            if not several:
                raise
            refused = e
        return _train_command(args, explicit, opts, model, cli, refused)


def preference_list_options(opts: dict, explicit: dict) -> dict:
    """opts (a command's) with --preference's names (TRL's loss_type list, a flag's or a config file's
    list) as TrainConfig's: the first its preference, the rest its preference_mix, "sft" its
    sft_weight; --preference-weights (TRL's loss_weights, one per name, sft's too) its
    preference_weights and sft_weight. A name alone is preference, as before (a config file's
    preference as text, with its preference_mix and preference_weights, is TrainConfig's own)."""
    from pyllm.nn import DPO_LOSSES

    names = opts.get("preference")
    if isinstance(names, str) and names and "preference_weights" in explicit:  # (a config file's preference)
        names = [names, *(opts.get("preference_mix") or [])]
    if not isinstance(names, list):
        if "preference_weights" in explicit:  # (a resume's run's names would be TrainConfig's, sft's aside)
            raise ValueError("--preference-weights goes with --preference: one weight per name it gives, in order")
        return opts
    weights = opts.get("preference_weights") or []
    if not isinstance(weights, list):
        raise ValueError(f"preference_weights must be a list of numbers, one per preference name, got {weights!r}")
    if not names or names[0] == "sft" or names.count("sft") > 1:
        raise ValueError(f"--preference: a pair loss first, then more of the dpo family and sft (TRL's loss_type; "
                         f"sft once, its weight the chosen replies' NLL's), got {' '.join(map(str, names))}")
    if weights and len(weights) != len(names):
        raise ValueError(f"--preference-weights: one weight per --preference name ({' '.join(map(str, names))}: "
                         f"{len(names)}), got {len(weights)}: {' '.join(map(str, weights))}")
    weights = weights or [1.0] * len(names)
    if "sft" in names:
        if names[0] not in (*DPO_LOSSES, "simpo"):
            raise ValueError(f"--preference's sft (the chosen replies' NLL per token, TRL's loss_type sft) goes with "
                             f"simpo and the dpo family ({', '.join(DPO_LOSSES)}), not {names[0]}")
        if "sft_weight" in opts:
            raise ValueError("--preference's sft and --sft-weight are one loss: give its weight once, in "
                             "--preference-weights (or --sft-weight without sft)")
        opts["sft_weight"] = weights[names.index("sft")]
    kept = [(name, w) for name, w in zip(names, weights) if name != "sft"]
    opts["preference"], opts["preference_mix"] = kept[0][0], [name for name, _ in kept[1:]]
    # (a name alone without weights: no preference_weights, as before the list)
    opts["preference_weights"] = [w for _, w in kept] if opts.get("preference_weights") else []
    return opts


def _in_dpo_family(preference: str) -> bool:
    from pyllm.nn import DPO_LOSSES

    return preference in DPO_LOSSES


# Options that tune one schedule, optimizer or loss: given to a run without it, they change nothing
# (--decay-frac had been taken silently by a cosine run, --muon-momentum by AdamW, --beta without a
# preference loss), as TrainConfig.validate refuses sft_weight or label_smoothing without theirs.
_GOES_WITH = {
    "decay_frac": (lambda c: c.schedule == "wsd", "schedule wsd"),
    "min_lr_ratio": (lambda c: c.schedule != "constant", "schedule cosine or wsd"),
    "muon_momentum": (lambda c: c.optimizer == "muon", "optimizer muon"),
    "beta": (lambda c: bool(c.preference) and c.preference != "reward",
             "a preference loss other than reward (a reward model's Bradley-Terry loss has no beta)"),
    "simpo_gamma": (lambda c: c.preference == "simpo", "preference simpo"),
    "discopop_tau": (lambda c: "discopop" in (c.preference, *c.preference_mix), "preference discopop"),
    "f_alpha": (lambda c: c.f_divergence == "alpha_divergence", "--f-divergence alpha_divergence"),
    "ld_alpha": (lambda c: _in_dpo_family(c.preference), "the dpo family of preference losses (LD-DPO)"),
    "desirable_weight": (lambda c: c.preference == "kto", "preference kto"),
    "undesirable_weight": (lambda c: c.preference == "kto", "preference kto"),
    "kto_loss_type": (lambda c: c.preference == "kto", "preference kto"),
    "grpo_sapo_temperatures": (lambda c: bool(c.grpo_reward) and c.grpo_loss_type == "sapo", "grpo_loss_type sapo"),
    "grpo_vespo": (lambda c: bool(c.grpo_reward) and c.grpo_loss_type == "vespo", "grpo_loss_type vespo"),
    **{name: (lambda c: c.sync_ref_model, "sync_ref_model")
       for name in ("ref_model_mixup_alpha", "ref_model_sync_steps")},
    "token_stats": (lambda c: not (c.preference == "reward" or c.teacher or c.grpo_reward),
                    "pretraining, SFT or preference tuning (not a reward model, distillation or GRPO, which log their "
                    "own metrics)"),
    **{name: (lambda c: bool(c.teacher), "a teacher (distillation)") for name in (
        "distill_beta", "distill_temperature", "distill_alpha", "distill_max_new_tokens", "distill_sample_temperature")},
    **{name: (lambda c: bool(c.grpo_reward), "grpo_reward (GRPO)") for name in (
        "grpo_reward_weights", "grpo_generations", "grpo_generations_eval", "grpo_max_new_tokens", "grpo_temperature",
        "grpo_beta",
        "grpo_loss_type", "grpo_scale_rewards", "grpo_multi_objective_aggregation", "grpo_iterations",
        "grpo_steps_per_generation", "grpo_epsilon",
        "grpo_epsilon_high", "grpo_top_p", "grpo_top_k", "grpo_min_p", "grpo_repetition_penalty", "grpo_delta",
        "grpo_top_entropy_quantile", "grpo_reward_clip", "grpo_off_policy_mask",
        "grpo_importance_sampling", "grpo_log_completions", "grpo_mask_truncated", "grpo_kl_bias_correction")},
}


def check_options_used(cfg, opts: dict, flags: dict) -> None:
    """ValueError for an option given that cfg's run would not read, naming what it goes with: a flag
    (flags' names), or a config file's key (opts') at another value than the default (a file may
    list every option)."""
    from pyllm.train import TrainConfig

    defaults = TrainConfig()
    given = {name for name, value in opts.items() if name in flags or value != getattr(defaults, name, value)}
    unused = [f"{name} (--{name.replace('_', '-')}) goes with {what}" for name, (used, what) in _GOES_WITH.items()
              if name in given and not used(cfg)]
    if unused:
        raise ValueError(f"{'; '.join(unused)}, which this run has not: it would change nothing; leave it out")


_SHARED_HINT = (" (under torchrun on several nodes, --out must be a folder on a filesystem every node shares: "
                "rank 0 writes the run's files, every rank reads them)")


def elastic_restart_resume(out_dir) -> str | None:
    """torchrun --max-restarts: a restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) of a run goes on
    from the checkpoint an earlier attempt of the same job (TORCHELASTIC_RUN_ID, --rdzv-id) wrote in
    out_dir, as the same command given --resume would (it had set that checkpoint aside and started
    again from step 0); out_dir, or None for a first attempt or no such checkpoint."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
        return None
    from pyllm.train import load_checkpoint

    try:
        saved = load_checkpoint(out_dir, mmap=True)
    except (FileNotFoundError, RuntimeError, ValueError):  # none yet (the first attempt died before its
        return None  # first checkpoint), or none of this job's: a new run, which sets it aside
    run_id = saved.get("elastic_run_id")
    if run_id is None or run_id != os.environ.get("TORCHELASTIC_RUN_ID"):
        return None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: going on from {out_dir}'s checkpoint "
              f"(step {saved['step']}), which an earlier attempt of this job wrote", file=sys.stderr, flush=True)
    return str(out_dir)


def _raise_on_every_rank(failed: Exception | None, info, what: str) -> None:
    """Under torchrun, a failure on any rank raised on every rank: its own error where it failed,
    else one saying another rank could not `what` (its error says why). One process: nothing."""
    if info is None or info.world_size == 1:
        return
    import torch

    from pyllm.train import all_reduce_sum

    flags = torch.zeros(info.world_size, dtype=torch.float64)
    flags[info.rank] = failed is not None
    ranks = all_reduce_sum(flags, info).nonzero().flatten().tolist()
    if failed is not None:
        raise failed
    if ranks:
        raise RuntimeError(f"rank {', '.join(map(str, ranks))} could not {what} (its error says why)")


def _resume_device(resume: str, opts: dict) -> str:
    """The device a resume joins its process group for (before the checkpoint is checked): the
    command's, else its checkpoint's, else auto."""
    if opts.get("device"):
        return opts["device"]
    import torch

    from pyllm.train import CHECKPOINT

    path = Path(resume) if Path(resume).is_file() else Path(resume) / CHECKPOINT
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["train_config"].get("device", "auto")
    except Exception:
        return "auto"


def same_checkpoint_everywhere(checkpoint: dict, resume: str, info) -> None:
    """ValueError on every rank unless every rank read the same run's checkpoint at the same step:
    each reads its own --resume folder, and a node with another (an older step, another run) had
    hung or trained its replica on with its own optimizer state and schedule, out of step with
    rank 0's, without a word."""
    import hashlib

    import torch.distributed as dist

    config = json.dumps(checkpoint["train_config"], sort_keys=True, default=str)
    mine = (checkpoint["step"], hashlib.sha256(config.encode()).hexdigest()[:12], str(Path(resume).resolve()))
    every = [None] * info.world_size
    dist.all_gather_object(every, mine)
    differ = [r for r, theirs in enumerate(every) if theirs[:2] != every[0][:2]]
    if differ:
        r = differ[0]
        raise ValueError(f"the ranks read different checkpoints: rank {r}'s ({every[r][2]}) is step {every[r][0]}"
                         + (" of another run's config" if every[r][1] != every[0][1] else "")
                         + f", rank 0's ({every[0][2]}) step {every[0][0]}: every rank must resume the same run"
                         + _SHARED_HINT)


def _train_command(args, explicit: dict, opts: dict, model: dict, cli: dict, refused: Exception | None = None) -> int:
    from pyllm.train import TrainConfig, TrainingDiverged, TrainingStopped, load_checkpoint, request_stop, train

    resume = cli["resume"]
    if resume:
        # Under torchrun every rank joins the group first, so that what fails on one rank (its node
        # without the checkpoint, rank 0 refused the folder) ends every rank: the others had waited
        # for it at the rendezvous (30 minutes). Rank 0 alone makes a kept checkpoint the run's
        # (the folder's lock is its), before any rank reads it.
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        info = None
        if several:
            from pyllm.train import setup_distributed

            info = setup_distributed(_resume_device(resume, opts))
        failed = refused
        if failed is None and Path(resume).is_file() and int(os.environ.get("RANK", "0")) == 0:
            try:
                install_kept_checkpoint(Path(resume))
            except Exception as e:
                if not several:
                    raise
                failed = e
        _raise_on_every_rank(failed, info, "resume")
        if Path(resume).is_file():
            resume = str(kept_checkpoint_run(Path(resume)))
        try:
            checkpoint = load_checkpoint(resume)
            saved = checkpoint["train_config"]
            from_config = set(config_file_options(args.config)) if args.config else set()
            check_resume_options(saved, opts, model, cli, resume, from_config - set(explicit))
            check_eval_choices_limit(cli)  # (a resume's too: it had been taken and ignored)
            check_reward_code(saved, opts)
            cfg = TrainConfig.from_dict({**saved, **opts, "out_dir": opts.get("out_dir", str(resume))})
            if Path(cfg.out_dir).resolve() != Path(resume).resolve():
                raise ValueError("--resume continues in its own folder; leave out --out")
            cfg.validate()  # what this call changes (--max-steps, --lr, ...)
            check_options_used(cfg, opts, explicit)
            finished = cfg.max_steps == checkpoint["step"] and not (Path(resume) / "model.safetensors").is_file()
            if not finished and cfg.max_steps <= checkpoint["step"]:
                raise ValueError(f"{resume} is at step {checkpoint['step']} already: give --max-steps above it to "
                                 "train on")
        except Exception as e:
            if not several:
                raise
            failed = FileNotFoundError(f"rank {info.rank}: {e}{_SHARED_HINT}") if isinstance(e, FileNotFoundError) else e
        _raise_on_every_rank(failed, info, "resume")
        if several:
            same_checkpoint_everywhere(checkpoint, resume, info)
        if finished and int(os.environ.get("RANK", "0")) == 0:
            # killed between its last checkpoint and the weights: train() writes them, no step taken
            print(f"{resume} is at step {checkpoint['step']}, its max_steps, without model.safetensors: writing it "
                  "from the checkpoint", file=sys.stderr)
        run = read_run(resume)
        tokenizer_path = run.get("tokenizer")
        for key in ("sample_tokens", "prompt"):  # (what the run ends with, as the run was told: --sample-tokens 0)
            if key in run and key not in explicit and cli[key] == _CLI_KEYS[key]:
                cli[key] = run[key]
        # The saved settings' paths into the run's own folder, where it is now (moved, renamed, copied):
        # the folder was where run.json was written, or where this checkpoint was (a resume elsewhere).
        for key in ("data_dir", "tokenizer", "eval_choices"):
            path = getattr(cfg, key)
            for was in filter(None, (run["was"], saved.get("out_dir"))):
                if (moved := in_run_folder(path, str(Path(was).resolve()), resume)) != path:
                    setattr(cfg, key, moved)
                    break
    else:
        data_dir = opts.pop("data_dir", None)  # a TrainConfig field a config file may name: the data, as --data
        if data_dir is not None and "data" not in explicit:  # (run.json records where its token files are;
            if cli["data"] is not None:  # the command's --data overrides the file's, as any flag does)
                raise ValueError("give the data once: a config file's data or its data_dir")
            cli["data"] = data_dir
        cfg = TrainConfig.from_dict({"model": model, **opts})
        cfg.validate()
        check_options_used(cfg, opts, explicit)
        from pyllm import data

        data_list = cli["data"] if isinstance(cli["data"], list) else [cli["data"]]
        if (cli["data"] and data.is_prompt_data(data_list)
                and not (cfg.grpo_reward or cfg.distill_seq_kd or cfg.distill_lmbda == 1)):
            raise ValueError("prompts alone ({\"prompt\": ...} lines without a completion) train by sampling the "
                             "replies: --grpo-reward, or distillation with --distill-seq-kd or --distill-lmbda 1")
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        # Under torchrun, rank 0 trains the tokenizer and writes the token files; the rest wait, and
        # learn whether it failed (a bad --data, a tokenizer that does not fit). Wherever no torchrun
        # ended them, they had failed at a barrier with gloo's "Connection closed by peer", naming no
        # cause, and under nccl, which notices a lost peer at its watchdog's timeout, waited for it.
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        info = None
        if world_size > 1:
            from pyllm.train import setup_distributed

            info = setup_distributed(cfg.device)
        failed = refused  # (the folder another run's, or not made on this rank: the others learn it here)
        if rank == 0 and failed is None:
            try:
                setup_run_data(cfg, cli)
            except Exception as e:
                if info is None:
                    raise
                failed = e
        _raise_on_every_rank(failed, info, "start the run")
        if info is not None and not (Path(cfg.out_dir) / "run.json").is_file():  # (rank 0 wrote it)
            failed = FileNotFoundError(f"rank {rank}: {Path(cfg.out_dir) / 'run.json'}, which rank 0 wrote, is not "
                                       f"here{_SHARED_HINT}")
        _raise_on_every_rank(failed, info, "start the run")
        run = read_run(cfg.out_dir)
        tokenizer_path, cfg.data_dir = run["tokenizer"], run["data_dir"]
        source = run.get("init_from_hf") or cfg.init_from_hf
        if cfg.grpo_reward and not cfg.tokenizer and tokenizer_path:  # reward functions are given text
            cfg.tokenizer = str(tokenizer_path)
        if cfg.samples_replies and not cfg.sample_stop_tokens and source:
            from pyllm.model import hf_folder
            from pyllm.tokenizer.tokenizer import hf_special_token_id, hf_stop_ids

            # samples end where the model's replies end: its end-of-sequence ids, and GRPO's at its
            # tokenizer's eos_token too, as TRL's GRPOTrainer (a generation_config naming another
            # end had let samples run past the tokenizer's, rewarded and trained so)
            cfg.sample_stop_tokens = hf_stop_ids(hf_folder(source))
            eos = hf_special_token_id(hf_folder(source), "eos_token") if cfg.grpo_reward else None
            if eos is not None and eos not in cfg.sample_stop_tokens:
                cfg.sample_stop_tokens = [*cfg.sample_stop_tokens, eos]
        elif cfg.samples_replies and not cfg.sample_stop_tokens and tokenizer_path:
            end = eot_id(load_tokenizer(tokenizer_path))
            cfg.sample_stop_tokens = [] if end is None else [end]  # pyllm's own tokenizer: its end of document
        if run["vocab_size"] and "vocab_size" not in cfg.model:
            cfg.model["vocab_size"] = run["vocab_size"]
        if cli["eval_choices_file"]:  # tokenized once, as the run's documents start; the trainer scores the file
            if not tokenizer_path:
                raise ValueError("--eval-choices needs the run's tokenizer (give --tokenizer)")
            from pyllm import evaluate

            choices = Path(cfg.out_dir) / "data" / "choices.bin"
            choices.parent.mkdir(parents=True, exist_ok=True)
            if int(os.environ.get("RANK", "0")) == 0:
                examples = evaluate.read_choices(cli["eval_choices_file"])[:cli["eval_choices_limit"]]
                evaluate.write_choices(examples, load_tokenizer(tokenizer_path), choices,
                                       run.get("prompt_prefix", []))
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                import torch.distributed as dist

                dist.barrier()
            cfg.eval_choices = str(choices)
    check_device(cfg.device)  # a config file's, a resumed run's
    if int(os.environ.get("RANK", "0")) == 0:
        start = (f"from {cfg.init_from_hf}" if cfg.init_from_hf else f"from the run {cfg.init_from_run}"
                 if cfg.init_from_run else f"preset {cfg.preset}")
        print(f"training: {start}, {cfg.max_steps} steps, batch {cfg.batch_size} x {cfg.grad_accum}, "
              f"device {cfg.device}, precision {cfg.precision}, run folder {cfg.out_dir}", flush=True)
    t0 = time.perf_counter()
    # SIGTERM (SLURM, Kubernetes, torchrun before their kill): the step under way ends, is checkpointed,
    # and the run stops; it had died with up to --ckpt-every steps lost and nothing said.
    # (a handler set outside Python, None here, cannot be put back: then none is installed)
    in_main = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not None
    old_handler = signal.signal(signal.SIGTERM, request_stop) if in_main else None
    try:
        summary = train(cfg, resume=bool(resume))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except TrainingStopped as e:
        print(f"\npyllm train: stopped (SIGTERM) after step {e.step}; {last_checkpoint_note(cfg.out_dir)}",
              file=sys.stderr)
        return 143  # 128 + SIGTERM, what a shell reports
    except KeyboardInterrupt:
        print(f"\npyllm train: interrupted; {last_checkpoint_note(cfg.out_dir)}", file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_handler)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if summary["rank"] != 0:
        return 0
    out = Path(cfg.out_dir)
    model_obj = summary["model"]
    print(f"done in {time.perf_counter() - t0:.0f} s on {summary['device']} ({summary['precision']}): "
          f"{model_obj.num_params() / 1e6:.2f}M params, val loss "
          f"{'not evaluated' if summary['val_loss'] is None else format(summary['val_loss'], '.4f')}, "
          f"{summary['skipped_steps']} skipped steps")
    print(f"wrote {out / 'checkpoint.pt'}, {out / 'model.safetensors'}, {out / 'log.jsonl'}"
          + (f", {out / 'loss.png'}" if (out / "loss.png").is_file() else ""))
    empty = summary.get("empty_steps", 0)
    if empty:
        print(f"warning: {empty} steps had no trained token (every reply in their batches cut away by --seq-len): "
              "skipped; raise --seq-len", file=sys.stderr)
    if (summary["skipped_steps"] - empty) * 4 > cfg.max_steps:  # the run mostly stood still: say why
        print(f"warning: {summary['skipped_steps'] - empty} of {cfg.max_steps} steps were skipped (non-finite "
              "gradients): the learning rate is likely too high (--lr), or gradient clipping off (--grad-clip)",
              file=sys.stderr)
    kept_best = cfg.keep_best and summary["best_val_loss"] is not None
    # FSDP2: the trained model's parameters are DTensor shards of a process group that is gone now;
    # the sample reads the whole weights rank 0 wrote (LoRA merged in)
    sharded = cfg.dist_mode == "fsdp" and summary["world_size"] > 1
    if kept_best or sharded:  # the sample from the weights kept
        from pyllm.model import LLM

        if kept_best:
            print(f"model.safetensors: the weights of the lowest val loss, {summary['best_val_loss']:.4f}")
        model_obj = LLM.load(out / "model.safetensors", device=summary["device"])
    if tokenizer_path and cli["sample_tokens"] > 0 and not model_obj.config.num_labels:  # (a reward model scores)
        tokenizer = load_tokenizer(tokenizer_path)
        eot = eot_id(tokenizer)
        prompt_ids, stops = None, ([] if eot is None else [eot])  # as pyllm generate
        prompt = default_prompt(tokenizer) if cli["prompt"] is None else cli["prompt"]
        try:
            tokenizer.encode_ordinary(prompt)
        except ValueError as e:  # a character vocabulary without the prompt's characters: the run is kept
            print(f"sample skipped: --prompt {prompt!r}: {e}", file=sys.stderr)
            return 0
        if run.get("chat") and run.get("init_from_hf"):  # a reply to the prompt as a user's message
            from pyllm.model import hf_folder
            from pyllm.tokenizer.tokenizer import hf_chat_prompt, hf_stop_ids

            source = hf_folder(run["init_from_hf"])
            prompt_ids = tokenizer.encode(hf_chat_prompt(source, [{"role": "user", "content": prompt}]),
                                          allowed_special="all")
            stops = hf_stop_ids(source)
        elif not prompt and not run.get("prompt_prefix"):  # a document's start, as pyllm generate
            prompt_ids = start_ids(tokenizer)
        print(f"sample ({cli['sample_tokens']} tokens {'replying to' if prompt_ids and prompt else 'after'} {prompt!r}):\n"
              + "-" * 60)
        stream_sample(model_obj, tokenizer, prompt, cli["sample_tokens"], 0.8, 50, None, seed=cfg.seed,
                      prefix_ids=run.get("prompt_prefix", []), prompt_ids=prompt_ids, stop_tokens=stops)
        print("\n" + "-" * 60)
    elif cli["sample_tokens"] > 0 and not model_obj.config.num_labels:
        print("sample skipped: no tokenizer is known for these token files (--tokenizer FILE decodes them)",
              file=sys.stderr)
    return 0


def stream_sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k, top_p, seed,
                  prefix_ids=(), prompt_ids=None, stop_tokens=(), cuda_graph: bool = False, draft=None,
                  draft_tokens: int = 4, stop_strings=(), min_p=None, repetition_penalty: float = 1.0,
                  no_repeat_ngram_size: int = 0, min_new_tokens: int = 0, warpers: dict | None = None) -> str:
    """Generates after prompt (after prefix_ids, e.g. a BOS token), printing text as it comes (a
    UTF-8 character split across tokens is printed once its last byte arrives). prompt_ids: the
    tokens to continue instead (a rendered chat), not printed; generation ends at a stop token,
    which is not printed either. draft: a smaller model over the same vocabulary for speculative
    decoding (LLM.generate_speculative; its acceptance is printed to stderr after). seed: an int, or
    a torch.Generator on the model's device to go on drawing from (several samples of one stream).
    stop_strings: generation also ends with the token that completes one of them in the sample's
    text (has_stop_string), that token printed. min_p, repetition_penalty, no_repeat_ngram_size,
    min_new_tokens: LLM.generate's; warpers: its typical_p, epsilon_cutoff and eta_cutoff (a dict)."""
    import torch

    device = next(model.parameters()).device
    if prompt_ids is not None:
        ids, prompt = list(prompt_ids), ""
    else:
        ids = [*prefix_ids, *prompt_tokens(tokenizer, prompt)] or start_ids(tokenizer)
    # the text a stop string may begin in: the prompt's tokens' (a SentencePiece "▁", a BOS: transformers' reads them)
    before = decode_known(tokenizer, ids) if stop_strings else ""
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    stops = set(stop_tokens)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator(device=device).manual_seed(seed)
    if draft is not None:  # refused before the prompt is printed (a half sample had been left on stdout)
        if len(ids) + max_new_tokens > (room := min(model.config.block_size, draft.config.block_size)):
            raise ValueError(f"--draft: the prompt's {len(ids)} tokens + --max-new-tokens {max_new_tokens} are more than "
                             f"the models' block_size ({room}): lower --max-new-tokens, or leave out --draft (without "
                             "it, generation slides past block_size)")
        stats = {}  # (generate_speculative checks the rest of its arguments when called)
        speculated = model.generate_speculative(idx, draft, max_new_tokens, temperature, top_k, top_p, draft_tokens,
                                                gen, stops, stats, min_p=min_p, repetition_penalty=repetition_penalty,
                                                no_repeat_ngram_size=no_repeat_ngram_size,
                                                min_new_tokens=min_new_tokens, **(warpers or {}))
    generated: list[int] = []
    printed = prompt
    sys.stdout.write(prompt)
    known = KnownIds(tokenizer)

    def on_token(token) -> bool:  # -> whether a stop string ended with it
        nonlocal printed
        if int(token[0]) in stops:
            return False
        generated.append(int(token[0]))
        text = prompt + known.decode(generated)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
        return bool(stop_strings) and has_stop_string(text[len(prompt):], stop_strings, before)

    if draft is not None:
        for token in speculated:
            if on_token(token):
                break
    else:
        def callback(token):
            if on_token(token):
                raise _StopString  # (out of generate(), which restores the model's mode on its way out)

        try:
            model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, callback=callback,
                           generator=gen, stop_tokens=stops, cuda_graph=cuda_graph, min_p=min_p,
                           repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                           min_new_tokens=min_new_tokens, **(warpers or {}))
        except _StopString:
            pass
    final = prompt + decode_known(tokenizer, generated)
    if final.startswith(printed) and final != printed:  # a last, incomplete character held back: printed
        sys.stdout.write(final[len(printed):])  # as it is returned (transformers' TextStreamer.end)
    if draft is not None:  # (after the sample's last character: it had come after this line)
        sys.stdout.flush()
        print(f"\nspeculative: {stats['accepted']:,} of {stats['drafted']:,} drafted tokens kept "
              f"({stats['accepted'] / max(stats['drafted'], 1):.0%}) in {stats['rounds']:,} rounds", file=sys.stderr)
    return final


class _StopString(Exception):
    """A sample's text holds a stop string: generation ends (stream_sample)."""


def has_stop_string(text: str, stop_strings, prompt: str = "") -> bool:
    """Whether a generated text holds one of stop_strings, one that may begin in the text of its
    prompt (given) and end in the generated text, as transformers' StopStringCriteria reads the
    whole sequence. Checked after each token, the first time it does is at the token that completes
    one (transformers' stops there, the stop string ending in that token's text or overhanging it);
    a stop string within the prompt alone does not count."""
    longest = max(map(len, stop_strings), default=0)
    tail = prompt[max(0, len(prompt) - longest + 1):] if longest > 1 else ""  # (what a stop string can begin in)
    whole = tail + text
    return any(whole.find(stop, max(0, len(tail) - len(stop) + 1)) >= 0 for stop in stop_strings)


def prompt_tokens(tokenizer, text: str) -> list[int]:
    """A prompt's ids: special-token text in it (<|endoftext|>, a hand-written <|im_start|>) as that
    special token, as transformers' tokenizer(text) and nanoGPT's sample.py (allowed_special) encode it."""
    return tokenizer.encode(text, allowed_special="all")


class KnownIds:
    """decode_known for a sample decoded again after each of its tokens: whether the tokenizer has an
    id is asked once per id (decode_known's fallback, one id at a time, at every step had made a
    sample holding a padding id quadratic in its length: 0.77 s a 1,024-token row against 0.014)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def decode(self, ids) -> str:
        return self.tokenizer.decode([t for t in ids if self._has(t)])

    def _has(self, t: int) -> bool:
        if t not in self.known:
            try:
                self.tokenizer.decode([t])
                self.known[t] = True
            except (KeyError, ValueError):  # (a padded vocabulary's id: decode_known leaves it out)
                self.known[t] = False
        return self.known[t]


def decode_known(tokenizer, ids) -> str:
    """tokenizer.decode(ids), leaving out ids no token has: the padding rows of an embedding table
    larger than the tokenizer (nanoGPT's 50304 for GPT-2's 50257, `--model vocab_size=N`), which a
    sample may draw; transformers' decode skips them too (generation had died mid-stream)."""
    try:
        return tokenizer.decode(ids)
    except (KeyError, ValueError):  # InvalidTokenError (both)
        return KnownIds(tokenizer).decode(ids)


def default_prompt(tokenizer) -> str:
    """The prompt when none is given: "def " (the bundled corpus is Python), or none (a document's
    start, nanoGPT's "\n") for a character vocabulary without those characters."""
    try:
        tokenizer.encode_ordinary("def ")
    except ValueError:
        return ""
    return "def "


def start_ids(tokenizer) -> list[int]:
    """What an empty prompt continues: <|endoftext|> (every document the model saw followed one),
    else a newline (nanoGPT's sample.py's start), else id 0."""
    eot = eot_id(tokenizer)
    if eot is not None:
        return [eot]
    try:
        return tokenizer.encode_ordinary("\n") or [0]
    except ValueError:  # a character vocabulary without "\n"
        return [0]


# transformers' warpers after min-p that `pyllm generate` takes (flags, generation_config.json), each with its off value
WARPERS = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def warpers_of(args) -> dict:
    """LLM.generate's typical_p / epsilon_cutoff / eta_cutoff of resolved args (resolve_sampling's)."""
    return {name: getattr(args, name, off) for name, off in WARPERS.items()}


def resolve_sampling(args, source) -> None:
    """--temperature / --top-k / --top-p / --min-p / --typical-p / --epsilon-cutoff / --eta-cutoff /
    --repetition-penalty / --no-repeat-ngram-size / --min-new-tokens not given: a Hugging Face model's
    generation_config.json (do_sample false: greedy; else its temperature, top_k, top_p, min_p,
    typical_p, epsilon_cutoff, eta_cutoff, transformers' defaults 1.0 / 50 / 1.0 / none / 1 / 0 / 0
    for the ones it leaves out or sets null; its repetition_penalty, no_repeat_ngram_size and
    min_new_tokens, greedy or not, default 1 / 0 / 0: none), as transformers' generate() takes them
    (a folder without one, or an empty one: greedy, as there); a model of pyllm's own: 0.8 / 50 /
    none / none / 1 / 0 / 0 (the warpers off). A --top-k, --top-p, --min-p or a warper given asks to sample,
    whatever do_sample says (it had been ignored under do_sample false, greedy without a word)."""
    config = {}
    if source is not None and (Path(source) / "generation_config.json").is_file():
        config = json.loads((Path(source) / "generation_config.json").read_text())
        config = {key: value for key, value in config.items() if value is not None}  # null: transformers' default
    # What transformers' generate would apply and pyllm's sampling does not: said, not dropped silently
    neutral = {"min_length": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": [], "suppress_tokens": [],
               "begin_suppress_tokens": [],
               "diversity_penalty": 0.0, "length_penalty": 1.0, "num_beams": 1, "sequence_bias": {},
               "top_h": None}  # (nulls are dropped above: a top_h given is said)
    ignored = {k: v for k, v in config.items() if k in neutral and v != neutral[k]}
    if getattr(args, "stop", None) is None:  # (--stop over the folder's, as generate(stop_strings=) over its config)
        stops = config.get("stop_strings") or []
        args.stop = [stops] if isinstance(stops, str) else list(stops)
    if "" in args.stop:  # (every text holds it: each sample would end at its first token)
        raise ValueError("--stop (or generation_config.json's stop_strings): an empty string would end every sample "
                         "at its first token; give the text to stop at")
    if ignored:
        print(f"pyllm generate: {Path(source) / 'generation_config.json'} sets "
              f"{', '.join(f'{k}={v!r}' for k, v in ignored.items())}, which pyllm's sampling does not apply "
              "(transformers' generate would): its tokens may differ", file=sys.stderr)
    if source is not None:  # a Hugging Face folder: no generation_config.json (or an empty one) is greedy there too
        # do_sample left out is greedy, as transformers
        sampling = args.top_k is not None or args.top_p is not None or getattr(args, "min_p", None) is not None \
            or any(getattr(args, name, None) is not None for name in WARPERS) \
            or bool(config.get("do_sample", False))
        # (Qwen2.5-Instruct's folder sets repetition_penalty 1.05, Qwen3's min_p 0)
        defaults = dict(temperature=float(config.get("temperature", 1.0)) if sampling else 0.0,
                        top_k=config.get("top_k", 50), top_p=config.get("top_p", 1.0), min_p=config.get("min_p"),
                        repetition_penalty=float(config.get("repetition_penalty", 1.0)),
                        no_repeat_ngram_size=config.get("no_repeat_ngram_size", 0),
                        min_new_tokens=config.get("min_new_tokens", 0),
                        **{name: config.get(name, off) for name, off in WARPERS.items()})
    else:
        defaults = dict(temperature=0.8, top_k=50, top_p=None, min_p=None, repetition_penalty=1.0,
                        no_repeat_ngram_size=0, min_new_tokens=0, **WARPERS)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if not args.top_k:
        args.top_k = None  # 0: no top-k, as in transformers' GenerationConfig


def generate_file(model, tokenizer, args, prefix_ids, stop_tokens, source) -> int:
    """`pyllm generate --prompts-file F`: one {"prompt": ...} per line of F (JSONL, as training's
    prompt-completion files), --batch-size of them at a time through LLM.generate_batch; writes
    {"prompt": ..., "completion": ...} lines to --out (or stdout), in F's order. --chat puts each
    prompt in the chat template; completions end before a stop token."""
    import torch

    from pyllm import data
    from pyllm.model import until_stop
    from pyllm.tokenizer.tokenizer import hf_chat_prompt

    path = Path(args.prompts_file)
    prompts = []
    # read as the training data's JSON Lines (a BOM read past, U+2028 inside a string kept in its line)
    for n, record, _ in data._jsonl_rows(path):
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{n}: expected a JSON object with a \"prompt\" string")
        prompts.extend([record["prompt"]] * args.num_samples)  # --num-samples completions of each, in a row
    args.batch_size = 16 if args.batch_size is None else args.batch_size

    def ids_of(prompt: str) -> list[int]:
        if args.chat:  # the template writes the BOS and the turn markers itself
            return tokenizer.encode(hf_chat_prompt(source, [{"role": "user", "content": prompt}],
                                                   **args.chat_template_kwargs), allowed_special="all")
        return [*prefix_ids, *prompt_tokens(tokenizer, prompt)] or start_ids(tokenizer)

    known = KnownIds(tokenizer)

    def ended(b: int, new: list[int]) -> bool:  # a completion ends with the token that completes a --stop string
        return has_stop_string(known.decode(new), args.stop, prompt_texts[b])

    def one_by_one(b: int, ids: list[int]) -> list[int]:
        """A prompt whose completion passes block_size: generate() slides past it, as --prompt does."""
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        new = []

        def callback(token):
            new.append(int(token[0]))
            if args.stop and new[-1] not in stops and ended(b, new):
                raise _StopString  # (out of generate(), which restores the model's mode on its way out)

        try:
            model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, callback=callback,
                           generator=generator, stop_tokens=stops, min_p=args.min_p,
                           repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                           min_new_tokens=args.min_new_tokens, **warpers_of(args))
        except _StopString:
            pass
        return until_stop(new, stops)

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stops = set(stop_tokens)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            ids = [ids_of(p) for p in chunk]
            # the text a stop string may begin in: the prompt's tokens' (transformers' reads them)
            prompt_texts = [decode_known(tokenizer, r) for r in ids] if args.stop else []
            if max(map(len, ids)) + args.max_new_tokens <= model.config.block_size:
                # a row ends at a stop token or at a --stop string (the batch once every row has)
                new = model.generate_batch(ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator,
                                           stops, cuda_graph=args.cuda_graph, stop_when=ended if args.stop else None,
                                           min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                           no_repeat_ngram_size=args.no_repeat_ngram_size,
                                           min_new_tokens=args.min_new_tokens, **warpers_of(args))
            else:
                new = [one_by_one(b, row) for b, row in enumerate(ids)]
            for prompt, tokens in zip(chunk, new):
                completion = decode_known(tokenizer, [t for t in tokens if t not in stops])
                out.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if args.out:
        print(f"wrote {len(prompts)} completions to {args.out}")
    return 0


# --- prepare, tokenizer, generate, plan ------------------------------------------------------------

def cmd_prepare(args) -> int:
    from pyllm import data

    tokenizer = text_tokenizer(args.tokenizer, "--tokenizer")
    stats = data.prepare(args.input, tokenizer, args.out, args.val_fraction)
    # the tokenizer beside its token files: `pyllm train --data OUT` records it, generate and eval find it
    copy = Path(args.out) / "tokenizer.bpe"
    if not copy.exists() or copy.resolve() != Path(args.tokenizer).resolve():
        copy_into(args.tokenizer, copy)
    print(f"{stats['files']} files, {stats['bytes'] / 1e6:.1f} MB -> {args.out}/train.bin ({stats['train_tokens']:,} tokens), "
          f"{args.out}/val.bin ({stats['val_tokens']:,} tokens)")
    return 0


def cmd_tokenizer_train(args) -> int:
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (a failed training, a typo in --input or too large a vocabulary, leaves the old file as it was)
    ensure_tokenizer(args.input, path, args.vocab_size, args.train_bytes, retrain=True)
    return 0


GENERATE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_model(args):
    """(model, tokenizer, prefix, source) for generate and eval: --hf DIR (with --adapter), or --run
    DIR (or --model and --tokenizer); prefix the ids its documents start with, source the Hugging
    Face folder whose chat template and end-of-sequence ids apply (None for a model trained here)."""
    from pyllm.model import LLM, hf_folder
    from pyllm.tokenizer.tokenizer import hf_prefix_ids

    prefix, source = [], None
    if args.hf:
        source = hf_folder(args.hf)
        model, tokenizer = LLM.from_hf(source, adapter=args.adapter), tokenizer_class().from_hf(source / "tokenizer.json")
        prefix = hf_prefix_ids(source / "tokenizer.json")  # Llama 3's <|begin_of_text|>
    else:
        run = Path(args.run) if args.run else None
        if run is not None and not run.is_dir():
            raise ValueError(f"--run {run}: no such folder (give a folder `pyllm train` wrote)")
        model_path = Path(args.model) if args.model else (run / "model.safetensors" if run else None)
        tokenizer_path = args.tokenizer
        if run is not None and (run / "run.json").exists():
            run_info = read_run(run)
            tokenizer_path = tokenizer_path or run_info.get("tokenizer")
            prefix = run_info.get("prompt_prefix", [])
            if run_info.get("init_from_hf"):  # a fine-tune: its source's template and stop ids
                source = hf_folder(run_info["init_from_hf"])
        if run is not None and tokenizer_path is None:  # trained on token files given without their tokenizer
            raise ValueError(f"--run {run} records no tokenizer (it trained on token files, and `pyllm train` was not "
                             "given --tokenizer): give the tokenizer that wrote them with --tokenizer PATH")
        if model_path is None or tokenizer_path is None:
            raise ValueError("give --run DIR (a folder `pyllm train` wrote), both --model and --tokenizer, or --hf DIR")
        # nanoGPT's ckpt.pt (torch.save's zip) as it is, else pyllm's safetensors
        model = LLM.from_nanogpt(model_path) if model_path.suffix in (".pt", ".pth") else LLM.load(model_path)
        tokenizer = load_tokenizer(tokenizer_path)
    if args.adapter and not args.hf:
        raise ValueError("--adapter goes with --hf DIR (the model the adapter was trained on)")
    return model, tokenizer, prefix, source


def inference_device_dtype(args) -> tuple[str, str]:
    """--device and --dtype resolved: bf16 on a GPU, where pyllm's attention kernels take 16-bit
    inputs only (fp32 weights would run on SDPA); fp32 on the CPU, where bf16 decoding measured no
    faster (llama-124m, 2-core Xeon VM, 2026-11-30: 36-38 tokens/s either way)."""
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return device, args.dtype if args.dtype != "auto" else ("bf16" if torch.device(device).type == "cuda" else "fp32")


def cmd_generate(args) -> int:
    import torch

    from pyllm.tokenizer.tokenizer import hf_chat_prompt, hf_stop_ids

    if args.prompt is not None and args.prompt.startswith("FILE:"):  # nanoGPT's sample.py: the prompt is the file's text
        path = Path(args.prompt[len("FILE:"):])
        if not path.is_file():
            raise ValueError(f"--prompt {args.prompt}: no such file {str(path)!r}")
        args.prompt = path.read_text(encoding="utf-8")
    alone = [flag for flag, given, needs in (("--out", args.out, args.prompts_file), ("--batch-size", args.batch_size,
             args.prompts_file), ("--draft-tokens", args.draft_tokens, args.draft),
             ("--chat-template-kwargs", args.chat_template_kwargs, args.chat))
             if given is not None and not needs]
    if alone:
        needed = {"--draft-tokens": "--draft", "--chat-template-kwargs": "--chat"}.get(alone[0], "--prompts-file")
        raise ValueError(f"{alone[0]} goes with {needed} (without it, it would be ignored)")
    args.draft_tokens = 4 if args.draft_tokens is None else args.draft_tokens
    args.chat_template_kwargs = args.chat_template_kwargs or {}
    model, tokenizer, prefix, source = load_model(args)
    if args.prompt is None:
        args.prompt = default_prompt(tokenizer)
    prompt_ids, stops = None, []
    if args.chat and source is None:
        raise ValueError("--chat needs --hf DIR, or a --run fine-tuned from one (--init-from-hf): a chat template")
    resolve_sampling(args, source)
    if not args.ignore_eos:  # where a document ends: the source's end-of-sequence ids, or pyllm's <|endoftext|>
        eot = eot_id(tokenizer)
        stops = hf_stop_ids(source) if source is not None else ([] if eot is None else [eot])
    if source is not None:
        if args.chat:  # the template writes the BOS and the turn markers itself
            text = hf_chat_prompt(source, [{"role": "user", "content": args.prompt}], **args.chat_template_kwargs)
            prompt_ids = tokenizer.encode(text, allowed_special="all")
    device, dtype = inference_device_dtype(args)
    model = model.to(device=device, dtype=getattr(torch, GENERATE_DTYPES[dtype])).eval()
    draft = None
    if args.draft:
        if args.prompts_file or args.cuda_graph:
            raise ValueError("--draft (speculative decoding) generates one prompt at a time without CUDA graphs: "
                             "leave out --prompts-file and --cuda-graph")
        from pyllm.train import load_frozen

        mine = args.tokenizer or (read_run(Path(args.run)).get("tokenizer") if args.run and not args.hf else None)
        if mine:  # (a draft of another tokenizer of the same size had drafted tokens the model never kept)
            check_teacher_tokenizer(args.draft, mine, "--draft", "speculative decoding checks the draft's tokens id by "
                                    "id, so the two models must share the tokenizer")
        draft = load_frozen(args.draft, "fp32", torch.device(device)).to(getattr(torch, GENERATE_DTYPES[dtype]))
    if args.prompts_file:
        return generate_file(model, tokenizer, args, prefix, stops, source)
    if not args.prompt and not prefix and prompt_ids is None:  # no text to continue: a document's start
        prompt_ids = start_ids(tokenizer)
    # every sample drawn from one stream, as nanoGPT's sample.py draws them (seed + i had made --seed 1's
    # first sample --seed 0's second: runs of adjacent seeds repeated each other's samples)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if source is not None and draft is None:  # (a Hugging Face model: where transformers' tokens would differ)
        n = len(prompt_ids) if prompt_ids is not None else len([*prefix, *prompt_tokens(tokenizer, args.prompt)])
        if n + args.max_new_tokens > model.config.block_size:
            print(f"pyllm generate: the prompt's {n} tokens + --max-new-tokens {args.max_new_tokens} pass the model's "
                  f"context ({model.config.block_size} tokens, its max_position_embeddings): past it pyllm goes on "
                  f"over the last {model.config.block_size} (nanoGPT's sampling), where transformers' generate keeps "
                  "them all: the tokens from there on may differ", file=sys.stderr)
    for i in range(args.num_samples):
        stream_sample(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                      gen, prefix, prompt_ids, stops, args.cuda_graph, draft, args.draft_tokens, args.stop,
                      args.min_p, args.repetition_penalty, args.no_repeat_ngram_size, args.min_new_tokens,
                      warpers_of(args))
        print("\n" + "-" * 60)
    return 0


def harness_prefix_ids(folder, tokenizer) -> list[int] | None:
    """[id] of a Hugging Face folder's bos_token, else its eos_token (hf_special_tokens), where the
    tokenizer has it as a special token: what lm-evaluation-harness conditions a text's first token
    (and an empty context's candidates) on (Qwen2.5-Instruct: <|im_end|>, not <|endoftext|>)."""
    from pyllm.tokenizer.tokenizer import hf_special_tokens

    tokens = hf_special_tokens(folder)
    for key in ("bos_token", "eos_token"):
        if tokens.get(key) in getattr(tokenizer, "special_tokens", {}):
            return [tokenizer.special_tokens[tokens[key]]]
    return None


def cmd_eval(args) -> int:
    import torch

    from pyllm import evaluate

    if not (args.choices or args.text or args.continuations):
        raise ValueError("give --choices FILE (multiple-choice examples), --continuations FILE and / or --text FILE")
    from pyllm import data
    from pyllm.tokenizer.tokenizer import hf_stop_ids

    model, tokenizer, prefix, source = load_model(args)
    device, dtype = inference_device_dtype(args)
    model = model.to(device=device, dtype=getattr(torch, GENERATE_DTYPES[dtype])).eval()
    # What an empty context and a text start from where the tokenizer has no <|endoftext|> (nor the
    # model a BOS, prefix): its end-of-sequence id, as lm-evaluation-harness's prefix token (the
    # first token had gone unpredicted, and a one-token ending after an empty context scored 0)
    start = None
    if not prefix and source is not None:  # lm-evaluation-harness's prefix_token_id (huggingface.py:611):
        start = harness_prefix_ids(source, tokenizer)  # the tokenizer's bos_token, else its eos_token
    if not prefix and not start and data.eot_id(tokenizer) is None:
        start = (hf_stop_ids(source)[:1] if source is not None else []) or start_ids(tokenizer)
    seq_len = args.seq_len if args.seq_len is not None else min(model.config.block_size, 2048)  # (0: refused)
    if not 1 <= seq_len <= model.config.block_size:
        raise ValueError(f"--seq-len must be in [1, {model.config.block_size}] (the model's block_size), got {seq_len}")
    results = {"device": device, "dtype": dtype, "seq_len": seq_len}
    for path in args.choices or []:
        examples = evaluate.read_choices(path)[:args.limit]
        keys = data._first_row_keys(path)
        if {"activity_label", "ctx_a", "ctx_b"} <= keys and "query" not in keys:
            print(f"eval: {path}: HellaSwag's own rows, scored as they are (as llm.c scores them); "
                  "lm-evaluation-harness's hellaswag rewrites each context first (activity label, [title], "
                  "brackets), so its acc / acc_norm differ: its processed rows ({query, choices, gold}) give them",
                  file=sys.stderr)
        if not examples:
            raise ValueError(f"{path}: no examples in it")
        score = evaluate.score_choices(model, tokenizer, examples, seq_len, args.batch_size, prefix, start=start)
        score.pop("logps")
        results[str(path)] = score
        pm = {k: "" if score[f"{k}_stderr"] is None else f" ± {score[f'{k}_stderr']:.4f}" for k in ("acc", "acc_norm")}
        print(f"{path}: {score['examples']:,} examples: acc {score['acc']:.4f}{pm['acc']}, "
              f"acc_norm {score['acc_norm']:.4f}{pm['acc_norm']}, "
              f"acc per byte {score['acc_bytes']:.4f}, acc per token {score['acc_per_token']:.4f}")
    for path in args.continuations or []:
        examples = evaluate.read_continuations(path)[:args.limit]
        if not examples:
            raise ValueError(f"{path}: no examples in it")
        score = evaluate.score_continuations(model, tokenizer, examples, seq_len, args.batch_size, prefix, start=start)
        score.pop("logps"), score.pop("greedy")
        results[str(path)] = score
        pm = "" if score["acc_stderr"] is None else f" ± {score['acc_stderr']:.4f}"
        print(f"{path}: {score['examples']:,} examples: acc {score['acc']:.4f}{pm}, perplexity {score['perplexity']:.4f}")
    if args.text:
        # read as `pyllm prepare` reads them: as on disk (CRLF kept), a JSON Lines file of {"text"}
        # rows a document each, a literal <|endoftext|> a document's end (it had been scored as 13
        # bytes of text, and the raw JSON of a rows file)
        texts = list(data.read_documents([Path(p) for p in args.text]))
        if data.eot_id(tokenizer) is not None:
            texts = list(data.split_at_separator(texts, data.EOT))
        loss = results["text"] = evaluate.text_loss(model, tokenizer, texts, seq_len, args.batch_size, prefix,
                                                    start=start)
        if not loss["tokens"]:
            raise ValueError(f"--text {' '.join(args.text)}: no tokens to predict (empty files?)")
        print(f"text ({loss['bytes']:,} bytes, {loss['tokens']:,} tokens predicted): loss {loss['loss']:.4f} nats/token, "
              f"perplexity {loss['perplexity']:.2f}, {loss['bits_per_byte']:.4f} bits/byte, word perplexity "
              f"{loss['word_perplexity']:.2f} ({loss['words']:,} words)")
    if args.json:  # (an infinite perplexity as null, as log.jsonl writes non-finite numbers: JSON has no inf)
        Path(args.json).write_text(json.dumps(_strict_json(results), indent=1, allow_nan=False))
    return 0


def _strict_json(value):
    """value with every non-finite float as None (Python's json writes Infinity and NaN, which JSON
    parsers elsewhere refuse or misread)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict_json(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def cmd_export(args) -> int:
    """A run of `pyllm train` as a Hugging Face checkpoint folder (LLM.to_hf): a fine-tune keeps its
    source's config.json and tokenizer files; a model pyllm trained from scratch gets a LLaMA,
    Mistral or GPT-2 config, and its tokenizer as tokenizer.json (Tokenizer.to_hf) plus pyllm's own."""
    import shutil

    run, out = Path(args.run), Path(args.out)
    check_run_folder(run)
    run_info = read_run(run)
    # --force removes checkpoint files (model.safetensors, tokenizer.bpe, config.json, ...) from --out before
    # the export reads them: --out the run itself or its source had lost them (and the source all its files)
    reads = [("--run", run), ("its --init-from-hf source", Path(run_info.get("init_from_hf") or "")),
             ("its tokenizer's folder", Path(run_info.get("tokenizer") or "").parent)]
    for what, folder in reads:
        if str(folder) not in ("", ".") and folder.is_dir() and out.exists() and out.resolve() == folder.resolve():
            raise ValueError(f"--out {out} is {what}, which the export reads: give a new folder")
    existed = out.exists()
    empty = not existed or (out.is_dir() and not any(out.iterdir()))
    clear_export_folder(out, args.force)
    try:
        return _export(run, out, args, run_info)
    except BaseException:  # no half-written checkpoint left behind (a later export had found it "not empty")
        if empty and out.is_dir():
            if existed:  # the user's empty folder: emptied again, kept
                for item in out.iterdir():
                    shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
            else:
                shutil.rmtree(out, ignore_errors=True)
        raise


def _export(run: Path, out: Path, args, run_info: dict) -> int:
    import shutil

    import torch

    from pyllm.model import HF_SIDE_FILES, LLM, hf_folder
    from pyllm.train import load_checkpoint

    if args.adapter:  # (fp32 by default, as PEFT's save_pretrained keeps it: bf16 had moved the logits 6e-4)
        return export_adapter(run, out, args.dtype or "fp32")
    args.dtype = args.dtype or "bf16"
    ckpt = load_checkpoint(run, mmap=True) if (run / "checkpoint.pt").exists() else None
    weights = run_weights(run, ckpt)
    model = LLM.load(weights).to(getattr(torch, GENERATE_DTYPES[args.dtype]))
    if weights.parent != run:  # (the checkpoint's weights, written for the export)
        shutil.rmtree(weights.parent, ignore_errors=True)
    source = run_info.get("init_from_hf")
    if source is None and ckpt is not None:  # runs from before run.json said
        source = ckpt["train_config"].get("init_from_hf")
    hf_config = None
    if source:
        folder = hf_folder(source)
        hf_config = json.loads((folder / "config.json").read_text())
    model.to_hf(out, hf_config)
    if source:
        for name in HF_SIDE_FILES:
            if (folder / name).exists():
                copy_into(folder / name, out / name)
    else:
        from pyllm.tokenizer.chars import is_nanogpt_meta

        if not run_info.get("tokenizer") and (run / "tokenizer.bpe").is_file():  # (no run.json: the folder's own)
            run_info["tokenizer"] = str(run / "tokenizer.bpe")
        # (none at all: token files of another's ids, exported without a tokenizer, as before)
        if run_info.get("tokenizer") and not Path(run_info["tokenizer"]).is_file():
            raise FileNotFoundError(f"--run {run}: its tokenizer {run_info['tokenizer']} is gone (run.json names it); "
                                    "put it back to export the run with its tokenizer")
        if run_info.get("tokenizer") and is_nanogpt_meta(run_info["tokenizer"]):
            copy_into(run_info["tokenizer"], out / "meta.pkl")  # nanoGPT's characters: no tokenizer.json for them
            print(f"pyllm export: {out} gets the run's nanoGPT meta.pkl (a character vocabulary), no tokenizer.json",
                  file=sys.stderr)
        elif run_info.get("tokenizer"):  # as tokenizer.json (transformers' fast tokenizer) and pyllm's own file
            tokenizer = tokenizer_class().load(run_info["tokenizer"])
            copy_into(run_info["tokenizer"], out / "tokenizer.bpe")
            tokenizer.to_hf(out / "tokenizer.json")
            eot = eot_id(tokenizer)
            eos = None if eot is None else "<|endoftext|>"
            write_whole(out / "tokenizer_config.json", json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size,
                # byte-level: decode gives the text back as it was (transformers 4.x cleaned " ," to ",")
                "clean_up_tokenization_spaces": False,
                **({"eos_token": eos, "bos_token": eos} if eos else {})}, indent=2))
            if eot is not None:  # generation ends at a document's end there too (the config's defaults
                # were LLaMA's ids 1 and 2, bytes in this vocabulary, or GPT-2's 50256, past it)
                config = json.loads((out / "config.json").read_text())
                config.update(bos_token_id=eot, eos_token_id=eot)
                write_whole(out / "config.json", json.dumps(config, indent=2))
                write_whole(out / "generation_config.json", json.dumps({"bos_token_id": eot, "eos_token_id": eot},
                                                                       indent=2))
    if model.score is not None and model.config.pad_token_id is not None:
        name_the_pad_token(out, model.config.pad_token_id)
    print(f"exported {run} to {out} ({'config of ' + str(source) if source else 'a ' + model_kind(out) + ' config'}, "
          f"{args.dtype})")
    return 0


def name_the_pad_token(out: Path, pad_id: int) -> None:
    """A reward model's export: tokenizer_config.json's pad_token, where it names none, the token its
    scores are read before (TRL's RewardTrainer saves its tokenizer with pad = eos), so that
    transformers' tokenizer pads a batch for it (it had raised "no padding token")."""
    from pyllm.tokenizer.tokenizer import hf_special_token_ids, hf_special_tokens

    tokens = hf_special_tokens(out)
    path = out / "tokenizer_config.json"
    if "pad_token" in tokens or not (out / "tokenizer.json").is_file():
        return
    text = next((tokens[role] for role, i in hf_special_token_ids(out).items() if i == pad_id), None)
    if text is None:
        added = json.loads((out / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or ()
        text = next((t.get("content") for t in added if t.get("id") == pad_id), None)
    if text is not None:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        write_whole(path, json.dumps({**config, "pad_token": text}, indent=2, ensure_ascii=False))


# What a checkpoint folder may hold that transformers or PEFT would read with the new files: a
# weights index and its shards (read instead of model.safetensors), an adapter (applied on top),
# tokenizer side files (mixed with the new tokenizer's).
_EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_config.json",
                 "adapter_model.safetensors", "adapter_model.bin", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                 "chat_template.json", "vocab.json", "merges.txt", "tokenizer.bpe", "meta.pkl")
_EXPORT_SHARDS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def clear_export_folder(out: Path, force: bool) -> None:
    """--out must be new or empty (files left in it had been loaded with the export: an adapter
    from before applied on top of new weights, silently); --force removes the checkpoint files
    there (_EXPORT_FILES, shards) and keeps the rest."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder to write the checkpoint into")
    if not out.is_dir() or not any(out.iterdir()):
        return
    found = sorted({p.name for p in out.iterdir() if p.name in _EXPORT_FILES or any(p.match(g) for g in _EXPORT_SHARDS)})
    if not force:
        raise ValueError(f"--out {out} is not empty ({', '.join(found[:4]) or next(out.iterdir()).name}"
                         f"{', ...' if len(found) > 4 else ''}): files there would be loaded with the export (an "
                         "adapter over the new weights, an index's shards instead of them); give a new folder, or "
                         "--force to replace the checkpoint files in it")
    for name in found:
        (out / name).unlink()


def check_run_folder(run: Path) -> None:
    """A folder `pyllm train` wrote, or what to do instead."""
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run}: no such folder (give the --out of a `pyllm train` run)")
    if (run / "config.json").is_file() and not (run / "checkpoint.pt").exists() and not (run / "run.json").exists():
        raise ValueError(f"--run {run} is a Hugging Face checkpoint folder already, not a run `pyllm train` wrote: "
                         "transformers loads it as it is")
    if not (run / "checkpoint.pt").exists() and not (run / "model.safetensors").exists():
        raise ValueError(f"--run {run}: no model.safetensors nor checkpoint.pt; give a folder `pyllm train` wrote")


def run_weights(run: Path, ckpt: dict | None) -> Path:
    """The weights file of a run to export: its model.safetensors, unless the run went on past them
    and stopped (a resume stopped early, a first run stopped before its end: model.safetensors is
    written when training ends), then its checkpoint's weights, in a temp file; keep_best's
    model.safetensors stays what it is (the lowest val loss)."""
    import tempfile

    from pyllm.model import ModelConfig, save_weights, weights_step

    weights = run / "model.safetensors"
    if ckpt is None:
        return weights
    step = weights_step(weights) if weights.exists() else None
    keep_best = ckpt["train_config"].get("keep_best") and ckpt.get("best_val_loss") is not None
    if weights.exists() and (keep_best or step is None or step >= ckpt["step"]):
        return weights
    print(f"pyllm export: {run} stopped at step {ckpt['step']}, "
          + (f"after its model.safetensors (step {step}) was written" if weights.exists() else "before its end")
          + f": exporting its checkpoint's weights (step {ckpt['step']})", file=sys.stderr)
    tc = ckpt["train_config"]
    from pyllm.train import lora_alpha_of
    scale = lora_alpha_of(tc["lora_rank"], tc.get("lora_alpha")) / tc["lora_rank"] if tc.get("lora_rank") else None
    tmp = Path(tempfile.mkdtemp(prefix="pyllm-export-")) / "model.safetensors"
    save_weights(ckpt["model"], ModelConfig(**ckpt["model_config"]), tmp, scale, step=ckpt["step"])
    return tmp


def export_adapter(run: Path, out: Path, dtype: str) -> int:
    """A LoRA run (--lora-rank, --init-from-hf) as a PEFT adapter folder (adapter_model.safetensors,
    adapter_config.json) over its Hugging Face source: PeftModel.from_pretrained(base, out) loads it."""
    import torch
    from safetensors.torch import save_file

    from pyllm.model import ModelConfig, hf_folder, lora_state_to_peft
    from pyllm.train import load_checkpoint, lora_alpha_of

    if not (run / "checkpoint.pt").exists():  # (load_checkpoint's own message speaks of resuming)
        raise ValueError(f"--adapter: {run} has no checkpoint.pt, which holds the LoRA updates unmerged; export it "
                         "without --adapter (model.safetensors: merged weights)")
    ckpt = load_checkpoint(run)
    train_config = ckpt["train_config"]
    if not train_config.get("lora_rank"):
        raise ValueError(f"{run}: not a LoRA run (train with --lora-rank R); export it without --adapter")
    if ckpt["model_config"].get("num_labels"):
        raise ValueError(f"{run}: a reward model (a score head, trained whole beside the LoRA updates): export it "
                         "without --adapter (a *ForSequenceClassification with the updates merged)")
    source = read_run(run).get("init_from_hf") or train_config.get("init_from_hf")
    if train_config.get("keep_best") and ckpt.get("best_val_loss") is not None:
        from pyllm.model import weights_step

        best = weights_step(run / "model.safetensors") if (run / "model.safetensors").exists() else None
        if best != ckpt["step"]:  # the adapter is the last step's, model.safetensors (merged) the best's
            raise ValueError(f"{run} kept the weights of its lowest val loss (--keep-best: model.safetensors, "
                             f"{'step ' + str(best) if best is not None else 'an earlier step'}), and its adapter is "
                             f"the last step's ({ckpt['step']}): export it without --adapter (the best weights, "
                             "merged), or train without --keep-best")
    if not source:
        raise ValueError(f"{run}: an adapter applies to a Hugging Face model, and this run started from "
                         f"{train_config.get('init_from_run') or 'a preset'}: export it without --adapter (merged weights)")
    started = train_config.get("init_from_run") or read_run(run).get("init_from_run")
    if source and started:  # the LoRA trained over that run's weights, not over the source's: PEFT's
        # base + adapter is another model (logits 0.11 off the merged export after 2 steps)
        raise ValueError(f"{run} started from the weights of the run {started} (fine-tuned from {source}), and its "
                         f"LoRA updates apply to those, not to {source}'s: an adapter over {source} is not this model; "
                         "export it without --adapter (merged weights)")
    if train_config.get("init_adapter"):  # merged into the base before training: the new updates alone are
        # another model over the base (PEFT's logits had been up to 0.68 off the merged export's)
        raise ValueError(f"{run} started from the adapter {train_config['init_adapter']}, merged into {source} before "
                         "its own LoRA updates: an adapter of those updates alone is not this model; export it "
                         "without --adapter (merged weights)")
    kind = model_kind(hf_folder(source))
    rank = train_config["lora_rank"]
    alpha = lora_alpha_of(rank, train_config.get("lora_alpha"))
    tensors, targets, parameters = lora_state_to_peft(ckpt["model"], ModelConfig(**ckpt["model_config"]), kind)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(getattr(torch, GENERATE_DTYPES[dtype])) for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    write_whole(out / "adapter_config.json", json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(source), "r": rank,
        "lora_alpha": alpha, "lora_dropout": train_config.get("lora_dropout", 0.0), "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "inference_mode": True, **({"target_parameters": parameters} if parameters else {})},
        indent=2))
    print(f"exported the LoRA adapter of {run} (rank {rank}, alpha {alpha:g}, over {source}) to {out}")
    return 0


def model_kind(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]


def measure_flops_per_s(preset: str, device: str, steps: int = 5) -> tuple[float, float]:
    """Achieved training FLOP/s and tokens/s of a few steps of a preset on this device, the FLOPs
    counted as the plan's C = 6 N D counts them (6 a parameter a token: no attention term), so that
    the plan's time for this very model is its tokens over its tokens/s. (The PaLM count that MFU
    uses, with the attention term, had made the plan 9% short on the CPU, 13% on a GPU.)"""
    import torch

    from pyllm.model import LLM, ModelConfig
    from pyllm.train import DistInfo, TrainConfig, autocast, make_optimizer

    dev = torch.device(device)
    model = LLM(ModelConfig.from_preset(preset)).to(dev)
    opt = make_optimizer(model, TrainConfig(lr=1e-4), DistInfo(device=dev))  # the trainer's optimizer
    B, T = (8, model.config.block_size) if dev.type == "cuda" else (4, min(128, model.config.block_size))
    x = torch.randint(0, model.config.vocab_size, (B, T + 1), device=dev)
    precision = "bf16" if dev.type == "cuda" else "fp32"

    def step():
        with autocast(precision, dev):
            loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step(max_grad_norm=1.0)
        opt.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(2):  # the first steps allocate optimizer state and warm caches
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    tok_s = B * T * steps / (time.perf_counter() - t0)
    return 6 * model.num_params() * tok_s, tok_s


def cmd_plan(args) -> int:
    import torch

    from pyllm import plan

    def number(flag: str, text: str | None) -> float | None:
        if text is None:
            return None
        try:
            value = plan.parse_number(text)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
        if not (math.isfinite(value) and value > 0):  # (1e400 is inf: it had planned "inf years")
            raise ValueError(f"{flag} must be a finite number > 0, got {text!r}")
        return value

    compute, params = number("--compute", args.compute), number("--params", args.params)
    given_flops_s = number("--flops-per-s", args.flops_per_s)
    result = plan.chinchilla(compute, params, args.tokens_per_param)
    print(f"compute-optimal (Chinchilla, {args.tokens_per_param:g} tokens/param, C = 6ND): "
          f"{plan.human(result['params'])} params, {plan.human(result['tokens'])} tokens, {result['flops']:.3g} FLOPs")
    if given_flops_s is not None:
        flops_s, source = given_flops_s, "given"
    else:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        preset = args.preset or ("llama-124m" if device.startswith("cuda") else "tiny")
        flops_s, tok_s = measure_flops_per_s(preset, device)
        source = f"measured: preset {preset} on {device}, {tok_s:,.0f} tokens/s, 6N FLOPs a token as C counts them"
    seconds = result["flops"] / (flops_s * args.gpus)
    print(f"at {flops_s:.3g} FLOP/s per device ({source}) x {args.gpus}: about {plan.human_time(seconds)}")
    return 0


def add_train_options(p: argparse.ArgumentParser) -> None:
    # Every default is None: unset options fall through to the config file, then TrainConfig.
    p.add_argument("--config", help="TOML, YAML or JSON file of options (any option below, as key = value; a [model] table); CLI options override it")
    p.add_argument("--out", help="run folder: checkpoint.pt, log.jsonl, loss.png, model.safetensors, the tokenizer and token files (default runs/main)")
    p.add_argument("--data", nargs="+", help="text files or folders to train on, or a folder holding train.bin/val.bin from `pyllm prepare` (default: this Python's standard-library source); with --init-from-hf also fine-tuning examples, *.jsonl files of {\"messages\": [{\"role\": ..., \"content\": ...}, ...]} lines (each put in the folder's chat template, the loss on the assistant's tokens) or {\"prompt\": ..., \"completion\": ...} lines (text, or lists of messages; the loss on the completion): whole examples are packed into rows, each attending to itself alone")
    p.add_argument("--tokenizer", help="a saved pyllm tokenizer to use instead of training one on --data")
    p.add_argument("--vocab-size", type=int, help="vocab size of the tokenizer trained on --data (default: the preset's; tiny: 4096)")
    p.add_argument("--tokenizer-train-bytes", type=at_least(0), help="train the tokenizer on an evenly spread sample of about this many bytes of --data (default 0: all of it)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint up to --max-steps "
                   "(or from DIR/checkpoints/step_N.pt, one --keep-checkpoints kept)")
    p.add_argument("--preset", help="model preset: tiny (default), tiny-moe, llama-124m, gpt2-124m, palm-style")
    p.add_argument("--init-from-hf", metavar="DIR", help="fine-tune a Hugging Face checkpoint folder or hub repo id (LLaMA, Mistral, Qwen2/3, SmolLM3, Phi-3/4, Gemma 2/3, OLMo 2, Granite, GPT-2, and the mixtures of experts Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, GraniteMoE: config.json, *.safetensors, tokenizer.json) instead of a preset; its tokenizer tokenizes --data (set --seq-len, the default being the model's whole context, and --lr, whose default 3e-3 is for training from scratch: fine-tuning wants about 1e-5 to 1e-4)")
    p.add_argument("--init-adapter", metavar="DIR", help="with --init-from-hf: a PEFT LoRA adapter folder trained on that model, merged into its weights before training")
    p.add_argument("--chat-template", metavar="FILE", help="with --init-from-hf and conversations: render them with "
                   "this chat template (a .jinja file) instead of the folder's, as TRL's chat_template_path: a training "
                   "variant with {%% generation %%} marks, such as TRL's trl/chat_templates/qwen3_training.jinja "
                   "(Qwen3's own template drops earlier turns' reasoning, which pyllm refuses); generation and "
                   "export keep the folder's")
    p.add_argument("--init-from-run", metavar="DIR", help="start from the final weights of a folder `pyllm train` wrote (model.safetensors; its own model config) instead of a preset, with its tokenizer: continue pretraining on new --data, or fine-tune on {\"prompt\": ..., \"completion\": ...} lines (each ending in <|endoftext|>, as its documents did; a run fine-tuned from a Hugging Face model passes on that model's chat template, for {\"messages\"} lines). The optimizer starts afresh (--resume continues a run instead)")
    p.add_argument("--lora-rank", type=int, help="train LoRA (low-rank) updates of this rank on every block's linear layers instead of all the weights, which stay frozen (no gradients or optimizer state for them); the run's model.safetensors has the updates merged in (default 0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=positive_number, help="LoRA's alpha: the updates are scaled by alpha / rank "
                   "(default 2 * rank; PEFT's default is 8: give --lora-alpha 8 to match it; rsLoRA's alpha / sqrt(rank): "
                   "give alpha * sqrt(rank))")
    p.add_argument("--lora-targets", metavar="NAMES", help="LoRA on these projections only, each its own update as PEFT "
                   "gives them: comma-separated q, k, v, o, gate, up, down (or PEFT's q_proj ...; all-linear for every "
                   "one); a mixture of experts' experts: experts (each expert its own updates; PEFT's target_parameters "
                   "experts.gate_up_proj, experts.down_proj); default: every linear layer, the fused qkv and gate_up one "
                   "update each")
    p.add_argument("--lora-dropout", type=float, help="dropout on the LoRA updates' inputs while training (PEFT's "
                   "lora_dropout; default 0)")
    p.add_argument("--model", dest="model_overrides", action="append", metavar="KEY=VALUE", help="override a ModelConfig field, e.g. --model n_layers=2 --model norm=layernorm (repeatable)")
    p.add_argument("--max-steps", type=int, help="optimizer steps in all (default 600)")
    p.add_argument("--ckpt-every", type=int, help="write the checkpoint every K steps (and at the end; default 200)")
    p.add_argument("--keep-checkpoints", type=int, metavar="K",
                   help="also keep the last K checkpoints as checkpoints/step_N.pt (hard links: no second copy on "
                        "disk; to resume from one: --resume RUN/checkpoints/step_N.pt); default 0: checkpoint.pt alone")
    p.add_argument("--eval-every", type=int, help="val loss every K steps (and at the end; default 100)")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=None,
                   help="model.safetensors holds the weights of the lowest val loss, written at that evaluation, "
                        "not the last step's (nanoGPT's always_save_checkpoint=False, for a run that overfits); "
                        "checkpoint.pt still holds the latest step, to resume from")
    p.add_argument("--eval-batches", type=int, help="batches per val evaluation (default 8)")
    p.add_argument("--eval-choices", dest="eval_choices_file", metavar="FILE",
                   help="at each evaluation also score a JSONL file of multiple-choice examples ({\"ctx\", "
                        "\"endings\", \"label\"} lines, HellaSwag's files as they are; see `pyllm eval`): acc and "
                        "acc_norm (and acc_per_token, what llm.c logs as its HellaSwag acc_norm) go to log.jsonl")
    p.add_argument("--eval-choices-limit", type=int, help="with --eval-choices: its first N examples only")
    p.add_argument("--device", help="auto (default: cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="auto (default): bf16 on CUDA, fp32 on CPU; fp16 uses a dynamic loss scaler")
    p.add_argument("--batch-size", type=int, help="sequences per process per micro-step (default 16)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's block_size)")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step, in each process (default 1): the "
                   "step's batch is batch size x grad-accum x processes (nanoGPT divides its gradient_accumulation_steps "
                   "by the processes instead)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--schedule", choices=["cosine", "wsd", "constant"],
                   help="lr schedule after warmup: cosine to the min lr (default), wsd (warmup-stable-decay: constant, "
                        "then linear to the min lr over the last --decay-frac of the steps), constant")
    p.add_argument("--min-lr-ratio", type=float, help="the lr at the end of cosine or wsd, as a fraction of --lr (default 0.1): wsd's last step takes it, cosine reaches it at step max_steps (as nanoGPT's at lr_decay_iters and transformers' cosine schedule), its last trained step just above")
    p.add_argument("--decay-frac", type=float, help="wsd: fraction of the steps spent decaying (default 0.2)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps W: lr (s + 1) / W at step s < W, the peak "
                                                     "at step W - 1 (nanoGPT's reaches it at W; default 30)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1; LoRA's A and B "
                   "too, where the Hugging Face Trainer's default is 0)")
    p.add_argument("--beta1", type=float, help="AdamW's beta1 (default 0.9)")
    p.add_argument("--beta2", type=float, help="AdamW's beta2 (default 0.95)")
    p.add_argument("--grad-clip", type=float, help="max global grad norm, 0 for none (default 1.0)")
    p.add_argument("--optimizer", choices=("adamw", "muon"),
                   help="adamw (default: pyllm's fused AdamW) or muon: Muon (Nesterov momentum, each update "
                        "orthogonalized by Newton-Schulz; fused q k v and gate up weights part by part, a MoE's "
                        "experts each) on the blocks' matrices, AdamW on embeddings, norms and output layer; one "
                        "--lr for both (Muon's scaled to AdamW's update size, Moonlight's). Whole training on one "
                        "process or ddp")
    p.add_argument("--muon-momentum", type=float, help="Muon's Nesterov momentum (default 0.95)")
    p.add_argument("--seed", type=int, help="seed of init, data order and sampling (default 1337)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only each block's input for the backward and recompute the rest there: activation "
                        "memory falls to about one (B, T, dim) tensor per layer, for ~1/3 more compute")
    p.add_argument("--fused-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="compute the loss chunk by chunk with its gradients (pyllm.nn.linear_cross_entropy): the "
                        "(batch, seq, vocab) logits and their gradient never exist, which is most of the activation "
                        "memory with a large vocabulary")
    p.add_argument("--z-loss", type=float,
                   help="add this times the mean of logsumexp(logits)^2 to the loss (PaLM's z-loss, 1e-4 there; OLMo "
                        "2's 1e-5): keeps the softmax's normaliser near 1 so the output layer's logits do not drift "
                        "(bf16 runs); logged as z_loss and part of the logged loss (val_loss is the cross-entropy "
                        "alone), with or without --fused-loss (packed conversations without it take logits at "
                        "every position, prompts too). Pretraining and SFT (default 0: off)")
    p.add_argument("--loss-type", choices=("nll", "dft"),
                   help="the training loss: nll (default, the cross-entropy) or dft (Dynamic Fine-Tuning, "
                        "arXiv 2508.05629; TRL's SFT loss_type 'dft'): each target's cross-entropy times its "
                        "probability under the model, held constant, still over the counted targets; from the "
                        "same kernel pass. Logged as the loss; val_loss stays the cross-entropy. Pretraining and "
                        "SFT")
    p.add_argument("--token-stats", action=argparse.BooleanOptionalAction, default=None,
                   help="log TRL's metrics each step, mean_token_accuracy (the share of targets that are the "
                        "model's argmax) and entropy (of its next-token distribution, at the targets), as TRL "
                        "averages them: over each micro-step's targets on every rank, then the micro-steps; val_ ones "
                        "at each evaluation; with --preference also logits_chosen and "
                        "logits_rejected (the mean logit over the vocabulary, at the replies' tokens: TRL's "
                        "DPOTrainer's and KTOTrainer's logits/*; the chosen replies' accuracy, KTO none). From the "
                        "cross-entropy kernel's pass over the logits (one more read of them without --fused-loss). "
                        "Not with a reward model, distillation or GRPO (default on)")
    p.add_argument("--preference", nargs="+", metavar="LOSS",
                   choices=["dpo", "ipo", "hinge", "simpo", "orpo", "kto", "reward", "robust", "exo_pair", "nca_pair",
                            "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"],
                   help="preference tuning on --data of preference pairs: *.jsonl lines of {\"prompt\": ..., "
                        "\"chosen\": ..., \"rejected\": ...} (text, or lists of messages put in the chat template; or "
                        "{\"chosen\": [messages], \"rejected\": [messages]} with a prompt in common), as TRL takes them, "
                        "with --init-from-hf or --init-from-run (and --lora-rank if you like). dpo (Rafailov et al. "
                        "2023), ipo and hinge compare with the starting model, whose log-probabilities of every pair "
                        "are computed once before training; simpo (Meng et al. 2024) and orpo (Hong et al. 2024) "
                        "need no reference. kto (Ethayarajh et al. 2024) trains on unpaired examples instead: lines of "
                        "{\"prompt\": ..., \"completion\": ..., \"label\": true or false} (TRL's KTO format). "
                        "reward trains a reward model on the pairs (a score head at each reply's last token, "
                        "-log sigmoid(score chosen - score rejected): TRL's RewardTrainer). TRL's other DPOTrainer "
                        "loss types compare with the starting model as dpo: robust, exo_pair, nca_pair, bco_pair, "
                        "sppo_hard, apo_zero, apo_down, discopop and sigmoid_norm. Several of the dpo family, and "
                        "sft (the chosen replies' NLL, as --sft-weight), add up (TRL's loss_type list; MPO: "
                        "--preference dpo bco_pair sft --preference-weights 0.8 0.2 1.0); TRL's sigmoid is dpo")
    p.add_argument("--preference-weights", type=float, nargs="+", metavar="W",
                   help="each --preference loss's weight, in their order, sft's too (TRL's loss_weights; "
                        "default 1 each)")
    p.add_argument("--desirable-weight", type=float, help="kto: the desirable examples' weight (default 1)")
    p.add_argument("--undesirable-weight", type=float, help="kto: the undesirable examples' weight (default 1)")
    p.add_argument("--kto-loss-type", choices=("kto", "apo_zero_unpaired"),
                   help="kto: its loss (default) or APO-zero's unpaired form (TRL's KTOConfig loss_type: 1 - "
                        "sigmoid(beta r) for desirable examples, sigmoid(beta r) for the others, no KL estimate)")
    # (> 0: TrainConfig's 0 stands for the default, and --beta 0 had trained with it, silently)
    p.add_argument("--beta", type=positive_number, help="the preference loss's beta, > 0 (orpo: its lambda; default: "
                   "0.1 as TRL's, simpo 2.0; a reward model's loss has none)")
    p.add_argument("--simpo-gamma", type=float, help="SimPO's target reward margin (default 0.5)")
    p.add_argument("--sft-weight", type=float, help="with --preference simpo or the dpo family: plus this times "
                   "the chosen reply's negative log-likelihood per token (RPO; TRL's loss_type [\"sigmoid\", "
                   "\"sft\"] with loss_weights, as --preference dpo sft; default 0)")
    p.add_argument("--label-smoothing", type=float, help="with --preference dpo or robust: the share of pairs "
                   "taken to be mislabelled (conservative / robust DPO; default 0); exo_pair: EXO's epsilon, "
                   "required (its paper's 1e-3); in a mix, each of them takes it")
    p.add_argument("--f-divergence", choices=("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
                   help="with --preference dpo, hinge, ipo, robust, exo_pair, discopop or sigmoid_norm (a mix: "
                        "all of its losses of these, as TRL): the divergence from the reference the loss regularizes "
                        "by (f-DPO; TRL's f_divergence_type; default reverse_kl, DPO's)")
    p.add_argument("--f-alpha", type=float, help="with --f-divergence alpha_divergence: its alpha (default 0.5, "
                   "TRL's f_alpha_divergence_coef)")
    p.add_argument("--ld-alpha", type=float, metavar="A", help="with --preference dpo or its family: LD-DPO "
                   "(length-desensitized DPO, Liu et al. 2024; TRL's ld_alpha), each reply's log-probability its "
                   "first tokens' as many as the shorter reply of its pair has, plus A in [0, 1] times the rest's "
                   "(the reference's alike; default off, A 1 is plain DPO)")
    p.add_argument("--discopop-tau", type=float, help="with --preference discopop: the log-ratio modulation's "
                   "temperature (default 0.05, TRL's)")
    p.add_argument("--center-rewards", type=float, help="with --preference reward: TRL's center_rewards_coefficient, "
                   "times the mean squared sum of each pair's scores added to the loss (keeps the scores near 0; "
                   "default 0)")
    p.add_argument("--reference", choices=["precomputed", "lora-off", "model"],
                   help="dpo and its family, kto: the reference model's log-probabilities computed once before "
                        "training by the starting model (precomputed, the default: kept in the checkpoint) or, with --lora-rank, "
                        "at each step by the model with its LoRA updates off (lora-off: no pass over the whole set "
                        "first, one more forward per step; PEFT's disable_adapter, TRL's default for PEFT models) "
                        "or, with --init-from-hf / --init-from-run, at each step by a frozen copy of that model "
                        "(model: TRL's ref_model without precompute_ref_log_probs; one more forward per step and "
                        "the copy's memory; --sync-ref-model may move it)")
    p.add_argument("--teacher", metavar="DIR", help="distill from this model: a Hugging Face checkpoint folder or hub "
                   "repo id, or a folder `pyllm train` wrote, over the student's vocabulary (the same tokenizer). The "
                   "loss at each trained token is --distill-alpha times the divergence between the two models' "
                   "next-token distributions (fused: no logits in memory) plus 1 - alpha times the cross-entropy on "
                   "the data, as TRL's GKD (off-policy; every assistant turn of a conversation, where TRL trains the "
                   "last) and Hinton's distillation; val loss stays the cross-entropy")
    p.add_argument("--distill-beta", type=float, help="GKD's generalized Jensen-Shannon divergence: 0 (default) the "
                   "forward KL(teacher || student), 1 the reverse KL(student || teacher), in between the mixture's")
    p.add_argument("--distill-temperature", type=float, help="both models' logits divided by it first (default 1)")
    p.add_argument("--distill-alpha", type=float, help="the divergence's weight in the loss, the cross-entropy's being "
                   "1 - alpha (default 1: the divergence alone)")
    p.add_argument("--distill-lmbda", type=float, help="GKD's lmbda: the share of micro-batches (drawn at random) "
                   "whose conversations' last replies are replaced by the student's own samples, the divergence taken "
                   "on those (on-policy distillation; default 0: the data's replies alone). With --distill-alpha < 1 those "
                   "micro-batches' cross-entropy is on the samples too (the student's own sample as its target)")
    p.add_argument("--grpo-reward", metavar="SPEC[,SPEC...]", help="GRPO (DeepSeekMath; TRL's GRPOTrainer, beta 0) "
                   "on --data of prompts, conversations or prompt-completion lines: each one's last reply replaced by "
                   "--grpo-generations samples of the model, rewarded by the sum of the SPECs' rewards: a reward model (a "
                   "`pyllm train --preference reward` run or a Hugging Face *ForSequenceClassification folder, same "
                   "tokenizer) or module:function, a TRL reward function: called with prompts=, completions= (text, or "
                   "[{\"role\": \"assistant\", \"content\": text}] for messages), completion_ids= and each of the data "
                   "lines' other keys (e.g. answer=) as lists, giving a number (or None) per completion; the advantage "
                   "is the reward normalized in its group")
    p.add_argument("--grpo-reward-weights", type=float, nargs="+", metavar="W",
                   help="GRPO: each --grpo-reward's weight in the sum (default 1 each)")
    p.add_argument("--grpo-generations", type=int, help="GRPO: samples per prompt (default 8)")
    p.add_argument("--grpo-generations-eval", type=int, metavar="G", help="GRPO: samples per prompt in eval (TRL's "
                   "num_generations_eval; default: --grpo-generations)")
    p.add_argument("--grpo-max-new-tokens", type=int, help="GRPO: at most this many tokens a sample (default 128)")
    p.add_argument("--grpo-temperature", type=float, help="GRPO: samples drawn at this temperature, and their "
                   "log-probabilities taken at it, as TRL's (default 1)")
    p.add_argument("--grpo-top-p", type=float, help="GRPO: samples drawn from the likeliest tokens whose probabilities "
                   "sum to P (TRL's top_p; default 1: all); their log-probabilities the whole distribution's, as TRL's")
    p.add_argument("--grpo-top-k", type=int, help="GRPO: samples drawn from the K likeliest tokens (TRL's top_k; "
                   "default 0: all)")
    p.add_argument("--grpo-min-p", type=float, help="GRPO: samples drawn from the tokens at least P times as likely "
                   "as the likeliest, after top-k and top-p (TRL's min_p; default 0: all, as TRL's vLLM "
                   "generation; TRL's transformers generation leaves its min_p None to the model's "
                   "generation_config.json: give a folder's min_p here to sample as it does)")
    p.add_argument("--grpo-repetition-penalty", type=float, help="GRPO: samples drawn with the positive logits of the "
                   "ids in their prompt and sample so far divided by R, the negative ones multiplied (TRL's "
                   "repetition_penalty; default 1: none); their log-probabilities without it, as TRL's")
    p.add_argument("--grpo-loss-type", choices=("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo",
                                                "rloo"),
                   help="GRPO: the sampled tokens' losses summed and divided by the step's share of the generation's "
                        "sampled tokens (dapo, the "
                        "default, TRL's), each sample's then the samples' number (grpo), the micro-batch's tokens "
                        "(bnpo) or samples x --grpo-max-new-tokens (dr_grpo); cispo (MiniMax-M1: the ratio clipped "
                        "above at --grpo-epsilon-high, detached, times A log p; TRL suggests 5), sapo (a soft "
                        "gate for the clip) or luspo (each sample's sum, then as grpo; with --grpo-importance-sampling "
                        "sequence), vespo (-phi(w) A log p, phi a gamma weight of the sample's ratio w; divided as "
                        "dapo), as TRL computes them; rloo: TRL's RLOOTrainer (leave-one-out advantages, "
                        "--grpo-beta's KL in the rewards, one clipped ratio a sample; --grpo-scale-rewards batch "
                        "normalizes the advantages, its normalize_advantages; --grpo-reward-clip LOW HIGH)")
    p.add_argument("--grpo-scale-rewards", choices=("group", "batch", "none"),
                   help="GRPO: advantages divided by the std of their group's rewards (default), of the "
                        "generation's (batch), or not (none, Dr. GRPO's)")
    p.add_argument("--grpo-multi-objective-aggregation", choices=("sum_then_normalize", "normalize_then_sum"),
                   help="GRPO with several rewards: their weighted sum normalized in its group (default; with "
                        "--grpo-scale-rewards), or each reward normalized in its group, then their weighted sum "
                        "by the generation's mean and std (normalize_then_sum: GDPO, TRL's)")
    p.add_argument("--grpo-iterations", type=int, help="GRPO: passes over each generation's samples (TRL's "
                   "num_iterations; default 1), the ratio to the sampling policy clipped to [1 - eps, 1 + eps_high]")
    p.add_argument("--grpo-steps-per-generation", type=int, metavar="N",
                   help="GRPO: each generation samples N micro-batches a process (TRL's steps_per_generation; a "
                        "multiple of --grad-accum; default --grad-accum) and trains N / grad_accum optimizer steps "
                        "on them in turn, off-policy after the first (the ratio to the sampling policy clipped)")
    p.add_argument("--grpo-epsilon", type=float, help="GRPO: the ratio's lower clip, 1 - eps (default 0.2)")
    p.add_argument("--grpo-top-entropy-quantile", type=float, metavar="RHO",
                   help="GRPO: the policy loss on the top RHO of each micro-batch's trained tokens by entropy over "
                        "every process (TRL's top_entropy_quantile, Beyond the 80/20 Rule: 0.2; the KL term on all; "
                        "default 1: every token)")
    # (> 0: TrainConfig's 0 is off, and TRL's off_policy_mask_threshold 0.0 masks: --grpo-off-policy-mask 0 had
    # trained with no mask, silently)
    p.add_argument("--grpo-off-policy-mask", type=positive_number, metavar="DELTA",
                   help="GRPO: a sample with a negative advantage whose mean log p_old - log p over its tokens is "
                        "above DELTA is left out of the policy loss (DeepSeek-V3.2's off-policy sequence masking, "
                        "TRL's off_policy_mask_threshold; off-policy runs: --grpo-iterations or "
                        "--grpo-steps-per-generation; default off)")
    p.add_argument("--grpo-sapo-temperatures", type=float, nargs=2, metavar=("POS", "NEG"),
                   help="with --grpo-loss-type sapo: the gate's temperatures for tokens of positive and of other "
                        "advantages (TRL's sapo_temperature_pos / _neg; default 1.0 1.05)")
    p.add_argument("--grpo-vespo", type=float, nargs=4, metavar=("K_POS", "LAMBDA_POS", "K_NEG", "LAMBDA_NEG"),
                   help="with --grpo-loss-type vespo: its gamma weighting's k and lambda for samples of advantage "
                        ">= 0 and for the others (TRL's vespo_*; default 2 3 3 2)")
    p.add_argument("--grpo-reward-clip", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="with --grpo-loss-type rloo: each reward clamped to [LOW, HIGH] (TRL's reward_clip_range)")
    p.add_argument("--grpo-delta", type=float, help="GRPO: the unclipped ratio capped at delta too (INTELLECT-2's "
                   "two-sided clip, TRL's delta; above 1, its paper more than 1 + eps_high; default none)")
    p.add_argument("--grpo-epsilon-high", type=float, help="GRPO: the ratio's upper clip, 1 + eps_high (default: "
                   "--grpo-epsilon; DAPO's clip-higher: 0.28)")
    p.add_argument("--grpo-importance-sampling", choices=("token", "sequence"),
                   help="GRPO: the ratio to the sampling policy per token (default) or per sample (GSPO: the exp of "
                        "its tokens' mean log-ratio)")
    p.add_argument("--grpo-log-completions", type=int, metavar="N",
                   help="GRPO: write each generation's first N samples (prompt, completion, reward, advantage) to "
                        "the run's completions.jsonl (default 0: none)")
    p.add_argument("--grpo-mask-truncated", action=argparse.BooleanOptionalAction, default=None,
                   help="GRPO: samples that reach --grpo-max-new-tokens without a stop token are rewarded but not "
                        "trained on (DAPO's overlong filtering; TRL's mask_truncated_completions)")
    p.add_argument("--grpo-kl-bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="GRPO: the KL penalty's tokens times their ratio to the sampling policy (TRL's "
                        "use_bias_correction_kl, default on: the unbiased reverse-KL gradient of DeepSeek-V3.2)")
    p.add_argument("--grpo-beta", type=float, help="GRPO: the weight of a KL penalty against the starting model (a "
                   "frozen copy of --init-from-hf / --init-from-run, or with --lora-rank the model with its updates "
                   "off; default 0, TRL's)")
    p.add_argument("--sync-ref-model", action=argparse.BooleanOptionalAction, default=None,
                   help="GRPO with --grpo-beta, or --reference model: every --ref-model-sync-steps steps the "
                        "reference model becomes alpha times the policy plus 1 - alpha times itself (TR-DPO; TRL's "
                        "sync_ref_model; a reference model of its own: not with --lora-rank's GRPO reference, nor "
                        "a precomputed one)")
    p.add_argument("--ref-model-mixup-alpha", type=float, metavar="ALPHA",
                   help="with --sync-ref-model: the policy's share of the new reference (default 0.6, TRL's)")
    p.add_argument("--ref-model-sync-steps", type=int, metavar="N",
                   help="with --sync-ref-model: sync every N optimizer steps (default 512, TRL's)")
    p.add_argument("--distill-seq-kd", action=argparse.BooleanOptionalAction, default=None,
                   help="GKD's seq_kd: the conversations' last replies replaced by the teacher's samples first (sequence-"
                        "level distillation; --distill-lmbda's draws then take the student's instead)")
    p.add_argument("--distill-max-new-tokens", type=int, help="on-policy samples: at most this many tokens (default 128)")
    p.add_argument("--distill-sample-temperature", type=float,
                   help="on-policy samples drawn at this temperature (default 0.9, TRL's)")
    p.add_argument("--doc-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each document's tokens from attending to the documents before it in the same training "
                        "window (cut at the end-of-document token: <|endoftext|>, or an --init-from-hf model's "
                        "end-of-sequence id), each document's positions starting at 0, as Llama 3 was trained; "
                        "conversations (*.jsonl) are always computed one by one")
    p.add_argument("--dist-mode", choices=["ddp", "fsdp", "zero1"],
                   help="under torchrun with several processes: ddp (default: DistributedDataParallel), fsdp (FSDP2: "
                        "params, grads and optimizer state sharded), zero1 (pyllm's ZeroAdamW: optimizer state sharded)")
    p.add_argument("--sample-tokens", type=int, help="tokens of the sample printed at the end, 0 for none (default 200)")
    p.add_argument("--prompt", help="prompt of the sample printed at the end (default 'def ', or a document's start "
                   "for a character vocabulary without those characters)")
    p.add_argument("--val-fraction", type=number_type(float, lambda v: 0 < v < 1, "in (0, 1)"), help="share of --data's documents (or tokens) held out for val, "
                   "when the run tokenizes it: every round(1 / x)-th document, so at most a half (default 0.02)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Where a finished model comes from (load_model reads them): generate and eval."""
    p.add_argument("--run", help="a run folder written by `pyllm train` (finds model.safetensors and the tokenizer)")
    p.add_argument("--model", help="a model.safetensors (instead of --run), or nanoGPT's ckpt.pt (with --tokenizer: "
                   "its data folder's meta.pkl, or a GPT-2 tokenizer file)")
    p.add_argument("--tokenizer", help="the tokenizer the model was trained with (instead of --run)")
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face checkpoint folder or hub repo id (LLaMA, Mistral, Qwen2/3, SmolLM3, Phi-3/4, Gemma 2/3, OLMo 2, Granite, GPT-2, and the mixtures of experts Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, GraniteMoE: config.json, *.safetensors, tokenizer.json) instead of --run")
    p.add_argument("--adapter", metavar="DIR", help="with --hf: a PEFT LoRA adapter folder trained on that model, merged into its weights")


def add_device_options(p: argparse.ArgumentParser) -> None:
    """--device and --dtype (inference_device_dtype resolves them): generate and eval."""
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", *GENERATE_DTYPES),
                   help="weights and activations: auto (default: bf16 on a GPU, fp32 on the CPU), fp32, bf16, fp16")


class _ExactOptionsParser(argparse.ArgumentParser):
    """argparse without prefix matching (allow_abbrev=False), for every subcommand (add_subparsers makes
    parsers of this class): `--min-lr 6e-5`, nanoGPT's absolute min_lr, had been taken as --min-lr-ratio
    6e-5 (the cosine ending at lr * 6e-5), and `--decay 0.1` as --decay-frac, without a word."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # (error's hints: the subcommand given)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            flags = {flag for action in self._command()._actions for flag in action.option_strings}
            hints = [hint for word in message.split()[2:] if (hint := _spelled_as(word, flags))]
            if hints:
                message += f" ({'; '.join(hints)})"
            command = self._command()
            if command is not self:  # the subcommand's usage and name (pyllm train: error: ...), as its other errors
                command.print_usage(sys.stderr)
                command.exit(2, f"{command.prog}: error: {message}\n")
        super().error(message)

    def _command(self) -> argparse.ArgumentParser:
        """The (sub)command parser the arguments name (pyllm tokenizer train: the nested one)."""
        parser = self
        for word in getattr(self, "_argv", []):
            sub = next((a.choices[word] for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction) and word in a.choices), None)
            if sub is not None:
                parser = sub
        return parser


def _spelled_as(word: str, flags: set) -> str | None:
    """pyllm's flag for an unrecognized one, among the command's flags: nanoGPT's train.py names,
    underscores for dashes, a flag's beginning (taken as the whole flag before: --max-step) or end."""
    if not word.startswith("--"):
        return None
    given = word.split("=")[0]
    name = given[2:].replace("-", "_")
    if name in _NANOGPT_FLAGS and _NANOGPT_FLAGS[name][0] in flags:
        flag, note = _NANOGPT_FLAGS[name]
        return f"nanoGPT's {name}: pyllm's {flag}{note}"
    flag = "--" + name.replace("_", "-")
    if flag != given and flag in flags:
        return f"pyllm's {flag}, with dashes"
    # (its beginning or its end: --decay is --decay-frac's or --weight-decay's)
    longer = sorted(f for f in flags if f != given and (f.startswith(given) or f.endswith("-" + given[2:])))
    return f"did you mean {' or '.join(longer)}?" if 0 < len(longer) <= 3 else None


# nanoGPT's train.py options (its config keys, --key=value on its command line) -> pyllm train's flag, a note
_NANOGPT_FLAGS = {"min_lr": ("--min-lr-ratio", " (min_lr / lr, nanoGPT's 6e-5 / 6e-4 = 0.1)"),
                  "max_iters": ("--max-steps", ""), "learning_rate": ("--lr", ""),
                  "warmup_iters": ("--warmup-steps", " (its warmup peaks a step earlier)"),
                  "lr_decay_iters": ("--max-steps", " (where the decay always ends)"),
                  "gradient_accumulation_steps": ("--grad-accum", " (per process, not divided by the processes)"),
                  "eval_interval": ("--eval-every", ""), "eval_iters": ("--eval-batches", " (fixed val windows, no train-split estimate)"), "out_dir": ("--out", ""),
                  "decay_lr": ("--schedule", " constant for False"), "dataset": ("--data", ""),
                  "always_save_checkpoint": ("--keep-best", " for False"), "n_layer": ("--model", " n_layers=N"),
                  "n_head": ("--model", " n_heads=N"), "n_embd": ("--model", " dim=N")}


def _nanogpt_keys() -> str:
    """_NANOGPT_FLAGS as a config file's keys: "learning_rate -> lr, ..., n_layer -> [model] n_layers"."""
    return ", ".join(f"{name} -> [model] {note.strip().split('=')[0]}" if flag == "--model" else
                     f"{name} -> {flag[2:].replace('-', '_')}{note}" for name, (flag, note) in _NANOGPT_FLAGS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = _ExactOptionsParser(prog="pyllm", description="pyllm: LLM training kernels, model and trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, CUDA build and GPU status, and which ops have which backends")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="run the benchmark scripts of bench/ (source checkout), ours vs peers")
    p.add_argument("--quick", action="store_true", help="small sizes, no torch.compile peers")
    p.add_argument("--device", help="cpu or cuda (default: cuda when usable)")
    p.add_argument("--dir", help="the bench/ folder of a source checkout (default: the one beside this pyllm)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("train", help="train a model; with no options, THE MAIN JOB: BPE + tiny model on this Python's stdlib source",
                       description="Train a model. With no options: train a BPE tokenizer on this Python's standard-library "
                                   "source, tokenize it, train the tiny preset (CPU: a few minutes), print val loss and a sample.")
    add_train_options(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("prepare", help="tokenize text files into train.bin / val.bin",
                       description="Tokenize text files into train.bin / val.bin: a 64-byte header (magic PYLLMTOK, "
                       "version, bytes per token, count, vocab size, end-of-document id), then the tokens, uint16 when "
                       "the vocab fits, else uint32. Read them with pyllm.data.open_tokens(path) or np.memmap(path, "
                       "dtype, mode='r', offset=64); nanoGPT's get_batch reads bare uint16 from byte 0.")
    p.add_argument("--input", nargs="+", help="text files or folders (default: this Python's standard-library source)")
    p.add_argument("--tokenizer", required=True, help="a saved pyllm tokenizer (from `pyllm tokenizer train`)")
    p.add_argument("--out", required=True, help="folder to write train.bin and val.bin into")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of the documents (or tokens) held out for val: every round(1 / x)-th document, so at most a half (default 0.02)")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("tokenizer", help="tokenizer commands (train)")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    p = tsub.add_parser("train", help="train a BPE tokenizer on text files")
    p.add_argument("--input", nargs="+", help="text files or folders (default: this Python's standard-library source)")
    p.add_argument("--vocab-size", type=int, default=4096, help="number of tokens, 256 bytes + merges + <|endoftext|> (default 4096)")
    p.add_argument("--out", required=True, help="where to save the tokenizer")
    p.add_argument("--train-bytes", type=at_least(0), default=0, help="train on an evenly spread sample of about this many bytes (default 0: all)")
    p.set_defaults(func=cmd_tokenizer_train)
    p = sub.add_parser("generate", help="sample text from a trained model, streaming it")
    add_model_options(p)
    p.add_argument("--prompt", help="text to continue (default 'def ', or a document's start for a character "
                   "vocabulary without those characters); FILE:path reads it from a "
                   "file (nanoGPT's sample.py convention)")
    p.add_argument("--chat", action="store_true", help="with --hf (or a --run fine-tuned from one): --prompt is a user "
                   "message, put in the folder's chat template (an instruct model's turn format); the reply ends at the "
                   "model's end-of-sequence token")
    p.add_argument("--chat-template-kwargs", metavar="JSON", type=json_object, help="with --chat: the chat template's "
                   "variables, as apply_chat_template's keyword arguments (TRL's and vLLM's chat_template_kwargs), "
                   "e.g. '{\"enable_thinking\": false}' for Qwen3's reply without reasoning")
    p.add_argument("--max-new-tokens", type=at_least(1), default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=at_least(0.0, float), help="softmax temperature; 0 is greedy (default 0.8; "
                   "a Hugging Face model's generation_config.json: its do_sample and temperature, as transformers; "
                   "greedy where the folder has none)")
    p.add_argument("--top-k", type=at_least(0), help="sample from the k most likely tokens only, 0: all (default 50, "
                   "or generation_config.json's)")
    p.add_argument("--top-p", type=probability, help="nucleus sampling: the smallest set of tokens with this much "
                   "probability, in (0, 1] (default: off, or generation_config.json's)")
    p.add_argument("--min-p", type=number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                   help="min-p sampling: only the tokens at least this many times as likely as the likeliest, after "
                   "--top-k and --top-p (transformers' min_p; default: off, or generation_config.json's)")
    p.add_argument("--repetition-penalty", type=positive_number, help="divide the positive logits of the ids the "
                   "prompt and the sample hold so far by this, multiply the negative ones (CTRL's, transformers' "
                   "repetition_penalty; greedy too; 1: off, the default, or generation_config.json's)")
    p.add_argument("--typical-p", type=number_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]"), metavar="P",
                   help="locally typical sampling: the tokens whose surprisal lies nearest the entropy, up to this "
                   "much probability, after --min-p (transformers' typical_p; default 1: off, or "
                   "generation_config.json's)")
    p.add_argument("--epsilon-cutoff", type=number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
                   metavar="E", help="epsilon sampling: only the tokens of probability at least E, the likeliest "
                   "always (transformers' epsilon_cutoff; default 0: off, or generation_config.json's)")
    p.add_argument("--eta-cutoff", type=number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
                   metavar="E", help="eta sampling: only the tokens of probability at least min(E, sqrt(E) "
                   "exp(-entropy)), the likeliest always (transformers' eta_cutoff; default 0: off, or "
                   "generation_config.json's)")
    p.add_argument("--no-repeat-ngram-size", type=at_least(0), metavar="N", help="never complete an N-gram of tokens "
                   "that the prompt and the sample already hold (transformers' no_repeat_ngram_size; greedy too; "
                   "0: off, the default, or generation_config.json's)")
    p.add_argument("--min-new-tokens", type=at_least(0), metavar="N", help="no end-of-sequence id before N new "
                   "tokens (transformers' min_new_tokens; 0: off, the default, or generation_config.json's)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end of a document: the model's "
                   "end-of-sequence ids (a Hugging Face model's) or <|endoftext|> (a model trained here) stop "
                   "generation otherwise")
    p.add_argument("--stop", action="append", metavar="TEXT", help="end a sample with the token that completes TEXT "
                   "in it, that token kept (transformers' stop_strings; repeatable; default: a Hugging Face model's "
                   "generation_config.json stop_strings, if any)")
    p.add_argument("--num-samples", type=at_least(1), default=1, help="independent samples (default 1); with "
                   "--prompts-file, completions of each prompt")
    p.add_argument("--prompts-file", metavar="FILE", help="continue every prompt of a JSONL file ({\"prompt\": ...} "
                   "per line) instead of --prompt, --batch-size at a time (prompts of different lengths in one "
                   "batch, no padding between them); writes {\"prompt\", \"completion\"} lines to --out or stdout")
    p.add_argument("--out", metavar="FILE", help="with --prompts-file: the JSONL file to write (default: stdout)")
    p.add_argument("--batch-size", type=at_least(1), help="with --prompts-file: prompts generated at once (default 16)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--draft", metavar="MODEL", help="speculative decoding: a smaller model over the same tokenizer (a "
                   "pyllm run or weights file, a Hugging Face folder or hub id) drafts --draft-tokens tokens that the "
                   "model checks in one forward; the same tokens greedily, the model's own distribution sampling")
    p.add_argument("--draft-tokens", type=at_least(1), help="with --draft: tokens drafted per round (default 4)")
    p.add_argument("--cuda-graph", action="store_true", help="on CUDA: each decode step replays a CUDA graph instead "
                   "of launching its kernels one by one (small models are bound by those launches; the same tokens). "
                   "UNVERIFIED: not yet run on a GPU")
    add_device_options(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("eval", help="a model's multiple-choice accuracy (HellaSwag-style files), continuations' "
                       "accuracy (LAMBADA's) and loss on text")
    add_model_options(p)
    p.add_argument("--choices", nargs="+", metavar="FILE", help="JSONL files of multiple-choice examples, "
                   "{\"ctx\": ..., \"endings\": [...], \"label\": i} lines (HellaSwag's files as they are: "
                   "lm-evaluation-harness's hellaswag task rewrites them first, so for its numbers give its processed "
                   "rows, {\"query\", \"choices\", \"gold\"}; no few-shot examples, each row scored alone): accuracy "
                   "by each ending's summed log-probability after the context (acc), per character (acc_norm, "
                   "lm-evaluation-harness's), per byte (acc_bytes) and per token (llm.c's)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="text files: the loss per token, perplexity and bits per "
                   "byte over windows of --seq-len tokens, each token predicted once (a text's last window with a "
                   "whole window of context, as lm-evaluation-harness); read as `pyllm prepare` reads them (a JSON "
                   "Lines file of {\"text\"} rows a document each, a literal <|endoftext|> a document's end)")
    p.add_argument("--continuations", nargs="+", metavar="FILE", help="JSONL files of single continuations, "
                   "{\"context\": ..., \"continuation\": ...} lines joined as they are (lm-evaluation-harness's "
                   "loglikelihood requests), or {\"text\": ...} lines split before the last word (LAMBADA's, as the "
                   "harness's lambada tasks): acc (every continuation token the model's top one) and perplexity")
    p.add_argument("--limit", type=at_least(1), help="the first N examples of each --choices / --continuations file only")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the model's block_size, at most 2048)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="rows per forward (default 8)")
    add_device_options(p)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("export", help="write a run as a Hugging Face checkpoint folder (transformers, vLLM, ... load it)")
    p.add_argument("--run", required=True, help="a run folder written by `pyllm train`")
    p.add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors, tokenizer "
                   "files): new or empty")
    p.add_argument("--force", action="store_true", help="--out may hold a checkpoint already: its files (weights, "
                   "index and shards, adapter, config, tokenizer files) are replaced, the others kept")
    p.add_argument("--dtype", choices=tuple(GENERATE_DTYPES),
                   help="dtype of the exported weights (default bf16; with --adapter fp32, as PEFT saves an adapter)")
    p.add_argument("--adapter", action="store_true", help="a LoRA run (--lora-rank, --init-from-hf): write its "
                   "updates alone as a PEFT adapter (adapter_model.safetensors, adapter_config.json) over the source model")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("plan", help="Chinchilla: compute-optimal params and tokens, and the time it would take here")
    p.add_argument("--compute", help="training budget in FLOPs, e.g. 1e21")
    p.add_argument("--params", help="model size, e.g. 124M, 1.5B")
    p.add_argument("--tokens-per-param", type=positive_number, default=20.0, help="tokens per parameter at the optimum (default 20, Hoffmann et al. 2022)")
    p.add_argument("--flops-per-s", help="achieved training FLOP/s per device; default: measured with a few steps of --preset here")
    p.add_argument("--preset", help="preset whose throughput is measured (default: llama-124m on CUDA, tiny on CPU)")
    p.add_argument("--device", default="auto", help="device to measure on: auto (default), cpu, cuda")
    p.add_argument("--gpus", type=at_least(1), default=1, help="devices training together (default 1)")
    p.set_defaults(func=cmd_plan)
    return parser


def number_type(kind, valid, what: str):
    """An argparse type: a `kind` number for which valid(value) holds (else argparse's one-line error
    saying it must be `what`), checked before any work rather than failing deep in the run."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if not valid(value):  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def at_least(low, kind=int):
    return number_type(kind, lambda v: low <= v < float("inf"),
                       f"{'an integer' if kind is int else 'a finite number'} >= {low}")


positive_number = number_type(float, lambda v: 0 < v < float("inf"), "a finite number > 0")


def json_object(text: str) -> dict:
    """A flag's JSON object (argparse's type: its error for anything else)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got {text!r}")
    return value
probability = number_type(float, lambda v: 0 < v <= 1, "in (0, 1]")


def check_device(device) -> None:
    """ValueError for a CUDA device torch cannot use here (a CPU-only torch, no GPU, an index past the
    last), before anything loads: torch's own failure is an AssertionError deep in a traceback."""
    if not isinstance(device, str) or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no GPU here"
        raise ValueError(f"--device {device}: {why}; use --device cpu (or auto)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")


class Terminated(BaseException):
    """SIGTERM, raised where the command is (main's handler), so that what it was writing is removed
    on the way out, as on Ctrl-C."""


_terminated_at: list[float] = []


def _terminate(signum, frame) -> None:
    """main's SIGTERM handler: Terminated raised; a second signal ends the process at once where its
    clean-up is stuck (train.end_if_repeated, as train.request_stop)."""
    from pyllm.train import end_if_repeated

    if _terminated_at:
        end_if_repeated(signum, _terminated_at[0])
        return
    _terminated_at.append(time.monotonic())
    raise Terminated


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (a job's time limit, `kill`) ends the commands that write data files as Ctrl-C does: by
    # an exception, so that the files they were writing are removed (killed by the default action, a
    # prepare had left its hidden temp token files, gigabytes, for the next prepare to remove 10
    # minutes later). `pyllm train` swaps in its own while it trains (request_stop: a checkpoint
    # first). Under torchrun only rank 0, which prepares the data: Python runs a handler only between
    # its own instructions, and the other ranks wait for it in a collective, where a handler's signal
    # had waited with them (the default action ends them at once). Other commands, and a handler of
    # the caller's own, are left as they are.
    own_handler = (args.command in ("prepare", "tokenizer", "train") and int(os.environ.get("RANK", "0")) == 0
                   and threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if own_handler:
        _terminated_at.clear()
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(args)
    finally:
        if own_handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(args) -> int:
    try:
        check_device(getattr(args, "device", None))
    except ValueError as e:
        print(f"pyllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.command in ("train", "generate", "eval"):  # before the first tensor: see pyllm.cpu_memory
        from pyllm.cpu_memory import reuse_cpu_memory
        reuse_cpu_memory()
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`pyllm info | head`): stop quietly, as other command-line tools do;
        # stdout goes to devnull so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except KeyboardInterrupt:
        print(f"\npyllm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"\npyllm {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143  # 128 + SIGTERM, what a shell reports
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if args.command in ("info", "bench"):
            raise
        print(f"pyllm {args.command}: error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `pyllm` command and `python -m pyllm`: main(), then out. Under torchrun each rank leaves
    through pyllm.train.end_process, past gloo's abort at interpreter exit (see there); main()
    itself returns, for callers in a process of their own. Under torchrun an error main() does not
    catch (an internal one) is printed and leaves that way too (it had reached the interpreter's
    exit: SIGABRT, exit -6 and a core dump, in place of 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        sys.exit(main())
    from pyllm.train import end_process

    try:
        code = main()
    except SystemExit as e:  # (argparse's usage errors)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    end_process(code)


if __name__ == "__main__":
    entry()
