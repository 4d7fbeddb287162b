"""cs336_basics.optimizer: AdamW trajectories against torch.optim.AdamW, and the cosine schedule."""

import copy
import math

import pytest
import torch
from numerics import assert_within_oracle

from cs336_basics.optimizer import AdamW, get_cosine_lr


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in [(6, 5), (5,), (3, 2, 2)]]


def loss_fn(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """A non-quadratic loss whose data changes every step, so the moments see varied gradients."""
    gen = torch.Generator().manual_seed(100 + step)
    return sum((torch.randn(p.shape, generator=gen).to(p.dtype) * p).sin().sum() + p.pow(2).sum() for p in params)


def run(optimizer_cls, steps: int = 10, group_lrs: tuple[float, ...] | None = None, dtype=torch.float32, **kwargs):
    params = make_params(dtype=dtype)
    groups = params if group_lrs is None else [{"params": [p], "lr": lr} for p, lr in zip(params, group_lrs)]
    optimizer = optimizer_cls(groups, **kwargs)
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(params, step).backward()
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(lr=1e-2, weight_decay=0.1),
        dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0),
    ],
)
def test_adamw_matches_torch_trajectory(kwargs):
    assert_same_trajectory(**kwargs)


def assert_same_trajectory(**kwargs) -> None:
    """Ours in float32 errs from torch's AdamW in float64 at most twice what torch's in float32 does
    (foreach=False: torch's single-tensor loop, the same op order as ours)."""
    ours, _ = run(AdamW, **kwargs)
    theirs, _ = run(torch.optim.AdamW, foreach=False, **kwargs)
    exact, _ = run(torch.optim.AdamW, foreach=False, dtype=torch.float64, **kwargs)
    for i, (mine, their, e) in enumerate(zip(ours, theirs, exact)):
        assert_within_oracle(f"param {i}", mine, their, e)


def test_adamw_param_groups_use_their_own_lr():
    assert_same_trajectory(group_lrs=(1e-1, 1e-2, 0.0))
    ours, _ = run(AdamW, group_lrs=(1e-1, 1e-2, 0.0))
    assert torch.equal(ours[2], make_params()[2])  # lr=0 leaves it untouched


def test_adamw_state_and_state_dict_round_trip():
    params, optimizer = run(AdamW, steps=3, lr=1e-2)
    state = optimizer.state[params[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["step"] == 3
    # Resuming from a saved state dict continues exactly like never stopping. (deepcopy stands in for
    # torch.save/load: load_state_dict alone would share the moment tensors between the two optimizers.)
    resumed = AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for opt in (optimizer, resumed):
        group_params = opt.param_groups[0]["params"]
        opt.zero_grad()
        loss_fn(group_params, step=3).backward()
        opt.step()
    for mine, their in zip(resumed.param_groups[0]["params"], params):
        torch.testing.assert_close(mine, their, atol=0, rtol=0)


def test_adamw_closure_and_skips_params_without_grad():
    params = make_params()
    optimizer = AdamW(params)
    before = params[1].detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = params[0].pow(2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure) > 0
    torch.testing.assert_close(params[1], before, atol=0, rtol=0)
    assert params[1] not in optimizer.state


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(betas=(-0.1, 0.9)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_adamw_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW(make_params(), **kwargs)


def test_cosine_lr_values():
    # The CS336 reference schedule: warm-up 7, cycle 21, max 1, min 0.1.
    expected = [
        0, 0.14285714285714285, 0.2857142857142857, 0.42857142857142855, 0.5714285714285714,
        0.7142857142857143, 0.8571428571428571, 1.0, 0.9887175604818206, 0.9554359905560885,
        0.9018241671106134, 0.8305704108364301, 0.7452476826029011, 0.6501344202803414, 0.55,
        0.44986557971965857, 0.3547523173970989, 0.26942958916356996, 0.19817583288938662,
        0.14456400944391146, 0.11128243951817937, 0.1, 0.1, 0.1, 0.1,
    ]
    actual = [get_cosine_lr(it, max_lr=1.0, min_lr=0.1, warmup_iters=7, cosine_cycle_iters=21) for it in range(25)]
    assert actual == pytest.approx(expected)


def test_cosine_lr_shape():
    lrs = [get_cosine_lr(it, max_lr=3e-4, min_lr=3e-5, warmup_iters=10, cosine_cycle_iters=110) for it in range(130)]
    assert lrs[0] == 0 and lrs[10] == pytest.approx(3e-4) and lrs[60] == pytest.approx(0.5 * (3e-4 + 3e-5))
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # increasing during warm-up
    assert all(a > b for a, b in zip(lrs[10:110], lrs[11:111]))  # decreasing during the cosine
    assert lrs[110:] == [pytest.approx(3e-5)] * 20
    # No warm-up and a zero-length cycle are both well defined.
    assert get_cosine_lr(0, 1.0, 0.1, warmup_iters=0, cosine_cycle_iters=10) == 1.0
    assert get_cosine_lr(5, 1.0, 0.1, warmup_iters=5, cosine_cycle_iters=5) == 1.0
    assert math.isclose(get_cosine_lr(6, 1.0, 0.1, warmup_iters=5, cosine_cycle_iters=5), 0.1)
    with pytest.raises(ValueError, match="cosine_cycle_iters"):
        get_cosine_lr(0, 1.0, 0.1, warmup_iters=10, cosine_cycle_iters=5)
