"""pyllm's ops: one module per op (pyllm.ops.<op>), each with a C++ CPU kernel and a CUDA kernel.

The public functions are re-exported from the top-level package (pyllm.swiglu, ...); this package
keeps only the modules, so that pyllm.ops.swiglu is the module and never shadowed by its function.
"""
import torch

from pyllm.ops import _util, adamw, cross_entropy, distill, flash_attn, rms_norm, rope, swiglu

_util.register_sharding_rules_when_loaded()  # (DTensor's: as it is imported)
# Every backward op the modules above defined (rope's backward is rope itself: it has a derivative);
# pyllm.hf registers its own.
for _op in dir(torch.ops.pyllm):
    if _op.endswith("_backward"):
        _util.refuse_second_derivatives(f"pyllm::{_op}")

# op name -> {device type: dtypes}, for `python -m pyllm info`.
BACKENDS = {
    "swiglu": swiglu.DTYPES,
    "geglu": swiglu.DTYPES,
    "adamw": adamw.DTYPES,
    "flash_attn": flash_attn.DTYPES,
    "rms_norm": rms_norm.DTYPES,
    "rope": rope.DTYPES,
    "cross_entropy": cross_entropy.DTYPES,
    "distill": distill.DTYPES,
}
