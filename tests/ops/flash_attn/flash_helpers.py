"""Shared pieces of the FlashAttention tests (CPU, CUDA and Triton-interpreter suites)."""

from __future__ import annotations

import torch

from ops.flash_attn import FlashAttention2PyTorch, FlashAttention2Triton, attention_reference, flash_attn

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


def reference_with_grads(q, k, v, causal, grad_out, dtype=torch.float64):
    """(O, dQ, dK, dV, L) of the naive math in `dtype` (float64 is the oracle)."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = attention_reference(q, k, v, causal)
    out.backward(grad_out.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad, lse.detach()


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(ours, q, k, v, causal, grad_out, fp32_atol=2e-5):
    """Compare (O, dQ, dK, dV) with float64. Low precision: ours may err at most 2x the same math
    done in that dtype (plus a floor), the usual oracle for bf16/fp16 kernels."""
    exact = reference_with_grads(q, k, v, causal, grad_out)
    names = ("O", "dQ", "dK", "dV")
    if q.dtype == torch.float32:
        for name, a, b in zip(names, ours, exact):
            assert max_error(a, b) <= fp32_atol, f"{name}: max error {max_error(a, b):.2e}"
        return
    low = reference_with_grads(q, k, v, causal, grad_out, dtype=q.dtype)
    for name, a, lo, b in zip(names, ours, low, exact):
        allowed = 2 * max_error(lo, b) + 1e-3
        assert max_error(a, b) <= allowed, f"{name}: error {max_error(a, b):.2e} > allowed {allowed:.2e}"
