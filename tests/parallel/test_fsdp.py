"""FSDP on gloo ranks trains exactly like one process, eager and per-block compiled.

Each case trains a model for 3 steps, every rank on its slice of a fixed batch, and compares the
full parameters (`gather_full_params`) with one process that trains on the whole batch. Two
references:
- `accumulated`: one process, rank 0's initial weights, the gradient of each rank's slice computed
  separately and averaged as the ranks do (sum of grad / world in rank order). This is the same
  arithmetic, so in fp32 on 2 ranks the parameters must be bit-identical (`torch.equal`).
- `whole`: one forward over the whole batch. A matmul over 2N rows does not round like two over N
  summed, so no data-parallel code equals it on every CPU. The bound is measured: twice plain
  torch's own difference between the accumulated and the whole-batch runs (`split_gap`), plus what
  compiling costs (below).
Every other bound is measured in the test too, never a constant (tests/numerics.py):
- compiled blocks run aot_eager's decomposed graphs, which round differently from the eager
  kernels: ours may differ from the eager reference by twice what the same compiled blocks differ
  by in one process (`compile_gap`; AdamW's division by sqrt(v) makes it far larger than the
  gradients' rounding);
- on 3 ranks gloo adds the three shards' gradients in an order of its own ((a + b) + c is not
  a + (b + c) in floats): twice the largest difference that another order of the sum makes in one
  process (`order_gap`).
With a bf16 or fp16 compute dtype the reference casts its weights the same way (`helpers.compute_in`):
the same arithmetic, so the same rules.

Ranks start from different seeds: only FSDP's broadcast makes them agree. Launching ranks costs
seconds, so one launch per world size runs every case and returns plain data; the tests assert on
it. Compiled variants use the aot_eager backend (inductor's C++ compile is too slow for 2 cores).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import compute_in
from numerics import ORACLE_FACTOR
from torch import nn

from cs336_basics.model import BasicsTransformerLM
from cs336_systems.distributed.launch import launch
from cs336_systems.parallel.activation_checkpointing import apply_activation_checkpointing
from cs336_systems.parallel.fsdp import FSDP, SHARD_SUFFIX, SHARDED_LAYERS

VOCAB, DIM, HIDDEN, BATCH, SEQ, STEPS, SEED = 13, 7, 11, 12, 6, 3, 1000


class ToyLM(nn.Module):
    """torch.nn layers: an embedding tied to the head, Linear layers with biases (7x11: sizes divisible
    by neither 2 nor 3, so every shard is padded), a LayerNorm (replicated)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(self.norm(h))


def _basics() -> BasicsTransformerLM:
    return BasicsTransformerLM(vocab_size=VOCAB, context_length=SEQ, d_model=32, num_layers=2, num_heads=4, d_ff=48)


MODELS = {"toy": ToyLM, "basics": _basics}


@dataclass(frozen=True)
class Case:
    model: str = "basics"
    optimizer: str = "adamw"
    mode: str = "eager"  # or "compiled-blocks"
    dtype: str = "float32"  # the compute dtype
    checkpointing: bool = False

    @property
    def id(self) -> str:
        extra = "-checkpointed" if self.checkpointing else ""
        return f"{self.model}-{self.optimizer}-{self.mode}-{self.dtype}{extra}"


CASES_2 = [
    Case("toy", "sgd"),
    Case("toy", "adamw"),
    Case("basics", "adamw"),
    Case("basics", "adamw", "compiled-blocks"),
    Case("basics", "adamw", checkpointing=True),
    Case("basics", "adamw", "compiled-blocks", checkpointing=True),
    Case("toy", "adamw", dtype="bfloat16"),
    Case("basics", "adamw", dtype="bfloat16"),
    Case("basics", "sgd", "compiled-blocks", dtype="float16"),
]
CASES_3 = [Case("toy", "adamw"), Case("basics", "sgd")]


# ------------------------------------------------------------------------------ on each rank


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def _optimizer(case: Case, params) -> torch.optim.Optimizer:
    if case.optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _build(case: Case, seed: int) -> nn.Module:
    """The model of `case`: checkpointed, then compiled per block, as parallelize() orders them."""
    torch.manual_seed(seed)
    model = MODELS[case.model]()
    if case.checkpointing:
        apply_activation_checkpointing(model, "full")
    if case.mode == "compiled-blocks":
        for block in model.layers:
            block.compile(backend="aot_eager")
    return model


def _reference(case: Case, world: int, whole: bool = False, compiled: bool = False,
               order: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """One process from rank 0's initial weights, eager (or with `case`'s compiled blocks): per-slice
    gradients averaged like the ranks (summed in `order`, default rank order), or `whole`. Not
    checkpointed: recomputation repeats the same arithmetic."""
    model = _build(dataclasses.replace(case, checkpointing=False, mode="compiled-blocks" if compiled else "eager"),
                   SEED)
    dtype = getattr(torch, case.dtype)
    names = {p: name for name, p in model.named_parameters()}
    if dtype != torch.float32:
        compute_in(model, dtype, SHARDED_LAYERS)
    opt = _optimizer(case, model.parameters())
    x, y = _batch()
    for _ in range(STEPS):
        if whole:
            _loss(model, x, y).backward()
        else:
            grads = []
            for xs, ys in zip(x.chunk(world), y.chunk(world)):
                opt.zero_grad()
                _loss(model, xs, ys).backward()
                grads.append([None if p.grad is None else p.grad / world for p in model.parameters()])
            grads = [grads[i] for i in order or range(world)]
            for p, *slices in zip(model.parameters(), *grads):
                p.grad = None if slices[0] is None else _sum_in_order(slices)
        opt.step()
        opt.zero_grad()
    return {names[p]: p.detach() for p in model.parameters()}


def _sum_in_order(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def _train(case: Case) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _build(case, SEED + rank)  # ranks start apart: only the broadcast makes them agree
    dtype = getattr(torch, case.dtype)
    fsdp = FSDP(model, compute_dtype=None if dtype == torch.float32 else dtype)
    opt = _optimizer(case, fsdp.parameters())
    x, y = (t.chunk(world)[rank] for t in _batch())
    in_flight = []
    _probe_overlap(fsdp, in_flight)
    for step in range(STEPS):
        if step == 1:  # the first forward also holds the root's own layers (see fsdp.py): count from step 2
            fsdp.gather_stats.reset()
        _loss(fsdp, x, y).backward()
        fsdp.finish_gradient_synchronization()
        grads = {name: (tuple(p.grad.shape), p.grad.dtype, tuple(p.shape)) for name, p in
                 fsdp.module.named_parameters() if p.requires_grad}
        replicated = {n: p.grad.flatten().tolist() for n, p in fsdp.module.named_parameters() if SHARD_SUFFIX not in n}
        opt.step()
        opt.zero_grad()
    full = {_plain_name(n): t for n, t in fsdp.gather_full_params().items()}
    largest = max(sp.shard_numel * world * sp.flat.element_size() for sp in fsdp.sharded_params)
    result = {"grads": grads, "replicated": replicated, "in_flight": in_flight,
              "peak_gathered_layers": fsdp.gather_stats.peak / largest, "gathered_after": fsdp.gathered_bytes()}
    accumulated = _reference(case, world)
    result["accumulated"] = _compare(full, accumulated)
    gaps = {"compile_gap": lambda: _reference(case, world, compiled=True),  # the oracles: plain torch's own
            "split_gap": lambda: _reference(case, world, whole=True)}  # differences, measured here
    if case.mode == "compiled-blocks":
        result["compile_gap"] = _compare(gaps["compile_gap"](), accumulated)["error"]
    if world == 2 and dtype == torch.float32:
        whole = gaps["split_gap"]()
        result["whole"] = _compare(full, whole)
        result["split_gap"] = _compare(accumulated, whole)["error"]
    if world == 3:
        result["order_gap"] = max(_compare(_reference(case, world, order=order), accumulated)["error"]
                                  for order in itertools.permutations(range(world)))
    return result


def _compare(full: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    return {"equal": full.keys() == ref.keys() and all(torch.equal(full[n], ref[n]) for n in ref),
            "error": max((full[n] - ref[n]).abs().max().item() for n in ref)}


def _plain_name(name: str) -> str:
    """The plain model's name of a parameter of a checkpointed one (one block per wrapper)."""
    return re.sub(r"^layers\.(\d+)\.blocks\.0\.", r"layers.\1.", name)


def _probe_overlap(fsdp: FSDP, seen: list[int]) -> None:
    """Reduce-scatters in flight when backward reaches the embedding (the last backward compute)."""
    embedding = fsdp.sharded_layers[0]

    def on_forward(module, args, out):
        out.register_hook(lambda grad: seen.append(fsdp.reduce_scatters_in_flight))

    embedding.register_forward_hook(on_forward)


def _bad_input() -> dict[str, str]:
    errors = {}
    for name, make in {"shape": lambda: FSDP(nn.Linear(4 + dist.get_rank(), 3)),
                       "dtype": lambda: FSDP(nn.Linear(4, 3), compute_dtype=torch.int32)}.items():
        try:
            make()
            errors[name] = ""
        except (ValueError, TypeError) as error:
            errors[name] = str(error)
    return errors


def _checkpoint_round_trip() -> dict:
    """full_state_dict on these ranks loads into a plain model, and back into FSDP."""
    torch.manual_seed(SEED)
    plain = ToyLM()
    fsdp = FSDP(ToyLM())
    sd = fsdp.full_state_dict()
    same_keys = sd.keys() == plain.state_dict().keys()
    plain.load_state_dict(sd)
    shifted = {k: v + 1 for k, v in sd.items()}
    fsdp.load_full_state_dict(shifted)
    back = fsdp.full_state_dict()
    return {"same_keys": same_keys, "round_trip": all(torch.equal(back[k], shifted[k]) for k in sd)}


def _run_everything(cases: list[Case]) -> dict:
    torch.use_deterministic_algorithms(True)
    results = {}
    for case in cases:
        torch._dynamo.reset()
        results[case.id] = _train(case)
    results["bad_input"] = _bad_input()
    results["checkpoint"] = _checkpoint_round_trip()
    return results


# ----------------------------------------------------------------------------------- pytest


@pytest.fixture(scope="module")
def ranks2() -> list[dict]:
    return launch(_run_everything, 2, CASES_2, backend="gloo")


@pytest.fixture(scope="module")
def ranks3() -> list[dict]:
    return launch(_run_everything, 3, CASES_3, backend="gloo")


@pytest.mark.numerics
@pytest.mark.parametrize("case", CASES_2, ids=lambda c: c.id)
def test_two_ranks_match_one_process(ranks2: list[dict], case: Case) -> None:
    for rank, results in enumerate(ranks2):
        result = results[case.id]
        compile_gap = result.get("compile_gap", 0.0)
        if case.mode == "eager":  # the same arithmetic in the same order: bit-identical
            assert result["accumulated"]["equal"], f"rank {rank}: {result['accumulated']}"
        bound = ORACLE_FACTOR * compile_gap
        assert result["accumulated"]["error"] <= bound, f"rank {rank}: {result['accumulated']}, bound {bound}"
        if "whole" in result:
            bound = ORACLE_FACTOR * (result["split_gap"] + compile_gap)
            assert result["whole"]["error"] <= bound, f"rank {rank}: {result['whole']}, bound {bound}"


@pytest.mark.numerics
@pytest.mark.parametrize("case", CASES_3, ids=lambda c: c.id)
def test_three_ranks_match_one_process(ranks3: list[dict], case: Case) -> None:
    for rank, results in enumerate(ranks3):
        result = results[case.id]
        bound = ORACLE_FACTOR * result["order_gap"]
        assert result["accumulated"]["error"] <= bound, f"rank {rank}: {result['accumulated']}, bound {bound}"


@pytest.mark.parametrize("case", CASES_2, ids=lambda c: c.id)
def test_grads_are_fp32_and_shaped_like_their_parameter(ranks2: list[dict], case: Case) -> None:
    for results in ranks2:
        for name, (grad_shape, grad_dtype, shape) in results[case.id]["grads"].items():
            assert grad_shape == shape and grad_dtype == torch.float32, name


@pytest.mark.parametrize("case", CASES_2, ids=lambda c: c.id)
def test_replicated_grads_agree_across_ranks(ranks2: list[dict], case: Case) -> None:
    ours, theirs = ranks2[0][case.id]["replicated"], ranks2[1][case.id]["replicated"]
    assert ours and ours.keys() == theirs.keys()
    assert all(ours[n] == theirs[n] for n in ours)


@pytest.mark.parametrize("case", [c for c in CASES_2 if c.model == "basics"], ids=lambda c: c.id)
def test_gathered_weights_are_freed_and_few(ranks2: list[dict], case: Case) -> None:
    for results in ranks2:
        result = results[case.id]
        assert result["gathered_after"] == 0
        # In units of the largest weight, so generous: the layer in use and the next one. A
        # checkpointed block's recomputation gathers the whole block (its backward follows at once).
        assert result["peak_gathered_layers"] <= (7 if case.checkpointing else 2)


@pytest.mark.parametrize("case", [c for c in CASES_2 if not c.checkpointing], ids=lambda c: c.id)
def test_reduce_scatter_overlaps_backward(ranks2: list[dict], case: Case) -> None:
    assert min(ranks2[0][case.id]["in_flight"]) > 0


@pytest.mark.parametrize("what", ["shape", "dtype"])
def test_bad_input_fails_on_every_rank(ranks2: list[dict], what: str) -> None:
    expected = {"shape": "differs from rank 0", "dtype": "compute_dtype"}[what]
    for results in ranks2:
        assert expected in results["bad_input"][what], results["bad_input"][what]


def test_full_state_dict_round_trip(ranks2: list[dict]) -> None:
    assert all(r["checkpoint"]["same_keys"] and r["checkpoint"]["round_trip"] for r in ranks2)


def test_needs_a_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="process group"):
        FSDP(nn.Linear(2, 2))
