"""Job presets: `train --preset NAME` for a whole job, not only a model size.

A job preset names a model size (a key of `cs336_systems.presets.PRESETS`) together with the training
settings that go with it: vocabulary, context, batch, parameter dtype, activation checkpointing.
`apply_job_preset` expands one into the flags the command line left unset, so explicit flags win.
Model sizes alone stay in `cs336_systems/presets.py`. This module imports no torch.
"""

from __future__ import annotations

import argparse
from typing import Any

from cs336_systems.presets import get_preset

JOB_PRESETS: dict[str, dict[str, Any]] = {
    # The CS336 2026 leaderboard step: the 8b model at 2 x 32768 tokens with bf16 parameters, and the
    # checkpointing that measured fastest within one H200's memory (docs/perf/train_step.md).
    "8b-32k": {"preset": "8b", "vocab_size": 151_936, "context_length": 32_768, "batch_size": 2,
               "param_dtype": "bf16", "activation_checkpointing": "selective"},
}
"""`train --preset NAME` for a whole job: these flags' values, where the command line leaves them at
their defaults."""


def apply_job_preset(args: argparse.Namespace, defaults: dict[str, Any]) -> argparse.Namespace:
    """`args` with a JOB_PRESETS name in `args.preset` expanded into the flags it sets that were not
    given (None), so explicit flags win; then every flag of `defaults` still None takes its default."""
    if args.preset not in JOB_PRESETS:
        get_preset(args.preset, also=JOB_PRESETS)  # an unknown name: the error lists the job presets as well
    values = vars(args).copy()
    for name, value in JOB_PRESETS.get(args.preset, {}).items():
        if name == "preset" or values.get(name) is None:
            values[name] = value
    for name, value in defaults.items():
        if values.get(name) is None:
            values[name] = value
    return argparse.Namespace(**values)
