"""Model presets: the parameter count computed from a shape equals the built model's."""

import pytest
import torch

from cs336_systems.presets import PRESETS, ModelConfig


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("vocab_size", [10_000, 151_936])
def test_num_params_counts_the_built_model(name, vocab_size):
    with torch.device("meta"):  # shapes only: the 8B model builds in milliseconds
        model = ModelConfig(preset=name, vocab_size=vocab_size, context_length=64).build()
    built = sum(p.numel() for p in model.parameters())
    assert PRESETS[name].num_params(vocab_size) == built
