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
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cs336_systems.errors import ConfigError

__all__ = ["NO_CHECKPOINTING", "POLICIES", "SELECTIVE_SAVED_MATMULS", "ActivationCheckpointing", "CheckpointedBlocks",
           "apply_activation_checkpointing", "parse_policy", "selective_context"]

POLICIES = ("none", "full", "every:K", "selective", "selective:NAMES")
"""The accepted policy strings (K a positive integer, NAMES block matmuls joined by "+")."""

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
    """"none", "full" (groups of `group_size` blocks, every:K included) or "selective"."""
    group_size: int = 1
    """Consecutive blocks checkpointed together."""
    saved_matmuls: tuple[str, ...] = SELECTIVE_SAVED_MATMULS
    """Block matmuls whose outputs `selective` keeps (ignored by the other modes)."""

    def __eq__(self, other: object) -> bool:
        """Equal to another policy with the same fields, or to a spelling of this policy ("every:1" is "full")."""
        if isinstance(other, str):
            try:
                other = parse_policy(other)
            except ConfigError:
                return False
        if not isinstance(other, ActivationCheckpointing):
            return NotImplemented
        return (self.mode, self.group_size, self.saved_matmuls) == (other.mode, other.group_size, other.saved_matmuls)

    def __hash__(self) -> int:
        return hash((self.mode, self.group_size, self.saved_matmuls))

    def __str__(self) -> str:
        if self.mode == "full" and self.group_size > 1:
            return f"every:{self.group_size}"
        if self.mode == "selective" and self.saved_matmuls != SELECTIVE_SAVED_MATMULS:
            return "selective:" + "+".join(self.saved_matmuls)
        return self.mode


NO_CHECKPOINTING = ActivationCheckpointing(mode="none")
"""The policy "none"."""


def parse_policy(text: str | ActivationCheckpointing) -> ActivationCheckpointing:
    """"none" | "full" | "every:K" | "selective" | "selective:NAMES" -> ActivationCheckpointing;
    ConfigError otherwise. A policy already parsed is returned as it is."""
    if isinstance(text, ActivationCheckpointing):
        return text
    if not isinstance(text, str):
        raise TypeError(f"an activation checkpointing policy is a string or ActivationCheckpointing, got {text!r}")
    if text in ("none", "full", "selective"):
        return ActivationCheckpointing(mode=text)
    match = re.fullmatch(r"every:(\d+)", text)
    if match and int(match.group(1)) >= 1:
        return ActivationCheckpointing(mode="full", group_size=int(match.group(1)))
    if text.startswith("selective:"):
        names = tuple(text.removeprefix("selective:").split("+"))
        unknown = [name for name in names if name not in BLOCK_MATMULS]
        if unknown or len(set(names)) != len(names):
            raise ConfigError(f"--activation-checkpointing: {text!r} must name distinct block matmuls joined by "
                              f"'+' (from {', '.join(BLOCK_MATMULS)}); unknown: {unknown}")
        return ActivationCheckpointing(mode="selective", saved_matmuls=names)
    raise ConfigError(f"--activation-checkpointing: unknown policy {text!r} "
                      f"(choose from {', '.join(POLICIES)}; K a positive integer)")


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


def apply_activation_checkpointing(model: nn.Module, policy: str | ActivationCheckpointing) -> nn.Module:
    """Wrap `model.layers` (a ModuleList of blocks) in place per `policy`; returns `model`.

    Call before compiling (so compiled graphs hold the recomputation) and before DDP/FSDP wrap it.
    """
    policy = parse_policy(policy)
    if policy.mode == "none":
        return model
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"activation checkpointing needs model.layers, a ModuleList of blocks; "
                        f"{type(model).__name__} has none")
    if any(isinstance(layer, CheckpointedBlocks) for layer in layers):
        raise ValueError("model.layers is already checkpointed")
    k, blocks = policy.group_size, list(layers)
    saved = policy.saved_matmuls if policy.mode == "selective" else None
    model.layers = nn.ModuleList(CheckpointedBlocks(blocks[i:i + k], first=i, saved_matmuls=saved)
                                 for i in range(0, len(blocks), k))
    model.register_state_dict_post_hook(functools.partial(_plain_names, group_size=k))
    model.register_load_state_dict_pre_hook(functools.partial(_wrapped_names, group_size=k))
    return model


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


def _wrapped_names(module, state_dict, prefix, *args, group_size: int) -> None:
    """load_state_dict pre-hook: the plain names -> layers.(I // K).blocks.(I % K).rest."""
    pattern = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.(?!blocks\.)")
    _rename(state_dict, pattern,
            lambda m: f"{prefix}layers.{int(m[1]) // group_size}.blocks.{int(m[1]) % group_size}.")
