"""Packed documents: per-token document ids -> the key range each token may attend to.

Why per-token ids and not cumulative sequence lengths (FlashAttention's varlen API): our batches are
fixed (B, N) rows, and a row holds several documents. Ids have the shape of the tokens, so they trace
through torch.compile with static shapes and no host sync (cu_seqlens have a data-dependent length
per batch, and the varlen kernels also need the longest document on the host). They are what
FlexAttention's document mask takes too.

The kernels never read the ids: each token t gets [start[t], end[t]), the positions of its document
(a maximal run of equal ids). Query i sees key j iff start[i] <= j < end[i] (and j <= i when
causal); this is symmetric, so a key's own range also says which queries see it. A query tile
[i0, i1) then needs keys from start[i0] to end[i1 - 1] (causal: i1), and a key tile [j0, j1) the
queries from start[j0] (causal: j0) to end[j1 - 1]: tiles outside lie wholly across documents and
are skipped, as causal tiles above the diagonal are.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

ID_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


def check_document_ids(document_ids: Tensor, q: Tensor, k: Tensor, *, check_values: bool = True) -> None:
    """Raise TypeError/ValueError naming `document_ids` unless it is an integer tensor on q's device,
    broadcastable to q.shape[:-1] (one id per query token: e.g. (B, 1, N) for q (B, H, N, D), shared by
    the heads; or (N,), one layout for every row; right-aligned as in broadcasting, so not (B, N)),
    with Nq == Nk, nondecreasing along the sequence (`check_values`: reads the values, one host sync)."""
    if not isinstance(document_ids, Tensor):
        raise TypeError(f"flash_attn: document_ids must be a torch.Tensor or None, got {type(document_ids).__name__}")
    if document_ids.dtype not in ID_DTYPES:
        raise TypeError(f"flash_attn: document_ids must be an integer tensor, got dtype {document_ids.dtype}")
    if document_ids.device != q.device:
        raise ValueError(f"flash_attn: document_ids is on {document_ids.device}, q on {q.device}")
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"flash_attn: document_ids needs as many keys as queries (self-attention over packed "
                         f"rows), got Nq={q.shape[-2]} and Nk={k.shape[-2]}")
    rows = q.shape[:-1]
    if (document_ids.dim() == 0 or document_ids.shape[-1] != rows[-1] or document_ids.dim() > len(rows)
            or not _broadcasts(document_ids.shape, rows)):
        raise ValueError(f"flash_attn: document_ids of shape {tuple(document_ids.shape)} must broadcast to "
                         f"q.shape[:-1] = {tuple(rows)} with its last dim the sequence")
    if check_values and document_ids.shape[-1] > 1 and document_ids.numel() > 0 and not _CHECKED.get(document_ids):
        if bool((document_ids[..., 1:] < document_ids[..., :-1]).any()):
            raise ValueError("flash_attn: document_ids must be nondecreasing along the sequence (each document "
                             "a contiguous run of equal ids)")
        _CHECKED.put(document_ids, True)


class PerTensorMemo:
    """Values remembered per tensor object while it lives unmodified.

    A model passes one ids tensor to every layer's forward and (saved) backward: remembering what was
    derived from it (found nondecreasing: one host sync; its bounds: eight small kernels) once per step
    spares doing it twice per layer. An entry holds only for the same tensor object at the same
    `_version` (an in-place write bumps it) and the same `key`, and goes away with the tensor. Inference
    tensors (no version counter) and traced calls are never remembered."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, object, object]] = {}

    def get(self, tensor: Tensor, key: object = None) -> object | None:
        if not _rememberable(tensor):
            return None
        entry = self._entries.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[1] != tensor._version or entry[2] != key:
            return None
        return entry[3]

    def put(self, tensor: Tensor, value: object, key: object = None) -> None:
        if _rememberable(tensor):
            slot = id(tensor)
            ref = weakref.ref(tensor, lambda _, slot=slot: self._entries.pop(slot, None))
            self._entries[slot] = (ref, tensor._version, key, value)


def _rememberable(tensor: Tensor) -> bool:
    return not (torch.compiler.is_compiling() or tensor.is_inference())


_CHECKED = PerTensorMemo()  # ids whose values were read and found nondecreasing
_BOUNDS = PerTensorMemo()  # ids -> document_bounds, keyed by the rows they were expanded to


def _broadcasts(shape: torch.Size, target: torch.Size) -> bool:
    # `s == 1 or s == t`, not `s in (1, t)`: dynamo (torch 2.11) answers False for an int `in` a tuple
    # holding a symbolic size equal to it (q's dims once dynamic, the ids' not).
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def document_bounds(document_ids: Tensor, rows: torch.Size) -> tuple[Tensor, Tensor]:
    """(start, end), each (R, N) int32 contiguous with R = prod(rows[:-1]): for each query row's
    token t, the first position of its document and one past its last. `rows` is q.shape[:-1].
    Remembered per ids tensor (PerTensorMemo): the callers never write into the bounds."""
    bounds = _BOUNDS.get(document_ids, tuple(rows))
    if bounds is None:
        bounds = _compute_bounds(document_ids, rows)
        _BOUNDS.put(document_ids, bounds, tuple(rows))
    return bounds


def _compute_bounds(document_ids: Tensor, rows: torch.Size) -> tuple[Tensor, Tensor]:
    n = rows[-1]
    ids = document_ids.reshape(-1, n)  # (R0, N) over the ids' own leading dims
    positions = torch.arange(n, device=ids.device, dtype=torch.int32)  # (N,)
    new_doc = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)  # (R0, N): a document starts here
    new_doc[:, 1:] = ids[:, 1:] != ids[:, :-1]
    start = torch.where(new_doc, positions, 0).cummax(dim=-1).values  # (R0, N): the latest start so far
    last = torch.ones_like(new_doc)  # (R0, N): a document ends here
    last[:, :-1] = new_doc[:, 1:]
    # The earliest end at or after t: a cummax over the reversed row of (n - 1 - end position).
    flipped = torch.where(last, n - 1 - positions, 0).flip(-1).cummax(dim=-1).values.flip(-1)
    end = (n - flipped).to(torch.int32)  # (R0, N)
    start = start.to(torch.int32)
    leading = document_ids.shape[:-1]
    start, end = start.reshape(*leading, n), end.reshape(*leading, n)
    return (start.expand(rows).reshape(-1, n).contiguous(), end.expand(rows).reshape(-1, n).contiguous())


def document_mask(document_ids: Tensor) -> Tensor:
    """(..., Nq, Nk) bool, True where query i and key j are in the same document (for references)."""
    return document_ids[..., :, None] == document_ids[..., None, :]
