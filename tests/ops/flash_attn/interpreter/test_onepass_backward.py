"""The single-pass backward (launch_onepass) on CPU tensors under the Triton interpreter.

Collected only with TRITON_INTERPRET=1 (tests/conftest.py). Tiles are 16x16 here, so these small
shapes cross tile edges, hit ragged last tiles of both queries and keys, and the causal diagonal.
"""

import pytest
import torch
from flash_helpers import assert_close_to_reference, reference_with_grads
from numerics import assert_within_oracle

from ops.flash_attn import launch
from ops.flash_attn.launch_onepass import flash_backward_onepass

# (leading dims, Nq, Nk, D): Nq != Nk, lengths that are not multiples of 16, D = 80 padded to 128.
SHAPES = [((2,), 37, 37, 16), ((1,), 20, 45, 80), ((), 50, 19, 32)]


def _inputs(lead, n_q, n_k, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*lead, n, d, generator=gen).to(dtype) for n in (n_q, n_k, n_k))
    return q, k, v, torch.randn(q.shape, generator=gen).to(dtype)


def _onepass(q, k, v, causal, grad_out):
    """(O, dQ, dK, dV): the Triton forward, then the one-pass backward."""
    scale = q.shape[-1] ** -0.5
    out, lse = launch.flash_forward(q, k, v, causal, scale)
    return (out, *flash_backward_onepass(grad_out, q, k, v, out, lse, causal, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_onepass_matches_float64(shape, causal, dtype, bf16_interpreter):
    q, k, v, grad_out = _inputs(*shape, dtype)
    assert_close_to_reference(_onepass(q, k, v, causal, grad_out), q, k, v, causal, grad_out)


@pytest.mark.parametrize("causal", [False, True])
def test_onepass_matches_two_pass(causal):
    q, k, v, grad_out = _inputs((2,), 37, 29, 80, torch.float32, seed=1)
    out, lse = launch.flash_forward(q, k, v, causal, 0.3)
    onepass = flash_backward_onepass(grad_out, q, k, v, out, lse, causal, 0.3)
    two_pass = launch.flash_backward(grad_out, q, k, v, out, lse, causal, 0.3)
    exact = reference_with_grads(q, k, v, causal, grad_out)
    for name, a, b, e in zip(("dQ", "dK", "dV"), onepass, two_pass, exact[1:4]):
        assert_within_oracle(name, a, b, e)  # one-pass errs at most 2x what the two-pass kernels do


def test_any_strides():
    """q, k, v with heads interleaved in rows, dO expanded from a scalar (all strides 0)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 2, 24, generator=gen).transpose(1, 2) for n in (21, 35, 35))  # (1, 2, N, 24)
    grad_out = torch.tensor(0.7).expand(q.shape)
    assert_close_to_reference(_onepass(q, k, v, True, grad_out), q, k, v, True, grad_out)


# That overflow is computed, then masked: numpy warns about it.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_padded_keys_do_not_poison_dq():
    """Scores near -100: L is so low that P = exp(-L) of a padded key (k = 0) overflows float32,
    so dQ stays finite only if the ragged key tile masks its padded keys."""
    gen = torch.Generator().manual_seed(3)
    q = -5 + 0.1 * torch.randn(1, 24, 16, generator=gen)
    k = 5 + 0.1 * torch.randn(1, 19, 16, generator=gen)
    v = torch.randn(1, 19, 16, generator=gen)
    grad_out = torch.randn(q.shape, generator=gen)
    _, dq, dk, dv = _onepass(q, k, v, False, grad_out)
    exact = reference_with_grads(q, k, v, False, grad_out)
    low = reference_with_grads(q, k, v, False, grad_out, dtype=torch.float32)
    for name, a, lo, b in zip(("dQ", "dK", "dV"), (dq, dk, dv), low[1:4], exact[1:4]):
        assert_within_oracle(name, a, lo, b)
