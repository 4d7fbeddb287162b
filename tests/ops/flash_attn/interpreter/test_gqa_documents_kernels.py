"""Grouped-query attention and packed documents in the tl kernels, each launcher on CPU tensors under
the Triton interpreter (TRITON_INTERPRET=1; tiles are 16x16 here).

The reference is flash_helpers' (attention_reference: K/V heads repeated for their group of query
heads, keys of other documents masked by id equality). Bounds are the oracle's (tests/numerics.py):
at most 2x what that math errs in the inputs' dtype against float64.
"""

import pytest
import torch
from flash_helpers import assert_close_to_reference, assert_forward_close

from ops.flash_attn.documents import document_bounds
from ops.flash_attn.launch import flash_backward, flash_forward
from ops.flash_attn.launch_onepass import flash_backward_onepass
from ops.flash_attn.launch_tma import flash_forward_tma
from ops.flash_attn.tiles import Blocks, KernelConfigs

# (batch, query heads, K/V heads, Nq, Nk, D, documents): groups of 1, 2 and 4, multi-query (one K/V
# head), odd lengths, Nq != Nk (no documents then: they need Nq == Nk).
CASES = [
    (2, 4, 2, 37, 37, 16, None),
    (1, 4, 2, 20, 45, 32, None),
    (1, 4, 1, 33, 33, 64, "single"),
    (1, 2, 2, 70, 70, 16, "mixed"),
    (1, 4, 1, 100, 100, 32, "mixed"),
    (1, 4, 2, 50, 50, 16, "per_head"),
]
# Document lengths, repeated to fill a row: documents of one token, documents that cover whole
# 16-key tiles (their unmasked path), documents across tile edges.
PATTERNS = ([1, 3, 40, 1, 25, 17], [30, 1, 1, 38, 5])
FORWARDS = {"pointer": flash_forward, "tma": flash_forward_tma}
BACKWARDS = {"two_pass": flash_backward, "one_pass": flash_backward_onepass}


def _ids_from_lengths(pattern, n: int) -> torch.Tensor:
    """(n,) int64 nondecreasing document ids: documents of the pattern's lengths, repeated, cut at n."""
    lengths = pattern * (n // sum(pattern) + 1)
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:n]


def _document_ids(kind, batch: int, heads: int, n: int) -> torch.Tensor | None:
    """None, or ids broadcastable to (batch, heads, n): one per batch row, or per head ("per_head")."""
    if kind is None:
        return None
    if kind == "single":
        return torch.zeros(batch, 1, n, dtype=torch.int32)
    rows = heads if kind == "per_head" else 1
    return torch.stack([torch.stack([_ids_from_lengths(PATTERNS[(b + h) % 2], n) for h in range(rows)])
                        for b in range(batch)])  # (batch, rows, n)


def _inputs(batch, hq, hkv, n_q, n_k, d, kind, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n_q, d, generator=gen).to(dtype)
    k, v = (torch.randn(batch, hkv, n_k, d, generator=gen).to(dtype) for _ in range(2))
    grad_out = torch.randn(q.shape, generator=gen).to(dtype)
    return q, k, v, grad_out, _document_ids(kind, batch, hq, n_q)


def _bounds(ids, q):
    return None if ids is None else document_bounds(ids, q.shape[:-1])


def _assert_forward(out, lse, q, k, v, ids, causal, scale):
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert_forward_close(out, lse, q, k, v, causal, scale, ids)


def _assert_gradients(grads, q, k, v, grad_out, ids, causal, scale):
    for name, ours, x in zip(("dQ", "dK", "dV"), grads, (q, k, v)):
        assert ours.shape == x.shape, name
    assert_close_to_reference((None, *grads), q, k, v, causal, grad_out, scale, ids)


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_float64(case, causal, forward):
    q, k, v, _, ids = _inputs(*case, torch.float32)
    scale = q.shape[-1] ** -0.5
    out, lse = FORWARDS[forward](q, k, v, causal, scale, bounds=_bounds(ids, q))
    _assert_forward(out, lse, q, k, v, ids, causal, scale)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_float64(case, causal, backward):
    q, k, v, grad_out, ids = _inputs(*case, torch.float32)
    scale, bounds = q.shape[-1] ** -0.5, _bounds(ids, q)
    out, lse = flash_forward(q, k, v, causal, scale, bounds=bounds)
    grads = BACKWARDS[backward](grad_out, q, k, v, out, lse, causal, scale, bounds=bounds)
    _assert_gradients(grads, q, k, v, grad_out, ids, causal, scale)


# bfloat16 with the bf16_interpreter fixture (conftest.py), which mends the interpreter's bf16 math.
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16(causal, bf16_interpreter):
    q, k, v, grad_out, ids = _inputs(1, 4, 2, 45, 45, 32, "mixed", torch.bfloat16, seed=1)
    scale, bounds = q.shape[-1] ** -0.5, _bounds(ids, q)
    out, lse = flash_forward(q, k, v, causal, scale, bounds=bounds)
    _assert_forward(out, lse, q, k, v, ids, causal, scale)
    for backward in BACKWARDS.values():
        _assert_gradients(backward(grad_out, q, k, v, out, lse, causal, scale, bounds=bounds),
                          q, k, v, grad_out, ids, causal, scale)


# Query tiles taller than key tiles and the reverse: the tile ranges round query rows to BLOCK_M and
# keys to BLOCK_N, which equal tiles would not tell apart.
@pytest.mark.parametrize("blocks", [Blocks(32, 16, 1, 1), Blocks(16, 32, 1, 1)], ids=["tall_q", "tall_k"])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_tiles(blocks, causal):
    q, k, v, grad_out, ids = _inputs(1, 2, 1, 70, 70, 16, "mixed", torch.float32, seed=3)
    scale, bounds = q.shape[-1] ** -0.5, _bounds(ids, q)
    for forward in FORWARDS.values():
        _assert_forward(*forward(q, k, v, causal, scale, blocks, bounds=bounds), q, k, v, ids, causal, scale)
    out, lse = flash_forward(q, k, v, causal, scale, blocks, bounds=bounds)
    two_pass = flash_backward(grad_out, q, k, v, out, lse, causal, scale, KernelConfigs(*[blocks] * 4), bounds=bounds)
    one_pass = flash_backward_onepass(grad_out, q, k, v, out, lse, causal, scale, blocks, bounds=bounds)
    for grads in (two_pass, one_pass):
        _assert_gradients(grads, q, k, v, grad_out, ids, causal, scale)


# Poisoned inputs make numpy warn about the NaN arithmetic inside the poisoned document.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("causal", [False, True])
def test_other_documents_tiles_are_skipped(causal):
    """Documents on 16-row tile edges: a tile of another document is never visited, so NaN in one
    document's q, k, v and dO leaves every other row's results bitwise as they were. A visited tile,
    even masked, would spread the NaN: its P (0 where masked) multiplies the NaN rows of V or dO,
    and 0 * NaN is NaN."""
    q, k, v, grad_out, _ = _inputs(1, 2, 1, 64, 64, 16, None, torch.float32, seed=2)
    ids = _ids_from_lengths([16, 32, 16], 64).expand(1, 1, 64)
    poisoned = slice(16, 48)  # the second document
    clean = _all_launchers(q, k, v, grad_out, ids, causal)
    dirty_inputs = [x.clone() for x in (q, k, v, grad_out)]
    for x in dirty_inputs:
        x[..., poisoned, :] = float("nan")
    dirty = _all_launchers(*dirty_inputs, ids, causal)
    others = torch.ones(64, dtype=torch.bool)
    others[poisoned] = False
    for name, a, b in zip(clean, clean.values(), dirty.values()):
        assert torch.isnan(b[..., poisoned, :] if b.dim() == 4 else b[..., poisoned]).any(), name
        assert torch.equal(a[..., others, :] if a.dim() == 4 else a[..., others],
                           b[..., others, :] if b.dim() == 4 else b[..., others]), name


def _all_launchers(q, k, v, grad_out, ids, causal) -> dict[str, torch.Tensor]:
    """Every launcher's outputs on these inputs, by name."""
    scale, bounds = 0.25, _bounds(ids, q)
    out, lse = flash_forward(q, k, v, causal, scale, bounds=bounds)
    results = {"O": out, "L": lse}
    results["O tma"], results["L tma"] = flash_forward_tma(q, k, v, causal, scale, bounds=bounds)
    for name, backward in BACKWARDS.items():
        grads = backward(grad_out, q, k, v, out, lse, causal, scale, bounds=bounds)
        results.update({f"{g} {name}": x for g, x in zip(("dQ", "dK", "dV"), grads)})
    return results
