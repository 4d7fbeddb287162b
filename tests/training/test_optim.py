"""The optimizer choice of `train`: torch's AdamW (the fused path on CUDA) takes the same steps as
cs336_basics' AdamW, `auto` picks torch-fused on CUDA only, and bad choices fail naming the flag."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_within_oracle

from cs336_basics.optimizer import AdamW
from cs336_systems.errors import ConfigError
from cs336_systems.training.config import OptimizerConfig
from cs336_systems.training.optim import adamw, build_optimizer

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def run_steps(optimizer_cls, device: str, steps: int = 10, dtype=torch.float32, **extra) -> list[torch.Tensor]:
    """`steps` AdamW steps on fixed parameters and gradients (with a changing learning rate, as training sets it)."""
    generator = torch.Generator().manual_seed(0)
    shapes = ((7, 5), (5,), (3, 4, 2))
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype)) for shape in shapes]
    optimizer = optimizer_cls(params, **HYPER, **extra)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(device, dtype)
        for group in optimizer.param_groups:
            group["lr"] = HYPER["lr"] * (1 - step / (2 * steps))
        optimizer.step()
    return [p.detach().cpu() for p in params]


def test_torch_adamw_takes_our_steps_cpu():
    assert_same_steps(run_steps(torch.optim.AdamW, "cpu", fused=False, foreach=False), run_steps(AdamW, "cpu"))


def assert_same_steps(theirs: list[torch.Tensor], ours: list[torch.Tensor]) -> None:
    """Torch's steps err from float64 at most twice what ours do, and the other way round: the same
    update, rounded in another order (tests/numerics.py)."""
    exact = run_steps(AdamW, "cpu", dtype=torch.float64)
    for i, (a, b, e) in enumerate(zip(theirs, ours, exact, strict=True)):
        assert_within_oracle(f"param {i}", a, b, e)
        assert_within_oracle(f"param {i}", b, a, e)


@pytest.mark.cuda
def test_fused_torch_adamw_takes_our_steps_cuda():
    assert_same_steps(run_steps(torch.optim.AdamW, "cuda", fused=True), run_steps(AdamW, "cuda"))


@pytest.mark.parametrize("implementation, device, expected", [
    ("auto", "cpu", AdamW), ("cs336", "cpu", AdamW), ("auto", "cuda", torch.optim.AdamW),
    ("cs336", "cuda", AdamW), ("torch-fused", "cuda", torch.optim.AdamW),
])
def test_which_adamw(implementation, device, expected):
    cls, extra = adamw(implementation, torch.device(device))
    assert cls is expected and extra == ({"fused": True} if expected is torch.optim.AdamW else {})


def test_torch_fused_needs_cuda():
    with pytest.raises(ConfigError, match="--optimizer torch-fused"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerConfig(implementation="torch-fused"))


def test_unknown_implementation_names_the_flag():
    with pytest.raises(ConfigError, match="--optimizer"):
        OptimizerConfig(implementation="sgd")


def test_build_optimizer_default_on_cpu_is_ours():
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerConfig())
    assert type(optimizer) is AdamW and optimizer.defaults["weight_decay"] == 0.1
