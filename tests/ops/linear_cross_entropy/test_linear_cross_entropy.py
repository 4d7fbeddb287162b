"""linear_cross_entropy op: numerics against float64, the three-matmul structure, registration
(opcheck), compile, errors; CUDA-marked tests add the 8B-sized head and its memory bound.

Without CUDA the op runs its chunked PyTorch path; interpreter/ checks the Triton kernel on CPU.
"""

import pytest
import torch
from numerics import assert_within_oracle
from torch._dynamo.testing import CompileCounterWithBackend, EagerAndRecordGraphs
from torch.utils.flop_counter import FlopCounterMode

from ops.linear_cross_entropy import LinearCrossEntropyFunction, chunked, linear_cross_entropy, op
from ops.linear_cross_entropy.reference import reference_loss_and_grads

REDUCTIONS = ["mean", "sum", "none"]
LOW = [torch.bfloat16, torch.float16]
ENTRIES = {
    "function": linear_cross_entropy,
    "op": lambda *args: torch.ops.cs336.linear_cross_entropy(*args),
    "autograd_function": lambda *args: LinearCrossEntropyFunction.apply(*args),
}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def generator(device: str = "cpu", seed: int = 1234) -> torch.Generator:
    """Inputs are drawn on `device` (an 8B head's weight is slow to draw on the host)."""
    return torch.Generator(device=device).manual_seed(seed)


@pytest.fixture
def gen():
    return generator()


@pytest.fixture
def fresh_dynamo():
    """Forget earlier compiles: frames compiled under a dispatch mode (FlopCounterMode) can be reused."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_inputs(lead, d, vocab, dtype, gen, magnitude=1.0, ignored=0.2, ignore_index=-100):
    """x (*lead, D), weight (V, D) with logits ~ N(0, magnitude^2), targets (*lead) with a share
    ignored; on the generator's device."""
    device = gen.device
    x = torch.randn(*lead, d, generator=gen, device=device) * magnitude
    weight = torch.randn(vocab, d, generator=gen, device=device) / d**0.5
    targets = torch.randint(0, vocab, lead, generator=gen, device=device)
    targets[torch.rand(lead, generator=gen, device=device) < ignored] = ignore_index
    return x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), targets


def upstream(reduction, targets, gen):
    """The gradient fed to backward: a scalar, or one per token for `none`."""
    shape = targets.shape if reduction == "none" else ()
    return torch.rand(shape, generator=gen, device=gen.device) + 0.5


def run(fn, x, weight, targets, ignore_index, reduction, grad):
    """(loss, dx, dweight) of fn on fresh leaves."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(x, weight, targets, ignore_index, reduction)
    loss.backward(grad)
    return loss.detach(), x.grad, weight.grad


def assert_close_to_reference(ours, x, weight, targets, ignore_index, reduction, grad):
    """Loss, dx, dweight against float64, within the oracle bound: at most 2x what the reference math
    done by plain PyTorch in the inputs' dtype errs on this machine (tests/numerics.py)."""
    exact = reference_loss_and_grads(x, weight, targets, ignore_index, reduction, grad)
    loss, dx, dw = ours
    assert loss.dtype == torch.float32 and dx.dtype == x.dtype and dw.dtype == weight.dtype
    assert loss.shape == exact[0].shape and dx.shape == x.shape and dw.shape == weight.shape
    low = reference_loss_and_grads(x, weight, targets, ignore_index, reduction, grad, dtype=x.dtype)
    for name, a, lo, b in zip(("loss", "dx", "dweight"), ours, low, exact):
        assert_within_oracle(name, a, lo, b, dtype=x.dtype)


# (leading dims, D, V): token counts that are no tile multiple, the three vocabularies, D in {64, 96, 128}.
CASES = [((133,), 64, 10000), ((7,), 96, 50257), ((2, 3), 64, 151936), ((1,), 128, 10000), ((3, 5), 128, 300)]


@pytest.mark.numerics
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_fp32(case, reduction, gen):
    x, weight, targets = make_inputs(*case, torch.float32, gen)
    grad = upstream(reduction, targets, gen)
    ours = run(linear_cross_entropy, x, weight, targets, -100, reduction, grad)
    assert_close_to_reference(ours, x, weight, targets, -100, reduction, grad)


@pytest.mark.numerics
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_matches_float64_low_precision(case, dtype, reduction, gen):
    x, weight, targets = make_inputs(*case, dtype, gen)
    grad = upstream(reduction, targets, gen)
    ours = run(linear_cross_entropy, x, weight, targets, -100, reduction, grad)
    assert_close_to_reference(ours, x, weight, targets, -100, reduction, grad)


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("lead", [(), (9,), (2, 5), (0,), (2, 0)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_empty(lead, reduction, entry, device):
    gen = generator(device)
    x, weight, targets = make_inputs(lead, 16, 50, torch.float32, gen)
    grad = upstream(reduction, targets, gen)
    ours = run(ENTRIES[entry], x, weight, targets, -100, reduction, grad)
    assert_close_to_reference(ours, x, weight, targets, -100, reduction, grad)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, LOW[0]])
@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(dtype, device):
    gen = generator(device)
    x = torch.randn(13, 3, 24, generator=gen, device=device).to(dtype).transpose(0, 1)  # (3, 13, D) interleaved
    weight = (torch.randn(24, 70, generator=gen, device=device) / 5).to(dtype).T  # (V, D), strides (1, V)
    targets = torch.randint(0, 70, (13, 3), generator=gen, device=device).T
    assert not (x.is_contiguous() or weight.is_contiguous() or targets.is_contiguous())
    for reduction in REDUCTIONS:
        grad = upstream(reduction, targets, gen)
        ours = run(linear_cross_entropy, x, weight, targets, -100, reduction, grad)
        assert_close_to_reference(ours, x, weight, targets, -100, reduction, grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_does_not_reach_inside(reduction, device):
    """Under autocast the op still computes in its inputs' dtypes (float32 here)."""
    gen = generator(device)
    x, weight, targets = make_inputs((40,), 32, 300, torch.float32, gen)
    grad = upstream(reduction, targets, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = run(linear_cross_entropy, x, weight, targets, -100, reduction, grad)
    assert_close_to_reference(ours, x, weight, targets, -100, reduction, grad)


@pytest.mark.numerics
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_recomputes_every_reduction(reduction, device):
    """The bwd op (what `none` uses) is right for mean and sum too, and for one gradient alone."""
    gen = generator(device)
    x, weight, targets = make_inputs((4, 9), 32, 120, torch.float32, gen)
    grad = upstream(reduction, targets, gen)
    _, dx_ref, dw_ref = reference_loss_and_grads(x, weight, targets, -100, reduction, grad)
    _, dx_low, dw_low = reference_loss_and_grads(x, weight, targets, -100, reduction, grad, dtype=torch.float32)
    dx, dw = torch.ops.cs336.linear_cross_entropy_bwd(grad, x.detach(), weight.detach(), targets, -100, reduction,
                                                      True, False)
    assert_within_oracle("dx", dx, dx_low, dx_ref)
    assert dw.numel() == 0
    dx, dw = torch.ops.cs336.linear_cross_entropy_bwd(grad, x.detach(), weight.detach(), targets, -100, reduction,
                                                      False, True)
    assert_within_oracle("dweight", dw, dw_low, dw_ref)
    assert dx.numel() == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_all_targets_ignored_give_zero_loss_and_gradients(reduction, device):
    gen = generator(device)
    x, weight, targets = make_inputs((2, 6), 16, 40, torch.float32, gen, ignored=1.0)
    loss, dx, dw = run(linear_cross_entropy, x, weight, targets, -100, reduction, upstream(reduction, targets, gen))
    assert torch.equal(loss, torch.zeros_like(loss))  # F.cross_entropy's mean gives nan here
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


def test_custom_ignore_index_and_many_chunks(gen, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 4 * 300 * 7)  # 7 tokens a chunk: 19 chunks, a ragged last one
    x, weight, targets = make_inputs((133,), 32, 300, torch.float32, gen, ignore_index=0)
    for reduction in REDUCTIONS:
        grad = upstream(reduction, targets, gen)
        ours = run(linear_cross_entropy, x, weight, targets, 0, reduction, grad)
        assert_close_to_reference(ours, x, weight, targets, 0, reduction, grad)


@pytest.mark.numerics
# Logits 100x larger carry 100x the absolute rounding of the matmul, which the softmax turns into
# relative error of the gradients: the oracle (torch's same math at the same magnitude) scales with it.
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_stay_finite(dtype, device):
    gen = generator(device)
    x, weight, targets = make_inputs((40,), 64, 1000, dtype, gen, magnitude=100.0)
    grad = upstream("mean", targets, gen)
    ours = run(linear_cross_entropy, x, weight, targets, -100, "mean", grad)
    assert all(torch.isfinite(t).all() for t in ours)
    assert_close_to_reference(ours, x, weight, targets, -100, "mean", grad)


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_three_matmuls_for_mean_and_sum(reduction, needs, device):
    """mean/sum: the gradients come with the forward (1 matmul + 1 per gradient); none: the backward
    recomputes the logits (1 + 1 + 1 per gradient); nothing to differentiate: 1."""
    gen = generator(device)
    x, weight, targets = make_inputs((50,), 32, 300, torch.float32, gen)
    x.requires_grad_(needs[0])
    weight.requires_grad_(needs[1])
    with FlopCounterMode(display=False) as counter:
        loss = linear_cross_entropy(x, weight, targets, reduction=reduction)
        if loss.requires_grad:
            loss.sum().backward()
    matmuls = 1 + sum(needs) + (reduction == "none" and any(needs))
    assert counter.get_total_flops() == matmuls * 2 * 50 * 32 * 300


def test_compiled_forward_makes_the_gradients(gen, fresh_dynamo):
    """Under torch.compile too, mean's backward reuses what the forward made: three matmuls."""
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    x, weight, targets = make_inputs((50,), 32, 300, torch.float32, gen)
    with FlopCounterMode(display=False) as counter:
        compiled(x, weight, targets).backward()
    assert counter.get_total_flops() == 3 * 2 * 50 * 32 * 300


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_no_graph_no_gradients(mode, compiled, fresh_dynamo, device):
    """Inputs that require grad under no_grad / inference_mode: the forward alone, one matmul."""
    gen = generator(device)
    fn = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True) if compiled else linear_cross_entropy
    x, weight, targets = make_inputs((50,), 32, 300, torch.float32, gen)
    with mode(), FlopCounterMode(display=False) as counter:
        loss = fn(x, weight, targets)
    assert counter.get_total_flops() == 2 * 50 * 32 * 300
    low = reference_loss_and_grads(x, weight, targets, dtype=torch.float32)[0]
    assert_within_oracle("loss", loss, low, reference_loss_and_grads(x, weight, targets)[0])


def test_gradients_only_where_required(gen):
    x, weight, targets = make_inputs((20,), 16, 30, torch.float32, gen)
    weight.requires_grad_(False)
    linear_cross_entropy(x, weight, targets).backward()
    assert x.grad is not None and weight.grad is None


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(reduction, device):
    gen = generator(device)
    x, weight, targets = make_inputs((3, 11), 16, 37, torch.float32, gen)
    for grad_x, grad_weight in ((True, True), (False, True), (False, False)):
        args = (x.detach(), weight.detach(), targets, -100, reduction, grad_x, grad_weight)
        torch.library.opcheck(torch.ops.cs336.linear_cross_entropy_fwd.default, args)
        grad = upstream(reduction, targets, gen)
        torch.library.opcheck(torch.ops.cs336.linear_cross_entropy_bwd.default, (grad, *args))
    torch.library.opcheck(torch.ops.cs336.linear_cross_entropy.default, (x, weight, targets, -100, reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compiled_fullgraph_matches_float64(reduction, gen, fresh_dynamo):
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    x, weight, targets = make_inputs((2, 19), 32, 500, torch.float32, gen)
    grad = upstream(reduction, targets, gen)
    ours = run(compiled, x, weight, targets, -100, reduction, grad)
    assert_close_to_reference(ours, x, weight, targets, -100, reduction, grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dynamic_compile_records_one_node_and_never_recompiles(reduction, fresh_dynamo):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x, w, t: linear_cross_entropy(x, w, t, reduction=reduction).sum(),
                             backend=counter, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    for lead in ((2, 5), (2, 7), (3, 133), (4, 40)):
        x, weight, targets = make_inputs(lead, 16, 64, torch.float32, gen)
        compiled(x, weight, targets).backward()
    assert counter.frame_count == 1
    recorder = EagerAndRecordGraphs()
    torch.compile(linear_cross_entropy, backend=recorder, fullgraph=True)(x, weight, targets)
    assert str(recorder.graphs[0].code).count("torch.ops.cs336.linear_cross_entropy(") == 1


def _inputs(**override):
    base = dict(x=torch.randn(2, 3, 8), weight=torch.randn(20, 8), targets=torch.randint(0, 20, (2, 3)),
                ignore_index=-100, reduction="mean")
    return base | override


BAD_INPUTS = [
    ("targets shape", dict(targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, "targets must have shape"),
    ("targets dtype", dict(targets=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "targets must be int64"),
    ("weight 3-D", dict(weight=torch.randn(1, 20, 8)), ValueError, "weight must have shape"),
    ("weight empty", dict(weight=torch.randn(0, 8)), ValueError, "weight must have shape"),
    ("head dim", dict(weight=torch.randn(20, 9)), ValueError, "head dim mismatch"),
    ("x scalar", dict(x=torch.tensor(1.0), targets=torch.tensor(1)), ValueError, "x must have shape"),
    ("dtypes differ", dict(weight=torch.randn(20, 8, dtype=torch.bfloat16)), TypeError, "weight has dtype"),
    ("unsupported dtype", dict(x=torch.randn(2, 3, 8, dtype=torch.float64),
                               weight=torch.randn(20, 8, dtype=torch.float64)), TypeError, "x has dtype"),
    ("devices differ", dict(targets=torch.randint(0, 20, (2, 3), device="meta")), ValueError, "one device"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("target too large", dict(targets=torch.tensor([[0, 1, 20], [3, 4, 5]])), ValueError,
     r"targets must lie in \[0, 20\)"),
    ("negative target", dict(targets=torch.tensor([[0, -1, 2], [3, 4, 5]])), ValueError, "got -1"),
    ("not a tensor", dict(weight=[[1.0]]), TypeError, "weight must be a torch.Tensor"),
]


@pytest.mark.parametrize("name, override, error, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("entry", ["function", "autograd_function"])
def test_bad_input_raises_clear_error(name, override, error, message, entry):
    args = _inputs(**override)
    with pytest.raises(error, match=f"^linear_cross_entropy: .*{message}"):
        ENTRIES[entry](*args.values())


def test_ignore_index_outside_the_vocabulary_is_not_an_error():
    args = _inputs(targets=torch.tensor([[0, 7, 7], [3, 7, 5]]), ignore_index=7)
    assert torch.isfinite(linear_cross_entropy(*args.values()))


# ------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, reduction", [
    (torch.float32, "mean"), (torch.bfloat16, "mean"), (torch.bfloat16, "sum"),
    (torch.bfloat16, "none"), (torch.float16, "mean")])
def test_cuda_8b_head_matches_float64(dtype, reduction):
    """D = 4096, V = 151936 (an 8B model's head) over 4099 tokens: several chunks and groups, ragged
    last ones."""
    gen = generator("cuda", 0)
    x, weight, targets = make_inputs((4099,), 4096, 151936, dtype, gen)
    grad = upstream(reduction, targets, gen)
    ours = run(linear_cross_entropy, x, weight, targets, -100, reduction, grad)
    assert_close_to_reference(ours, x, weight, targets, -100, reduction, grad)


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_compiled_with_inductor(reduction, fresh_dynamo):
    """Inductor around the op (its CPU C++ compile takes ~40 s, so this runs on CUDA only)."""
    compiled = torch.compile(lambda x, w, t: linear_cross_entropy(x * 2, w, t, reduction=reduction) * 3,
                             fullgraph=True)
    gen = generator("cuda", 0)
    x, weight, targets = make_inputs((300,), 64, 1000, torch.float32, gen)
    grad = upstream(reduction, targets, gen)
    ours = run(lambda x, w, t, i, r: compiled(x / 2, w, t) / 3, x, weight, targets, -100, reduction, grad)
    assert_close_to_reference(ours, x, weight, targets, -100, reduction, grad)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_uses_the_mixed_precision_gemms(dtype):
    """cuBLAS makes float32 logits and accumulates float32 dW from bf16/fp16 (else: slow fallbacks)."""
    from ops.linear_cross_entropy import launch

    assert launch.mixed_precision_gemms(torch.device("cuda", torch.cuda.current_device()), dtype)


@pytest.mark.cuda
def test_cuda_extra_memory_is_bounded_and_independent_of_tokens():
    """Peak memory of forward + backward beyond inputs and gradients: one chunk of float32 logits, one
    group of dlogits and the float32 dW, whatever the number of tokens."""
    from ops.linear_cross_entropy import launch

    d, vocab = 4096, 151936
    chunk, group = launch.chunk_rows(vocab, 2)
    bound = 4 * chunk * vocab + 2 * group * vocab + 4 * vocab * d + 64 * 2**20
    linear_cross_entropy(*make_inputs((64,), d, 1000, torch.bfloat16, generator("cuda"))).backward()  # cuBLAS set-up
    extras = []
    for n in (group, 3 * group + 5):
        x, weight, targets = make_inputs((n,), d, vocab, torch.bfloat16, generator("cuda", 0))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() + 2 * (x.numel() + weight.numel())  # + the gradients to come
        torch.cuda.reset_peak_memory_stats()
        linear_cross_entropy(x, weight, targets).backward()
        torch.cuda.synchronize()
        extras.append(torch.cuda.max_memory_allocated() - before)
        del x, weight, targets
    assert max(extras) <= bound, [e / 2**30 for e in extras]
    assert abs(extras[1] - extras[0]) <= 64 * 2**20, [e / 2**30 for e in extras]


@pytest.mark.cuda
def test_cuda_out_of_range_targets(monkeypatch):
    x, weight, targets = (t.cuda() for t in _inputs(targets=torch.tensor([[0, 1, 20], [3, -5, 5]])).values()
                          if isinstance(t, torch.Tensor))
    # Unchecked (the default): treated as ignored, no stray memory access.
    loss = linear_cross_entropy(x, weight, targets, reduction="none")
    assert loss[0, 2].item() == 0.0 and loss[1, 1].item() == 0.0 and torch.isfinite(loss).all()
    monkeypatch.setattr(op, "CHECK_TARGETS", True)
    with pytest.raises(ValueError, match="targets must lie in"):
        linear_cross_entropy(x, weight, targets)
