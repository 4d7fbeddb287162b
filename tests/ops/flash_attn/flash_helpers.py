"""Shared pieces of the FlashAttention tests (CPU, CUDA and Triton-interpreter suites)."""

from __future__ import annotations

import torch
from numerics import assert_within_oracle, eps, magnitude

from ops.flash_attn import FlashAttention2PyTorch, FlashAttention2Triton, attention_reference, flash_attn
from ops.flash_attn.reference import attention_scores, default_scale, repeat_kv_heads
from ops.flash_attn.tiles import precision

# A float32 product as three TF32 products (the CUDA kernels' "tf32x3", ops/flash_attn/tiles.py):
# a = a_hi + a_lo + r_a with a_hi, a_lo rounded to TF32's 11 significant bits, so |r_a| <= 2^-22 |a|;
# a_hi b_hi + a_hi b_lo + a_lo b_hi drops a_lo b_lo and the residuals' products: at most 3 * 2^-22 |a b|.
# Plain float32 math rounds each product to 2^-24: where its result is exact (a one-hot softmax, whose
# O is one row of V) the oracle errs 0 and only this term bounds the kernel's products.
TF32X3_PRODUCT_ERROR = 3 * 2.0**-22


def product_error(q: torch.Tensor) -> float:
    """Relative error of one product on the path `q` takes, beyond float32's own rounding."""
    if q.is_cuda and precision(q.dtype, q.shape[-1]) == "tf32x3":
        return TF32X3_PRODUCT_ERROR
    return 0.0

# (leading dims, Nq, Nk, D): odd lengths, Nq != Nk, 0/1/2 leading dims, non-power-of-two D.
SHAPES = [
    ((), 37, 37, 16),
    ((2,), 65, 130, 32),
    ((2, 2), 100, 47, 64),
    ((1,), 1, 33, 80),
    ((2,), 77, 77, 128),
]

# Each takes (q, k, v, causal) and optionally document_ids.
IMPLEMENTATIONS = {
    "op": lambda q, k, v, causal, ids=None: flash_attn(q, k, v, causal, document_ids=ids),
    "triton_function": lambda q, k, v, causal, ids=None: FlashAttention2Triton.apply(q, k, v, causal, None, ids),
    "pytorch_function": lambda q, k, v, causal, ids=None: FlashAttention2PyTorch.apply(q, k, v, causal, None, ids),
}


def make_inputs(lead, n_q, n_k, d, dtype, device, generator, magnitude=1.0, kv_heads=None):
    """q (*lead, Nq, D), k and v (*lead, Nk, D), or with `kv_heads` (*lead[:-1], kv_heads, Nk, D)."""
    kv_lead = lead if kv_heads is None else (*lead[:-1], kv_heads)

    def rand(dims, n):
        x = torch.randn(*dims, n, d, generator=generator, dtype=torch.float32) * magnitude
        return x.to(device=device, dtype=dtype).requires_grad_()

    return rand(lead, n_q), rand(kv_lead, n_k), rand(kv_lead, n_k)


def run_with_grads(fn, q, k, v, causal, grad_out, document_ids=None):
    """(O, dQ, dK, dV) of fn on fresh leaves."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, causal) if document_ids is None else fn(q, k, v, causal, document_ids)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def reference_with_grads(q, k, v, causal, grad_out, dtype=torch.float64, scale=None, document_ids=None):
    """(O, dQ, dK, dV, L) of the naive math in `dtype` (float64 is the oracle)."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = attention_reference(q, k, v, causal, scale, document_ids)
    out.backward(grad_out.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad, lse.detach()


def assert_close_to_reference(ours, q, k, v, causal, grad_out, scale=None, document_ids=None):
    """Compare (O, dQ, dK, dV) with float64, within the oracle bound: at most 2x what the naive math
    done by plain PyTorch in the inputs' dtype errs on this machine (tests/numerics.py), plus one eps
    of the size of each result's terms (`term_sizes`). Grouped-query heads and documents included:
    the naive math repeats k, v per query head and masks other documents. An O of None is not
    compared (a backward kernel returns only the gradients)."""
    exact = reference_with_grads(q, k, v, causal, grad_out, scale=scale, document_ids=document_ids)
    low = reference_with_grads(q, k, v, causal, grad_out, dtype=q.dtype, scale=scale, document_ids=document_ids)
    sizes = term_sizes(q, k, v, causal, grad_out, scale, document_ids)
    # The backward recomputes P = exp(S - L): L rounds by up to eps |L| (float32), a relative error of
    # P, so of each gradient's terms, that the naive softmax, exp(S - max) / sum, does not have.
    recompute = eps(torch.float32) * magnitude(exact[4])
    products = product_error(q)
    for i, (name, a, lo, b, size) in enumerate(zip(("O", "dQ", "dK", "dV"), ours, low, exact, sizes)):
        if a is not None:
            assert_within_oracle(name, a, lo, b, q.dtype, scale=size, extra=(recompute * size if i else 0.0)
                                 + products * size)


def term_sizes(q, k, v, causal, grad_out, scale=None, document_ids=None):
    """Largest |.| of O, dQ, dK, dV computed from the absolute values of their terms, in float64:
    the magnitudes a rounding error is relative to (Higham's |a||b|). dQ of a query that sees one
    key is 0 exactly, a cancellation of dP - Delta: its rounding is relative to |dP| + |Delta|.
    With grouped-query heads a kv head's dK and dV sum the terms of all its query heads."""
    q, k, v, grad_out = (x.detach().double() for x in (q, k, v, grad_out))
    scale = default_scale(q.shape[-1]) if scale is None else scale
    out, lse = attention_reference(q, k, v, causal, scale, document_ids)
    scores = attention_scores(q, k, causal, scale, document_ids)  # (..., Hq, Nq, Nk), -inf where masked
    p = torch.exp(scores - lse[..., None])  # 0 where masked: exp(-inf)
    k_abs, v_abs = repeat_kv_heads(q, k).abs(), repeat_kv_heads(q, v).abs()  # (..., Hq, Nk, D)
    delta = (grad_out * out).sum(-1, keepdim=True).abs()  # (..., Hq, Nq, 1)
    ds = p * (grad_out.abs() @ v_abs.transpose(-1, -2) + delta)  # (..., Hq, Nq, Nk)
    sizes = (p @ v_abs, scale * ds @ k_abs, _sum_groups(scale * ds.transpose(-1, -2) @ q.abs(), k),
             _sum_groups(p.transpose(-1, -2) @ grad_out.abs(), k))
    return [t.abs().max().item() if t.numel() else 0.0 for t in sizes]


def _sum_groups(x, kv):
    """x (..., Hq, N, D) summed over each group of query heads sharing a kv head: (..., Hkv, N, D)."""
    if x.shape[:-2] == kv.shape[:-2]:
        return x
    return x.unflatten(-3, (kv.shape[-3], -1)).sum(-3)


def assert_forward_close(out, lse, q, k, v, causal, scale=None, document_ids=None):
    """O and L of a forward kernel against float64, within the oracle bound: O against the naive math
    in the inputs' dtype, L against the naive math in float32 (the kernels' L is a float32 sum
    whatever the input dtype); O also within the kernels' product error (product_error) of its terms."""
    ids = document_ids
    exact_out, exact_lse = attention_reference(q.double(), k.double(), v.double(), causal, scale, ids)
    low_out, _ = attention_reference(q, k, v, causal, scale, ids)
    _, low_lse = attention_reference(q.float(), k.float(), v.float(), causal, scale, ids)
    o_terms = term_sizes(q, k, v, causal, torch.zeros_like(q), scale, ids)[0]  # max of P |V|
    assert_within_oracle("O", out, low_out, exact_out, q.dtype, extra=product_error(q) * o_terms)
    assert_within_oracle("L", lse, low_lse, exact_lse, torch.float32)
