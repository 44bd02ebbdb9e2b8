"""Keep a CPU training loop's freed memory in the process, so that the next step's tensors of the
same sizes land on pages already mapped.

Every fresh CPU tensor of some size pays the kernel a page fault per 4 KiB page at first touch,
because glibc's malloc hands large freed blocks back to the kernel (munmap for blocks it mmapped,
heap trimming for the rest). A training step makes the same tensors every step (autocast's 16-bit
weight copies, the embedding's dense gradient, the fused loss's buffers, the weight gradients), so
it pays again every step: 211,000 faults a step for llama-124m, bf16, B = 2, T = 512, of a ~2.4 s
step on a 2-core EPYC VM (~3.5 us a fault there; 2026-12-02). `reuse_cpu_memory()` turns two
process-wide settings on:

- glibc malloc keeps freed blocks below 32 MiB (M_MMAP_THRESHOLD fixed at 32 MiB, its largest,
  M_TRIM_THRESHOLD at 2 GiB: the heap is not trimmed);
- torch backs its CPU tensors of 2 MiB and more with transparent huge pages (its own option,
  THP_MEM_ALLOC_ENABLE=1: a fault per 2 MiB instead of per 4 KiB for the blocks above 32 MiB, which
  malloc still maps and unmaps). torch reads it at its first CPU allocation: it only takes effect when
  set before any CPU tensor exists, and where the kernel gives huge pages on request
  (/sys/kernel/mm/transparent_hugepage/enabled "madvise" or "always").

The next tensor of a freed one's size does not always land on its pages: glibc may split a freed block
for a small allocation in between, and the heap then grows for the tensor anew, a few times per size
before it settles (up to three times seen for one 8 MiB size; `tests/test_cpu_memory.py`).

Measured (same VM and step, median of 8 steps): 211 K -> 3.7 K faults a step, 2.4 s -> 1.76 s;
with a random T in 64..512 each step, 1.64 -> 1.30 s, peak RSS 3,202 -> 3,232 MB. Turning malloc's
mmap off altogether (M_MMAP_MAX = 0) removed every fault (1.64 s) but grew the peak RSS to 5.3 GB on
the varying shapes (fragmentation), so it is not done. The memory is not handed back until the
process ends: RSS stays near its peak, which a training loop reaches every step anyway.

`pyllm train`, `generate` and `eval` call it first; PYLLM_REUSE_CPU_MEMORY=0 (or false, off, no)
turns it off. Code of one's own calls it before making its first tensor. Linux with glibc only;
elsewhere nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc():
    """The C library when it is glibc (its mallopt parameters are glibc's), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):  # musl and others have no gnu_get_libc_version
        return None
    return libc


def _huge_pages_on_request() -> bool:
    try:
        with open(_THP) as f:
            setting = f.read()
    except OSError:
        return False
    return "[madvise]" in setting or "[always]" in setting


def reuse_cpu_memory() -> dict:
    """Turns the two settings above on for this process (idempotent). -> {"malloc": whether glibc's
    malloc now keeps freed blocks, "huge_pages": whether torch was asked for huge pages and the kernel
    gives them on request (torch may have read the setting already: see the module's docstring)}."""
    done = {"malloc": False, "huge_pages": False}
    if os.environ.get("PYLLM_REUSE_CPU_MEMORY", "1").strip().lower() in ("0", "false", "off", "no"):
        return done
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # a user's own choice stands
    done["huge_pages"] = os.environ["THP_MEM_ALLOC_ENABLE"] == "1" and _huge_pages_on_request()
    libc = _glibc()
    if libc is not None:
        mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1  # each on its own: 1 is success
        trim_set = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
        done["malloc"] = mmap_set and trim_set
    return done
