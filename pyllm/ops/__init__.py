"""pyllm's ops: one module per op (pyllm.ops.<op>), each with a C++ CPU kernel and a CUDA kernel.

The public functions are re-exported from the top-level package (pyllm.swiglu, ...); this package
keeps only the modules, so that pyllm.ops.swiglu is the module and never shadowed by its function.
"""
from pyllm.ops import _util, adamw, cross_entropy, distill, flash_attn, rms_norm, rope, swiglu

_util.register_sharding_rules_when_loaded()  # (DTensor's: as it is imported)
for _op in ("flash_attn", "swiglu", "swiglu_packed", "geglu", "geglu_packed", "rms_norm", "cross_entropy", "distill"):
    _util.refuse_second_derivatives(f"pyllm::{_op}_backward")  # (rope's backward is rope: it has one)

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
