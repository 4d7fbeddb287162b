"""Train a BasicsTransformerLM on the embedded corpus (the default) or on token files.

    python -m cs336_systems                     # `mini` model, embedded corpus: < 60 s on 2 CPU cores
    python -m cs336_systems train --data train.bin --val-data valid.bin --preset small \\
        --steps 5000 --batch-size 32 --context-length 256 --attention sdpa --compile --bf16

Token files are flat arrays of token ids, memory-mapped: `.npy` (np.save) or raw `.bin` (uint16).
OUT_DIR receives config.json and metrics.jsonl (one JSON object per logged step or evaluation).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cs336_systems.corpus import VOCAB_SIZE as CORPUS_VOCAB_SIZE
from cs336_systems.corpus import CorpusConfig, load_corpus
from cs336_systems.errors import ConfigError
from cs336_systems.presets import ModelConfig, add_model_arguments, model_config_from_args

MetricsHook = Callable[[dict[str, Any]], None]
"""Called with every metrics record: {"kind": "train" | "eval", "step": ..., ...}."""


# ---------------------------------------------------------------- configuration


@dataclass(kw_only=True)
class RuntimeConfig:
    """Where and how the model runs (shared with `bench model`)."""

    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    compile_backend: str = "inductor"
    """torch.compile backend; "aot_eager" compiles fast and is what the CPU tests use."""
    bf16: bool = False
    """Run forward and loss under bfloat16 autocast (parameters and optimizer stay fp32)."""

    def __post_init__(self) -> None:
        self.device = str(pick_device(self.device))
        if self.compile and self.compile_backend not in torch.compiler.list_backends(exclude_tags=()):
            raise ConfigError(f"--compile-backend: unknown backend {self.compile_backend!r}")


@dataclass(kw_only=True)
class DataConfig:
    """Which tokens to train and evaluate on."""

    data: str | None = None
    """Training token file (.npy or uint16 .bin); None: the embedded corpus."""
    val_data: str | None = None
    """Validation token file; None: the corpus's validation split, or no evaluation with --data."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Size and seed of the embedded corpus (used when `data` is None)."""

    def __post_init__(self) -> None:
        if self.val_data is not None and self.data is None:
            raise ConfigError("--val-data needs --data (the embedded corpus has its own split)")


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW with a cosine learning-rate schedule and gradient clipping."""

    lr: float = 3e-3
    """Peak learning rate, reached after the warm-up."""
    min_lr: float | None = None
    """Final learning rate of the cosine decay; None: lr / 10."""
    warmup_steps: int | None = None
    """Linear warm-up length; None: 10% of the run."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW moment decay rates."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        self.min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr must be in [0, --lr], got {self.min_lr}")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0, got {self.grad_clip}")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape and attention implementation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation tokens."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, torch.compile and autocast."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per step."""
    context_length: int = 128
    """Tokens per sequence; at most model.context_length."""
    eval_every: int = 100
    """Evaluate on validation data every this many steps (and before and after training); 0: never."""
    eval_batches: int = 4
    """Validation batches per evaluation: fixed windows from the start of the split."""
    log_every: int = 10
    """Record metrics (and sync with the device for the loss) every this many steps."""
    seed: int = 0
    """Seeds parameter initialisation and batch sampling."""
    out_dir: str | None = "outputs/train"
    """Directory for config.json and metrics.jsonl; None writes nothing."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "context_length", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        self.model.check_context(self.context_length)
        if self.optimizer.warmup_steps is None:
            self.optimizer.warmup_steps = max(1, self.steps // 10)
        if not 0 <= self.optimizer.warmup_steps <= self.steps:
            raise ConfigError(f"--warmup-steps must be in [0, --steps], got {self.optimizer.warmup_steps}")


# ---------------------------------------------------------------- runtime helpers (also used by bench)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` means the current CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast(runtime: RuntimeConfig) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for, else a no-op."""
    device_type = torch.device(runtime.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=runtime.bf16)


def apply_compile(model: torch.nn.Module, runtime: RuntimeConfig) -> torch.nn.Module:
    """`model` itself, or a torch.compile wrapper sharing its parameters."""
    return torch.compile(model, backend=runtime.compile_backend) if runtime.compile else model


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --compile, --compile-backend, --bf16 (see RuntimeConfig)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--compile-backend", default="inductor", metavar="NAME",
                       help="torch.compile backend (default: inductor; aot_eager compiles fast)")
    group.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward and loss")


def runtime_config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(device=args.device, compile=args.compile, compile_backend=args.compile_backend,
                         bf16=args.bf16)


# ---------------------------------------------------------------- data


def load_tokens(path: str, flag: str) -> np.ndarray:
    """Memory-map a flat token file; ConfigError naming `flag` when it is missing or malformed."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{flag}: no such file: {path}")
    if file.suffix not in (".npy", ".bin"):
        raise ConfigError(f"{flag}: expected a .npy or .bin token file, got {path}")
    try:
        tokens = np.load(file, mmap_mode="r") if file.suffix == ".npy" else np.memmap(file, np.uint16, mode="r")
    except (OSError, ValueError) as error:
        raise ConfigError(f"{flag}: cannot read {path}: {str(error).splitlines()[0]}") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise ConfigError(f"{flag}: expected a 1-D array of integer token ids, got {tokens.dtype} {tokens.shape}")
    return tokens


def load_data(config: TrainConfig) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(train tokens, validation tokens or None, smallest vocabulary that covers them), checked."""
    if config.data.data is None:
        train, val = load_corpus(config.data.corpus)
        splits = {"--data": train, "--val-data": val}
        vocab = CORPUS_VOCAB_SIZE
    else:
        splits = {"--data": load_tokens(config.data.data, "--data")}
        if config.data.val_data is not None:
            splits["--val-data"] = load_tokens(config.data.val_data, "--val-data")
        vocab = 1 + max(int(tokens.max()) for tokens in splits.values() if len(tokens))
    for flag, tokens in splits.items():
        if len(tokens) <= config.context_length:
            raise ConfigError(f"{flag}: {len(tokens)} tokens, too few for --context-length {config.context_length}")
    return splits["--data"], splits.get("--val-data"), vocab


def with_vocab(model: ModelConfig, data_vocab: int) -> ModelConfig:
    """`model` with its vocabulary taken from the data, or checked against it."""
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=data_vocab)
    if model.vocab_size < data_vocab:
        raise ConfigError(f"--vocab-size {model.vocab_size} is smaller than the data's largest token id + 1 "
                          f"({data_vocab})")
    return model


def validation_windows(tokens: np.ndarray, config: TrainConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same (inputs, targets) batches at every evaluation: consecutive windows from the start."""
    ctx, per_batch = config.context_length, config.batch_size
    count = min(config.eval_batches * per_batch, (len(tokens) - 1) // ctx)
    starts = np.arange(count) * ctx
    windows = np.stack([np.asarray(tokens[s : s + ctx + 1], dtype=np.int64) for s in starts])  # (N, T+1)
    windows = torch.from_numpy(windows).to(config.runtime.device)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(per_batch)]


# ---------------------------------------------------------------- the loop


@dataclass
class Trainer:
    """Everything one run holds; a checkpoint of it is what resuming would need."""

    config: TrainConfig
    model: torch.nn.Module
    forward: torch.nn.Module  # `model`, or its compiled wrapper
    optimizer: torch.optim.Optimizer
    train_tokens: np.ndarray
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    step: int = 0


def build_trainer(config: TrainConfig) -> Trainer:
    """Load and check the data, then build the model and optimizer (the heavy part comes last)."""
    train_tokens, val_tokens, data_vocab = load_data(config)
    config.model = with_vocab(config.model, data_vocab)
    config.model.check_attention()
    from cs336_basics.optimizer import AdamW

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)  # get_batch samples with numpy's global generator
    model = config.model.build().to(config.runtime.device)
    opt = config.optimizer
    optimizer = AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    val_batches = validation_windows(val_tokens, config) if val_tokens is not None and config.eval_every else []
    return Trainer(config, model, apply_compile(model, config.runtime), optimizer, train_tokens, val_batches)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (1-based: the first step already learns)."""
    from cs336_basics.optimizer import get_cosine_lr

    opt = config.optimizer
    return get_cosine_lr(step, opt.lr, opt.min_lr, opt.warmup_steps, config.steps)


def compute_loss(trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from cs336_basics.nn_utils import cross_entropy

    with autocast(trainer.config.runtime):
        logits = trainer.forward(inputs)  # (B, T, V)
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_step(trainer: Trainer) -> torch.Tensor:
    """One optimizer step on a fresh batch; returns the detached loss (no host sync)."""
    from cs336_basics.data import get_batch
    from cs336_basics.nn_utils import clip_gradient

    config = trainer.config
    inputs, targets = get_batch(trainer.train_tokens, config.batch_size, config.context_length, config.runtime.device)
    loss = compute_loss(trainer, inputs, targets)
    loss.backward()
    if config.optimizer.grad_clip:
        clip_gradient(trainer.model.parameters(), config.optimizer.grad_clip)
    for group in trainer.optimizer.param_groups:
        group["lr"] = learning_rate(config, trainer.step + 1)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step += 1
    return loss.detach()


@torch.no_grad()
def evaluate(trainer: Trainer) -> float:
    """Mean loss over the fixed validation batches."""
    trainer.model.eval()
    losses = [compute_loss(trainer, inputs, targets) for inputs, targets in trainer.val_batches]
    trainer.model.train()
    return torch.stack(losses).mean().item()


def _is_eval_step(trainer: Trainer) -> bool:
    every, step = trainer.config.eval_every, trainer.step
    return bool(trainer.val_batches) and (step == 0 or step == trainer.config.steps or step % every == 0)


def run(trainer: Trainer, hooks: Sequence[MetricsHook] = ()) -> list[dict[str, Any]]:
    """Train for config.steps; every record goes to each hook and is returned, in order."""
    config, records = trainer.config, []
    tokens_per_step = config.batch_size * config.context_length

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        for hook in hooks:
            hook(record)

    train_seconds, mark, mark_step = 0.0, time.perf_counter(), trainer.step
    while trainer.step < config.steps:
        if _is_eval_step(trainer):
            emit({"kind": "eval", "step": trainer.step, "val_loss": evaluate(trainer)})
            mark = time.perf_counter()  # evaluation time does not count as training time
        loss = train_step(trainer)
        if trainer.step == 1 or trainer.step % config.log_every == 0 or trainer.step == config.steps:
            loss_value = loss.item()  # the only host sync of the step, and only on logged steps
            now = time.perf_counter()
            train_seconds += now - mark
            emit({"kind": "train", "step": trainer.step, "loss": loss_value, "lr": learning_rate(config, trainer.step),
                  "tokens_per_s": (trainer.step - mark_step) * tokens_per_step / (now - mark),
                  "train_seconds": train_seconds})
            mark, mark_step = now, trainer.step
    if _is_eval_step(trainer):
        emit({"kind": "eval", "step": trainer.step, "val_loss": evaluate(trainer)})
    return records


# ---------------------------------------------------------------- hooks and reporting


class JsonlWriter:
    """Metrics hook appending each record as one JSON line."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w")

    def __call__(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a crashed run keeps its metrics

    def close(self) -> None:
        self.file.close()


class ProgressBar:
    """Metrics hook driving a tqdm bar: step, loss, tokens/s."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)

    def __call__(self, record: dict[str, Any]) -> None:
        if record["kind"] == "train":
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        else:
            self.bar.write(f"step {record['step']}: val loss {record['val_loss']:.3f}")

    def close(self) -> None:
        self.bar.close()


def summarize(config: TrainConfig, records: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    train = [r for r in records if r["kind"] == "train"]
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    seconds = train[-1]["train_seconds"]
    return {
        "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
        "first_val_loss": evals[0] if evals else None, "last_val_loss": evals[-1] if evals else None,
        "tokens_per_s": config.steps * config.batch_size * config.context_length / seconds,
        "train_seconds": seconds, "wall_seconds": wall_seconds,
    }


def print_summary(config: TrainConfig, num_params: int, summary: dict[str, Any]) -> None:
    model, runtime = config.model, config.runtime
    print(f"\n{model.preset or 'custom'} model ({num_params / 1e6:.2f}M params, {model.attention} attention) on "
          f"{runtime.device}: {config.steps} steps x {config.batch_size} x {config.context_length} tokens")
    print(f"  train loss   {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
    if summary["first_val_loss"] is not None:
        print(f"  val loss     {summary['first_val_loss']:.3f} -> {summary['last_val_loss']:.3f}")
    print(f"  tokens/s     {summary['tokens_per_s']:,.0f}")
    print(f"  wall time    {summary['wall_seconds']:.1f} s ({summary['train_seconds']:.1f} s training)")


def train(config: TrainConfig, hooks: Sequence[MetricsHook] = ()) -> dict[str, Any]:
    """Build, train, report; the programmatic entry point. Returns the summary."""
    start = time.perf_counter()
    trainer = build_trainer(config)
    num_params = trainer.model.get_num_params()
    out_dir = Path(config.out_dir) if config.out_dir else None
    writers: list[Any] = [ProgressBar(config.steps, config.progress)]
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = {**dataclasses.asdict(config), "num_params": num_params}
        (out_dir / "config.json").write_text(json.dumps(resolved, indent=1))
        writers.append(JsonlWriter(out_dir / "metrics.jsonl"))
    try:
        records = run(trainer, [*writers, *hooks])
    finally:
        for writer in writers:
            writer.close()
    summary = summarize(config, records, time.perf_counter() - start)
    print_summary(config, num_params, summary)
    if out_dir:
        print(f"  wrote        {out_dir}/config.json, metrics.jsonl")
    return summary


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="mini")
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    group.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    group.add_argument("--context-length", type=int, default=128, help="tokens per sequence (default: 128)")
    group.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    group.add_argument("--min-lr", type=float, help="final learning rate (default: lr/10)")
    group.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 10%% of --steps)")
    group.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    group.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default: 1.0)")
    group.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed (default: 0)")
    group = parser.add_argument_group("data and output")
    group.add_argument("--data", metavar="FILE", help="training tokens, .npy or uint16 .bin (default: embedded corpus)")
    group.add_argument("--val-data", metavar="FILE", help="validation tokens (default: the corpus's split)")
    group.add_argument("--eval-every", type=int, default=100, help="steps between evaluations, 0 = never")
    group.add_argument("--log-every", type=int, default=10, help="steps between metrics records (default: 10)")
    group.add_argument("--out-dir", default="outputs/train", help="config.json + metrics.jsonl go here")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_arguments(parser)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=model_config_from_args(args, context_length=args.context_length),
        data=DataConfig(data=args.data, val_data=args.val_data),
        optimizer=OptimizerConfig(lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                                  weight_decay=args.weight_decay, grad_clip=args.grad_clip),
        runtime=runtime_config_from_args(args),
        steps=args.steps, batch_size=args.batch_size, context_length=args.context_length,
        eval_every=args.eval_every, log_every=args.log_every, seed=args.seed, out_dir=args.out_dir,
        progress=not args.no_progress,
    )


def main(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0
