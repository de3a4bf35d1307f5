"""Test configuration: without a CUDA device, Triton kernels run under the interpreter on CPU
tensors, so TRITON_INTERPRET must be set before anything imports triton."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from posttrain_kernels.dispatch import live_backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
LIVE = live_backends()


def fused_backends(include_triton: bool = True):
    """Fused backends that run on this machine, each with the device its tensors live on."""
    out = [pytest.param("torch", "cpu", id="torch")]
    if LIVE["cpu"]:
        out.append(pytest.param("cpu", "cpu", id="cpu"))
    if include_triton and LIVE["triton"]:
        dev = "cuda" if HAS_CUDA else "cpu"
        out.append(pytest.param("triton", dev, id="triton"))
    if LIVE["cuda"]:
        out.append(pytest.param("cuda", "cuda", id="cuda"))
    return out


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
