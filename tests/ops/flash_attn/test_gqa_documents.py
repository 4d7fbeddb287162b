"""FlashAttention with grouped-query heads (GQA/MQA) and packed documents (`document_ids`).

Every result is compared with the float64 reference (which repeats k, v per query head and masks
other documents) within the oracle bound of flash_helpers: at most 2x what plain PyTorch's same
math in the inputs' dtype errs, plus one rounding of each result's terms. On a machine without
CUDA the op and both Functions run the tiled PyTorch path; the `cuda` tests run the kernels.
"""

import pytest
import torch
from flash_helpers import IMPLEMENTATIONS, assert_close_to_reference, assert_forward_close, make_inputs, run_with_grads
from numerics import assert_within_oracle
from torch._dynamo.testing import CompileCounterWithBackend

from ops.flash_attn import attention_reference, flash_attn
from ops.flash_attn.tiled import TILE


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2024)


def random_document_ids(batch, n, gen, device="cpu", dtype=torch.int64, mean_length=20):
    """(B, 1, N) ids of documents of random lengths (geometric, mean `mean_length`), each row
    starting and ending with a document of length 1 (when N >= 3)."""
    starts = torch.rand(batch, n, generator=gen) < 1 / mean_length  # (B, N): a document starts here
    starts[:, 0] = False  # the first document's id is 0 however it starts
    if n >= 3:
        starts[:, 1] = starts[:, n - 1] = True  # [0, 1) and [N - 1, N) are documents of one token
    return starts.cumsum(-1).to(device=device, dtype=dtype)[:, None, :]  # (B, 1, N), nondecreasing


def one_token_documents(batch, n, gen, device="cpu"):
    """(B, 1, N): every token its own document (each query sees only its own key)."""
    return torch.arange(n, device=device).expand(batch, 1, n)


def single_document(batch, n, gen, device="cpu"):
    """(B, 1, N): one document per row, which is plain (non-document) attention."""
    return torch.zeros(batch, 1, n, dtype=torch.int32, device=device)


LAYOUTS = {"random": random_document_ids, "one_token_each": one_token_documents, "single": single_document}


def check(impl, q, k, v, causal, gen, ids=None):
    """Run `impl` forward + backward and compare O, dQ, dK, dV with float64."""
    grad_out = torch.randn(q.shape, generator=gen).to(q.device, q.dtype)
    ours = run_with_grads(IMPLEMENTATIONS[impl], q, k, v, causal, grad_out, ids)
    assert all(x.dtype == q.dtype for x in ours) and ours[2].shape == k.shape and ours[3].shape == v.shape
    assert_close_to_reference(ours, q, k, v, causal, grad_out, document_ids=ids)


# The numerics matrix (tools/numerics_matrix.sh) reruns only the op's cases: on a CPU the three
# implementations share the tiled path, so the other two add no new arithmetic to check there.
NUMERICS_IMPLS = [pytest.param(name, marks=pytest.mark.numerics) if name == "op" else name for name in IMPLEMENTATIONS]


@pytest.mark.parametrize("impl", NUMERICS_IMPLS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1], ids=lambda h: f"group{8 // h}")  # 1: multi-query
def test_grouped_query_heads_match_float64(kv_heads, causal, impl, gen):
    q, k, v = make_inputs((2, 8), 70, 45, 16, torch.float32, "cpu", gen, kv_heads=kv_heads)
    check(impl, q, k, v, causal, gen)


@pytest.mark.parametrize("impl", NUMERICS_IMPLS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_documents_match_float64(layout, causal, impl, gen):
    n = 2 * TILE + 22  # a ragged third tile
    q, k, v = make_inputs((2, 2), n, n, 32, torch.float32, "cpu", gen)
    check(impl, q, k, v, causal, gen, LAYOUTS[layout](2, n, gen))


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_heads_with_documents_match_float64(causal, dtype, gen):
    q, k, v = make_inputs((2, 4), 130, 130, 16, dtype, "cpu", gen, kv_heads=2)
    check("op", q, k, v, causal, gen, random_document_ids(2, 130, gen, dtype=torch.int32))


@pytest.mark.numerics
def test_transposed_layout_with_grouped_heads_and_documents(gen):
    """(B, N, H, D) projections seen as (B, H, N, D); outputs and gradients keep their inputs' layout."""
    n, d = 90, 16
    q = torch.randn(2, n, 4, d, generator=gen).transpose(1, 2).requires_grad_()  # (B, Hq, N, D) view
    k, v = (torch.randn(2, n, 2, d, generator=gen).transpose(1, 2).requires_grad_() for _ in range(2))
    ids = random_document_ids(2, n, gen)
    grad_out = torch.randn(2, n, 4, d, generator=gen).transpose(1, 2)
    ours = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, True, grad_out, ids)
    assert [t.stride() for t in ours] == [x.stride() for x in (q, q, k, v)]
    assert_close_to_reference(ours, q, k, v, True, grad_out, document_ids=ids)


@pytest.mark.numerics
@pytest.mark.parametrize("causal", [False, True])
def test_forward_logsumexp_with_grouped_heads_and_documents(causal, gen):
    q, k, v = make_inputs((2, 4), 100, 100, 16, torch.float32, "cpu", gen, kv_heads=1)
    ids = random_document_ids(2, 100, gen)
    out, lse = torch.ops.cs336.flash_attn_fwd(q, k, v, causal, 0.25, ids)
    assert lse.shape == q.shape[:-1]
    assert_forward_close(out, lse, q, k, v, causal, scale=0.25, document_ids=ids)


def test_ids_broadcast_over_rows(gen):
    """One layout for every row, as (N,), gives the bits of the same ids expanded to q.shape[:-1]."""
    q, k, v = make_inputs((2, 4), 80, 80, 16, torch.float32, "cpu", gen, kv_heads=2)
    ids = random_document_ids(1, 80, gen)[0, 0]  # (N,)
    grad_out = torch.randn(q.shape, generator=gen)
    shared = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, True, grad_out, ids)
    expanded = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, True, grad_out, ids.expand(2, 4, 80))
    assert all(torch.equal(a, b) for a, b in zip(shared, expanded))


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_tiles_of_other_documents_are_never_read(impl, gen):
    """Two documents split at a tile edge: NaN in every input of the second cannot reach the first's
    outputs or gradients, which it would if the tiled loops visited the cross-document tiles (the
    mask makes P 0 there, and 0 * NaN is NaN)."""
    n = 2 * TILE + 10
    q, k, v = make_inputs((1, 2), n, n, 16, torch.float32, "cpu", gen)
    for x in (q, k, v):
        x.data[..., TILE:, :] = float("nan")
    ids = (torch.arange(n) >= TILE).long()  # (N,): [0, TILE) and [TILE, N)
    grad_out = torch.randn(q.shape, generator=gen)
    ours = run_with_grads(IMPLEMENTATIONS[impl], q, k, v, False, grad_out, ids)
    assert all(torch.isfinite(t[..., :TILE, :]).all() for t in ours)
    first = [x[..., :TILE, :] for x in (q, k, v)]
    assert_close_to_reference([t[..., :TILE, :] for t in ours], *first, False, grad_out[..., :TILE, :])


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_backward_is_deterministic(impl, gen):
    q, k, v = make_inputs((2, 4), 150, 150, 16, torch.float32, "cpu", gen, kv_heads=2)
    ids = random_document_ids(2, 150, gen)
    grad_out = torch.randn(q.shape, generator=gen)
    first, second = (run_with_grads(IMPLEMENTATIONS[impl], q, k, v, True, grad_out, ids) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("op_name", ["flash_attn_fwd", "flash_attn_bwd", "flash_attn"])
def test_opcheck_with_grouped_heads_and_documents(op_name, gen):
    q, k, v = make_inputs((2, 4), 33, 33, 16, torch.float32, "cpu", gen, kv_heads=2)
    ids = random_document_ids(2, 33, gen)
    if op_name != "flash_attn":
        q, k, v = q.detach(), k.detach(), v.detach()
    if op_name == "flash_attn_fwd":
        args = (q, k, v, True, 0.25, ids)
    elif op_name == "flash_attn_bwd":
        out, lse = torch.ops.cs336.flash_attn_fwd(q, k, v, True, 0.25, ids)
        args = (torch.randn_like(out), q, k, v, out, lse, True, 0.25, ids)
    else:
        args = (q, k, v, True, None, ids)
    torch.library.opcheck(getattr(torch.ops.cs336, op_name).default, args)


# Every implementation causal, and the op without the mask too: compiling the tiled loops of the
# PyTorch Function takes ~15 s a case on a CPU, so it is not repeated for both masks.
@pytest.mark.parametrize("impl, causal", [("op", False), *((impl, True) for impl in IMPLEMENTATIONS)])
def test_compiled_fullgraph_matches_float64(impl, causal, gen):
    # Static shapes: the implementations' functions are shared across tests, and a second compile at
    # other shapes would turn dynamic (dynamic shapes are the op's test below, not the tiled Function's).
    compiled = torch.compile(IMPLEMENTATIONS[impl], backend="aot_eager", fullgraph=True, dynamic=False)
    q, k, v = make_inputs((2, 4), 75, 75, 16, torch.float32, "cpu", gen, kv_heads=2)
    ids = random_document_ids(2, 75, gen)
    grad_out = torch.randn(q.shape, generator=gen)
    ours = run_with_grads(compiled, q, k, v, causal, grad_out, ids)
    assert_close_to_reference(ours, q, k, v, causal, grad_out, document_ids=ids)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("target", ["op", "triton_function"])
def test_dynamic_compile_has_no_recompiles(target, backend, gen):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(IMPLEMENTATIONS[target], backend=counter, fullgraph=True, dynamic=True)
    for n in (48, 81):
        q, k, v = make_inputs((2, 4), n, n, 16, torch.float32, "cpu", gen, kv_heads=2)
        ids = random_document_ids(2, n, gen)
        grad_out = torch.randn(q.shape, generator=gen)
        assert_close_to_reference(run_with_grads(compiled, q, k, v, True, grad_out, ids), q, k, v, True,
                                  grad_out, document_ids=ids)
    assert counter.frame_count == 1


BAD_INPUTS = [
    ("query heads not a multiple", dict(q=torch.randn(2, 6, 8, 16)), "q has 6 heads, k has 4: the query heads must"),
    ("k and v heads differ", dict(v=torch.randn(2, 2, 8, 16)), "k and v must have the same leading dims"),
    ("batch differs", dict(k=torch.randn(3, 4, 8, 16), v=torch.randn(3, 4, 8, 16)), "leading dims of q, k, v"),
    ("float ids", dict(ids=torch.zeros(2, 1, 8)), "document_ids must be an integer tensor"),
    ("ids of the wrong length", dict(ids=torch.zeros(2, 1, 9, dtype=torch.int64)), "document_ids of shape"),
    ("ids not broadcastable", dict(ids=torch.zeros(3, 1, 8, dtype=torch.int64)), "document_ids of shape"),
    ("decreasing ids", dict(ids=torch.tensor([0, 0, 1, 1, 0, 2, 2, 2])), "document_ids must be nondecreasing"),
    ("Nq != Nk with ids", dict(k=torch.randn(2, 4, 9, 16), v=torch.randn(2, 4, 9, 16),
                               ids=torch.zeros(8, dtype=torch.int64)), "document_ids needs as many keys"),
]


@pytest.mark.parametrize("name, override, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_bad_input_raises_clear_error(name, override, message, impl):
    args = dict(q=torch.randn(2, 8, 8, 16), k=torch.randn(2, 4, 8, 16), v=torch.randn(2, 4, 8, 16), ids=None)
    args |= override
    with pytest.raises((ValueError, TypeError), match=message):
        IMPLEMENTATIONS[impl](args["q"], args["k"], args["v"], False, args["ids"])


def test_bad_ids_are_caught_by_the_compiled_op(gen):
    """Under torch.compile the fake checks the ids' shape and the real op reads their values."""
    compiled = torch.compile(IMPLEMENTATIONS["op"], backend="aot_eager", fullgraph=True)
    q, k, v = make_inputs((1, 2), 8, 8, 16, torch.float32, "cpu", gen)
    with pytest.raises(ValueError, match="document_ids must be nondecreasing"):
        compiled(q, k, v, False, torch.tensor([0, 1, 1, 0, 2, 2, 2, 2]))


# CUDA: the kernels at model sizes, bf16.


@pytest.mark.cuda
@pytest.mark.numerics
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n", [1000, 4096])
def test_cuda_grouped_heads_with_documents(n, head_dim, causal, gen):
    q, k, v = make_inputs((2, 8), n, n, head_dim, torch.bfloat16, "cuda", gen, kv_heads=2)
    check("op", q, k, v, causal, gen, random_document_ids(2, n, gen, "cuda", mean_length=n // 8))


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_deterministic_backward(head_dim, gen):
    """Under torch.use_deterministic_algorithms(True) repeated backwards give the same bits."""
    q, k, v = make_inputs((2, 8), 4096, 4096, head_dim, torch.bfloat16, "cuda", gen, kv_heads=2)
    ids = random_document_ids(2, 4096, gen, "cuda", mean_length=500)
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", torch.bfloat16)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, second = (run_with_grads(IMPLEMENTATIONS["op"], q, k, v, True, grad_out, ids) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_reference_groups_query_heads_in_order(gen):
    """Query head h reads kv head h // (Hq // Hkv): the grouped float64 reference equals per-head
    attention so indexed, as closely as the same per-head math in float32 does (oracle)."""
    q, k, v = (x.detach() for x in make_inputs((1, 6), 10, 10, 8, torch.float32, "cpu", gen, kv_heads=2))
    out, _ = attention_reference(q.double(), k.double(), v.double())
    for h in range(6):
        expected, _ = attention_reference(q[:, h].double(), k[:, h // 3].double(), v[:, h // 3].double())
        low, _ = attention_reference(q[:, h], k[:, h // 3], v[:, h // 3])
        assert_within_oracle(f"head {h}", out[:, h], low, expected, torch.float32)


def test_ids_reused_across_calls_are_read_once(gen, monkeypatch):
    """One ids tensor passed to several forwards and their backwards (a model's layers) is read once
    and its bounds computed once; written in place, it is read again, its bounds recomputed, and a
    decrease it now holds is still an error."""
    from ops.flash_attn import documents

    reads, computed = [], []
    put, compute = documents._CHECKED.put, documents._compute_bounds
    monkeypatch.setattr(documents._CHECKED, "put", lambda ids, value: (reads.append(1), put(ids, value)))
    monkeypatch.setattr(documents, "_compute_bounds", lambda ids, rows: (computed.append(1), compute(ids, rows))[1])
    q, k, v = make_inputs((2, 4), 40, 40, 16, torch.float32, "cpu", gen, kv_heads=2)
    ids = random_document_ids(2, 40, gen)
    for _ in range(3):  # three layers, forward and backward
        flash_attn(q, k, v, True, document_ids=ids).sum().backward()
    assert (len(reads), len(computed)) == (1, 1)
    ids[..., -1] += 1  # in place, still valid (the last document split off): a new version
    check("op", q, k, v, True, gen, ids)  # against float64 with the new documents
    assert (len(reads), len(computed)) == (2, 2)
    ids[..., 5] = ids[..., 4] - 1  # in place: a decrease, and a new version
    with pytest.raises(ValueError, match="nondecreasing"):
        flash_attn(q, k, v, True, document_ids=ids)


def test_documents_under_inference_mode(gen):
    """Ids made under torch.inference_mode (no version counter: never remembered) are checked and
    used on every call, and a decrease is still an error."""
    q, k, v = (x.detach() for x in make_inputs((1, 2), 24, 24, 8, torch.float32, "cpu", gen))
    with torch.inference_mode():
        ids = random_document_ids(1, 24, gen)
        out = flash_attn(q, k, v, True, document_ids=ids)
        again = flash_attn(q, k, v, True, document_ids=ids)
        bad = ids.clone()
        bad[..., 3] = bad[..., 2] - 1
        with pytest.raises(ValueError, match="nondecreasing"):
            flash_attn(q, k, v, True, document_ids=bad)
    exact, _ = attention_reference(q.double(), k.double(), v.double(), True, document_ids=ids)
    low, _ = attention_reference(q, k, v, True, document_ids=ids)
    assert torch.equal(out, again)
    assert_within_oracle("O", out, low, exact, torch.float32)
