"""The swappable attention registry.

An attention implementation is a function `fn(q, k, v, is_causal) -> out` on (B, H, T, D) tensors.
Models resolve the function once, at construction or `set_attention` time, and keep it as an
attribute: forward never looks the name up, so torch.compile sees a fixed function and two models
using different implementations cannot affect each other.

Built in: `naive` (the CS336 math below), `sdpa` (PyTorch's fused kernel) and `flash` (the Triton
FlashAttention-2 op from `ops.flash_attn`, imported on first use so this module works without it).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cs336_basics.nn_utils import softmax

AttentionFn = Callable[[Tensor, Tensor, Tensor, bool], Tensor]


def scaled_dot_product_attention(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T / sqrt(d)) V over any leading dims; `mask` (..., Tq, Tk) is True where attention is kept."""
    scores = Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(scores, dim=-1) @ V  # (..., Tq, Dv)


def naive_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
    mask = None
    if is_causal:
        # Query i sees keys 0..i: the top-left-aligned lower triangle, as torch's sdpa defines is_causal.
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()  # (Tq, Tk)
    return scaled_dot_product_attention(q, k, v, mask)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
    # ops.flash_attn is imported (and its ops registered) by get_attention; after that this import
    # is a dictionary lookup. Its flash_attn records `cs336.flash_attn` in compiled graphs.
    from ops.flash_attn import flash_attn

    return flash_attn(q, k, v, is_causal)


_REGISTRY: dict[str, AttentionFn] = {"naive": naive_attention, "sdpa": sdpa_attention, "flash": flash_attention}
# Implementations whose op is registered by importing a module, done lazily by get_attention.
_REQUIRED_MODULE: dict[str, str] = {"flash": "ops.flash_attn"}

# The valid names, kept in step with register_attention (usable as argparse `choices`).
ATTENTION_IMPLEMENTATIONS: list[str] = list(_REGISTRY)


def register_attention(name: str, fn: AttentionFn) -> None:
    """Make `fn(q, k, v, is_causal)` available as `attention=name`. Re-registering the same fn is a no-op."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {fn!r}")
    if _REGISTRY.get(name, fn) is not fn:
        raise ValueError(f"name {name!r} is already registered to {_REGISTRY[name]!r}")
    if name not in _REGISTRY:
        ATTENTION_IMPLEMENTATIONS.append(name)
    _REGISTRY[name] = fn


def get_attention(name: str) -> AttentionFn:
    """The implementation registered as `name`, importing the module that provides its op if needed."""
    if name not in _REGISTRY:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")
    module = _REQUIRED_MODULE.get(name)
    if module is not None:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(f"attention={name!r} needs module {module!r}, which failed to import: {error}") from error
    return _REGISTRY[name]
