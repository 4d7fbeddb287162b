"""Runs every tests/ops/*/interpreter folder (the Triton kernels on CPU) in one subprocess with
TRITON_INTERPRET=1.

The variable must be set before triton is imported, which the main test process has already done.
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_triton_kernels_under_interpreter():
    folders = sorted(str(p) for p in HERE.glob("*/interpreter") if p.is_dir())
    assert folders, "no interpreter test folders found"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *folders],
        env=env, cwd=HERE.parent.parent, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
