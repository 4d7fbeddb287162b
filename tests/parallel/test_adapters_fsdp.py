"""The CS336 2026 adapters (get_ddp, get_fsdp and friends), called as CS336's tests call them: keywords, 2 gloo ranks.

Each rank seeds its model with its rank (rank 1 starts apart until the wrapper broadcasts rank 0's
weights), trains its half of a freshly shuffled batch for 5 SGD steps with an optimizer over the
wrapper's parameters, and compares, after each step, the full parameters with a model trained in
the same process on the whole batch. With a bf16 compute dtype the comparison is with the same
fp32 reference: the bound is bf16's rounding, not equality. One launch runs every case.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from adapters import (
    ddp_on_after_backward,
    fsdp_gather_full_params,
    fsdp_on_after_backward,
    get_ddp,
    get_fsdp,
)
from helpers import compute_in, max_distance, split_sgd_step
from numerics import ORACLE_FACTOR
from torch import nn

from cs336_systems.distributed.launch import launch
from cs336_systems.parallel.fsdp import SHARDED_LAYERS

SAMPLES, FEATURES, HIDDEN, CLASSES, STEPS = 20, 10, 15, 5, 5


class ToyModel(nn.Module):
    """CS336's toy shapes plus an embedding; `tied` ties the two square hidden layers' weights."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, HIDDEN, bias=False)
        self.ln = nn.LayerNorm(HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)
        self.no_grad_fixed_param = nn.Parameter(torch.tensor([2.0, 2.0]), requires_grad=False)
        if tied:
            self.fc3.weight = self.fc2.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(F.relu(self.fc1(x)))
        h = F.relu(self.fc3(F.relu(self.fc2(h)))) * self.no_grad_fixed_param[0]
        return self.head(h)


@dataclass(frozen=True)
class Case:
    wrapper: str  # "ddp" or "fsdp"
    tied: bool
    dtype: str = "float32"  # FSDP's compute dtype

    @property
    def id(self) -> str:
        return f"{self.wrapper}-{'tied' if self.tied else 'untied'}-{self.dtype}"


CASES = [Case("ddp", tied) for tied in (False, True)] + [
    Case("fsdp", tied, dtype) for tied in (False, True) for dtype in ("float32", "bfloat16")]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(SAMPLES, FEATURES, generator=g), torch.randint(0, CLASSES, (SAMPLES,), generator=g)


def _wrap(case: Case, model: nn.Module) -> nn.Module:
    if case.wrapper == "ddp":
        return get_ddp(module=model)
    compute_dtype = None if case.dtype == "float32" else getattr(torch, case.dtype)
    return get_fsdp(module=model, compute_dtype=compute_dtype)


def _params(case: Case, wrapped: nn.Module) -> dict[str, torch.Tensor]:
    if case.wrapper == "ddp":
        return dict(wrapped.module.named_parameters())
    return fsdp_gather_full_params(fsdp_model=wrapped)


def _train(case: Case) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = ToyModel(case.tied)
    reference = ToyModel(case.tied)
    reference.load_state_dict(model.state_dict())
    wrapped = _wrap(case, model)
    for p in reference.parameters():  # the reference starts from rank 0's weights too
        dist.broadcast(p.detach(), src=0)
    start = _params(case, wrapped)
    same_start = all(torch.equal(start[n], p) for n, p in reference.named_parameters())

    split, names = ToyModel(case.tied), [n for n, _ in reference.named_parameters()]
    split.load_state_dict(reference.state_dict())
    split_params = list(split.parameters())  # before compute_in reorders model.parameters()
    if case.dtype != "float32":
        compute_in(split, getattr(torch, case.dtype), SHARDED_LAYERS)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    split_optimizer = torch.optim.SGD(split_params, lr=0.1)
    x, y = _data()
    errors, gaps, grads_ok = [], [], True
    for step in range(STEPS):
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(42 + step))
        x, y = x[order], y[order]
        mine = slice(rank * SAMPLES // 2, (rank + 1) * SAMPLES // 2)

        optimizer.zero_grad()
        F.cross_entropy(wrapped(x[mine]), y[mine]).backward()
        if case.wrapper == "ddp":
            ddp_on_after_backward(ddp_model=wrapped, optimizer=optimizer)
        else:
            fsdp_on_after_backward(fsdp_model=wrapped, optimizer=optimizer)
        grads_ok &= all(p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype
                        for p in wrapped.module.parameters() if p.requires_grad)
        optimizer.step()

        reference_optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        reference_optimizer.step()
        split_sgd_step(split, split_optimizer, x, y)
        params = _params(case, wrapped)
        errors.append(max_distance([params[n] for n in names], reference.parameters()))
        gaps.append(max_distance(split_params, reference.parameters()))
    return {"same_start": same_start, "errors": errors, "gaps": gaps, "grads_ok": grads_ok}


def _run_all() -> dict[str, dict]:
    return {case.id: _train(case) for case in CASES}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return launch(_run_all, 2, backend="gloo")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_wrapping_broadcasts_rank0_weights(ranks: list[dict], case: Case) -> None:
    assert all(results[case.id]["same_start"] for results in ranks)


@pytest.mark.numerics
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_full_batch_training_every_step(ranks: list[dict], case: Case) -> None:
    """Over every step, within twice what plain torch moves from the fp32 full-batch run by averaging
    the two halves' gradients itself, computing in the case's dtype the way FSDP does (`compute_in`)."""
    for rank, results in enumerate(ranks):
        errors, gaps = results[case.id]["errors"], results[case.id]["gaps"]
        assert max(errors) <= ORACLE_FACTOR * max(gaps), f"rank {rank}: {errors} vs oracle {gaps}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_module_parameter_gets_its_own_shape_and_dtype_of_grad(ranks: list[dict], case: Case) -> None:
    assert all(results[case.id]["grads_ok"] for results in ranks)
