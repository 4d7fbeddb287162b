"""flash_helpers.py (shared by this folder and interpreter/) importable as a top-level module."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
