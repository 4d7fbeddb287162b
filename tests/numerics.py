"""Tolerances derived on the machine that runs the test, never tuned to one CPU.

A floating-point result depends on the order of its sums, and that order changes with the CPU's
vector width (ATEN_CPU_CAPABILITY, oneDNN/MKL ISA), the thread count and the library version. So no
test here compares against a bare constant. A bound is one of:

- an **oracle** measured in the test: the same math in plain PyTorch, in the dtype under test, against
  float64 on this machine (`oracle_bound`). Ours may err at most ORACLE_FACTOR times as much, plus
  the rounding of the result itself to the dtype;
- an **error-analysis bound** written next to the test (`sum_bound`: a sum or dot product of length K
  in precision u errs by at most gamma_K = K u / (1 - K u) times the sum of the magnitudes).

Tests mark themselves `numerics` (see pyproject.toml); .ci/run reruns those under the CPU kernel
choices that change summation order (tools/numerics_matrix.sh).
"""

from __future__ import annotations

import torch

ORACLE_FACTOR = 2.0
"""Ours against float64 may err this many times what plain PyTorch's same math in the same dtype
errs: two implementations that round as often, in other orders, land within a small factor of each
other (FlashAttention's and Liger-Kernel's tests use the same rule, with 2)."""


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of `dtype`: twice the unit roundoff u."""
    return torch.finfo(dtype).eps


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if b.numel() else 0.0


def magnitude(t: torch.Tensor) -> float:
    """Largest absolute value (0 for an empty tensor)."""
    return t.double().abs().max().item() if t.numel() else 0.0


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest reference value (0 for empty tensors)."""
    return max_error(a, b) / max(magnitude(b), 1e-300) if b.numel() else 0.0


def oracle_bound(torch_error: float, dtype: torch.dtype, scale: float) -> float:
    """The most ours may err: ORACLE_FACTOR x `torch_error` (plain PyTorch's same math in `dtype`
    against float64, measured on this machine) + one eps of `scale` (the largest value of the result:
    storing it in `dtype` rounds, however exact the sums)."""
    return ORACLE_FACTOR * torch_error + eps(dtype) * scale


def assert_within_oracle(name: str, ours: torch.Tensor, low: torch.Tensor, exact: torch.Tensor,
                         dtype: torch.dtype | None = None, extra: float = 0.0, scale: float | None = None) -> None:
    """|ours - exact| <= oracle_bound(|low - exact|, scale) + `extra`: `low` is plain PyTorch's same
    math in `dtype` (default: ours's dtype), `exact` the float64 result. `scale` (default: the largest
    |exact|) is the size of the terms whose last rounding the bound allows: where the exact result
    cancels (a gradient that is 0), the caller passes the size of what cancelled. `extra` is an
    error-analysis term for what ours rounds and the oracle does not (the caller says why)."""
    dtype = dtype or ours.dtype
    scale = magnitude(exact) if scale is None else scale
    bound = oracle_bound(max_error(low, exact), dtype, scale) + extra
    error = max_error(ours, exact)
    assert error <= bound, f"{name}: error {error:.3e} > {bound:.3e}, torch {dtype} errs {max_error(low, exact):.3e}"


def gamma(k: int, dtype: torch.dtype) -> float:
    """gamma_k = k u / (1 - k u), u = eps / 2: the relative error bound of a k-term sum (Higham, Thm 3.1)."""
    ku = k * eps(dtype) / 2
    if ku >= 1:
        raise ValueError(f"gamma: k = {k} is too long a sum for {dtype} to bound")
    return ku / (1 - ku)


def sum_bound(k: int, dtype: torch.dtype, abs_sum: torch.Tensor | float) -> torch.Tensor | float:
    """Worst-case error of a length-k sum (or dot product) in `dtype`: gamma_k x sum of |terms|
    (for a dot product: |a| . |b|, computed in float64 by the caller)."""
    return gamma(k, dtype) * abs_sum
