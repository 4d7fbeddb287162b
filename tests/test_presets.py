"""Model presets: the parameter count computed from a shape equals the built model's. Job presets
(training/jobs.py): a model size plus `train` flags, which explicit flags override."""

import argparse
import dataclasses

import pytest
import torch

from cs336_systems.errors import ConfigError
from cs336_systems.presets import PRESETS, ModelConfig
from cs336_systems.training.config import add_arguments
from cs336_systems.training.jobs import JOB_PRESETS, apply_job_preset


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("vocab_size", [10_000, 151_936])
def test_num_params_counts_the_built_model(name, vocab_size):
    with torch.device("meta"):  # shapes only: the 8B model builds in milliseconds
        model = ModelConfig(preset=name, vocab_size=vocab_size, context_length=64).build()
    built = sum(p.numel() for p in model.parameters())
    assert PRESETS[name].num_params(vocab_size) == built


@pytest.mark.parametrize("name", list(JOB_PRESETS))
def test_a_job_preset_is_a_model_size_and_train_flags(name):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = set(vars(parser.parse_args([])))
    assert JOB_PRESETS[name]["preset"] in PRESETS and name not in PRESETS
    assert set(JOB_PRESETS[name]) <= flags
    assert name in parser.format_help()  # --preset's help lists the whole jobs


def test_a_job_preset_fills_only_the_flags_not_given():
    given = argparse.Namespace(preset="8b-32k", batch_size=4, context_length=None, vocab_size=None,
                               param_dtype=None, activation_checkpointing=None, steps=None)
    args = apply_job_preset(given, {"steps": 10, "batch_size": 1})
    assert (args.preset, args.batch_size, args.context_length, args.steps) == ("8b", 4, 32_768, 10)
    plain = apply_job_preset(argparse.Namespace(preset="tiny", batch_size=None), {"batch_size": 1})
    assert (plain.preset, plain.batch_size) == ("tiny", 1)


def test_gqa_presets_share_their_base_shape():
    """`8b-gqa` is the 8b model with 8 kv heads for its 32 query heads (4 per group), `tiny-gqa` the tiny one
    with 2 for 4: only k_proj and v_proj differ."""
    for gqa, base, kv_heads in (("8b-gqa", "8b", 8), ("tiny-gqa", "tiny", 2)):
        shape = PRESETS[gqa]
        assert shape.num_kv_heads == kv_heads and PRESETS[base].num_kv_heads is None
        assert dataclasses.replace(shape, num_kv_heads=None) == PRESETS[base]
    with torch.device("meta"):
        model = ModelConfig(preset="8b-gqa", vocab_size=151_936, context_length=64).build()
    attn = model.layers[0].attn
    assert (attn.num_heads, attn.num_kv_heads) == (32, 8)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (8 * 4096 // 32, 4096)


def test_num_kv_heads_flag_overrides_the_preset():
    assert ModelConfig(preset="tiny-gqa").num_kv_heads == 2
    assert ModelConfig(preset="tiny-gqa", num_kv_heads=1).num_kv_heads == 1
    assert ModelConfig(preset="tiny").num_kv_heads is None
    with pytest.raises(ConfigError, match="--num-heads 4 is not divisible by --num-kv-heads 3"):
        ModelConfig(preset="tiny", num_kv_heads=3)
    with pytest.raises(ConfigError, match="--num-kv-heads must be positive"):
        ModelConfig(preset="tiny", num_kv_heads=0)
