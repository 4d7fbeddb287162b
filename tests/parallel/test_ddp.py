"""DDP wrappers on 2 gloo ranks match single-process training on the whole batch.

Every case trains a toy LM (tied embedding/head, a frozen parameter, a buffer, a layer only some
steps use) for 5 steps on disjoint halves of a fixed batch and compares with one process training
on the whole batch. Ranks initialise from different seeds, so only the wrapper's broadcast of
rank 0's parameters and buffers can make them agree. Launching ranks costs seconds, so one launch runs every
case and returns plain data;
the parametrized tests below only assert on it. Compiled variants use the aot_eager backend:
the same graphs without inductor's C++ compile, which is far too slow for a 2-core CI box.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from numerics import ORACLE_FACTOR
from torch import nn

from cs336_systems.distributed.launch import launch
from cs336_systems.parallel.ddp import MIB, DDPBucketed, DDPIndividualParameters
from cs336_systems.parallel.ddp_baselines import FlatDDP, NaiveDDP

WRAPPERS = {"individual": DDPIndividualParameters, "bucketed": DDPBucketed, "naive": NaiveDDP, "flat": FlatDDP}

VOCAB, DIM, BATCH, SEQ, STEPS, SEED = 16, 8, 8, 4, 5, 1000
MODES = ("eager", "compiled-model", "compiled-wrapper", "compiled-blocks")
# Bucket caps for the toy model's 11 trainable tensors (fp32 bytes, launch order: extra.bias 32,
# extra.weight 256, then per block fc2.bias 32, fc2.weight 512, fc1.bias 64, fc1.weight 512, and
# the tied embedding 512 last) and the bucket count each must give.
BUCKETS = {"one": (None, 1), "two": (1600 / MIB, 2), "six": (600 / MIB, 6)}


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.relu(self.fc1(h)))


class ToyLM(nn.Module):
    """Embedding tied to the output head, a frozen scale, a buffer, two blocks, and `extra` used on request."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5, requires_grad=False)
        self.register_buffer("shift", 0.1 * torch.randn(dim))
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.extra = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, use_extra: bool = False) -> torch.Tensor:
        h = self.embed(tokens) * self.scale + self.shift  # (B, T, D)
        for block in self.blocks:
            h = block(h)
        if use_extra:
            h = h + self.extra(h)
        return self.head(h)  # (B, T, V)


@dataclass(frozen=True)
class Case:
    wrapper: str  # individual | bucketed | naive | flat
    mode: str = "eager"
    buckets: str = "one"  # key of BUCKETS (bucketed only)
    view: bool = False  # gradient_as_bucket_view, gradients zeroed in place
    accumulate: int = 1  # micro-batches per step, all but the last under no_sync()
    disagree: bool = False  # only rank 0 uses `extra`: ranks differ in which parameters get gradients

    @property
    def id(self) -> str:
        parts = [self.wrapper, self.mode] + ([self.buckets] if self.wrapper == "bucketed" else [])
        parts += ["view"] * self.view + [f"accumulate{self.accumulate}"] * (self.accumulate > 1)
        return "-".join(parts + ["disagree"] * self.disagree)


CASES = (
    [Case("individual", mode) for mode in MODES]
    + [Case("bucketed", mode, buckets) for mode in MODES for buckets in BUCKETS]
    + [Case("bucketed", "eager", "two", view=True), Case("bucketed", "compiled-wrapper", "six", view=True),
       Case("individual", "eager", view=True)]
    + [Case(w, mode, "two", accumulate=2) for w in ("individual", "bucketed") for mode in ("eager", "compiled-model")]
    + [Case(w, "eager", "six", disagree=True) for w in ("individual", "bucketed")]
    + [Case("naive"), Case("flat")]
)


# ------------------------------------------------------------------------------ on each rank


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, use_extra: bool) -> torch.Tensor:
    return F.cross_entropy(model(x, use_extra).flatten(0, 1), y.flatten())


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Weight decay would move a parameter whose gradient became zeros instead of staying None.
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)


def _reference(case: Case, split: bool = False, compiled: bool = False) -> dict[str, torch.Tensor]:
    """One process, rank 0's initialisation: whole batch, or (`split`) each rank's micro-batches'
    gradients summed and the two halves averaged, as the ranks do; eager or compiled (aot_eager)."""
    torch.manual_seed(SEED)
    model = ToyLM()
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    opt = _optimizer(model)
    x, y = _batch()
    half = BATCH // 2
    for _ in range(STEPS):
        if split:
            _split_gradients(forward, model, case, x, y)
        elif case.disagree:  # rank 0's half uses `extra`, rank 1's does not; the mean of both losses
            loss = (_loss(forward, x[:half], y[:half], True) + _loss(forward, x[half:], y[half:], False)) / 2
            loss.backward()
        else:
            _loss(forward, x, y, False).backward()
        opt.step()
        opt.zero_grad()
    return _state(model)


def _split_gradients(forward: nn.Module, model: nn.Module, case: Case, x: torch.Tensor, y: torch.Tensor) -> None:
    """.grad = the mean over the two halves of each half's accumulated micro-batch gradients."""
    halves = []
    for rank, (xh, yh) in enumerate(zip(x.chunk(2), y.chunk(2))):
        model.zero_grad()
        for xm, ym in zip(xh.chunk(case.accumulate), yh.chunk(case.accumulate)):
            (_loss(forward, xm, ym, case.disagree and rank == 0) / case.accumulate).backward()
        halves.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name, p in model.named_parameters():
        grads = [h[name] for h in halves if name in h]
        p.grad = sum(grads[1:], grads[0]) / 2 if grads else None


def _gaps(case: Case, whole: dict[str, torch.Tensor]) -> float:
    """The oracle: plain torch's own distance from the whole-batch run when it splits the batch as
    the ranks do, plus when it compiles the model (aot_eager rounds unlike the eager kernels)."""
    gap = _distance(_reference(case, split=True), whole)
    return gap + (_distance(_reference(case, compiled=True), whole) if case.mode != "eager" else 0.0)


def _distance(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    return max((t - theirs[n]).abs().max().item() for n, t in ours.items())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict([*model.named_parameters(), *model.named_buffers()])


def _wrap(model: ToyLM, case: Case) -> nn.Module:
    compile_ = dict(backend="aot_eager")
    if case.mode == "compiled-blocks":
        for block in model.blocks:
            block.compile(**compile_)
    inner = torch.compile(model, **compile_) if case.mode == "compiled-model" else model
    if case.wrapper == "individual":
        ddp = DDPIndividualParameters(inner, gradient_as_bucket_view=case.view)
    elif case.wrapper == "bucketed":
        ddp = DDPBucketed(inner, bucket_size_mb=BUCKETS[case.buckets][0], gradient_as_bucket_view=case.view)
    else:
        ddp = WRAPPERS[case.wrapper](inner)
    return torch.compile(ddp, **compile_) if case.mode == "compiled-wrapper" else ddp


def _probe_overlap(ddp: nn.Module, model: ToyLM, seen: list[int]) -> None:
    """Record how many all-reduces are in flight when backward reaches the embedding, its last compute.

    Only where the embedding runs eagerly (a hook on a traced intermediate would be traced too).
    """
    def on_forward(module, args, out):
        # ddp.buckets is read at that moment: the wrapper rebuilds its buckets after step 1.
        out.register_hook(lambda grad: seen.append(sum(b.handle is not None for b in getattr(ddp, "buckets", []))))

    model.embed.register_forward_hook(on_forward)


def _train(case: Case) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(SEED + rank)  # ranks start apart: only the broadcast makes them agree
    model = ToyLM()
    torch.manual_seed(SEED)
    started_apart = any(not torch.equal(t, t0) for t, t0 in zip(_state(model).values(), _state(ToyLM()).values()))
    ddp = _wrap(model, case)
    n_buckets = len(getattr(ddp, "buckets", []))  # as planned at construction, before the one rebuild
    opt, in_flight = _optimizer(ddp), []
    if case.mode in ("eager", "compiled-blocks"):
        _probe_overlap(ddp, model, in_flight)
    x, y = (t.chunk(2)[rank].chunk(case.accumulate) for t in _batch())
    use_extra = case.disagree and rank == 0
    for _ in range(STEPS):
        ddp.on_train_batch_start()
        for i, (xm, ym) in enumerate(zip(x, y)):
            with ddp.no_sync() if i < case.accumulate - 1 else contextlib.nullcontext():
                (_loss(ddp, xm, ym, use_extra) / case.accumulate).backward()
            ddp.finish_gradient_synchronization()  # a no-op after a no_sync() backward
        grads_in_buckets = _grads_are_bucket_views(ddp)
        opt.step()
        opt.zero_grad(set_to_none=not case.view)
    reference = _reference(case)
    return {
        "errors": {n: (t - reference[n]).abs().max().item() for n, t in _state(model).items()},
        "oracle": _gaps(case, reference),
        "started_apart": started_apart,
        "buckets": n_buckets,
        "in_flight": in_flight,
        "grads_in_buckets": grads_in_buckets,
        "extra_grad_is_none": model.extra.weight.grad is None,
    }


def _grads_are_bucket_views(ddp: nn.Module) -> bool:
    buckets = getattr(ddp, "buckets", [])
    pairs = [(p, view) for b in buckets for p, view in zip(b.params, b.views) if p.grad is not None]
    return bool(pairs) and all(p.grad.data_ptr() == view.data_ptr() for p, view in pairs)


def _construction_errors() -> dict[str, str]:
    """Each wrapper on ranks whose models differ in shape, and the double-backward misuse."""
    errors = {}
    for name, cls in WRAPPERS.items():
        try:
            cls(ToyLM(dim=DIM + dist.get_rank()))
            errors[name] = ""
        except ValueError as error:
            errors[name] = str(error)
    ddp = DDPBucketed(ToyLM())
    x, y = _batch()
    _loss(ddp, x, y, False).backward()
    try:
        _loss(ddp, x, y, False).backward()
        errors["twice"] = ""
    except RuntimeError as error:
        errors["twice"] = str(error)
    ddp.finish_gradient_synchronization()
    return errors


def _run_everything() -> dict:
    results = {}
    for case in CASES:
        torch._dynamo.reset()  # fresh compile caches: no case may fall back to eager at the recompile limit
        results[case.id] = _train(case)
    results["construction"] = _construction_errors()
    results["collected"] = _wrappers_are_collected()
    return results


def _wrappers_are_collected() -> bool:
    """A dropped wrapper is freed even though its hooks stay on the (still used) parameters."""
    model = ToyLM()
    refs = [weakref.ref(DDPIndividualParameters(model)), weakref.ref(DDPBucketed(model, bucket_size_mb=None))]
    gc.collect()
    _loss(model, *_batch(), False).backward()  # the orphaned hooks fire and do nothing
    return all(ref() is None for ref in refs)


# ----------------------------------------------------------------------------------- pytest


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return launch(_run_everything, 2, backend="gloo")


@pytest.mark.numerics
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_single_process(ranks: list[dict], case: Case) -> None:
    """Within twice what plain torch itself moves from the whole-batch run by splitting the batch
    (and compiling) the same way, measured on each rank (`_gaps`)."""
    for rank, results in enumerate(ranks):
        errors, bound = results[case.id]["errors"], ORACLE_FACTOR * results[case.id]["oracle"]
        assert max(errors.values()) <= bound, f"rank {rank}: parameters differ from one process by {errors} > {bound}"


def test_ranks_start_from_different_parameters(ranks: list[dict]) -> None:
    """Else the equality above would not show that the wrappers broadcast rank 0's state."""
    assert all(ranks[1][case.id]["started_apart"] for case in CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c.wrapper in ("individual", "bucketed")], ids=lambda c: c.id)
def test_bucket_count(ranks: list[dict], case: Case) -> None:
    expected = 11 if case.wrapper == "individual" else BUCKETS[case.buckets][1]
    assert ranks[0][case.id]["buckets"] == expected


@pytest.mark.parametrize("case", [c for c in CASES if c.view], ids=lambda c: c.id)
def test_gradient_as_bucket_view(ranks: list[dict], case: Case) -> None:
    assert all(r[case.id]["grads_in_buckets"] for r in ranks)


@pytest.mark.parametrize("case", [c for c in CASES if not c.disagree and c.wrapper in ("individual", "bucketed")],
                         ids=lambda c: c.id)
def test_unused_parameter_keeps_no_gradient(ranks: list[dict], case: Case) -> None:
    assert all(r[case.id]["extra_grad_is_none"] for r in ranks)


@pytest.mark.parametrize("mode", ["eager", "compiled-blocks"])
@pytest.mark.parametrize("wrapper", ["individual", "bucketed"])
def test_communication_overlaps_backward(ranks: list[dict], wrapper: str, mode: str) -> None:
    case = Case(wrapper, mode, "six" if wrapper == "bucketed" else "one")
    # From step 2 on: step 1 launches in reverse parameter order, where unused `extra` comes first
    # and holds every bucket back until finish; the buckets are then rebuilt in arrival order.
    # (With the whole model compiled, backward is one autograd node: no gradient, so no
    # all-reduce, exists before all of backward's compute is done.)
    in_flight = ranks[0][case.id]["in_flight"]
    assert min(in_flight[1:]) > 0, f"no all-reduce had started when backward reached the embedding: {in_flight}"


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_shape_mismatch_fails_on_every_rank(ranks: list[dict], wrapper: str) -> None:
    for results in ranks:
        message = results["construction"][wrapper]
        assert "differs from rank 0" in message and "shape" in message, message


def test_dropped_wrappers_are_freed(ranks: list[dict]) -> None:
    assert all(r["collected"] for r in ranks)


def test_gradient_twice_in_one_step_is_an_error(ranks: list[dict]) -> None:
    assert all("got a gradient twice" in r["construction"]["twice"] for r in ranks)


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_needs_a_process_group(wrapper: str) -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="process group"):
        WRAPPERS[wrapper](nn.Linear(2, 2))


@pytest.mark.parametrize("size", [0, -1.0])
def test_bucket_size_must_be_positive(size: float) -> None:
    with pytest.raises(ValueError, match="bucket_size_mb must be > 0"):
        DDPBucketed(nn.Linear(2, 2), bucket_size_mb=size)
