"""Shared pieces of the FlashAttention tests (CPU, CUDA and Triton-interpreter suites)."""

from __future__ import annotations

import torch
from numerics import assert_within_oracle, eps, magnitude

from ops.flash_attn import FlashAttention2PyTorch, FlashAttention2Triton, attention_reference, flash_attn
from ops.flash_attn.reference import default_scale

# (leading dims, Nq, Nk, D): odd lengths, Nq != Nk, 0/1/2 leading dims, non-power-of-two D.
SHAPES = [
    ((), 37, 37, 16),
    ((2,), 65, 130, 32),
    ((2, 2), 100, 47, 64),
    ((1,), 1, 33, 80),
    ((2,), 77, 77, 128),
]

IMPLEMENTATIONS = {
    "op": lambda q, k, v, causal: flash_attn(q, k, v, causal),
    "triton_function": lambda q, k, v, causal: FlashAttention2Triton.apply(q, k, v, causal),
    "pytorch_function": lambda q, k, v, causal: FlashAttention2PyTorch.apply(q, k, v, causal),
}


def make_inputs(lead, n_q, n_k, d, dtype, device, generator, magnitude=1.0):
    def rand(n):
        x = torch.randn(*lead, n, d, generator=generator, dtype=torch.float32) * magnitude
        return x.to(device=device, dtype=dtype).requires_grad_()

    return rand(n_q), rand(n_k), rand(n_k)


def run_with_grads(fn, q, k, v, causal, grad_out):
    """(O, dQ, dK, dV) of fn on fresh leaves."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, causal)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def reference_with_grads(q, k, v, causal, grad_out, dtype=torch.float64, scale=None):
    """(O, dQ, dK, dV, L) of the naive math in `dtype` (float64 is the oracle)."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = attention_reference(q, k, v, causal, scale)
    out.backward(grad_out.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad, lse.detach()


def assert_close_to_reference(ours, q, k, v, causal, grad_out, scale=None):
    """Compare (O, dQ, dK, dV) with float64, within the oracle bound: at most 2x what the naive math
    done by plain PyTorch in the inputs' dtype errs on this machine (tests/numerics.py), plus one eps
    of the size of each result's terms (`term_sizes`)."""
    exact = reference_with_grads(q, k, v, causal, grad_out, scale=scale)
    low = reference_with_grads(q, k, v, causal, grad_out, dtype=q.dtype, scale=scale)
    sizes = term_sizes(q, k, v, causal, grad_out, scale)
    # The backward recomputes P = exp(S - L): L rounds by up to eps |L| (float32), a relative error of
    # P, so of each gradient's terms, that the naive softmax, exp(S - max) / sum, does not have.
    recompute = eps(torch.float32) * magnitude(exact[4])
    for i, (name, a, lo, b, size) in enumerate(zip(("O", "dQ", "dK", "dV"), ours, low, exact, sizes)):
        assert_within_oracle(name, a, lo, b, q.dtype, scale=size, extra=recompute * size if i else 0.0)


def term_sizes(q, k, v, causal, grad_out, scale=None):
    """Largest |.| of O, dQ, dK, dV computed from the absolute values of their terms, in float64:
    the magnitudes a rounding error is relative to (Higham's |a||b|). dQ of a query that sees one
    key is 0 exactly, a cancellation of dP - Delta: its rounding is relative to |dP| + |Delta|."""
    q, k, v, grad_out = (x.detach().double() for x in (q, k, v, grad_out))
    scale = default_scale(q.shape[-1]) if scale is None else scale
    out, lse = attention_reference(q, k, v, causal, scale)
    scores = (q @ k.transpose(-1, -2)) * scale  # (..., Nq, Nk)
    p = torch.exp(scores - lse[..., None])  # 0 where masked: exp(-inf)
    delta = (grad_out * out).sum(-1, keepdim=True).abs()  # (..., Nq, 1)
    ds = p * (grad_out.abs() @ v.abs().transpose(-1, -2) + delta)  # (..., Nq, Nk)
    sizes = (p @ v.abs(), scale * ds @ k.abs(), scale * ds.transpose(-1, -2) @ q.abs(),
             p.transpose(-1, -2) @ grad_out.abs())
    return [t.abs().max().item() if t.numel() else 0.0 for t in sizes]


def assert_forward_close(out, lse, q, k, v, causal, scale=None):
    """O and L of a forward kernel against float64, within the oracle bound: O against the naive math
    in the inputs' dtype, L against the naive math in float32 (the kernels' L is a float32 sum
    whatever the input dtype)."""
    exact_out, exact_lse = attention_reference(q.double(), k.double(), v.double(), causal, scale)
    low_out, _ = attention_reference(q, k, v, causal, scale)
    _, low_lse = attention_reference(q.float(), k.float(), v.float(), causal, scale)
    assert_within_oracle("O", out, low_out, exact_out, q.dtype)
    assert_within_oracle("L", lse, low_lse, exact_lse, torch.float32)
