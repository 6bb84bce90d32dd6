"""Kernel tests. Without a GPU, Triton kernels run under Triton's CPU interpreter: TRITON_INTERPRET
is set here, before kernels.triton_loss is imported (its @triton.jit reads it at import), and the
module is re-imported if something loaded it earlier. With a GPU the kernels compile for real."""

from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    if "kernels.triton_loss" in sys.modules:
        importlib.reload(sys.modules["kernels.triton_loss"])


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty / torch.empty_like during the test returns memory filled with garbage
    (NaN for floats), so a kernel that leaves part of an output unwritten fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if t.dtype.is_floating_point:
                t.fill_(math.nan)
            elif t.dtype == torch.bool:
                t.fill_(True)
            else:
                t.fill_(torch.iinfo(t.dtype).max)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    yield


def pytest_configure(config):
    # the interpreter evaluates both sides of tl.where in NumPy: inf * 0 there is expected
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
