"""The one place that turns a plain model into what a job trains: activation checkpointing, then
compilation, then the data-parallel wrapper. `train` and every benchmark call `parallelize`.

    forward, ddp = parallelize(model, world_size, compile_model=True, activation_checkpointing=parse_policy("full"),
                               precision=Precision(compute=torch.bfloat16))
    loss = lm_loss(forward, x, y)                      # forward: the module to call
    ...; ddp.finish_gradient_synchronization()         # ddp: the wrapper, or None with one rank

Order matters: checkpointing wraps blocks before they are compiled (so the compiled graph holds
the recomputation), and the DDP or FSDP (`fsdp=True`) wrapper goes around the compiled module (its
hooks and collectives stay in eager code, outside any traced graph).

Engines (`engine`): "ours" (DDPBucketed, FSDP) or "torch" (torch's DistributedDataParallel and
FSDP2's fully_shard, behind the same interface: torch_engines.py), the trusted references ours
are tested against. The precision policy is one value (runtime.Precision): FSDP gathers weights in
its compute dtype and reduces gradients in its reduce dtype, ours and torch's alike; DDP reduces in
the parameters' dtype (a Precision asking otherwise is refused).

Compilation is regional by default: each block (or checkpointed group of blocks) is compiled in
place with `module.compile()`, and since every block runs the same code on same-shaped tensors,
dynamo traces one graph and reuses it for all layers (parameters are graph inputs), so compile time
does not grow with depth. In place also means that code calling `model.layers` directly (a fused
LM-head loss that stops before `lm_head`) still runs the compiled blocks. `compile_mode="model"`
compiles the whole model as one graph instead, for comparison.
"""

from __future__ import annotations

import torch
from torch import nn

from cs336_systems.errors import ConfigError
from cs336_systems.parallel.activation_checkpointing import (
    NO_CHECKPOINTING,
    ActivationCheckpointing,
    apply_activation_checkpointing,
)
from cs336_systems.parallel.ddp import DDPBucketed
from cs336_systems.parallel.fsdp import FSDP
from cs336_systems.parallel.torch_engines import TorchDDP, TorchFSDP2
from cs336_systems.runtime import ENGINES, FP32, Precision

Wrapper = DDPBucketed | FSDP | TorchDDP | TorchFSDP2
"""What `parallelize` returns beside the module to call (None with one rank)."""

PerLayer = tuple[ActivationCheckpointing, ...]
"""One checkpointing policy per layer (a CheckpointPlan's `per_layer`)."""

COMPILE_MODES = ("regional", "model")
"""How `apply_compile` compiles: each repeated block in place, or the whole model as one graph."""


def apply_compile(model: nn.Module, enabled: bool, backend: str = "inductor", mode: str = "regional") -> nn.Module:
    """The module to call: `model` itself (uncompiled, or regional: its blocks and final norm compiled in
    place) or, with mode "model", a torch.compile wrapper sharing its parameters.

    Regional needs `model.layers` (a ModuleList of blocks); a model without one is compiled whole.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if not enabled:
        return model
    layers = getattr(model, "layers", None)
    if mode == "model" or not isinstance(layers, nn.ModuleList):
        return torch.compile(model, backend=backend)
    for layer in layers:  # one graph for all: the same code and shapes, parameters as inputs
        layer.compile(backend=backend)
    norm = getattr(model, "ln_final", None)
    if isinstance(norm, nn.Module):  # fused, the fp32 norm keeps no fp32 copies of its input for backward
        norm.compile(backend=backend)
    return model


def apply_ddp(module: nn.Module, world_size: int, bucket_size_mb: float | None) -> DDPBucketed | None:
    """Our bucketed DDP around `module` when there are several ranks, else None."""
    if world_size == 1:
        return None
    return DDPBucketed(module, bucket_size_mb=bucket_size_mb)


def apply_fsdp(module: nn.Module, world_size: int, precision: Precision = FP32) -> FSDP | None:
    """Our FSDP around `module` when there are several ranks, else None. It shards `module`'s
    Linear/Embedding parameters in place: afterwards `model.parameters()` are the local shards (plus
    the replicated norms), what the optimizer must get; checkpoints go through `full_state_dict()`.
    Weights are gathered in `precision`'s compute dtype, gradients reduce-scattered in its reduce dtype."""
    if world_size == 1:
        return None
    return FSDP(module, compute_dtype=precision.gather_dtype, reduce_dtype=precision.reduce_dtype)


def parallelize(model: nn.Module, world_size: int, *, compile_model: bool = False, compile_backend: str = "inductor",
                compile_mode: str = "regional",
                activation_checkpointing: ActivationCheckpointing | PerLayer = NO_CHECKPOINTING,
                bucket_size_mb: float | None = 25.0, fsdp: bool = False, engine: str = "ours",
                precision: Precision = FP32) -> tuple[nn.Module, Wrapper | None]:
    """(the module to call, the DDP or FSDP wrapper or None) for `model` on `world_size` ranks.

    `activation_checkpointing` is a parsed policy (activation_checkpointing.parse_policy, called once
    where the configuration is read) or one per layer (a CheckpointPlan's `per_layer`); it wraps
    `model.layers` in place, before compilation. `fsdp`
    shards instead of replicating; `engine` picks ours or torch's (ENGINES); `precision` is the run's
    precision policy (the model must already be in its parameter dtype).
    """
    per_layer = isinstance(activation_checkpointing, tuple) and all(
        isinstance(p, ActivationCheckpointing) for p in activation_checkpointing)
    if not (isinstance(activation_checkpointing, ActivationCheckpointing) or per_layer):
        raise TypeError("parallelize: activation_checkpointing must be a parsed policy (parse_policy) or a "
                        f"tuple of them, one per layer (CheckpointPlan.per_layer), got {activation_checkpointing!r}")
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    precision.check_engine(fsdp)
    apply_activation_checkpointing(model, activation_checkpointing)
    compiled = apply_compile(model, compile_model, compile_backend, compile_mode)
    if world_size == 1:
        return compiled, None
    # After compiling: the wrappers' hooks and collectives stay in eager code around the compiled
    # blocks (regional compile breaks each block's graph at our FSDP's per-layer hooks).
    if engine == "torch":
        if fsdp:  # in place on the plain model, which the regional compile leaves the module to call
            if compiled is not model:
                raise ValueError("torch's FSDP2 here needs the regional compile (or none), not compile_mode 'model'")
            wrapper = TorchFSDP2(model, precision)
            return wrapper.module, wrapper
        ddp = TorchDDP(compiled, bucket_size_mb)
        return ddp.module, ddp
    wrapper = apply_fsdp(compiled, world_size, precision) if fsdp else apply_ddp(compiled, world_size, bucket_size_mb)
    return wrapper, wrapper
