"""The package itself: import, the extension's build flags, `python -m pyllm info`."""
import subprocess
import sys

import pyllm
from pyllm import _C
from pyllm.ops import BACKENDS, _util


def test_import_and_version():
    assert pyllm.__version__
    assert callable(pyllm.swiglu) and callable(pyllm.swiglu_packed)


def test_extension_reports_its_build():
    assert isinstance(_C.has_cuda, bool)
    if _C.has_cuda:
        assert _C.cuda_archs  # e.g. "80,90"
        assert _C.cuda_device_count() >= 0  # 0, not an exception, without a GPU or driver
        assert _C.cuda_runtime_version().count(".") == 1


def test_dtype_codes_match_the_cpp_side():
    # csrc/common/dtype.h: f32 = 0, f16 = 1, bf16 = 2, f64 = 3
    import torch

    assert _util.DTYPE_CODES == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "pyllm", "info"], capture_output=True, text=True, check=True).stdout
    assert f"pyllm {pyllm.__version__}" in out
    assert "CUDA kernels:" in out and "GPU usable now:" in out
    for op in BACKENDS:
        assert op in out
