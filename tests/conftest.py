"""Shared pytest configuration.

tests/interpreter/ holds the Triton-kernel tests that need TRITON_INTERPRET=1 set before triton is
imported; the main suite runs them in a subprocess (tests/test_flash_interpreter.py), so they are
collected directly only when that variable is set.
"""

import os

import pytest
import torch

collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreter"]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
