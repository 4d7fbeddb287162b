"""The Triton path of linear_cross_entropy (lce_rows_kernel and its launcher) on CPU tensors under the
Triton interpreter (TRITON_INTERPRET=1).

Collected only when that variable is set (tests/conftest.py); tests/ops/test_interpreter.py runs this
folder in a subprocess. Vocabulary tiles are 128 wide here and chunks a few tokens long, so these
small shapes cross tile edges, ragged last tiles, chunk and group edges.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_within_oracle, eps, gamma, max_error

from ops.linear_cross_entropy import launch, linear_cross_entropy
from ops.linear_cross_entropy.reference import reference_loss_and_grads
from ops.triton_utils import use_triton

VOCAB, DIM = 300, 32


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """7 tokens a chunk, 14 a group: every shape below spans several of both."""
    monkeypatch.setattr(launch, "chunk_rows", lambda vocab, itemsize: (7, 14))


def make_inputs(n, dtype, gen, magnitude=1.0, ignored=0.2):
    x = (torch.randn(n, DIM, generator=gen) * magnitude).to(dtype)
    weight = (torch.randn(VOCAB, DIM, generator=gen) / DIM**0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored] = -100
    return x, weight, targets


def run(x, weight, targets, reduction, grad):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(x, weight, targets, reduction=reduction)
    loss.backward(grad)
    return loss.detach(), x.grad, weight.grad


def test_cpu_tensors_take_the_triton_path():
    assert use_triton(torch.empty(1))


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [5, 14, 40])
def test_matches_float64(n, reduction, dtype):
    gen = torch.Generator().manual_seed(n)
    x, weight, targets = make_inputs(n, dtype, gen)
    grad = torch.rand(targets.shape if reduction == "none" else (), generator=gen) + 0.5
    ours = run(x, weight, targets, reduction, grad)
    exact = reference_loss_and_grads(x, weight, targets, -100, reduction, grad)
    torch_low = reference_loss_and_grads(x, weight, targets, -100, reduction, grad, dtype=dtype)
    for name, a, b, low in zip(("loss", "dx", "dweight"), ours, exact, torch_low):
        # The interpreter truncates float32 -> bf16 casts (the GPU rounds): one eps more than rounding.
        truncation = eps(dtype) * b.abs().max().item() if dtype == torch.bfloat16 else 0.0
        assert_within_oracle(name, a, low, b, dtype, extra=truncation)


def test_noncontiguous_inputs():
    """x with interleaved tokens and W stored transposed reach cuBLAS (here: torch.mm) as they are."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 11, DIM, generator=gen).transpose(0, 1)  # (11, 3, D)
    weight = (torch.randn(DIM, VOCAB, generator=gen) / DIM**0.5).T  # (V, D), strides (1, V)
    targets = torch.randint(0, VOCAB, (11, 3), generator=gen)
    ours = run(x, weight, targets, "sum", torch.tensor(1.0))
    exact = reference_loss_and_grads(x, weight, targets, -100, "sum")
    low = reference_loss_and_grads(x, weight, targets, -100, "sum", dtype=torch.float32)
    for name, a, lo, b in zip(("loss", "dx", "dweight"), ours, low, exact):
        assert_within_oracle(name, a, lo, b)


@pytest.mark.numerics
def test_large_logits_and_all_ignored():
    gen = torch.Generator().manual_seed(3)
    x, weight, targets = make_inputs(23, torch.float32, gen, magnitude=100.0)
    ours = run(x, weight, targets, "mean", torch.tensor(1.0))
    exact = reference_loss_and_grads(x, weight, targets, -100, "mean")
    low = reference_loss_and_grads(x, weight, targets, -100, "mean", dtype=torch.float32)
    assert all(torch.isfinite(t).all() for t in ours)
    for name, a, lo, b in zip(("loss", "dx", "dweight"), ours, low, exact):
        assert_within_oracle(name, a, lo, b)
    loss, dx, dw = run(x, weight, torch.full_like(targets, -100), "mean", torch.tensor(1.0))
    assert loss.item() == 0.0 and not dx.any() and not dw.any()


def rows_bounds(logits: torch.Tensor) -> tuple[float, float]:
    """Error bounds of the kernel's float32 loss and dlogits for these logits (u = eps / 2, M = max |z|):
    each exp argument (z - m) * log2(e) rounds twice, by at most 2u|z - m| <= 4uM: a relative 4uM on
    every term of the V-term sum, which itself adds gamma_V; log and the sums m + log s and lse - z
    round by u|.| each. dlogits = exp(z - lse) <= 1 carries the loss's error in its argument, the
    rounding of z - lse and of the product by log2(e) (2u * 2M) and of exp2 (u)."""
    u, big = eps(torch.float32) / 2, logits.abs().max().item()
    loss = 4 * u * big + gamma(VOCAB, torch.float32) + u * (1 + 2 * (big + math.log(VOCAB)))
    return loss, loss + 4 * u * big + u


@pytest.mark.parametrize("write_grad", [False, True])
def test_kernel_rows(write_grad):
    """The kernel alone: losses and dlogits of one chunk; a target out of [0, V) (what an unchecked
    CUDA call can pass) is treated as ignored, without a stray load or store."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(9, VOCAB, generator=gen) * 30  # (R, V)
    targets = torch.tensor([0, 299, 5, -100, 300, -7, 17, 128, 127])
    scale = torch.rand(9, generator=gen)
    losses, dlogits = torch.empty(9), torch.full((9, VOCAB), float("nan"))
    launch.launch_rows(logits, dlogits if write_grad else None, targets, scale, losses, -100)
    valid = (targets >= 0) & (targets < VOCAB)
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    safe = torch.where(valid, targets, 0)
    expected = torch.where(valid, -log_probs.gather(1, safe[:, None]).squeeze(1), 0.0)
    loss_bound, grad_bound = rows_bounds(logits)
    assert max_error(losses, expected) <= loss_bound
    if write_grad:
        onehot = F.one_hot(safe, VOCAB).double()
        expected = (log_probs.exp() - onehot) * (scale.double() * valid)[:, None]
        assert max_error(dlogits, expected) <= grad_bound * scale.max().item()
