"""cs336_basics.nn_utils against torch.nn.functional and torch.nn.utils."""

import pytest
import torch
import torch.nn.functional as F
from numerics import eps, gamma

from cs336_basics.nn_utils import check_positive_int, clip_gradient, cross_entropy, log_softmax, softmax


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("scale", [1.0, 1e4])  # 1e4: exp overflows unless the max is subtracted
def test_softmax_and_log_softmax_match_torch(gen, dim, scale):
    x = torch.randn(4, 5, 6, generator=gen) * scale
    torch.testing.assert_close(softmax(x, dim=dim), F.softmax(x, dim=dim))
    torch.testing.assert_close(log_softmax(x, dim=dim), F.log_softmax(x, dim=dim))


@pytest.mark.parametrize("shape", [(8, 11), (2, 3, 11)])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_cross_entropy_matches_torch(gen, shape, scale):
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    targets = torch.randint(shape[-1], shape[:-1], generator=gen)
    loss = cross_entropy(logits, targets)
    expected = F.cross_entropy(logits.flatten(0, -2), targets.flatten())
    assert loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)


def test_cross_entropy_upcasts_bf16(gen):
    logits = torch.randn(16, 100, generator=gen).bfloat16()
    targets = torch.randint(100, (16,), generator=gen)
    loss = cross_entropy(logits, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), targets))


def test_cross_entropy_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def make_params_with_grads(gen: torch.Generator, grad_scale: float) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(3, 4), (5,), (2, 2, 2)]]
    for p in params[:2]:  # the last parameter has no gradient and must be skipped
        p.grad = torch.randn(p.shape, generator=gen) * grad_scale
    return params


@pytest.mark.parametrize("grad_scale", [10.0, 1e-3])  # above and below max_norm
def test_clip_gradient_matches_torch(gen, grad_scale):
    ours = make_params_with_grads(gen, grad_scale)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for mine, their in zip(ours, theirs):
        their.grad = None if mine.grad is None else mine.grad.clone()
    total_norm = clip_gradient(ours, max_norm=1.0)
    expected_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0)
    assert isinstance(total_norm, torch.Tensor)
    torch.testing.assert_close(total_norm, expected_norm)
    for mine, their in zip(ours, theirs):
        assert (mine.grad is None) == (their.grad is None)
        if mine.grad is not None:
            torch.testing.assert_close(mine.grad, their.grad)


def test_clip_gradient_result_norm_and_edge_cases(gen):
    params = make_params_with_grads(gen, grad_scale=10.0)
    before = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params if p.grad is not None])).item()
    clip_gradient(iter(params), max_norm=0.5)  # a generator works too
    grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    clipped = torch.linalg.vector_norm(grads)
    # bound: the scale is 0.5 / (norm + 1e-6) (clip_gradient's eps); each norm of n terms errs by
    # gamma_n relative and the scaling rounds each element by u: within that of 0.5.
    bound = 0.5 * (1e-6 / before + 2 * gamma(grads.numel(), torch.float32) + eps(torch.float32))
    assert abs(clipped.item() - 0.5) <= bound
    assert clip_gradient([torch.nn.Parameter(torch.ones(2))], max_norm=1.0).item() == 0.0  # no grads at all
    with pytest.raises(ValueError, match="max_norm"):
        clip_gradient(params, max_norm=0.0)


def test_check_positive_int_names_the_argument():
    check_positive_int(a=1, b=2)
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            check_positive_int(batch_size=bad)
