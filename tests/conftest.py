"""Shared pytest configuration.

tests/ mirrors the packages (ops/, basics/, parallel/, training/, bench/); tests/adapters.py is the
CS336 interface, importable from every test (this folder is put on sys.path).

tests/ops/*/interpreter/ hold the Triton-kernel tests that need TRITON_INTERPRET=1 set before triton
is imported; the main suite runs them in a subprocess (tests/ops/test_interpreter.py), so they are
collected directly only when that variable is set.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["ops/*/interpreter"]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
