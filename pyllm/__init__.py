"""pyllm: hand-written CUDA kernels with C++ CPU twins for training LLMs."""
__version__ = "0.1.0"

from pyllm.ops.swiglu import swiglu, swiglu_packed  # noqa: E402
from pyllm.tokenizer import Tokenizer  # noqa: E402

__all__ = ["swiglu", "swiglu_packed", "Tokenizer", "__version__"]
