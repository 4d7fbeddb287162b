"""The precision policy is one value built once from the flags, and the checkpointing policy is parsed once."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_cli_error

from cs336_systems import cli
from cs336_systems.errors import ConfigError
from cs336_systems.parallel.activation_checkpointing import ActivationCheckpointing, parse_policy
from cs336_systems.parallel.parallelize import parallelize
from cs336_systems.presets import ModelConfig
from cs336_systems.runtime import FP32, Precision, RuntimeConfig, autocast
from cs336_systems.training import command as train
from cs336_systems.training.config import config_from_args

COMMON = ["--preset", "tiny", "--context-length", "32", "--batch-size", "8", "--steps", "2", "--nproc", "1",
          "--no-progress"]


def parse(*flags: str):
    return config_from_args(cli.build_parser().parse_args(["train", *COMMON, *flags]))


BF16, F32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("flags, precision", [
    ((), Precision()),
    (("--bf16",), Precision(param=F32, compute=BF16, reduce=F32)),
    (("--compute-dtype", "bf16"), Precision(param=F32, compute=BF16, reduce=F32)),
    (("--param-dtype", "bf16"), Precision(param=BF16, compute=BF16, reduce=BF16)),
    (("--param-dtype", "bf16", "--bf16"), Precision(param=BF16, compute=BF16, reduce=BF16)),
    (("--param-dtype", "bf16", "--reduce-dtype", "fp32", "--fsdp", "--nproc", "2"),
     Precision(param=BF16, compute=BF16, reduce=F32)),
], ids=["default", "bf16", "compute-bf16", "param-bf16", "param-bf16-and-bf16", "bf16-params-fp32-reduce"])
def test_flags_build_one_precision(flags, precision):
    config = parse(*flags)
    assert config.runtime.precision == precision
    assert config.runtime.bf16 == (precision.compute == BF16)


def test_autocast_only_when_compute_is_below_the_parameters():
    with autocast(RuntimeConfig(device="cpu", bf16=True)):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16
    for runtime in (RuntimeConfig(device="cpu"), RuntimeConfig(device="cpu", param_dtype="bf16")):
        with autocast(runtime):
            assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("flags, message", [
    (["--param-dtype", "bf16", "--compute-dtype", "fp32"], "--compute-dtype fp32 is higher than --param-dtype bf16"),
    (["--reduce-dtype", "bf16"], "--reduce-dtype bf16 is lower than --param-dtype fp32"),
    (["--bf16", "--compute-dtype", "fp32"], "--bf16 means --compute-dtype bf16"),
    (["--param-dtype", "bf16", "--reduce-dtype", "fp32"], "--reduce-dtype fp32 with --param-dtype bf16 needs --fsdp"),
], ids=["compute-above-params", "reduce-below-params", "bf16-and-compute", "reduce-without-fsdp"])
def test_bad_precision_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(train, "run_job", lambda *a, **k: pytest.fail("a job started"))
    assert cli.main(["train", *COMMON, *flags, "--out-dir", str(tmp_path / "out")]) == 2
    assert_cli_error(capsys, message)


def test_precision_rejects_other_dtypes():
    with pytest.raises(ConfigError, match="--param-dtype must be one of fp32, bf16"):
        Precision(param=torch.float16)
    assert str(FP32) == "param fp32/compute fp32/reduce fp32"


def test_engine_flag():
    assert parse().parallel.engine == "ours"
    assert parse("--engine", "torch").parallel.engine == "torch"
    with pytest.raises(SystemExit):
        parse("--engine", "jax")


# ---------------------------------------------------------------- checkpointing policy: parsed once


def test_checkpointing_policy_is_parsed_at_configuration():
    config = parse("--activation-checkpointing", "every:2")
    policy = config.parallel.activation_checkpointing
    assert isinstance(policy, ActivationCheckpointing) and (policy.mode, policy.group_size) == ("full", 2)
    assert policy == "every:2" and str(policy) == "every:2" and policy == parse_policy("every:2")
    assert parse().parallel.activation_checkpointing == "none"
    with pytest.raises(ConfigError, match="--activation-checkpointing: unknown policy 'sometimes'"):
        parse("--activation-checkpointing", "sometimes")


def test_parallelize_takes_a_parsed_policy_not_a_string():
    model = ModelConfig(preset="tiny", vocab_size=64).build()
    with pytest.raises(TypeError, match="parse_policy"):
        parallelize(model, 1, activation_checkpointing="full")
    forward, wrapper = parallelize(model, 1, activation_checkpointing=parse_policy("full"))
    assert forward is model and wrapper is None and type(model.layers[0]).__name__ == "CheckpointedBlocks"
