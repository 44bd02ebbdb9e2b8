import pytest
import torch

from pyllm.ops import _util


def pytest_collection_modifyitems(config, items):
    if _util.cuda_usable():
        return
    why = "no usable GPU" if _util.HAS_CUDA_KERNELS else "pyllm was built without CUDA kernels"
    skip = pytest.mark.skip(reason=f"cuda: {why}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
