"""The swappable attention registry.

An attention implementation is a function `fn(q, k, v, is_causal, document_ids=None) -> out` on
q (B, Hq, T, D) and k, v (B, Hkv, T, D), out (B, Hq, T, D). Grouped-query attention: Hq is a multiple
of Hkv and query head h reads kv head h // (Hq // Hkv). Packed documents: `document_ids` (broadcastable
to q.shape[:-1], e.g. (B, 1, T)) holds a nondecreasing integer id per token, and a query sees only keys
of its own document (and, causal, at or before it). Functions with the older four-argument signature
`fn(q, k, v, is_causal)` still register and run: the model passes `document_ids` only when it has some.

Models resolve the function once, at construction or `set_attention` time, and keep it as an
attribute: forward never looks the name up, so torch.compile sees a fixed function and two models
using different implementations cannot affect each other.

Built in: `naive` (the CS336 math below), `sdpa` (PyTorch's fused kernel) and `flash` (the Triton
FlashAttention-2 op from `ops.flash_attn`, imported on first use so this module works without it).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cs336_basics.nn_utils import softmax

AttentionFn = Callable[..., Tensor]
"""`fn(q, k, v, is_causal[, document_ids])` -> out: see the module docstring."""


def scaled_dot_product_attention(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T / sqrt(d)) V over any leading dims; `mask` (..., Tq, Tk) is True where attention is kept."""
    scores = Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(scores, dim=-1) @ V  # (..., Tq, Dv)


def naive_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, document_ids: Tensor | None = None) -> Tensor:
    """The reference: every kv head repeated for its query group, then one dense boolean mask."""
    groups = query_groups(q, k)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)  # (..., Hq, Tk, D)
    return scaled_dot_product_attention(q, k, v, attention_mask(q, k, is_causal, document_ids))


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, document_ids: Tensor | None = None) -> Tensor:
    # enable_gqa: torch's kernels read each kv head for its whole query group, without a copy.
    gqa = query_groups(q, k) > 1
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    mask = attention_mask(q, k, is_causal, document_ids)  # (..., 1, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, document_ids: Tensor | None = None) -> Tensor:
    # ops.flash_attn is imported (and its ops registered) by get_attention; after that this import
    # is a dictionary lookup. Its flash_attn records `cs336.flash_attn` in compiled graphs. It takes
    # GQA and document ids itself, never materialising a mask.
    from ops.flash_attn import flash_attn

    if document_ids is None:
        return flash_attn(q, k, v, is_causal)
    return flash_attn(q, k, v, is_causal, document_ids=document_ids)


def query_groups(q: Tensor, k: Tensor) -> int:
    """Query heads per kv head, Hq / Hkv for q (..., Hq, T, D) and k (..., Hkv, T, D)."""
    if q.dim() < 3 or k.dim() < 3 or q.shape[-3] % k.shape[-3]:
        raise ValueError(f"q's heads must be a multiple of k's (grouped-query attention): q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, as (..., heads, seq, head_dim)")
    return q.shape[-3] // k.shape[-3]


def attention_mask(q: Tensor, k: Tensor, is_causal: bool, document_ids: Tensor | None) -> Tensor | None:
    """True where query i may see key j: j <= i if `is_causal`, and the same document if `document_ids`
    (..., T) is given; (Tq, Tk) or (..., Tq, Tk); None when every key is visible."""
    mask = None
    if is_causal:
        # Query i sees keys 0..i: the top-left-aligned lower triangle, as torch's sdpa defines is_causal.
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()  # (Tq, Tk)
    if document_ids is not None:
        if document_ids.shape[-1] != q.shape[-2] or q.shape[-2] != k.shape[-2]:
            raise ValueError(f"document_ids of shape {tuple(document_ids.shape)} needs one id per token of "
                             f"q {tuple(q.shape)} and k {tuple(k.shape)}")
        same = document_ids[..., :, None] == document_ids[..., None, :]  # (..., T, T)
        mask = same if mask is None else same & mask
    return mask


def takes_document_ids(fn: AttentionFn) -> bool:
    """Whether `fn` accepts a `document_ids` argument (registered functions may predate it)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return True
    return "document_ids" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


_REGISTRY: dict[str, AttentionFn] = {"naive": naive_attention, "sdpa": sdpa_attention, "flash": flash_attention}
# Implementations whose op is registered by importing a module, done lazily by get_attention.
_REQUIRED_MODULE: dict[str, str] = {"flash": "ops.flash_attn"}

# The valid names, kept in step with register_attention (usable as argparse `choices`).
ATTENTION_IMPLEMENTATIONS: list[str] = list(_REGISTRY)


def register_attention(name: str, fn: AttentionFn) -> None:
    """Make `fn(q, k, v, is_causal[, document_ids])` available as `attention=name`. Re-registering the
    same fn is a no-op."""
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
