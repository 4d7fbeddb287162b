"""How much memory a training step needs at least, checked against the device before anything is allocated.

An 8B model on a laptop used to run for two minutes, print nothing and be killed by the kernel; now
`train` (from `prepare`) and `bench step` refuse it in one line. The estimate is a floor, per process:

    parameters + AdamW state + max(gradients, activations)

- parameters N values, gradients N, AdamW state 2 N (exp_avg, exp_avg_sq), all in the parameter dtype;
  FSDP divides all three by the processes, a sharded optimizer divides the AdamW state. Gradients do not
  exist during the forward (zero_grad sets them to None), activations are gone after the backward: the
  peak holds one or the other, plus what lives across steps.
- activations: tokens per forward x layers x the values per token and block that the checkpointing
  policy keeps (`kept_per_token`), plus one checkpointed group's recomputation in the backward, plus the
  logits when the loss is not fused. The counts are what backward needs that only a matmul can remake
  (a compiler recomputes norms and pointwise work, eager keeps them too: docs/activation_checkpointing.md
  measured 36 d_model per token and block for `none` where this counts 6 + 2 d_ff/d_model).

Not counted: the allocator's slack, DDP's gradient buckets, FSDP's gathered layers, compiler workspaces,
temporaries. A run under the floor can still run out of memory; a run over it cannot fit. For the 8b-32k
leaderboard step the floor is 84 GiB with `selective` (measured peak: 107) and 68 with `full` (76).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cs336_systems.errors import ConfigError
from cs336_systems.parallel.activation_checkpointing import ActivationCheckpointing, parse_policy
from cs336_systems.parallel.checkpoint_plan import CheckpointPlan, measure_layer_costs, solve_plan
from cs336_systems.presets import PRESETS, ModelConfig, ModelShape
from cs336_systems.runtime import PARAM_DTYPES

if TYPE_CHECKING:
    from cs336_systems.training.config import TrainConfig

GIB = 2**30
PLAN_FILE = "ac_plan.json"
"""train's record of an auto / budget:GiB plan, in its output directory."""


@dataclass(frozen=True)
class MemoryPlan:
    """The memory floor of one process, in bytes, and how many processes share the device's memory."""

    parameters: int
    optimizer: int
    gradients: int
    activations: int
    processes: int = 1
    """Processes on this memory: the local workers on a CPU, 1 on a GPU (one process each)."""

    @property
    def per_process(self) -> int:
        return self.parameters + self.optimizer + max(self.gradients, self.activations)

    @property
    def total(self) -> int:
        return self.per_process * self.processes

    def describe(self) -> str:
        """The formula with its numbers, in GiB."""
        terms = (f"parameters {self.parameters / GIB:.3g} + AdamW state {self.optimizer / GIB:.3g} + "
                 f"max(gradients {self.gradients / GIB:.3g}, activations {self.activations / GIB:.3g}) GiB")
        return f"{self.processes} processes x [{terms}]" if self.processes > 1 else terms


def kept_per_token(shape: ModelShape, policy: ActivationCheckpointing) -> tuple[float, float]:
    """(values each block keeps per token from forward to backward, values one block recomputes per token
    in the backward), both in units of d_model. A plan request (auto, budget:GiB) counts as `full`.

    A block's matmul outputs: q, k, v, the attention output O, the output projection (the residual
    stream after attention), SwiGLU's w1 and w3 (d_ff wide); plus the block's input: 6 + 2 d_ff/d_model.
    """
    ff = shape.d_ff / shape.d_model
    block = 6 + 2 * ff
    if policy.planned:  # a plan keeps at least what `full` keeps: the floor of any plan it may choose
        policy = parse_policy("full")
    if policy.mode == "none":
        return block, 0.0
    if policy.mode == "full":  # one input per group; backward re-runs a whole group
        return 1 / policy.group_size, block * policy.group_size
    # selective: the input and the matmul outputs it names (O too, but only when compiled: not counted)
    saved = sum(ff if name in ("w1", "w3") else 1 for name in policy.saved_matmuls if name != "w2")
    return 1 + saved, block - 1 - saved


def estimate(shape: ModelShape, vocab_size: int, *, tokens: int, param_bytes: int, activation_bytes: int,
             policy: str, fused_loss: bool = True, world_size: int = 1, fsdp: bool = False,
             shard_optimizer: bool = False, processes: int = 1, optimizer_in_backward: bool = False) -> MemoryPlan:
    """The floor of one process training `shape` on `tokens` tokens per forward (see the module docstring).
    With `optimizer_in_backward` each gradient is freed once its parameter is updated: the gradients term
    is the largest parameter's (the LM head or embedding table, or one SwiGLU matrix)."""
    values = shape.num_params(vocab_size)
    params = values * param_bytes // (world_size if fsdp else 1)
    optimizer = 2 * values * param_bytes // (world_size if fsdp or shard_optimizer else 1)
    kept, recomputed = kept_per_token(shape, parse_policy(policy))
    activations = tokens * shape.d_model * (shape.num_layers * kept + recomputed) * activation_bytes
    if not fused_loss:  # the whole (tokens, vocabulary) logits exist at once
        activations += tokens * vocab_size * activation_bytes
    gradients = params
    if optimizer_in_backward:
        gradients = max(vocab_size, shape.d_ff, shape.d_model) * shape.d_model * param_bytes
    return MemoryPlan(parameters=params, optimizer=optimizer, gradients=gradients, activations=int(activations),
                      processes=processes)


def available_bytes(device: torch.device | str, processes: int = 1) -> int:
    """Memory a run can take now: the CPU's available RAM (MemAvailable: free plus reclaimable caches), or
    on CUDA the free memory of the GPU this process trains on. For `processes` > 1 spawned ranks, one GPU
    each, the least total memory of their GPUs: reading free memory would open a CUDA context (hundreds
    of MiB) on every GPU in the launching process, held for the whole job."""
    device = torch.device(device)
    if device.type == "cuda":
        first = torch.cuda.current_device() if device.index is None else device.index
        if "LOCAL_RANK" in os.environ:  # a torchrun worker checks its own GPU
            first, processes = int(os.environ["LOCAL_RANK"]), 1
        if processes == 1:
            return torch.cuda.mem_get_info(first)[0]
        return min(torch.cuda.get_device_properties(first + i).total_memory for i in range(processes))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(plan: MemoryPlan, available: int, what: str, advice: str) -> None:
    """A ConfigError when the floor of `what` (the flags that chose the run) is more than `available`;
    `advice` says what would fit."""
    if plan.total > available:
        raise ConfigError(f"{what} needs at least {plan.total / GIB:.3g} GiB of memory ({plan.describe()}) but "
                          f"the device has {available / GIB:.3g} GiB available; {advice}")


def largest_fitting(candidates: dict[str, MemoryPlan], available: int) -> str | None:
    """The last candidate (they come smallest first) whose floor fits `available`, or None."""
    fitting = [name for name, plan in candidates.items() if plan.total <= available]
    return fitting[-1] if fitting else None


def check_train_memory(config: TrainConfig) -> None:
    """`train`: refuse a run whose floor exceeds the device's memory, naming a preset that would fit and the
    flags that lower memory. `config` is a TrainConfig whose vocabulary is resolved."""
    model, runtime, parallel = config.model, config.runtime, config.parallel
    device = torch.device(runtime.device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", parallel.world_size))
    param_bytes = PARAM_DTYPES[runtime.param_dtype].itemsize

    def plan(shape: ModelShape) -> MemoryPlan:
        return estimate(shape, model.vocab_size, tokens=config.micro_batch_size * config.context_length,
                        param_bytes=param_bytes, activation_bytes=2 if runtime.bf16 else param_bytes,
                        policy=parallel.activation_checkpointing, fused_loss=config.loss == "fused",
                        world_size=parallel.world_size, fsdp=parallel.fsdp,
                        shard_optimizer=parallel.shard_optimizer,
                        processes=local if device.type == "cpu" else 1,
                        optimizer_in_backward=config.optimizer.in_backward)

    free = available_bytes(device, parallel.world_size if device.type == "cuda" else 1)
    smaller = largest_fitting({name: plan(shape) for name, shape in sorted(PRESETS.items(), key=_size)
                               if shape.num_params() < model.shape.num_params()}, free)
    advice = [f"--preset {smaller} fits (at this batch and context)"] if smaller else []
    advice.append("lower memory with " + ", ".join(_lowering_flags(config)))
    what = (f"this run ({model.shape.num_params(model.vocab_size) / 1e9:.3g} B parameters, "
            f"{config.micro_batch_size} x {config.context_length} tokens per forward)")
    check_fits(plan(model.shape), free, what, "; ".join(advice))


def _size(item: tuple[str, ModelShape]) -> int:
    return item[1].num_params()


def _lowering_flags(config: TrainConfig) -> list[str]:
    """The flags that would lower this run's memory, skipping those already at their lowest."""
    flags = []
    if config.parallel.activation_checkpointing not in ("full", "every:1"):
        flags.append("--activation-checkpointing full")
    if config.runtime.param_dtype == "fp32":
        flags.append("--param-dtype bf16")
    if torch.device(config.runtime.device).type == "cpu" and config.parallel.world_size > 1:
        flags.append("--nproc 1")
    elif not config.parallel.fsdp and config.parallel.world_size > 1:
        flags.append("--fsdp")
    return [*flags, "a smaller --batch-size or --context-length (or more --grad-accum-steps)"]


# ---------------------------------------------------------------- memory-budgeted checkpointing plans


MARGIN_FRACTION = 0.02
"""`auto`'s default margin: 2% of the device's memory (2.6 GiB of an H200, 1.6 of an H100) left free for
the allocator's fragmentation and what the budget does not count (compiler workspaces, temporaries).
Why 2 and not more: the all-`full` 8B step measured a 76 GiB peak on an H200, which an 80 GB H100
(79.1 GiB) holds with 3 GiB to spare; a 5% margin (4 GiB) would refuse the one plan that fits there.
docs/activation_checkpointing.md gives the accounting against measured peaks."""


def device_memory(device: torch.device | str) -> int:
    """All of the device's memory: the GPU's total, or the CPU's RAM (MemTotal)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def activation_budget(policy: ActivationCheckpointing, floor: MemoryPlan, *, available: int, total: int,
                      loss_bytes: int = 0) -> tuple[int, str]:
    """(bytes the layers may keep for backward, how that was reached) for a plan request.

    budget:GiB: that, for the kept bytes alone. auto[:MARGIN]: `available` less the parameters and AdamW
    state (`floor`'s), the loss's working set and the margin (MARGIN GiB, default MARGIN_FRACTION of
    `total`); the solver fits in it the kept bytes and the backward of one layer (its working set while it
    runs, by the policies the plan uses: solve_plan(transient=True)). The kept activations share memory
    with the gradients (max(gradients, activations), module docstring): a budget below the gradients
    leaves no room, and is an error here."""
    if policy.mode == "budget":
        return int(policy.gib * GIB), "given"
    margin = int(MARGIN_FRACTION * total) if policy.gib is None else int(policy.gib * GIB)
    budget = available - floor.parameters - floor.optimizer - loss_bytes - margin
    terms = (f"{available / GIB:.3g} GiB free - parameters {floor.parameters / GIB:.3g} - AdamW state "
             f"{floor.optimizer / GIB:.3g} - loss {loss_bytes / GIB:.3g} - margin {margin / GIB:.3g}")
    if budget < floor.gradients:
        raise ConfigError(f"--activation-checkpointing {policy}: no plan fits: {terms} = {budget / GIB:.3g} GiB, "
                          f"less than the gradients ({floor.gradients / GIB:.3g} GiB), which take the activations' "
                          "place in backward; lower memory (a smaller --batch-size or --context-length, "
                          f"{'a smaller margin (auto:GiB), ' if margin else ''}--fsdp with more processes)")
    return budget, terms


def resolve_checkpointing(policy: ActivationCheckpointing, model: ModelConfig, *, batch: int, context_length: int,
                          dtype: torch.dtype, device: torch.device | str, param_dtype: torch.dtype | None = None,
                          fused_loss: bool = True, world_size: int = 1, fsdp: bool = False,
                          shard_optimizer: bool = False, available: int | None = None,
                          optimizer_in_backward: bool = False, compiled: bool = False
                          ) -> ActivationCheckpointing | CheckpointPlan:
    """`policy` itself, or for a plan request (auto, budget:GiB) the plan: one block of `model` is built on
    `device` in `dtype` (the activations' dtype: the compute dtype), its per-policy costs measured at
    `batch` x `context_length` tokens, and the layer counts solved against the budget (activation_budget;
    parameters, gradients and AdamW state in `param_dtype`, default `dtype`; `available` default: what
    is free now). `compiled`: the run compiles its blocks (on CUDA the table is then measured compiled:
    checkpoint_plan.measure_layer_costs). Call before the model is built: the free memory read then is
    what the whole run gets."""
    if not policy.planned:
        return policy
    with torch.device(device):
        block = _one_block(model, context_length).to(dtype)
    costs = measure_layer_costs(block, batch, context_length, compiled=compiled)
    del block
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    tokens = batch * context_length
    floor = estimate(model.shape, model.vocab_size, tokens=tokens, param_bytes=(param_dtype or dtype).itemsize,
                     activation_bytes=dtype.itemsize, policy="none", fused_loss=fused_loss, world_size=world_size,
                     fsdp=fsdp, shard_optimizer=shard_optimizer, optimizer_in_backward=optimizer_in_backward)
    available = available_bytes(device) if available is None else available
    loss = 0 if fused_loss else tokens * model.vocab_size * dtype.itemsize  # the whole logits at once
    budget, terms = activation_budget(policy, floor, available=available, total=device_memory(device),
                                      loss_bytes=loss)
    return solve_plan(costs, model.num_layers, budget, what=f"--activation-checkpointing {policy}",
                      budget_terms=terms, transient=policy.mode == "auto")


def resolve_train_checkpointing(config: TrainConfig, device: torch.device
                                ) -> ActivationCheckpointing | CheckpointPlan:
    """`train`'s policy, or its plan for this process (resolve_checkpointing at the micro-batch shape, in the
    compute dtype; on a CPU the local processes share the RAM, so each budgets its share)."""
    runtime, parallel = config.runtime, config.parallel
    local = int(os.environ.get("LOCAL_WORLD_SIZE", parallel.world_size)) if device.type == "cpu" else 1
    policy = parallel.activation_checkpointing
    if not policy.planned:
        return policy
    return resolve_checkpointing(policy, config.model, batch=config.micro_batch_size,
                                 context_length=config.context_length, dtype=runtime.precision.compute,
                                 param_dtype=runtime.precision.param, device=device,
                                 fused_loss=config.loss == "fused", world_size=parallel.world_size,
                                 fsdp=parallel.fsdp, shard_optimizer=parallel.shard_optimizer,
                                 available=available_bytes(device) // local,
                                 optimizer_in_backward=config.optimizer.in_backward, compiled=runtime.compile)


def record_plan(plan: CheckpointPlan, out_dir: str | None) -> None:
    """Print the plan (one line) and, with an output directory, save it as OUT_DIR/ac_plan.json (the
    cost table, the budget and how it was reached). Called by rank 0."""
    print(plan.describe(), flush=True)
    if out_dir:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=1))


def _one_block(model: ModelConfig, context_length: int) -> torch.nn.Module:
    """A freshly initialised TransformerBlock of `model` (on the default device), attention and RoPE included."""
    from cs336_basics.model import RotaryEmbedding, TransformerBlock

    rope = RotaryEmbedding(max(context_length, model.context_length), model.d_model // model.num_heads,
                           theta=model.rope_theta)
    return TransformerBlock(model.d_model, model.num_heads, model.d_ff, rope, attention=model.attention)
