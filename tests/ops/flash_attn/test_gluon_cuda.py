"""The Gluon kernels on an sm_90 GPU against float64: O, L, the backward's gradients, and the op.

Low-precision oracle as in the other FlashAttention tests: our error against float64 may be at most
2x the error of the same math done in the input dtype (plus a floor). L is float32 from exact
16-bit products, so it is held to an absolute tolerance.
"""

import dataclasses

import pytest
import torch
from flash_helpers import assert_close_to_reference, assert_forward_close, make_inputs, run_with_grads
from numerics import assert_within_oracle, eps, magnitude
from torch.utils._python_dispatch import TorchDispatchMode

import ops.flash_attn.gluon as gluon
from ops.flash_attn import flash_attn
from ops.flash_attn.dispatch import attention_forward
from ops.flash_attn.documents import document_bounds

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
                            and gluon.gluon_available()), reason="needs an sm_90 GPU and the tested Triton"),
]

# (leading dims, Nq, Nk): odd lengths, Nq != Nk both ways, one query row, several CTAs and key tiles.
SHAPES = [((2, 3), 200, 333), ((1,), 1000, 1000), ((2,), 77, 1030), ((1,), 1030, 77), ((3,), 1, 129),
          ((), 4096, 4096)]
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gluon_forward_matches_float64(shape, head_dim, causal, dtype, gen):
    from ops.flash_attn.gluon.launch import flash_forward_gluon

    q, k, v = (x.detach() for x in make_inputs(*shape, head_dim, dtype, "cuda", gen))
    scale = head_dim ** -0.5
    out, lse = flash_forward_gluon(q, k, v, causal, scale)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert_forward_close(out, lse, q, k, v, causal, scale)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", [((2, 3), 200, 333), ((), 4096, 4096), ((1,), 1030, 77)], ids=str)
def test_gluon_forward_pingpong_matches_float64(shape, head_dim, causal, gen):
    from ops.flash_attn.gluon.launch import FORWARD_TILES, flash_forward_gluon

    tiles = dataclasses.replace(FORWARD_TILES[head_dim], pingpong=not FORWARD_TILES[head_dim].pingpong)
    q, k, v = (x.detach() for x in make_inputs(*shape, head_dim, torch.bfloat16, "cuda", gen))
    out, lse = flash_forward_gluon(q, k, v, causal, head_dim ** -0.5, tiles=tiles)
    assert_forward_close(out, lse, q, k, v, causal, head_dim ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_op_with_gluon_forward_matches_float64_with_gradients(head_dim, causal, dtype, gen, monkeypatch):
    monkeypatch.setattr(gluon, "GLUON_MIN_WORK", 0)  # route this small problem through Gluon too
    monkeypatch.setattr(gluon, "small_grid", lambda *shape: False)
    q, k, v = make_inputs((2, 2), 333, 517, head_dim, dtype, "cuda", gen)
    assert gluon.use_gluon_forward(q, k, v)
    assert gluon.use_gluon_backward(q, k, v) == (head_dim in gluon.GLUON_BACKWARD_HEAD_DIMS)
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", dtype)
    ours = run_with_grads(lambda q, k, v, c: flash_attn(q, k, v, c), q, k, v, causal, grad_out)
    assert_close_to_reference(ours, q, k, v, causal, grad_out)


class _AtenOps(TorchDispatchMode):
    """Records the aten ops run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gluon_kernels_take_the_transposed_projection_layout_without_copies(head_dim, causal, gen):
    """q, k, v, dO as (B, N, H, D) storage seen as (B, H, N, D) (batch and heads do not merge into one
    stride): the 4-D descriptors read them as they are; O and the gradients come out in that layout."""
    from ops.flash_attn.gluon.launch import flash_forward_gluon
    from ops.flash_attn.gluon.launch_bwd import flash_backward_gluon

    q, k, v, grad_out = (torch.randn(2, n, 4, head_dim, generator=gen).to("cuda", torch.bfloat16).transpose(1, 2)
                         for n in (300, 517, 517, 300))
    scale = head_dim ** -0.5
    with _AtenOps() as ops_run:
        out, lse = flash_forward_gluon(q, k, v, causal, scale)
        grads = flash_backward_gluon(grad_out, q, k, v, out, lse, causal, scale)
    copies = [name for name in ops_run.names if any(c in name for c in ("copy", "clone", "contiguous"))]
    assert not copies, copies
    assert [t.stride() for t in (out, *grads)] == [t.stride() for t in (q, q, k, v)]
    assert_forward_close(out, lse, q, k, v, causal, scale)
    assert_close_to_reference((out, *grads), q, k, v, causal, grad_out)


def _backward_case(shape, head_dim, causal, dtype, gen, tiles=None):
    """(O, dQ, dK, dV) with the Gluon backward, and what the float64 oracle needs."""
    from ops.flash_attn.gluon.launch_bwd import flash_backward_gluon

    q, k, v = (x.detach() for x in make_inputs(*shape, head_dim, dtype, "cuda", gen))
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", dtype)
    scale = head_dim ** -0.5
    out, lse = attention_forward(q, k, v, causal, scale)
    grads = flash_backward_gluon(grad_out, q, k, v, out, lse, causal, scale, tiles=tiles)
    return (out, *grads), (q, k, v, causal, grad_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", SHAPES + [((2,), 1031, 1031)], ids=str)
def test_gluon_backward_matches_float64(shape, head_dim, causal, dtype, gen):
    ours, inputs = _backward_case(shape, head_dim, causal, dtype, gen)
    assert all(g.dtype == dtype and g.shape == x.shape for g, x in zip(ours[1:], inputs[:3]))
    assert_close_to_reference(ours, *inputs)


@pytest.mark.parametrize("variant", [dict(early_dp=False), dict(num_stages=3), dict(dk_from_registers=False),
                                     dict(dq_swizzle=32)], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gluon_backward_tile_variants_match_float64(variant, head_dim, gen):
    from ops.flash_attn.gluon.launch_bwd import BACKWARD_TILES

    tiles = dataclasses.replace(BACKWARD_TILES[head_dim], **variant)
    ours, inputs = _backward_case(((2,), 1030, 777), head_dim, True, torch.bfloat16, gen, tiles)
    assert_close_to_reference(ours, *inputs)


def test_gluon_backward_with_zero_stride_grad(gen):
    """dO from out.sum(): all-zero strides, which TMA cannot read; the launcher copies it."""
    from ops.flash_attn.gluon.launch_bwd import flash_backward_gluon

    q, k, v = (x.detach() for x in make_inputs((1, 2), 300, 300, 128, torch.bfloat16, "cuda", gen))
    out, lse = attention_forward(q, k, v, True, 128 ** -0.5)
    grad_out = torch.ones((), device="cuda", dtype=torch.bfloat16).expand_as(out)
    ours = (out, *flash_backward_gluon(grad_out, q, k, v, out, lse, True, 128 ** -0.5))
    assert_close_to_reference(ours, q, k, v, True, grad_out.contiguous())


# Grouped-query attention and packed documents. The float64 oracle expands K/V to the query heads
# (repeat_interleave: query head h reads K/V head h // G) and masks keys outside each query's
# document (ids equal), on top of the causal mask.
GQA_SHAPES = [1024, 4096 + 17]
HEADS_Q = 8


def _document_ids(batch: int, n: int, gen: torch.Generator, heads: int = 1) -> torch.Tensor:
    """(batch, heads, n) int32, nondecreasing along n: documents of random lengths, 1-token ones
    included (every third document), a different split in every row."""
    rows = []
    for _ in range(batch * heads):
        lengths = []
        while sum(lengths) < n:
            short = len(lengths) % 3 == 2
            lengths.append(1 if short else int(torch.randint(1, max(2, n // 3), (1,), generator=gen)))
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:n]
        rows.append(ids)
    return torch.stack(rows).reshape(batch, heads, n).to(torch.int32)


def _masked_scores(q, k, v, causal, scale, ids):
    """(masked scaled scores (B, Hq, Nq, Nk), keep mask, k and v repeated to q's heads): keys of
    other documents (ids (..., N) broadcastable to q.shape[:-1], or None) and, causal, after the
    query are -inf."""
    group = q.shape[-3] // k.shape[-3]
    k, v = (x.repeat_interleave(group, dim=-3) for x in (k, v))  # (B, Hq, Nk, D)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.ones_like(keep).tril()
    if ids is not None:
        keep = keep & (ids[..., :, None] == ids[..., None, :])  # (B, 1 or Hq, Nq, Nk)
    return scores.masked_fill(~keep, float("-inf")), keep, k, v


def _masked_reference(q, k, v, causal, scale, ids):
    """(O, L) of the naive math in q's dtype (autograd sums dK, dV over each K/V head's group)."""
    scores, _, _, v = _masked_scores(q, k, v, causal, scale, ids)
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def _assert_masked_forward_close(out, lse, q, k, v, causal, scale, ids):
    """As flash_helpers.assert_forward_close: O within 2x what the naive math errs in q's dtype, L
    within 2x what it errs in float32 (the kernels' L is a float32 sum), both against float64."""
    exact_out, exact_lse = _masked_reference(q.double(), k.double(), v.double(), causal, scale, ids)
    low_out, _ = _masked_reference(q, k, v, causal, scale, ids)
    _, low_lse = _masked_reference(q.float(), k.float(), v.float(), causal, scale, ids)
    assert_within_oracle("O", out, low_out, exact_out, q.dtype)
    assert_within_oracle("L", lse, low_lse, exact_lse, torch.float32)


def _gqa_inputs(n, head_dim, kv_heads, dtype, gen):
    q = torch.randn(2, HEADS_Q, n, head_dim, generator=gen).to("cuda", dtype)  # (B, Hq, N, D)
    k, v = (torch.randn(2, kv_heads, n, head_dim, generator=gen).to("cuda", dtype) for _ in range(2))  # (B, Hkv, N, D)
    return q, k, v


def gqa_and_document_cases(test):
    """Every (dtype, causal, head dim, length, K/V heads with or without documents) the GQA and document
    tests of the forward and the backward run."""
    test = pytest.mark.parametrize("kv_heads, documents", [(2, False), (1, False), (8, True), (2, True), (1, True)],
                                   ids=["gqa4", "gqa8", "docs", "gqa4-docs", "gqa8-docs"])(test)
    for name, values, ids in (("n", GQA_SHAPES, None), ("head_dim", [64, 128], None), ("causal", [False, True], None),
                              ("dtype", DTYPES, str)):
        test = pytest.mark.parametrize(name, values, ids=ids)(test)
    return test


@gqa_and_document_cases
def test_gluon_forward_gqa_and_documents_match_float64(kv_heads, documents, n, head_dim, causal, dtype, gen,
                                                       monkeypatch):
    from ops.flash_attn.gluon.launch import flash_forward_gluon

    monkeypatch.setattr(gluon, "GLUON_MIN_WORK", 0)  # the rule takes these inputs at any size
    q, k, v = _gqa_inputs(n, head_dim, kv_heads, dtype, gen)
    assert gluon.use_gluon_forward(q, k, v, documents)
    ids = _document_ids(2, n, gen).to("cuda") if documents else None  # (B, 1, N)
    bounds = document_bounds(ids, q.shape[:-1]) if documents else None
    scale = head_dim ** -0.5
    out, lse = flash_forward_gluon(q, k, v, causal, scale, bounds)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    _assert_masked_forward_close(out, lse, q, k, v, causal, scale, ids)


@pytest.mark.parametrize("causal", [False, True])
def test_gluon_forward_documents_differ_per_head(causal, gen):
    """ids (B, Hq, N): every query head has its own split, so the kernel must read row bh's bounds."""
    from ops.flash_attn.gluon.launch import flash_forward_gluon

    q, k, v = _gqa_inputs(1000, 128, 2, torch.bfloat16, gen)
    ids = _document_ids(2, 1000, gen, heads=HEADS_Q).to("cuda")  # (B, Hq, N)
    out, lse = flash_forward_gluon(q, k, v, causal, 128 ** -0.5, document_bounds(ids, q.shape[:-1]))
    _assert_masked_forward_close(out, lse, q, k, v, causal, 128 ** -0.5, ids)


@pytest.mark.parametrize("causal", [False, True])
def test_gluon_forward_one_token_documents_only(causal, gen):
    """Every token its own document: each query sees only its own key, O = V of its K/V head."""
    from ops.flash_attn.gluon.launch import flash_forward_gluon

    q, k, v = _gqa_inputs(300, 64, 2, torch.bfloat16, gen)
    ids = torch.arange(300, device="cuda", dtype=torch.int32).expand(2, 1, 300)  # (B, 1, N)
    out, lse = flash_forward_gluon(q, k, v, causal, 0.125, document_bounds(ids, q.shape[:-1]))
    assert torch.equal(out, v.repeat_interleave(HEADS_Q // 2, dim=1))
    _assert_masked_forward_close(out, lse, q, k, v, causal, 0.125, ids)


def _masked_grads(q, k, v, causal, scale, ids, grad_out, dtype):
    """(O, dQ, dK, dV, L) of the naive masked math in `dtype` (float64: the oracle)."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = _masked_reference(q, k, v, causal, scale, ids)
    out.backward(grad_out.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad, lse.detach()


def _masked_term_sizes(q, k, v, causal, scale, ids, grad_out):
    """flash_helpers.term_sizes with the document mask and GQA: the largest |.| of O, dQ, dK, dV
    from the absolute values of their terms, in float64; dK and dV sum their terms over the group's
    query heads."""
    q, k, v, grad_out = (x.detach().double() for x in (q, k, v, grad_out))
    scores, keep, k_rep, v_rep = _masked_scores(q, k, v, causal, scale, ids)
    p = torch.softmax(scores, dim=-1)  # (B, Hq, Nq, Nk), 0 where masked
    out = p @ v_rep
    delta = (grad_out * out).sum(-1, keepdim=True).abs()  # (B, Hq, Nq, 1)
    ds = p * (grad_out.abs() @ v_rep.abs().transpose(-1, -2) + delta)  # (B, Hq, Nq, Nk)

    def per_kv_head(x):  # (B, Hq, Nk, D) -> (B, Hkv, Nk, D): the group's terms add up
        return x.unflatten(1, (k.shape[1], -1)).sum(2)

    sizes = (p @ v_rep.abs(), scale * ds @ k_rep.abs(), per_kv_head(scale * ds.transpose(-1, -2) @ q.abs()),
             per_kv_head(p.transpose(-1, -2) @ grad_out.abs()))
    return [t.abs().max().item() for t in sizes]


def _assert_masked_backward_close(ours, q, k, v, causal, scale, ids, grad_out):
    """(O, dQ, dK, dV) against float64 within the oracle bound of flash_helpers.assert_close_to_reference:
    2x what the naive masked math errs in q's dtype, plus one eps of each result's term size, plus the
    recompute term (P = exp(S - L) with L rounded in float32 to eps |L|: a relative error of P)."""
    exact = _masked_grads(q, k, v, causal, scale, ids, grad_out, torch.float64)
    low = _masked_grads(q, k, v, causal, scale, ids, grad_out, q.dtype)
    sizes = _masked_term_sizes(q, k, v, causal, scale, ids, grad_out)
    recompute = eps(torch.float32) * magnitude(exact[4])
    for i, (name, a, lo, b, size) in enumerate(zip(("O", "dQ", "dK", "dV"), ours, low, exact, sizes)):
        assert_within_oracle(name, a, lo, b, q.dtype, scale=size, extra=recompute * size if i else 0.0)


@gqa_and_document_cases
def test_gluon_backward_gqa_and_documents_match_float64(kv_heads, documents, n, head_dim, causal, dtype, gen):
    from ops.flash_attn.gluon.launch import flash_forward_gluon
    from ops.flash_attn.gluon.launch_bwd import flash_backward_gluon

    q, k, v = _gqa_inputs(n, head_dim, kv_heads, dtype, gen)
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", dtype)
    ids = _document_ids(2, n, gen).to("cuda") if documents else None  # (B, 1, N)
    bounds = document_bounds(ids, q.shape[:-1]) if documents else None
    scale = head_dim ** -0.5
    out, lse = flash_forward_gluon(q, k, v, causal, scale, bounds)
    grads = flash_backward_gluon(grad_out, q, k, v, out, lse, causal, scale, bounds)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    _assert_masked_backward_close((out, *grads), q, k, v, causal, scale, ids, grad_out)


@pytest.mark.parametrize("causal", [False, True])
def test_gluon_backward_documents_differ_per_head(causal, gen):
    """ids (B, Hq, N) with GQA: the query heads of one group have different splits, so each CTA's
    query range is the union over its group and each step masks by its own query head's bounds."""
    from ops.flash_attn.gluon.launch import flash_forward_gluon
    from ops.flash_attn.gluon.launch_bwd import flash_backward_gluon

    q, k, v = _gqa_inputs(1000, 128, 2, torch.bfloat16, gen)
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", torch.bfloat16)
    ids = _document_ids(2, 1000, gen, heads=HEADS_Q).to("cuda")  # (B, Hq, N)
    bounds = document_bounds(ids, q.shape[:-1])
    out, lse = flash_forward_gluon(q, k, v, causal, 128 ** -0.5, bounds)
    grads = flash_backward_gluon(grad_out, q, k, v, out, lse, causal, 128 ** -0.5, bounds)
    _assert_masked_backward_close((out, *grads), q, k, v, causal, 128 ** -0.5, ids, grad_out)


@pytest.mark.parametrize("documents", [False, True], ids=["plain", "documents"])
def test_gluon_launches_replay_with_the_same_results(documents, gen):
    """The second launch of a Gluon kernel with the same specialisation replays Triton's compiled
    launcher (ops.triton_utils.replay): same O, L and gradients, bitwise, on other buffers."""
    from ops.flash_attn.gluon import launch, launch_bwd

    q, k, v = (x.detach() for x in make_inputs((2, 4), 640, 640, 128, torch.bfloat16, "cuda", gen, kv_heads=2))
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", q.dtype)
    ids = torch.arange(640, device="cuda").div(100, rounding_mode="floor")[None, None] if documents else None
    bounds = document_bounds(ids, q.shape[:-1]) if documents else None
    runs = []
    for _ in range(2):
        forward_replays, backward_replays = launch._FORWARD.replays, launch_bwd._BACKWARD.replays
        out, lse = launch.flash_forward_gluon(q, k, v, True, 0.125, bounds)
        grads = launch_bwd.flash_backward_gluon(grad_out, q, k, v, out, lse, True, 0.125, bounds)
        runs.append((out, lse, *grads))
    assert launch._FORWARD.replays == forward_replays + 1 and launch_bwd._BACKWARD.replays == backward_replays + 1
    assert_forward_close(runs[0][0], runs[0][1], q, k, v, True, 0.125, document_ids=ids)
    # The forward is deterministic; the backward's dQ sums by reductions in the order CTAs finish.
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:2], runs[1][:2]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][3:], runs[1][3:]))  # dK, dV: no atomics
