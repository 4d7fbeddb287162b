"""A memory-budgeted activation-checkpointing plan: the policy each layer runs with.

    costs = measure_layer_costs(block, batch=2, ctx=32768)   # one block, every candidate policy
    plan = solve_plan(costs, num_layers=34, budget=44 * GIB)  # the least recomputation that fits
    print(plan.describe())    # ac plan: 20 x selective, 14 x full; kept 41.2 GiB of 44.0 budget; ...
    apply_activation_checkpointing(model, plan.per_layer)

The layers are identical, so a plan is a count per policy: n_p layers under policy p, with
sum n_p = layers and sum n_p kept_p <= budget, minimising sum n_p recompute_p. The counts are
enumerated (a few policies, tens of layers: at most some 10^5 combinations, a fraction of a second).

The cost table is measured, for one block at the run's micro-batch shape and dtype on its device:

- kept bytes: the storages the block's forward creates that are still alive after it (with its
  output alive): what backward keeps, whoever holds it (autograd's saved tensors, the checkpoint's
  saved input, the selective policy's cache). Counted by a dispatch mode holding weak references
  (`retained_bytes`), so it works on any device. `torch.autograd.graph.saved_tensors_hooks` would
  see only part of it: a non-reentrant checkpoint installs its own hooks inside the region, and the
  selective cache holds its tensors outside autograd (the tests use the hooks as an independent
  count where they do see everything: `none`, and `full`'s saved input).
  With attention "flash" the bytes are measured with SDPA in its place: eager `ops.flash_attn`
  skips the op dispatch, so the selective policy would not see (and keep) it in eager, while the
  compiled run keeps its O and L, the same tensors as SDPA's.
  For a compiled run on CUDA (`compiled=True`) the bytes are instead those the compiled block keeps,
  read from the caching allocator (`compiled_memory`), with what its backward adds at its peak: the
  eager count predicted an all-`selective` 8B step well, but plans keeping more than `selective`
  ran out of memory on an H200 even with a 12 GiB margin under the card (docs/activation_checkpointing.md).
- recompute seconds: what backward re-runs, timed op by op in forward (no autograd): the
  attention and each block matmul alone, and the block's pointwise rest (the whole block's
  forward less those); a policy re-runs the rest, the attention unless selective, and the
  matmuls it does not keep, never w2 (recomputation stops at its input). This is the compute a
  compiled step re-runs, without the eager selective policy's dispatch overhead, which a compiled
  graph does not pay. Median of `runs` timings each, on the device (cs336_systems.timing.call_seconds).

Order of the layers: the plan gives the first layers the policies that keep least. Backward frees
the last layers' activations first while gradients accumulate, so the big ones go first.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from cs336_systems.errors import ConfigError
from cs336_systems.parallel.activation_checkpointing import (
    BLOCK_MATMULS,
    ActivationCheckpointing,
    CheckpointedBlocks,
    parse_policy,
)
from cs336_systems.timing import call_seconds

__all__ = ["CANDIDATES", "CheckpointPlan", "LayerCosts", "measure_layer_costs", "retained_bytes", "solve_plan"]

GIB = 2**30

CANDIDATES = ("none", "selective:q_proj+k_proj+v_proj+output_proj+w1+w3", "selective:q_proj+k_proj+v_proj+output_proj",
              "selective", "full")
"""The per-layer policies a plan chooses from, most memory first: keep everything; keep every matmul
but w2 (recompute only norms, RoPE and pointwise work); keep the attention projections; `selective`
(the attention and its output projection); `full` (only the input)."""


# ---------------------------------------------------------------- kept bytes


class _OutputStorages(TorchDispatchMode):
    """Records the storage of every tensor an operator returns while active (a weak reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not new memory (it may be a parameter's).
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                storage = t.untyped_storage()
                # Keyed by address: a freed storage's address is reused, and the newest owner wins.
                self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self, exclude: torch.Tensor | None = None) -> int:
        skip = exclude.untyped_storage().data_ptr() if exclude is not None else None
        return sum(n for ptr, (ref, n) in self.storages.items() if ptr != skip and not ref.expired())


def retained_bytes(fn: Callable, *args) -> tuple[int, object]:
    """(bytes of the tensors `fn(*args)` creates that are still alive after it returns, not counting
    its output's storage; the output). With the output alive, that is what autograd keeps for
    backward: saved activations, checkpoint inputs and the selective cache alike."""
    with _OutputStorages() as tracker:
        out = fn(*args)
    return tracker.live_bytes(exclude=out if isinstance(out, torch.Tensor) and out.dim() else None), out


def _region(block: nn.Module, policy: ActivationCheckpointing) -> nn.Module:
    """`block` as a run wraps it under a single-layer `policy`."""
    if policy.mode == "none":
        return block
    saved = policy.saved_matmuls if policy.mode == "selective" else None
    return CheckpointedBlocks([block], first=0, saved_matmuls=saved)


def kept_bytes(block: nn.Module, x: torch.Tensor, policy: ActivationCheckpointing) -> int:
    """Bytes one block keeps for backward under `policy` (a single-layer policy), input `x` (B, T, d).

    The input is copied inside the measurement, so it counts when the block keeps it (as every
    policy does); the output does not (it is the next block's input, counted there)."""
    region = _region(block, policy)
    leaf = x.detach().requires_grad_()  # (B, T, d): the graph reaches it, as the embedding's output

    def forward() -> torch.Tensor:
        return region(leaf.clone())

    kept, _ = retained_bytes(forward)
    return kept


def compiled_memory(block: nn.Module, x: torch.Tensor, policy: ActivationCheckpointing) -> tuple[int, int]:
    """CUDA: (bytes kept from forward to backward, bytes its backward adds at its peak) of one block under
    `policy`, compiled as a run compiles it (each block its own region) and counted by the caching
    allocator: what the compiled graphs save and hold, which the eager count need not equal (the
    partitioner chooses the saved tensors; the backward graph's buffers live as inductor plans them).
    The backward's share is the layer's working set while its gradients are formed: the recomputation,
    the gradient temporaries and the block's parameter gradients, above what the forward kept."""
    device = x.device
    compiled = torch.compile(_region(block, policy))
    leaf = x.detach().requires_grad_()  # (B, T, d)
    compiled(leaf.clone()).sum().backward()  # compiles the forward and backward graphs
    block.zero_grad(set_to_none=True)
    leaf.grad = None
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    out = compiled(leaf.clone())  # (B, T, d)
    torch.cuda.synchronize(device)
    after_forward = torch.cuda.memory_allocated(device)
    kept = after_forward - start - _allocated_bytes(out)
    loss = out.sum()
    torch.cuda.synchronize(device)
    before_backward = torch.cuda.memory_allocated(device)  # the kept bytes, the output and the loss
    torch.cuda.reset_peak_memory_stats(device)
    loss.backward()
    torch.cuda.synchronize(device)
    backward = torch.cuda.max_memory_allocated(device) - before_backward
    del out, loss
    block.zero_grad(set_to_none=True)
    return kept, backward


def _allocated_bytes(tensor: torch.Tensor) -> int:
    """What the caching allocator holds for `tensor`'s storage: its bytes rounded up to the allocator's
    512-byte granularity (a 2-byte scalar takes 512)."""
    return -(-tensor.untyped_storage().nbytes() // 512) * 512


# ---------------------------------------------------------------- recompute seconds


def median_seconds(fn: Callable[[], object], device: torch.device | str, runs: int) -> float:
    """Median seconds of `fn()` over `runs` calls after one untimed call, device drained at both ends."""
    return statistics.median(call_seconds(fn, device, warmup=1, iters=runs))


def _linear(block: nn.Module, name: str) -> nn.Module:
    return getattr(block.ffn if name in ("w1", "w2", "w3") else block.attn, name)


def op_seconds(block: nn.Module, x: torch.Tensor, runs: int) -> dict[str, float]:
    """Forward seconds of the block ("block"), its attention ("attention") and each of its matmuls
    (BLOCK_MATMULS names), no autograd, on inputs of the shapes they see in the block."""
    device = x.device
    batch, tokens, d_model = x.shape
    heads = block.attn.num_heads
    with torch.no_grad():
        ff_in = torch.randn(batch, tokens, block.ffn.w2.weight.shape[1], device=device, dtype=x.dtype)  # (B, T, d_ff)
        q, k, v = (torch.randn(batch, heads, tokens, d_model // heads, device=device, dtype=x.dtype)
                   for _ in range(3))  # (B, H, T, head_dim)
        seconds = {"block": median_seconds(lambda: block(x), device, runs),
                   "attention": median_seconds(lambda: block.attn.attention_fn(q, k, v, True), device, runs)}
        for name in BLOCK_MATMULS:
            linear, inp = _linear(block, name), ff_in if name == "w2" else x
            seconds[name] = median_seconds(lambda linear=linear, inp=inp: linear(inp), device, runs)
    return seconds


def recompute_seconds(ops: dict[str, float], policy: ActivationCheckpointing) -> float:
    """Seconds backward spends re-running one block's forward under `policy`, from `op_seconds`: the
    block's work that is neither attention nor a matmul (norms, RoPE, SwiGLU's pointwise work: the block
    less those, at least 0), plus the attention and each matmul the policy does not keep. w2 is never
    re-run (recomputation stops at its input). Built from positive parts, so a policy that keeps more
    never costs more."""
    if policy.mode == "none":
        return 0.0
    rest = max(ops["block"] - ops["attention"] - sum(ops[name] for name in BLOCK_MATMULS), 0.0)
    kept = set(policy.saved_matmuls) if policy.mode == "selective" else set()
    rerun = [name for name in BLOCK_MATMULS if name != "w2" and name not in kept]
    return rest + (0.0 if policy.mode == "selective" else ops["attention"]) + sum(ops[name] for name in rerun)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class LayerCosts:
    """What one layer costs under each candidate policy, measured at one micro-batch shape."""

    policies: tuple[str, ...]
    """Policy spellings, in the order of the other fields."""
    kept_bytes: tuple[int, ...]
    """Bytes one layer keeps from forward to backward."""
    recompute_s: tuple[float, ...]
    """Seconds one layer's backward spends recomputing."""
    backward_bytes: tuple[int, ...] | None = None
    """Bytes one layer's backward adds at its peak above what it kept (compiled_memory), where measured
    (compiled on CUDA); None where not: then the budget takes `none`'s kept bytes for it."""
    shape: tuple[int, int, int] = (0, 0, 0)
    """(batch, ctx, d_model) of the measurement."""
    dtype: str = ""
    device: str = ""
    attention: str = ""
    """The block's attention (timed as it is; its bytes counted as SDPA's when "flash")."""

    def __post_init__(self) -> None:
        if not (len(self.policies) == len(self.kept_bytes) == len(self.recompute_s)) or not self.policies:
            raise ValueError("LayerCosts: one kept_bytes and recompute_s per policy, at least one policy")
        if self.backward_bytes is not None and len(self.backward_bytes) != len(self.policies):
            raise ValueError("LayerCosts: one backward_bytes per policy, or none")

    def transient(self, policy: str) -> int:
        """What one layer under `policy` holds while its backward runs, beyond its kept bytes: the measured
        backward working set, or where none was measured, `none`'s kept bytes (its whole forward again)."""
        if self.backward_bytes is None:
            return max(self.kept_bytes)
        return self.backward_bytes[self.policies.index(str(parse_policy(policy)))]

    def cost(self, policy: str) -> tuple[int, float]:
        """(kept bytes, recompute seconds) of one layer under `policy`."""
        i = self.policies.index(str(parse_policy(policy)))
        return self.kept_bytes[i], self.recompute_s[i]

    def describe(self) -> str:
        """One line per policy: MiB kept and ms recomputed per layer."""
        batch, ctx, d_model = self.shape
        head = (f"per-layer costs ({batch} x {ctx} tokens, d_model {d_model}, {self.dtype}, {self.device}, "
                f"attention {self.attention}):")
        backward = self.backward_bytes or (None,) * len(self.policies)
        rows = [f"  {p:<48} kept {b / 2**20:10.4g} MiB  recompute {s * 1e3:9.4g} ms"
                + ("" if w is None else f"  backward adds {w / 2**20:10.4g} MiB")
                for p, b, s, w in zip(self.policies, self.kept_bytes, self.recompute_s, backward)]
        return "\n".join([head, *rows])

    def to_dict(self) -> dict:
        backward = self.backward_bytes or (None,) * len(self.policies)
        return {"shape": list(self.shape), "dtype": self.dtype, "device": self.device, "attention": self.attention,
                "policies": {p: {"kept_bytes": b, "recompute_s": s, **({} if w is None else {"backward_bytes": w})}
                             for p, b, s, w in zip(self.policies, self.kept_bytes, self.recompute_s, backward)}}


def measure_layer_costs(block: nn.Module, batch: int, ctx: int, *, policies: Sequence[str] = CANDIDATES,
                        runs: int = 3, compiled: bool = False) -> LayerCosts:
    """The cost table of `block` (a TransformerBlock, on its device and in its dtype) for a micro-batch of
    `batch` x `ctx` tokens: kept bytes per policy, and recompute seconds from `runs` timings of each op.
    `compiled` (the run compiles its blocks) on CUDA: the bytes as the compiled block keeps them and
    its backward's working set (compiled_memory); elsewhere the eager count."""
    param = block.attn.q_proj.weight  # (d_model, d_model): the block's device and dtype
    generator = torch.Generator(device=param.device).manual_seed(0)
    x = torch.randn(batch, ctx, param.shape[1], device=param.device, dtype=param.dtype,
                    generator=generator)  # (B, T, d_model)
    parsed = [parse_policy(p) for p in policies]
    backward = None
    if compiled and param.device.type == "cuda":
        kept, backward = zip(*(compiled_memory(block, x, p) for p in parsed))
        torch.compiler.reset()  # the run compiles its own blocks: no cache entries (or recompiles) left over
    else:
        with _attention_for_bytes(block):
            kept = tuple(kept_bytes(block, x, p) for p in parsed)
    ops = op_seconds(block, x, runs)
    return LayerCosts(policies=tuple(str(p) for p in parsed), kept_bytes=tuple(kept),
                      recompute_s=tuple(recompute_seconds(ops, p) for p in parsed), backward_bytes=backward,
                      shape=(batch, ctx, x.shape[-1]), dtype=str(param.dtype).removeprefix("torch."),
                      device=str(param.device), attention=block.attn.attention)


class _attention_for_bytes:
    """SDPA in place of "flash" while bytes are counted (see the module docstring), restored after."""

    def __init__(self, block: nn.Module) -> None:
        self.attn, self.name = block.attn, block.attn.attention

    def __enter__(self) -> None:
        if self.name == "flash":
            self.attn.set_attention("sdpa")

    def __exit__(self, *exc: object) -> None:
        self.attn.set_attention(self.name)


# ---------------------------------------------------------------- the solver


@dataclass(frozen=True)
class CheckpointPlan:
    """Layers per policy, what they keep and recompute, against the budget they were chosen for."""

    counts: tuple[tuple[str, int], ...]
    """(policy, layers), least kept bytes first: the order of the layers (module docstring)."""
    kept_bytes: int
    budget_bytes: int
    recompute_s: float
    """Seconds of recomputation per step (per micro-batch)."""
    transient_bytes: int = 0
    """What the backward of one layer adds (its policies' largest `LayerCosts.transient`), where the budget
    holds it too (`solve_plan(..., transient=True)`); 0 where the budget is for kept bytes alone."""
    costs: LayerCosts | None = None
    budget_terms: str = ""
    """How the budget was reached, for the record ("given", or free memory less what)."""

    @property
    def per_layer(self) -> tuple[ActivationCheckpointing, ...]:
        """One policy per layer, in layer order: what apply_activation_checkpointing takes."""
        return tuple(parse_policy(p) for p, n in self.counts for _ in range(n))

    def describe(self) -> str:
        """One line: `ac plan: 20 x selective, 14 x full; kept 41.2 GiB of 44.0 budget; recompute 0.31 s/step`."""
        layers = ", ".join(f"{n} x {p}" for p, n in reversed(self.counts))  # most memory first
        backward = f" + one layer's backward {_gib(self.transient_bytes)}" if self.transient_bytes else ""
        return (f"ac plan: {layers}; kept {_gib(self.kept_bytes)}{backward} GiB of {_gib(self.budget_bytes)} budget; "
                f"recompute {self.recompute_s:.3g} s/step")

    def to_dict(self) -> dict:
        return {"plan": self.describe(), "counts": dict(self.counts), "kept_bytes": self.kept_bytes,
                "transient_bytes": self.transient_bytes, "budget_bytes": self.budget_bytes,
                "recompute_s": self.recompute_s, "budget": self.budget_terms,
                "costs": self.costs.to_dict() if self.costs else None}


def solve_plan(costs: LayerCosts, num_layers: int, budget: int, *, what: str = "--activation-checkpointing",
               budget_terms: str = "", transient: bool = False) -> CheckpointPlan:
    """The counts per policy with the least recompute seconds whose kept bytes fit `budget`; a ConfigError
    naming `what` and the numbers when even the least-memory plan does not fit. Ties go to the plan that
    keeps more: what is kept is work not redone, where timings too small to tell (a clamped pointwise
    rest) make two plans equal. `transient`: the budget also holds the backward of one layer, the
    largest `costs.transient(p)` over the policies the plan uses (a plan without the policy whose
    backward needs most does not reserve for it)."""
    if num_layers < 1:
        raise ValueError(f"solve_plan: num_layers must be positive, got {num_layers}")
    options = _undominated(costs, transient)
    best = None
    for counts in _compositions(num_layers, len(options)):
        kept = sum(n * b for n, (_, b, _, _) in zip(counts, options))
        backward = max(t for n, (_, _, _, t) in zip(counts, options) if n) if transient else 0
        if kept + backward > budget:
            continue
        key = (sum(n * s for n, (_, _, s, _) in zip(counts, options)), -kept)
        if best is None or key < best[0]:
            best = key, counts, backward
    if best is None:
        least = min(costs.kept_bytes)
        policy = costs.policies[costs.kept_bytes.index(least)]
        backward = f" and its backward {costs.transient(policy) / GIB:.3g} GiB" if transient else ""
        raise ConfigError(f"{what}: no plan fits a budget of {budget / GIB:.3g} GiB{_terms(budget_terms)}: the least "
                          f"memory, {num_layers} x {policy}, keeps {num_layers * least / GIB:.3g} GiB{backward}; free "
                          "memory (a smaller --batch or context), or give a budget with budget:GiB")
    (seconds, minus_kept), counts, backward = best
    order = sorted(zip(options, counts), key=lambda item: item[0][1])  # least kept bytes first
    return CheckpointPlan(counts=tuple((p, n) for (p, _, _, _), n in order if n), kept_bytes=-minus_kept,
                          budget_bytes=budget, recompute_s=seconds, transient_bytes=backward, costs=costs,
                          budget_terms=budget_terms)


def _gib(n: int) -> str:
    """GiB with one decimal, or three significant digits below 1 GiB (tiny test models)."""
    return f"{n / GIB:.1f}" if n >= GIB else f"{n / GIB:.3g}"


def _terms(budget_terms: str) -> str:
    return f" ({budget_terms})" if budget_terms else ""


def _undominated(costs: LayerCosts, transient: bool) -> list[tuple[str, int, float, int]]:
    """The (policy, bytes, seconds, backward bytes) that no other policy beats, faster in no more bytes
    (and, where the backward counts, no larger a backward): the others never belong to a best plan, and
    dropping them shortens the enumeration."""
    rows = [(p, b, s, costs.transient(p) if transient else 0)
            for p, b, s in zip(costs.policies, costs.kept_bytes, costs.recompute_s)]
    return [row for row in rows if not any(b <= row[1] and s < row[2] and t <= row[3] for _, b, s, t in rows)]


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every tuple of `parts` non-negative integers summing to `total` (stars and bars)."""
    for bars in itertools.combinations(range(total + parts - 1), parts - 1):
        edges = (-1, *bars, total + parts - 1)
        yield tuple(edges[i + 1] - edges[i] - 1 for i in range(parts))
