"""FlashAttention-2 op: numerics against float64, registration (opcheck), compile, errors.

On a machine without CUDA the op runs its tiled PyTorch path; the Triton kernels are checked on CPU
by tests/test_flash_interpreter.py and on CUDA by the `cuda`-marked tests here.
"""

import pytest
import torch
from flash_helpers import (
    IMPLEMENTATIONS,
    SHAPES,
    assert_close_to_reference,
    assert_forward_close,
    make_inputs,
    run_with_grads,
)
from numerics import assert_within_oracle, eps
from torch._dynamo.testing import CompileCounterWithBackend, EagerAndRecordGraphs, normalize_gm

from ops.flash_attn import FlashAttention2PyTorch, FlashAttention2Triton, attention_reference, flash_attn

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_fp32(shape, causal, impl, device, gen):
    q, k, v = make_inputs(*shape, torch.float32, device, gen)
    grad_out = torch.randn(q.shape, generator=gen).to(device)
    ours = run_with_grads(IMPLEMENTATIONS[impl], q, k, v, causal, grad_out)
    assert_close_to_reference(ours, q, k, v, causal, grad_out)


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=str)
def test_matches_float64_low_precision(shape, causal, dtype, device, gen):
    q, k, v = make_inputs(*shape, dtype, device, gen)
    grad_out = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    ours = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, causal, grad_out)
    assert all(x.dtype == dtype for x in ours)
    assert_close_to_reference(ours, q, k, v, causal, grad_out)


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_logsumexp_output(causal, device, gen):
    q, k, v = make_inputs((2,), 70, 45, 40, torch.float32, device, gen)
    out, lse = torch.ops.cs336.flash_attn_fwd(q, k, v, causal, 40**-0.5)
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    assert_forward_close(out, lse, q, k, v, causal)


@pytest.mark.parametrize("function", [FlashAttention2PyTorch, FlashAttention2Triton])
def test_saves_exactly_one_logsumexp_tensor(function, gen):
    q, k, v = make_inputs((2, 3), 20, 20, 16, torch.float32, "cpu", gen)
    out = function.apply(q, k, v, True)
    matches = [t for t in out.grad_fn.saved_tensors if t.shape == (2, 3, 20)]
    assert len(matches) == 1


@pytest.mark.numerics
def test_explicit_scale_and_noncontiguous_inputs(gen):
    # (B, N, H, D) viewed as (B, H, N, D): strided, as attention layers usually produce it.
    q, k, v = transposed_inputs(gen)
    assert not q.is_contiguous()
    grad_out = torch.randn(2, 3, 40, 32, generator=gen)
    ours = run_with_grads(lambda *a: flash_attn(*a, scale=0.3), q, k, v, False, grad_out)
    assert_close_to_reference(ours, q, k, v, False, grad_out, scale=0.3)


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("magnitude", [10.0, 100.0])
def test_large_magnitude_scores(magnitude, device, gen):
    """Scores of ~5e2 (x10) or ~5e4 (x100) overflow a naive exp; ours must stay finite and correct.

    The backward's recomputation of P from L rounds by eps |L| (see flash_helpers), which grows with
    the scores: the bound grows with it.
    """
    q, k, v = make_inputs((2,), 50, 50, 32, torch.float32, device, gen, magnitude=magnitude)
    grad_out = torch.randn(q.shape, generator=gen).to(device)
    ours = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, True, grad_out)
    out, lse = torch.ops.cs336.flash_attn_fwd(q, k, v, True, 32**-0.5)
    assert all(torch.isfinite(x).all() for x in (*ours, lse))
    assert_forward_close(out, lse, q, k, v, True)
    assert_close_to_reference(ours, q, k, v, True, grad_out)


def transposed_inputs(gen, device="cpu", dtype=torch.float32, n=(40, 50), heads=3, d=32):
    """q, k, v as attention layers make them: (B, N, H, D) projections seen as (B, H, N, D)."""
    return tuple(torch.randn(2, length, heads, d, generator=gen).to(device, dtype).transpose(1, 2)
                 for length in (n[0], n[1], n[1]))


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_and_gradients_keep_the_input_layout(device, gen):
    """O is laid out like q and each gradient like its input (torch.empty_like), as the fakes say:
    for the transposed projection layout, O.transpose(1, 2).flatten(-2) is then a view."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (x.requires_grad_() for x in transposed_inputs(gen, device, dtype, n=(256, 256), heads=4, d=64))
    out = flash_attn(q, k, v, True)
    assert out.stride() == q.stride() and out.transpose(1, 2).flatten(-2)._base is not None
    out.backward(torch.randn(2, 256, 256, generator=gen).to(device, dtype).unflatten(-1, (4, 64)).transpose(1, 2))
    for x in (q, k, v):
        assert x.grad.stride() == x.stride()
    # The fakes (what torch.compile plans the graph with) promise the same strides.
    meta = [x.detach().to("meta") for x in (q, k, v)]
    fake_out, fake_lse = torch.ops.cs336.flash_attn_fwd(*meta, True, 0.125)
    fake_grads = torch.ops.cs336.flash_attn_bwd(fake_out, *meta, fake_out, fake_lse, True, 0.125)
    assert [t.stride() for t in (fake_out, *fake_grads)] == [t.stride() for t in (out, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("op_name", ["flash_attn_fwd", "flash_attn_bwd", "flash_attn"])
def test_opcheck(op_name, layout, gen):
    q, k, v = make_inputs((2,), 33, 20, 16, torch.float32, "cpu", gen)
    if layout == "transposed":  # real and fake strides must agree for these too
        q, k, v = (x.requires_grad_() for x in transposed_inputs(gen, n=(33, 20), heads=2, d=16))
    if op_name != "flash_attn":
        # The building blocks are not differentiable themselves: flash_attn and the Functions are.
        q, k, v = q.detach(), k.detach(), v.detach()
    if op_name == "flash_attn_fwd":
        args = (q, k, v, True, 0.25)
    elif op_name == "flash_attn_bwd":
        out, lse = torch.ops.cs336.flash_attn_fwd(q, k, v, True, 0.25)
        args = (torch.randn_like(out), q, k, v, out, lse, True, 0.25)
    else:
        args = (q, k, v, True, None)
    torch.library.opcheck(getattr(torch.ops.cs336, op_name).default, args)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_fullgraph_matches_float64(impl, causal, gen):
    # Static shapes: the implementations' functions are shared across tests, and a second compile at
    # other shapes would turn dynamic (dynamic shapes are the op's test below, not the tiled Function's).
    compiled = torch.compile(IMPLEMENTATIONS[impl], backend="aot_eager", fullgraph=True, dynamic=False)
    q, k, v = make_inputs((2,), 45, 60, 32, torch.float32, "cpu", gen)
    grad_out = torch.randn(q.shape, generator=gen)
    assert_close_to_reference(run_with_grads(compiled, q, k, v, causal, grad_out), q, k, v, causal, grad_out)


def test_compiled_with_inductor(gen):
    compiled = torch.compile(lambda q, k, v: flash_attn(q, k, v, True) * 2, fullgraph=True)
    q, k, v = make_inputs((1, 2), 40, 40, 16, torch.float32, "cpu", gen)
    grad_out = torch.randn(q.shape, generator=gen)
    ours = run_with_grads(lambda q, k, v, c: compiled(q, k, v) / 2, q, k, v, True, grad_out)
    assert_close_to_reference(ours, q, k, v, True, grad_out)


def test_compiled_attention_layer_with_transposed_layout(gen):
    """MultiHeadSelfAttention's pattern, inductor-compiled: q, k, v as transposed views of the
    projections, O read back through .transpose(1, 2).flatten(-2). Inductor lays out the code
    around the op from the fakes' strides and asserts the kernels' outputs have them (O like q,
    grads like inputs): a fake saying contiguous fails here."""

    def layer(x, w_qkv, w_o, attend=lambda q, k, v: flash_attn(q, k, v, True)):  # x (B, T, 32) -> (B, T, 32)
        q, k, v = ((x @ w.T).unflatten(-1, (2, 16)).transpose(1, 2) for w in w_qkv)  # (B, H, T, D) views, 2 heads
        out = attend(q, k, v)
        return out.transpose(1, 2).flatten(-2) @ w_o.T

    x = torch.randn(2, 40, 32, generator=gen)
    w_qkv, w_o = torch.randn(3, 32, 32, generator=gen) / 6, torch.randn(32, 32, generator=gen) / 6
    grad = torch.randn(2, 40, 32, generator=gen)
    results = []
    for fn in (layer, torch.compile(layer, backend="inductor", fullgraph=True)):
        inputs = [t.clone().requires_grad_() for t in (x, w_qkv, w_o)]
        out = fn(*inputs)
        out.backward(grad)
        results.append([out, *(t.grad for t in inputs)])
    inputs = [t.double().requires_grad_() for t in (x, w_qkv, w_o)]
    out = layer(*inputs, attend=lambda q, k, v: attention_reference(q, k, v, True)[0])  # float64
    out.backward(grad.double())
    for eager, compiled, exact in zip(*results, [out, *(t.grad for t in inputs)]):
        assert_within_oracle("compiled", compiled, eager, exact)  # inductor errs at most 2x what eager does


@pytest.mark.parametrize("target", ["op", "triton_function"])
def test_dynamic_compile_has_no_recompiles(target):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(IMPLEMENTATIONS[target], backend=counter, fullgraph=True, dynamic=True)
    for n in (32, 48, 80, 129):
        q, k, v = (torch.randn(2, 2, n, 16, requires_grad=True) for _ in range(3))
        compiled(q, k, v, True).sum().backward()
    assert counter.frame_count == 1


TRACED_GRAPH = """\
class GraphModule(torch.nn.Module):
    def forward(self, L_q_: "f32[1, 2, 16, 8]", L_k_: "f32[1, 2, 16, 8]", L_v_: "f32[1, 2, 16, 8]"):
        l_q_ = L_q_
        l_k_ = L_k_
        l_v_ = L_v_

        flash_attn: "f32[1, 2, 16, 8]" = torch.ops.cs336.flash_attn(l_q_, l_k_, l_v_, True, None);  l_q_ = l_k_ = l_v_ = None
        return (flash_attn,)
"""


def test_graph_of_compiled_call():
    """Pins what dynamo records: one `cs336.flash_attn` node, no graph break, no decomposition."""
    backend = EagerAndRecordGraphs()

    @torch.compile(backend=backend, fullgraph=True)
    def attention(q, k, v):
        return flash_attn(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    attention(q, k, v)
    assert len(backend.graphs) == 1
    assert normalize_gm(backend.graphs[0].print_readable(print_output=False)) == TRACED_GRAPH


BAD_INPUTS = [
    ("leading dims", dict(k=torch.randn(3, 8, 16)), ValueError, "leading dims"),
    ("head dims", dict(k=torch.randn(2, 8, 32), v=torch.randn(2, 8, 32)), ValueError, "head dims"),
    ("dtypes", dict(k=torch.randn(2, 8, 16, dtype=torch.float64)), TypeError, "k has dtype"),
    ("mixed dtypes", dict(k=torch.randn(2, 8, 16).half()), TypeError, "share a dtype"),
    ("integers", dict(q=torch.ones(2, 8, 16, dtype=torch.int64)), TypeError, "q has dtype"),
    ("head dim > 256", dict(q=torch.randn(2, 8, 264), k=torch.randn(2, 8, 264), v=torch.randn(2, 8, 264)),
     ValueError, "<= 256"),
    ("empty", dict(q=torch.randn(2, 0, 16)), ValueError, "empty sequence"),
    ("vector", dict(v=torch.randn(16)), ValueError, "v must have shape"),
    ("k/v lengths", dict(v=torch.randn(2, 9, 16)), ValueError, "same length"),
]


@pytest.mark.parametrize("name, override, error, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("entry", ["op", "pytorch_function"])
def test_bad_input_raises_clear_error(name, override, error, message, entry):
    args = dict(q=torch.randn(2, 8, 16), k=torch.randn(2, 8, 16), v=torch.randn(2, 8, 16)) | override
    with pytest.raises(error, match=message):
        IMPLEMENTATIONS[entry](args["q"], args["k"], args["v"], False)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_scale_raises_clear_error(scale):
    q = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        flash_attn(q, q, q, scale=scale)


@pytest.mark.cuda
def test_cuda_and_cpu_inputs_mixed_is_an_error():
    q = torch.randn(2, 8, 16, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        flash_attn(q, torch.randn(2, 8, 16), torch.randn(2, 8, 16))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [4096, 16384])
def test_cuda_long_sequences_on_sampled_rows(n, dtype, gen):
    """Long causal sequences: check 64 sampled query rows (and all of dV's rows' sums) in float64."""
    q, k, v = make_inputs((1, 2), n, n, 64, dtype, "cuda", gen)
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", dtype)
    out, dq, dk, dv = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, True, grad_out)
    rows = torch.randint(0, n, (64,), generator=gen).to("cuda")
    qs, ks, vs = q.detach()[..., rows, :].double(), k.detach().double(), v.detach().double()
    scores = (qs @ ks.transpose(-1, -2)) / 8.0  # (1, 2, 64, N)
    scores = scores.masked_fill(torch.arange(n, device="cuda")[None, :] > rows[:, None], float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ vs
    low_scores = (q.detach()[..., rows, :] @ k.detach().transpose(-1, -2)) / 8.0  # the same math in `dtype`
    low_scores = low_scores.masked_fill(torch.arange(n, device="cuda")[None, :] > rows[:, None], float("-inf"))
    assert_within_oracle("O", out[..., rows, :], torch.softmax(low_scores, dim=-1) @ v.detach(), expected)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    # Sum over keys of dV = sum over queries of dO (each row of P sums to 1). Bound: P rounded to
    # `dtype` errs by eps/2 relative, so sum_j |dV_j error| <= eps/2 sum_i |dO_i|, and storing dV rounds
    # each by eps/2 |dV_j|.
    bound = eps(dtype) * (grad_out.double().abs().sum(-2) + dv.double().abs().sum(-2))
    assert ((dv.double().sum(-2) - grad_out.double().sum(-2)).abs() <= bound).all()


@pytest.mark.cuda
def test_cuda_peak_memory_is_linear_in_sequence_length():
    """B=1, H=16, N=16384, D=64 bf16 causal forward+backward: at most 227 MiB beyond the inputs
    (what torch's cuDNN attention needs; the N x N scores alone would take 8 GiB)."""
    q, k, v = (torch.randn(1, 16, 16384, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    flash_attn(q, k, v, True).sum().backward()
    torch.cuda.synchronize()
    extra_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    assert extra_mib <= 227, f"{extra_mib:.0f} MiB"



@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_onepass_backward_and_deterministic_mode(causal, gen, monkeypatch):
    """Head dim 64 with long keys takes the single-pass backward (bulk-reduced dQ) on Hopper; under
    torch.use_deterministic_algorithms the two-pass one, whose results repeat bit for bit."""
    from ops.flash_attn import dispatch
    from ops.flash_attn.dispatch import use_onepass_backward

    monkeypatch.setattr(dispatch, "ONEPASS_BACKWARD_MIN_KEYS", 2048)  # a smaller float64 reference
    q, k, v = make_inputs((2,), 2048 + 37, 2048 + 37, 64, torch.bfloat16, "cuda", gen)
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", torch.bfloat16)
    onepass = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, causal, grad_out)
    assert use_onepass_backward(q, k, v) == (torch.cuda.get_device_capability()[0] >= 9)
    assert_close_to_reference(onepass, q, k, v, causal, grad_out)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert not use_onepass_backward(q, k, v)
        first = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, causal, grad_out)
        second = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, causal, grad_out)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert_close_to_reference(first, q, k, v, causal, grad_out)


@pytest.mark.cuda
def test_cuda_tma_forward_for_head_dim_128(gen):
    """Head dim 128, 8192+ queries and more rows than the small-grid tiles take take the
    tensor-descriptor forward on Hopper; one such head takes the pointer kernel."""
    from ops.flash_attn.dispatch import use_tma_forward

    q, k, v = make_inputs((2,), 8192 + 5, 8192 + 5, 128, torch.bfloat16, "cuda", gen)
    assert use_tma_forward(q, k, v) == (torch.cuda.get_device_capability()[0] >= 9)
    assert not use_tma_forward(q[:1], k[:1], v[:1])
    out, lse = torch.ops.cs336.flash_attn_fwd(q, k, v, True, 128**-0.5)
    assert_forward_close(out, lse, q, k, v, True)


def test_tile_tables_follow_the_rows_in_all():
    """The selection rule, not the tuned sizes (a retune must not break this): few rows in all
    (batch * heads * Nq) pick the small-grid table, many pick the tables tuned for many heads, heads
    0 means "unknown" (many), and float32 has one table whatever the rows."""
    from ops.flash_attn.tiles import (
        LONG_SEQUENCE,
        SMALL_GRID_ROWS,
        SMALL_GRID_ROWS_D128_SHORT,
        kernel_configs,
        small_grid,
    )

    bf16 = torch.bfloat16
    assert small_grid(1, 4096, 64) and not small_grid(64, 4096, 64) and not small_grid(0, 4096, 64)
    assert small_grid(2, SMALL_GRID_ROWS // 2, 64) and not small_grid(2, SMALL_GRID_ROWS // 2 + 1, 64)
    # Short sequences at D = 128 have the lower limit; long ones the common one.
    assert small_grid(2, SMALL_GRID_ROWS_D128_SHORT // 2, 128) and not small_grid(4, 4096, 128)
    assert small_grid(1, SMALL_GRID_ROWS, 128) and SMALL_GRID_ROWS >= LONG_SEQUENCE
    # Same decision (and same long-sequence flag), same tiles; a different decision, the other table.
    assert kernel_configs(64, bf16, 4096, heads=1) == kernel_configs(64, bf16, 2048, heads=2)
    assert kernel_configs(64, bf16, 4096) == kernel_configs(64, bf16, 4096, heads=64)
    if kernel_configs(64, bf16, 4096, heads=1) == kernel_configs(64, bf16, 4096, heads=64):
        pytest.fail("the small-grid and many-heads tables are equal: the rule selects nothing")
    assert kernel_configs(64, torch.float32, 1024, heads=1) == kernel_configs(64, torch.float32, 1024, heads=64)


@pytest.mark.cuda
def test_cuda_replayed_descriptor_launches_match_triton_launches(gen, monkeypatch):
    """The descriptor forward and the single-pass backward replay too (tensor-descriptor arguments):
    same bits as Triton's launch path, except dQ, whose bulk-reduced sums vary in their last bits."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors become TMA copies on sm_90+ only")
    from ops.flash_attn import launch_onepass, launch_tma
    from ops.triton_utils import replay as triton_replay

    q, k, v = make_inputs((2,), 1000, 1000, 128, torch.bfloat16, "cuda", gen)
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", torch.bfloat16)
    kernels = (launch_tma.forward_tma_kernel, launch_onepass.preprocess_kernel, launch_onepass.onepass_kernel,
               launch_onepass.dq_convert_kernel)

    def run():
        out, lse = launch_tma.flash_forward_tma(q, k, v, True, 0.1)
        return out, lse, *launch_onepass.flash_backward_onepass(grad_out, q, k, v, out, lse, True, 0.1, descriptors=True)

    monkeypatch.setattr(triton_replay, "ENABLED", False)
    expected = run()
    monkeypatch.setattr(triton_replay, "ENABLED", True)
    before = [kernel.replays for kernel in kernels]
    runs = [run() for _ in range(3)]
    assert all(kernel.replays - b >= 2 for kernel, b in zip(kernels, before)), "the 2nd and 3rd calls should replay"
    for out, lse, dq, dk, dv in runs:
        assert all(torch.equal(x, y) for x, y in zip((out, lse, dk, dv), expected[:2] + expected[3:]))
        # Two float32 orders of the same sums round to neighbouring bf16 values at most: one ulp.
        assert ((dq.double() - expected[2].double()).abs() <= eps(dq.dtype) * expected[2].double().abs()
                + eps(torch.float32) * q.shape[-2] * expected[2].double().abs().max()).all()


@pytest.mark.cuda
def test_cuda_onepass_backward_from_sum(gen, monkeypatch):
    """.sum().backward() hands the backward an all-zero-stride dO, which descriptors cannot read."""
    from ops.flash_attn import dispatch

    monkeypatch.setattr(dispatch, "ONEPASS_BACKWARD_MIN_KEYS", 2048)
    q, k, v = make_inputs((1, 2), 2048 + 37, 2048 + 37, 64, torch.bfloat16, "cuda", gen)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = flash_attn(*leaves, True)
    out.sum().backward()
    ours = (out.detach(), *(x.grad for x in leaves))
    assert_close_to_reference(ours, q, k, v, True, torch.ones_like(q))


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_cuda_fp32_precision_over_many_tiles(head_dim, gen):
    """float32 multiplies by three TF32 products on sm_80+ up to head dim 128 (plain FMA products
    beyond) and still meets the float32 tolerance across many key and query tiles."""
    from ops.flash_attn.launch import precision

    tensor_cores = head_dim <= 128 and torch.cuda.get_device_capability() >= (8, 0)
    assert precision(torch.float32, head_dim) == ("tf32x3" if tensor_cores else "ieee")
    q, k, v = make_inputs((2,), 1000, 1000, head_dim, torch.float32, "cuda", gen)
    grad_out = torch.randn(q.shape, generator=gen).to("cuda")
    for causal in (False, True):
        ours = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, causal, grad_out)
        assert_close_to_reference(ours, q, k, v, causal, grad_out)


@pytest.mark.cuda
def test_cuda_replayed_launches_match_triton_launches(gen, monkeypatch):
    """Repeated calls replay the compiled launchers (ops/triton_utils/replay.py) and give the same bits
    as Triton's own launch path; a misaligned view of the same data compiles apart and is right too."""
    from ops.flash_attn import launch
    from ops.triton_utils import replay as triton_replay

    size = 300 * 64
    storage = torch.randn(2, 3 * size + 1, generator=gen).to("cuda", torch.bfloat16)
    aligned = [storage[:, i * size:(i + 1) * size].view(2, 300, 64) for i in range(3)]
    misaligned = [storage[:, 1 + i * size:1 + (i + 1) * size].view(2, 300, 64) for i in range(3)]  # 2 bytes off
    grad_out = torch.randn(2, 300, 64, generator=gen).to("cuda", torch.bfloat16)
    for q, k, v in (aligned, misaligned):
        monkeypatch.setattr(triton_replay, "ENABLED", False)
        expected = run_with_grads(IMPLEMENTATIONS["op"], q, k, v, True, grad_out)
        monkeypatch.setattr(triton_replay, "ENABLED", True)
        before = [kernel.replays for kernel in (launch.forward_kernel, launch.dq_kernel, launch.dkdv_kernel)]
        runs = [run_with_grads(IMPLEMENTATIONS["op"], q, k, v, True, grad_out) for _ in range(3)]
        after = [kernel.replays for kernel in (launch.forward_kernel, launch.dq_kernel, launch.dkdv_kernel)]
        assert all(b - a >= 2 for a, b in zip(before, after)), "the 2nd and 3rd calls should replay"
        assert all(torch.equal(x, y) for run in runs for x, y in zip(run, expected))
        assert_close_to_reference(runs[-1], q, k, v, True, grad_out)


@pytest.mark.parametrize("entry", ["op", "pytorch_function"])
def test_head_dim_zero_raises_clear_error(entry):
    """D = 0 is refused by the argument checks, not by a ZeroDivisionError in the default scale 1/sqrt(D)."""
    q = torch.randn(2, 8, 0)
    with pytest.raises(ValueError, match="head dim .* must be positive"):
        IMPLEMENTATIONS[entry](q, q, q, False)
