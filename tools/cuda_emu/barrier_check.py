"""Is every __syncthreads of the CUDA kernels needed, and do the emulator's cases reach it?

Removes each barrier of csrc/cuda in turn (in a copy of the source tree, never in this one), builds
the emulator's race build of that copy and runs the kernel's cases of tests/test_cuda_emu.py under
ThreadSanitizer (tests/test_cuda_emu_race.py says how). A removal that TSan reports is a barrier the
kernel needs and the cases reach; one it does not report is a barrier that orders nothing in those
cases (not needed, or a path the cases miss: worth a look either way). Also says whether the plain
answers stayed right without it: those barriers only the race build can check.

    python tools/cuda_emu/barrier_check.py                 # every kernel file (~30 min on 2 cores)
    python tools/cuda_emu/barrier_check.py rms_norm.cu     # one file

Writes one JSON line per barrier to stdout.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import build  # (this folder: a script's own folder leads sys.path)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# each kernel file's cases in test_cuda_emu.py (a -k expression): every launch shape and code path
# that has a barrier, one dtype
CASES = {
    "adamw.cu": "test_adamw",
    "bpe.cu": "test_bpe_encoder and gpt4o",
    "cross_entropy.cu": "test_cross_entropy and bfloat16",
    "distill.cu": "test_generalized_jsd and bfloat16",
    "flash_attn_bwd.cu": "test_flash_attn_simt_backward",
    "flash_attn_bwd_mma.cu": "(test_flash_attn_forward_and_backward and bfloat16 and 64 and (square or mqa or tiny) "
                             "and not full-square) or (test_flash_attn_taller_tiles and 64) or "
                             "test_flash_attn_other_head_dims or (test_flash_attn_atomic_dq_backward and causal and "
                             "(gqa or no-key-rows))",
    "flash_attn_decode.cu": "(test_kv_cache_decode and bfloat16 and 64) or (test_kv_cache_decode_layouts and 3)",
    "flash_attn_fwd.cu": "(test_flash_attn_forward_and_backward and bfloat16 and 64 and (square or mqa or tiny) "
                         "and not full-square) or (test_flash_attn_taller_tiles and 64)",
    "rms_norm.cu": "test_rms_norm_forward_and_backward and bfloat16",
}


def _copy_tree(dst: Path) -> None:
    """The source tree (as it is now, edits included) without build outputs; pyllm's built extension linked in."""
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "_C*.so"))
    for ext in (ROOT / "pyllm").glob("_C*.so"):
        (dst / "pyllm" / ext.name).symlink_to(ext)


def main(files: list[str]) -> int:
    tsan = build.tsan_runtime()
    if tsan is None or build.cuda_include() is None:
        print("needs a CUDA toolkit's headers and the host compiler's libtsan.so", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="barrier_check_") as tmp:
        tree = Path(tmp) / "tree"
        _copy_tree(tree)
        for name in files or list(CASES):
            src = tree / "csrc" / "cuda" / name
            original = src.read_text()
            lines = original.split("\n")
            for i, line in enumerate(lines):
                if "__syncthreads();" not in line.split("//")[0]:
                    continue
                src.write_text("\n".join(lines[:i] + [line.replace("__syncthreads();", ";", 1)] + lines[i + 1:]))
                proc, reports = build.run_under_tsan(
                    tsan, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_emu.py", "-k", CASES[name]],
                    tree, Path(tmp) / f"logs_{name}_{i + 1}")
                src.write_text(original)
                tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr[-300:]]
                print(json.dumps({
                    "file": name, "line": i + 1, "races_reported": reports.count("WARNING: ThreadSanitizer"),
                    "at": sorted(set(re.findall(r"SUMMARY: ThreadSanitizer: data race \S*/(\S+:\d+)", reports))),
                    "answers": "right" if " failed" not in tail[0] and proc.returncode in (0, 66) else "wrong",
                    "pytest": tail[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
