"""pyllm: hand-written CUDA kernels with C++ CPU twins for training LLMs."""
__version__ = "0.1.0"

# Before anything loads _C: a build for another CPU gets an ImportError here, not SIGILL.
from pyllm import _cpu_guard  # noqa: E402

_cpu_guard.check()

import importlib.util as _importlib_util  # noqa: E402

if _importlib_util.find_spec("pyllm._C") is None:  # else a circular-import error from the first op module
    def _missing_extension() -> str:
        import glob
        import os
        import sys

        here = __path__[0]
        others = sorted(os.path.basename(f) for f in glob.glob(os.path.join(here, "_C.*")) if not f.endswith(".json"))
        found = (f" It holds {', '.join(others)}: built for another Python than this {sys.version_info[0]}."
                 f"{sys.version_info[1]}." if others else "")
        if os.path.basename(os.path.dirname(here)) in ("site-packages", "dist-packages"):
            return (f"pyllm's compiled extension (pyllm._C) is not in the installed {here}.{found} Install pyllm "
                    "again with this Python (pip install --force-reinstall --no-deps ...)")
        return (f"pyllm's compiled extension (pyllm._C) is not in {here}: a source checkout without a build.{found} "
                "Build it there (pip install --no-build-isolation -e .), or run from another folder to import an "
                "installed pyllm")

    raise ImportError(_missing_extension())

# csrc/bind.cpp's kAbi: the layout of what this Python passes the extension and reads back from it.
_ABI = 3


def _check_abi(extension) -> None:
    """ImportError where the compiled extension was built from other sources than this Python's
    (a checkout pulled, not rebuilt): its kernels would read arguments or write buffers in another
    layout, wrong numbers without an error."""
    abi = getattr(extension, "abi", 1)
    if abi != _ABI:
        raise ImportError(f"pyllm's compiled extension ({extension.__file__}) was built from "
                          f"{'older' if abi < _ABI else 'newer'} sources than this pyllm's Python (its interface "
                          f"{abi}, this pyllm's {_ABI}): build it again (pip install --no-build-isolation -e . in a "
                          "checkout; reinstall pyllm otherwise)")


from pyllm import _C  # noqa: E402

_check_abi(_C)

from pyllm.ops.cross_entropy import cross_entropy  # noqa: E402
from pyllm.ops.distill import generalized_jsd  # noqa: E402
from pyllm.ops.flash_attn import flash_attn, flash_attn_with_kvcache  # noqa: E402
from pyllm.ops.rms_norm import rms_norm  # noqa: E402
from pyllm.ops.rope import rope  # noqa: E402
from pyllm.ops.swiglu import geglu, geglu_packed, swiglu, swiglu_packed  # noqa: E402
from pyllm import optim  # noqa: E402
from pyllm.tokenizer import Tokenizer  # noqa: E402

__all__ = ["cross_entropy", "linear_cross_entropy", "generalized_jsd", "flash_attn", "flash_attn_with_kvcache", "geglu", "geglu_packed", "rms_norm", "rope", "swiglu", "swiglu_packed", "optim", "Tokenizer", "__version__"]


# Submodules the docs name as pyllm.nn, pyllm.model, ...: imported at their first use, so that
# `import pyllm; pyllm.nn.RMSNorm` works (it raised AttributeError unless something had imported
# pyllm.nn) while `import pyllm` stays as light as it was.
_SUBMODULES = {"nn", "model", "train", "data", "evaluate", "hf", "flash_attn_interface", "cpu_memory", "plan", "cli"}


def __dir__():  # (tab completion: the names __getattr__ gives too)
    return sorted({*globals(), "linear_cross_entropy", *_SUBMODULES})


def __getattr__(name: str):
    # The fused output-layer loss lives with the modules (pyllm.nn); here too, where the other losses
    # are, without importing pyllm.nn at `import pyllm`.
    if name == "linear_cross_entropy":
        from pyllm.nn import linear_cross_entropy

        return linear_cross_entropy
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"pyllm.{name}")
    raise AttributeError(f"module 'pyllm' has no attribute {name!r}")
