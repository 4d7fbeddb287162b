"""The CS336 DDP adapters, called the way CS336's tests call them: keyword arguments, 2 gloo ranks.

Each rank seeds its model with its own rank, so rank 1 starts from different weights until the
wrapper broadcasts rank 0's. Then every rank trains its half of a freshly shuffled batch for 5 SGD steps and
compares, after each step,
with a model trained in the same process on the whole batch. One launch runs every case.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from adapters import (
    ddp_bucketed_on_after_backward,
    ddp_bucketed_on_train_batch_start,
    ddp_individual_parameters_on_after_backward,
    get_ddp_bucketed,
    get_ddp_individual_parameters,
)
from helpers import max_distance, split_sgd_step
from numerics import ORACLE_FACTOR
from torch import nn

from cs336_systems.distributed.launch import launch

SAMPLES, FEATURES, CLASSES, STEPS = 20, 10, 5, 5


class ToyModel(nn.Module):
    """Two hidden layers with a LayerNorm; `tied` shares the hidden layers' weight."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, FEATURES, bias=False)
        self.ln = nn.LayerNorm(FEATURES)
        self.fc2 = nn.Linear(FEATURES, FEATURES)
        self.head = nn.Linear(FEATURES, CLASSES)
        self.no_grad_fixed_param = nn.Parameter(torch.tensor([2.0, 2.0]), requires_grad=False)
        if tied:
            self.fc2.weight = self.fc1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(F.relu(self.fc1(x)))
        return self.head(F.relu(self.fc2(h)) * self.no_grad_fixed_param[0])


@dataclass(frozen=True)
class Case:
    tied: bool
    bucket_size_mb: float | None  # None: DDPIndividualParameters through its adapters

    @property
    def id(self) -> str:
        wrapper = "individual" if self.bucket_size_mb is None else f"bucketed-{self.bucket_size_mb:g}MB"
        return f"{wrapper}-{'tied' if self.tied else 'untied'}"


# CS336's bucket sizes: every parameter in a bucket of its own, a few per bucket, all in one.
CASES = [Case(tied, size) for tied in (False, True) for size in (None, 0.0001, 0.0016, 0.01)]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(SAMPLES, FEATURES, generator=g), torch.randint(0, CLASSES, (SAMPLES,), generator=g)


def _train(case: Case) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(rank)
    reference = ToyModel(case.tied)
    model = ToyModel(case.tied)
    model.load_state_dict(reference.state_dict())
    if case.bucket_size_mb is None:
        ddp_model = get_ddp_individual_parameters(module=model)
    else:
        ddp_model = get_ddp_bucketed(module=model, bucket_size_mb=case.bucket_size_mb)
    for p in reference.parameters():  # the reference starts from rank 0's weights too
        dist.broadcast(p.detach(), src=0)
    started_apart = any(not torch.equal(p, q) for p, q in zip(reference.parameters(), _own_initial(case, rank)))
    same_start = all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))

    split = ToyModel(case.tied)  # the oracle: plain torch averaging the two halves' gradients itself
    split.load_state_dict(reference.state_dict())
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    split_optimizer = torch.optim.SGD(split.parameters(), lr=0.1)
    x, y = _data()
    errors, gaps = [], []
    for step in range(STEPS):
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(42 + step))
        x, y = x[order], y[order]
        mine = slice(rank * SAMPLES // 2, (rank + 1) * SAMPLES // 2)

        if case.bucket_size_mb is not None:
            ddp_bucketed_on_train_batch_start(ddp_model=ddp_model, optimizer=optimizer)
        optimizer.zero_grad()
        F.cross_entropy(ddp_model(x[mine]), y[mine]).backward()
        if case.bucket_size_mb is None:
            ddp_individual_parameters_on_after_backward(ddp_model=ddp_model, optimizer=optimizer)
        else:
            ddp_bucketed_on_after_backward(ddp_model=ddp_model, optimizer=optimizer)
        optimizer.step()

        reference_optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        reference_optimizer.step()
        split_sgd_step(split, split_optimizer, x, y)
        errors.append(max_distance(model.parameters(), reference.parameters()))
        gaps.append(max_distance(split.parameters(), reference.parameters()))
    return {"started_apart": started_apart, "same_start": same_start, "errors": errors, "gaps": gaps}


def _own_initial(case: Case, rank: int) -> list[torch.Tensor]:
    torch.manual_seed(rank)
    return list(ToyModel(case.tied).parameters())


def _run_all() -> dict[str, dict]:
    return {case.id: _train(case) for case in CASES}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return launch(_run_all, 2, backend="gloo")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_wrapping_broadcasts_rank0_weights(ranks: list[dict], case: Case) -> None:
    assert ranks[1][case.id]["started_apart"]  # else the broadcast would go untested
    assert all(results[case.id]["same_start"] for results in ranks)


@pytest.mark.numerics
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_full_batch_training_every_step(ranks: list[dict], case: Case) -> None:
    """Over every step, within twice what plain torch moves from the full batch by averaging the two
    halves' gradients itself (measured on each rank: no data-parallel code is closer on every CPU)."""
    for rank, results in enumerate(ranks):
        errors, gaps = results[case.id]["errors"], results[case.id]["gaps"]
        assert max(errors) <= ORACLE_FACTOR * max(gaps), f"rank {rank}: {errors} vs oracle {gaps}"
