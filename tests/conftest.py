"""Test setup: on a machine without CUDA the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels (at import of ``kernels``),
so it is set here, before any test module imports them. On a GPU every cached launch is checked against the
JIT's own choice of compiled kernel (kernels/dispatch.py), so the whole suite tests the launch keys.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LONGCTX_CHECK_LAUNCH_CACHE", "1")


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
