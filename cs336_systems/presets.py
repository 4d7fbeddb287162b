"""Model sizes: the CS336 preset table, tiny CPU presets, and the `ModelConfig` that resolves them.

`PRESETS[name]` is a `ModelShape` (d_model, d_ff, num_layers, num_heads, and num_kv_heads for
grouped-query attention). The CS336 sizes (small … 2.7B) are benchmarked with `VOCAB_SIZE` = 10,000;
`tiny`, `tiny-gqa` and `mini` are ours, small enough to train or benchmark on a laptop CPU in seconds.

`ModelConfig` is what `train` and `bench model` build a `BasicsTransformerLM` from: a preset with
any field overridden by flags, validated in `__post_init__` so bad input fails before any tensor
exists. This module imports no torch, so reading the table stays cheap. Training settings that go
with a size (`train --preset 8b-32k`: batch, parameter dtype, checkpointing) are job presets, in
`cs336_systems/training/jobs.py`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from cs336_systems.errors import ConfigError, check_float, positive_float

VOCAB_SIZE = 10_000
"""Vocabulary size of the CS336 benchmarks (the TinyStories BPE tokenizer's)."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The numbers that size a Transformer LM apart from vocabulary and context."""

    d_model: int
    """Width of the residual stream."""
    d_ff: int
    """Hidden width of the SwiGLU feed-forward layer."""
    num_layers: int
    """Number of Transformer blocks."""
    num_heads: int
    """Attention (query) heads per block; must divide d_model."""
    num_kv_heads: int | None = None
    """Key/value heads per block (grouped-query attention); must divide num_heads. None: num_heads."""

    def num_params(self, vocab_size: int = VOCAB_SIZE) -> int:
        """Parameter count of a BasicsTransformerLM of this shape, without building it.

        Per block: Q and O projections (2 d^2), K and V (2 d x kv_heads x head_dim), SwiGLU
        (3 d d_ff) and two RMSNorm gains; plus the token embedding, the final norm and the untied LM head.
        """
        d = self.d_model
        kv_dim = (self.num_kv_heads or self.num_heads) * (d // self.num_heads)
        block = 2 * d * d + 2 * d * kv_dim + 3 * d * self.d_ff + 2 * d
        return self.num_layers * block + 2 * vocab_size * d + d


PRESETS: dict[str, ModelShape] = {
    # ours: CPU-sized (train's default is `mini`; tests use `tiny`)
    "tiny": ModelShape(d_model=64, d_ff=256, num_layers=2, num_heads=4),
    "tiny-gqa": ModelShape(d_model=64, d_ff=256, num_layers=2, num_heads=4, num_kv_heads=2),
    "mini": ModelShape(d_model=128, d_ff=512, num_layers=4, num_heads=4),
    # CS336 Assignment 2, Table 1
    "small": ModelShape(d_model=768, d_ff=3072, num_layers=12, num_heads=12),
    "medium": ModelShape(d_model=1024, d_ff=4096, num_layers=24, num_heads=16),
    "large": ModelShape(d_model=1280, d_ff=5120, num_layers=36, num_heads=20),
    "xl": ModelShape(d_model=1600, d_ff=6400, num_layers=48, num_heads=25),
    "2.7B": ModelShape(d_model=2560, d_ff=10240, num_layers=32, num_heads=32),
    # The CS336 2026 leaderboard model (8.1 B parameters with its 151936-token vocabulary); the
    # `8b-32k` job preset of `bench step` and `train` (training/jobs.py) adds its context and batch.
    "8b": ModelShape(d_model=4096, d_ff=11008, num_layers=34, num_heads=32),
    # The same width and depth with grouped-query attention, 4 query heads per kv head (Llama-3-8B's
    # 32 / 8): k_proj and v_proj shrink 4x: 7.27 B parameters with the 151936-token vocabulary.
    "8b-gqa": ModelShape(d_model=4096, d_ff=11008, num_layers=34, num_heads=32, num_kv_heads=8),
}
CS336_PRESETS = ("small", "medium", "large", "xl", "2.7B")
"""The sizes the CS336 handout benchmarks, in increasing order."""


def get_preset(name: str, flag: str = "--preset", also: Iterable[str] = ()) -> ModelShape:
    """`PRESETS[name]`, or a ConfigError naming `flag` and listing the choices: the sizes, then `also`
    (other names the command takes, e.g. training.jobs.JOB_PRESETS, expanded before asking for a shape)."""
    if name not in PRESETS:
        choices = [*PRESETS, *also]
        raise ConfigError(f"{flag}: unknown preset {name!r} (choose from {', '.join(choices)})")
    return PRESETS[name]


@dataclass(kw_only=True)
class ModelConfig:
    """A BasicsTransformerLM: a preset, any of whose shape fields a flag may override."""

    preset: str | None = "mini"
    """Name in PRESETS that fills the shape fields left as None; None means give all four."""
    d_model: int | None = None
    """Residual width (default: the preset's)."""
    d_ff: int | None = None
    """Feed-forward hidden width (default: the preset's)."""
    num_layers: int | None = None
    """Number of blocks (default: the preset's)."""
    num_heads: int | None = None
    """Attention heads (default: the preset's); must divide d_model."""
    num_kv_heads: int | None = None
    """Key/value heads, grouped-query attention (default: the preset's, else num_heads); must divide
    num_heads."""
    vocab_size: int | None = None
    """Embedding rows; token ids must be smaller. None: the command decides (train: from the data;
    bench: VOCAB_SIZE)."""
    context_length: int = 256
    """Longest sequence the model accepts (size of its RoPE table)."""
    rope_theta: float = 10_000.0
    """RoPE base frequency."""
    attention: str = "naive"
    """Attention implementation, a key of cs336_basics.attention.ATTENTION_IMPLEMENTATIONS."""

    def __post_init__(self) -> None:
        if self.preset is not None:
            shape = get_preset(self.preset)
            for f in fields(ModelShape):
                if getattr(self, f.name) is None:
                    setattr(self, f.name, getattr(shape, f.name))
        for name in ("d_model", "d_ff", "num_layers", "num_heads", "context_length"):
            if getattr(self, name) is None:
                raise ConfigError(f"{_flag(name)} is required when no --preset is given")
        for name in ("d_model", "d_ff", "num_layers", "num_heads", "context_length", "vocab_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{_flag(name)} must be positive, got {value}")
        check_float(self.rope_theta, "--rope-theta", "positive")
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"--d-model {self.d_model} is not divisible by --num-heads {self.num_heads}"
            )
        if (self.d_model // self.num_heads) % 2:
            raise ConfigError(f"--d-model {self.d_model} / --num-heads {self.num_heads} = "
                              f"{self.d_model // self.num_heads} must be even: RoPE rotates pairs of dimensions")
        self._check_kv_heads()

    def _check_kv_heads(self) -> None:
        if self.num_kv_heads is None:
            return
        if self.num_kv_heads <= 0:
            raise ConfigError(f"--num-kv-heads must be positive, got {self.num_kv_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"--num-heads {self.num_heads} is not divisible by --num-kv-heads {self.num_kv_heads}")

    @property
    def shape(self) -> ModelShape:
        return ModelShape(d_model=self.d_model, d_ff=self.d_ff, num_layers=self.num_layers,
                          num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)

    def check_context(self, context_length: int) -> None:
        """Fail when sequences of `context_length` tokens do not fit the model."""
        if context_length > self.context_length:
            raise ConfigError(f"--context-length {context_length} is longer than the model's context "
                              f"(--model-context-length {self.context_length})")

    def check_attention(self) -> None:
        """Fail with a one-line message on an attention name the model does not know."""
        from cs336_basics.attention import ATTENTION_IMPLEMENTATIONS

        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            choices = ", ".join(ATTENTION_IMPLEMENTATIONS)
            raise ConfigError(f"--attention: unknown implementation {self.attention!r} (choose from {choices})")

    def build(self) -> Any:
        """A freshly initialised `cs336_basics.model.BasicsTransformerLM` on the CPU."""
        from cs336_basics.model import BasicsTransformerLM

        if self.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved before build()")
        self.check_attention()
        return BasicsTransformerLM(
            vocab_size=self.vocab_size, context_length=self.context_length, d_model=self.d_model,
            num_layers=self.num_layers, num_heads=self.num_heads, d_ff=self.d_ff,
            rope_theta=self.rope_theta, attention=self.attention, num_kv_heads=self.num_kv_heads,
        )


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str = "mini",
                        default_attention: str = "naive", jobs: Iterable[str] = ()) -> None:
    """The model-shape flags shared by `train` and `bench model` (see ModelConfig); `jobs`: the names of
    whole jobs --preset also takes (train: training.jobs.JOB_PRESETS), listed in its help."""
    whole_jobs = f"; or a whole job: {', '.join(jobs)}" if jobs else ""
    group = parser.add_argument_group("model")
    group.add_argument("--preset", default=default_preset, metavar="NAME",
                       help=f"model size: {', '.join(PRESETS)} (default: {default_preset}){whole_jobs}")
    for name, text in (("d_model", "residual width"), ("d_ff", "feed-forward width"),
                       ("num_layers", "number of blocks"), ("num_heads", "attention heads"),
                       ("num_kv_heads", "key/value heads, grouped-query attention")):
        group.add_argument(_flag(name), type=int, metavar="N", help=f"{text} (default: the preset's)")
    group.add_argument("--vocab-size", type=int, metavar="N",
                       help="embedding rows (default: train: from the data; bench: 10000)")
    group.add_argument("--rope-theta", type=positive_float, default=10_000.0, help="RoPE base (default: 10000)")
    group.add_argument("--attention", default=default_attention, metavar="NAME",
                       help=f"attention implementation: naive, sdpa, flash (default: {default_attention})")
    group.add_argument("--model-context-length", type=int, metavar="N",
                       help="the model's maximum context (RoPE table); default: --context-length")


def model_config_from_args(args: argparse.Namespace, *, context_length: int) -> ModelConfig:
    """ModelConfig from `add_model_arguments` flags; the model's context defaults to `context_length`."""
    return ModelConfig(
        preset=args.preset, d_model=args.d_model, d_ff=args.d_ff, num_layers=args.num_layers,
        num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, vocab_size=args.vocab_size,
        rope_theta=args.rope_theta, attention=args.attention,
        context_length=args.model_context_length or context_length,
    )

