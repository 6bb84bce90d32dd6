"""Every benchmark `make bench` runs (bench/__main__.py, MODULES) imports and has run(quick): the
runner imports them one by one and reports a failing import only as a failed benchmark at the end
of a long run, so a broken import is caught here instead."""

from __future__ import annotations

import importlib
import inspect

import pytest

from bench.__main__ import MODULES


@pytest.mark.parametrize("name", MODULES)
def test_each_benchmark_imports_and_has_run(name):
    module = importlib.import_module(f"bench.{name}")
    assert "quick" in inspect.signature(module.run).parameters
