"""Activation checkpointing: keep fewer activations in forward, recompute them in backward.

    policy = parse_policy("full")                    # once, at configuration time (training/config.py)
    apply_activation_checkpointing(model, policy)    # before compile and before DDP/FSDP (parallelize.py)

Policies (the `--activation-checkpointing` flag):

  none       keep every activation autograd saves (fastest, most memory)
  full       checkpoint every block: forward keeps only each block's input; backward re-runs the block
  every:K    checkpoint groups of K consecutive blocks together: one input kept per group, K blocks
             re-run at once in backward (K = 1 is `full`; the best K is sqrt(layers x input bytes /
             block activation bytes), 1 for these models: docs/activation_checkpointing.md)
  selective  checkpoint every block, but keep what is expensive to recompute per byte stored: the
             attention output and its logsumexp (O, L: the outputs of `cs336::flash_attn_fwd` or of
             torch's SDPA op) and the output projection's matmul (SELECTIVE_SAVED_MATMULS); norms,
             RoPE, SwiGLU's pointwise work and the other matmuls are recomputed
  selective:NAMES   the same, keeping the outputs of the block matmuls named (joined by "+", from
             BLOCK_MATMULS) instead: e.g. `selective:output_proj+k_proj` spends one more d_model
             per token and block to skip one more projection's recomputation

Memory-budgeted plans (parallel/checkpoint_plan.py) pick a policy per layer:

  auto[:MARGIN]  the least recomputation whose kept activations fit the device's free memory minus
             what is not per-layer activations and a margin (MARGIN GiB; default 5% of the device)
  budget:GiB the same with the activation budget given

They are requests, resolved into a per-layer list by training.memory_plan.resolve_checkpointing
(which measures one block's costs on the run's device); `apply_activation_checkpointing` takes
the list (one policy per layer) or one policy for every layer.

Memory per token and block, in units of d_model values (measured on xl in bf16, eager:
docs/activation_checkpointing.md): `full` keeps 1 (the input), `selective` 3.03 (input, O and L,
output projection), `none` 36. Recomputation is the block's forward but its last matmul: 38.2 of
44.1 TFLOP per 8B layer at 32k context for `full`, 18.4 for `selective`, which skips the
attention forward, the largest part at long context.

Blocks are wrapped in `CheckpointedBlocks` modules, so `model.layers` holds the wrappers and a
compiled wrapper holds the recomputation in its graph. The model's state_dict keeps the plain names
(`layers.7.attn.q_proj.weight`): hooks translate to and from the wrapped ones, so checkpoints load
into a model with any policy or none.

Selective checkpointing sees operators through the dispatcher (torch.utils.checkpoint's selective
contexts). Compiled, our attention is the `cs336::flash_attn_fwd` op in the graph and is saved. In
eager mode `ops.flash_attn` calls its kernels directly (the op dispatch costs more than a small
attention), so eager `selective` with attention "flash" re-runs the attention forward; eager SDPA
is saved in both.
"""

from __future__ import annotations

import collections
import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cs336_systems.errors import ConfigError

__all__ = ["BLOCK_MATMULS", "NO_CHECKPOINTING", "PLANNED", "POLICIES", "SELECTIVE_SAVED_MATMULS",
           "ActivationCheckpointing", "CheckpointedBlocks", "apply_activation_checkpointing", "parse_policy",
           "selective_context"]

POLICIES = ("none", "full", "every:K", "selective", "selective:NAMES", "auto", "auto:MARGIN", "budget:GiB")
"""The accepted policy strings (K a positive integer, NAMES block matmuls joined by "+", MARGIN and
GiB numbers of GiB: MARGIN >= 0, GiB > 0)."""

PLANNED = ("auto", "budget")
"""Modes that are requests for a per-layer plan (checkpoint_plan.py), not a policy to apply."""

BLOCK_MATMULS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w3", "w2")
"""The `aten.mm` calls of one TransformerBlock forward, in the order they run (attention's own
matmuls are bmm or inside its op)."""

SELECTIVE_SAVED_MATMULS = ("output_proj",)
"""Matmul outputs `selective` keeps. Every projection but w2 costs the same 2 d_model FLOPs per value
kept; w2's output is never recomputed anyway (backward needs only its input, and recomputation
stops at the last tensor backward needs). The output projection is the one whose output backward
needs soonest (the residual add feeding the second norm). Keeping w1 and w3 as well adds
2 d_ff / d_model (5.4 for the 8B model) per token and block: past the 8B/32k memory budget."""


def _attention_ops() -> tuple:
    ops = [torch.ops.aten._scaled_dot_product_flash_attention.default,
           torch.ops.aten._scaled_dot_product_efficient_attention.default,
           torch.ops.aten._scaled_dot_product_cudnn_attention.default,
           torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default]
    if hasattr(torch.ops.cs336, "flash_attn_fwd"):  # registered by importing ops.flash_attn
        ops.append(torch.ops.cs336.flash_attn_fwd.default)
    return tuple(ops)


# ---------------------------------------------------------------- policy strings


@dataclass(frozen=True)
class ActivationCheckpointing:
    """A parsed policy: what to checkpoint (`mode`) and how many consecutive blocks per region."""

    mode: str
    """"none", "full" (groups of `group_size` blocks, every:K included), "selective", or a plan request:
    "auto" (budget from the device's free memory) or "budget" (budget given)."""
    group_size: int = 1
    """Consecutive blocks checkpointed together."""
    saved_matmuls: tuple[str, ...] = SELECTIVE_SAVED_MATMULS
    """Block matmuls whose outputs `selective` keeps (ignored by the other modes)."""
    gib: float | None = None
    """"auto": the margin left free, in GiB (None: the default, 5% of the device's memory);
    "budget": the activation budget, in GiB. None for the other modes."""

    @property
    def planned(self) -> bool:
        """A request for a per-layer plan ("auto", "budget"), resolved before it can be applied."""
        return self.mode in PLANNED

    def __eq__(self, other: object) -> bool:
        """Equal to another policy with the same fields, or to a spelling of this policy ("every:1" is "full")."""
        if isinstance(other, str):
            try:
                other = parse_policy(other)
            except ConfigError:
                return False
        if not isinstance(other, ActivationCheckpointing):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple:
        return self.mode, self.group_size, self.saved_matmuls, self.gib

    def __str__(self) -> str:
        if self.mode in PLANNED:
            return self.mode if self.gib is None else f"{self.mode}:{self.gib:g}"
        if self.mode == "full" and self.group_size > 1:
            return f"every:{self.group_size}"
        if self.mode == "selective" and self.saved_matmuls != SELECTIVE_SAVED_MATMULS:
            return "selective:" + "+".join(self.saved_matmuls)
        return self.mode


NO_CHECKPOINTING = ActivationCheckpointing(mode="none")
"""The policy "none"."""


def parse_policy(text: str | ActivationCheckpointing) -> ActivationCheckpointing:
    """"none" | "full" | "every:K" | "selective" | "selective:NAMES" | "auto" | "auto:MARGIN" |
    "budget:GiB" -> ActivationCheckpointing; ConfigError otherwise. A policy already parsed is
    returned as it is."""
    if isinstance(text, ActivationCheckpointing):
        return text
    if not isinstance(text, str):
        raise TypeError(f"an activation checkpointing policy is a string or ActivationCheckpointing, got {text!r}")
    if text in ("none", "full", "selective"):
        return ActivationCheckpointing(mode=text)
    match = re.fullmatch(r"every:(\d+)", text)
    if match and int(match.group(1)) >= 1:
        return ActivationCheckpointing(mode="full", group_size=int(match.group(1)))
    if text == "auto":
        return ActivationCheckpointing(mode="auto")
    if text.startswith(("auto:", "budget:")):
        return _parse_planned(text)
    if text.startswith("selective:"):
        names = tuple(text.removeprefix("selective:").split("+"))
        unknown = [name for name in names if name not in BLOCK_MATMULS]
        if unknown or len(set(names)) != len(names):
            raise ConfigError(f"--activation-checkpointing: {text!r} must name distinct block matmuls joined by "
                              f"'+' (from {', '.join(BLOCK_MATMULS)}); unknown: {unknown}")
        return ActivationCheckpointing(mode="selective", saved_matmuls=names)
    raise ConfigError(f"--activation-checkpointing: unknown policy {text!r} "
                      f"(choose from {', '.join(POLICIES)}; K a positive integer)")


def _parse_planned(text: str) -> ActivationCheckpointing:
    """"auto:MARGIN" (GiB >= 0 left free) or "budget:GiB" (> 0 GiB of kept activations)."""
    mode, _, number = text.partition(":")
    try:
        gib = float(number)
    except ValueError:
        gib = math.nan
    least = "a number of GiB >= 0" if mode == "auto" else "a number of GiB > 0"
    if not math.isfinite(gib) or gib < 0 or (mode == "budget" and gib == 0):
        raise ConfigError(f"--activation-checkpointing {text!r}: {mode}:X needs X {least}, got {number!r}")
    return ActivationCheckpointing(mode=mode, gib=gib)


# ---------------------------------------------------------------- selective policy


def _selective_policy(saved_matmuls: tuple[str, ...]):
    """The op-level policy of one checkpointed block call: save attention outputs and the matmuls
    named in `saved_matmuls`, recompute the rest. Counts matmuls separately in the forward and in
    the recomputation, so both make the same choices (fresh counters per call: see selective_context)."""
    attention, counts = _attention_ops(), collections.Counter()
    saved_indices = {BLOCK_MATMULS.index(name) for name in saved_matmuls}

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in attention:
            return CheckpointPolicy.MUST_SAVE
        if op == torch.ops.aten.mm.default:
            index = counts[ctx.is_recompute] % len(BLOCK_MATMULS)
            counts[ctx.is_recompute] += 1
            if index in saved_indices:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_context(saved_matmuls: tuple[str, ...] = SELECTIVE_SAVED_MATMULS):
    """A `context_fn` for torch.utils.checkpoint: the selective policy with fresh matmul counters."""
    return create_selective_checkpoint_contexts(_selective_policy(saved_matmuls))


# ---------------------------------------------------------------- wrapping


class CheckpointedBlocks(nn.Module):
    """Consecutive blocks run as one checkpointed region (non-reentrant, so it works eager, compiled
    and under module hooks: a recomputation calls the blocks' modules again, hooks included)."""

    def __init__(self, blocks: list[nn.Module], first: int, saved_matmuls: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.first = first  # index in the plain model's layers of blocks[0]
        # None: recompute everything (`full`, `every:k`); a tuple: `selective`, keeping the outputs of
        # the attention op and of these block matmuls (BLOCK_MATMULS names).
        self.saved_matmuls = saved_matmuls

    @property
    def selective(self) -> bool:
        return self.saved_matmuls is not None

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        # Built here as a partial: what dynamo accepts as a context_fn under torch.compile.
        selective = {}
        if self.selective:
            selective["context_fn"] = functools.partial(selective_context, self.saved_matmuls)
        # preserve_rng_state=False: the model draws no random numbers, so there is no RNG state to replay.
        return checkpoint(self._run, x, *args, use_reentrant=False, preserve_rng_state=False, **selective)

    def _run(self, x: torch.Tensor, *args) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, *args)
        return x

    def extra_repr(self) -> str:
        return f"first={self.first}, saved_matmuls={self.saved_matmuls}"


def apply_activation_checkpointing(model: nn.Module, policy: str | ActivationCheckpointing | Sequence
                                   ) -> nn.Module:
    """Wrap `model.layers` (a ModuleList of blocks) in place per `policy`; returns `model`.

    `policy` is one policy for every layer, or one per layer (a sequence as long as `model.layers`,
    what a CheckpointPlan's `per_layer` gives: the policies of group size 1). With one per layer,
    layers under "none" stay plain blocks and the others are wrapped one by one.

    Call before compiling (so compiled graphs hold the recomputation) and before DDP/FSDP wrap it.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"activation checkpointing needs model.layers, a ModuleList of blocks; "
                        f"{type(model).__name__} has none")
    if isinstance(policy, Sequence) and not isinstance(policy, str):
        per_layer = _per_layer(policy, len(layers))
    else:
        per_layer, policy = None, parse_policy(policy)
        if policy.planned:
            raise TypeError(f"activation checkpointing {policy} is a request for a plan: resolve it first "
                            "(training.memory_plan.resolve_checkpointing) and apply the plan's per_layer policies")
    if all(p.mode == "none" for p in (per_layer or (policy,))):
        return model
    if any(isinstance(layer, CheckpointedBlocks) for layer in layers):
        raise ValueError("model.layers is already checkpointed")
    blocks = list(layers)
    if per_layer is None:  # groups of K blocks, each group one region
        k, wrapped = policy.group_size, None
        model.layers = nn.ModuleList(CheckpointedBlocks(blocks[i:i + k], first=i, saved_matmuls=_saved(policy))
                                     for i in range(0, len(blocks), k))
    else:  # each layer its own region, or none
        k, wrapped = 1, frozenset(i for i, p in enumerate(per_layer) if p.mode != "none")
        model.layers = nn.ModuleList(block if p.mode == "none" else CheckpointedBlocks([block], i, _saved(p))
                                     for i, (block, p) in enumerate(zip(blocks, per_layer)))
    model.register_state_dict_post_hook(functools.partial(_plain_names, group_size=k))
    model.register_load_state_dict_pre_hook(functools.partial(_wrapped_names, group_size=k, wrapped=wrapped))
    return model


def _saved(policy: ActivationCheckpointing) -> tuple[str, ...] | None:
    """CheckpointedBlocks' `saved_matmuls` for `policy`: the names under selective, None (keep nothing)."""
    return policy.saved_matmuls if policy.mode == "selective" else None


def _per_layer(policies: Sequence, layers: int) -> tuple[ActivationCheckpointing, ...]:
    """One parsed policy per layer, each of a single block ("none", "full", "selective[:NAMES]")."""
    parsed = tuple(parse_policy(p) for p in policies)
    if len(parsed) != layers:
        raise ValueError(f"per-layer activation checkpointing needs one policy per layer: {layers} layers, "
                         f"{len(parsed)} policies")
    odd = sorted({str(p) for p in parsed if p.planned or p.group_size != 1})
    if odd:
        raise ValueError(f"per-layer activation checkpointing takes single-layer policies (none, full, "
                         f"selective[:NAMES]), got {', '.join(odd)}")
    return parsed


def _rename(state_dict: dict, pattern: re.Pattern, new_name) -> None:
    """Rename matching keys of `state_dict` in place, keeping their order."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[pattern.sub(new_name, key, count=1)] = value


def _plain_names(module, state_dict, prefix, local_metadata, *, group_size: int) -> None:
    """state_dict hook: layers.G.blocks.J.rest -> layers.(G*K + J).rest, the plain model's names."""
    pattern = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.blocks\.(\d+)\.")
    _rename(state_dict, pattern, lambda m: f"{prefix}layers.{int(m[1]) * group_size + int(m[2])}.")


def _wrapped_names(module, state_dict, prefix, *args, group_size: int, wrapped: frozenset[int] | None) -> None:
    """load_state_dict pre-hook: the plain names -> layers.(I // K).blocks.(I % K).rest, for the layers
    in `wrapped` (None: all; a per-layer plan leaves its "none" layers plain)."""
    pattern = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.(?!blocks\.)")

    def name(m: re.Match) -> str:
        if wrapped is not None and int(m[1]) not in wrapped:
            return m[0]
        return f"{prefix}layers.{int(m[1]) // group_size}.blocks.{int(m[1]) % group_size}."

    _rename(state_dict, pattern, name)
