"""`train`'s configuration: one @dataclass section per concern, validated on construction, and its flags.

Every check that can fail on user input runs here or in `training.command.prepare`, before any process or
process group exists, and raises a one-line ConfigError naming the flag.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from cs336_systems.errors import ConfigError, check_float, directory, nonnegative_float, positive_float
from cs336_systems.parallel.activation_checkpointing import NO_CHECKPOINTING, ActivationCheckpointing, parse_policy
from cs336_systems.presets import ModelConfig, add_model_arguments, model_config_from_args
from cs336_systems.runtime import ENGINES, RuntimeConfig, add_runtime_arguments, runtime_config_from_args
from cs336_systems.training.corpus import EOT_ID, CorpusConfig
from cs336_systems.training.jobs import JOB_PRESETS, apply_job_preset
from cs336_systems.training.loss import LOSS_IMPLEMENTATIONS


@dataclass(kw_only=True)
class DataConfig:
    """Which tokens to train and evaluate on."""

    data: str | None = None
    """Training token file (.npy or uint16 .bin); None: the embedded corpus."""
    val_data: str | None = None
    """Validation token file; None: the corpus's validation split, or no evaluation with --data."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Size and seed of the embedded corpus (used when `data` is None)."""
    pack_documents: bool = False
    """Windows carry document ids (end-of-text tokens before each position): attention and RoPE
    positions stay within each document (training/data.py)."""
    eot_id: int | None = None
    """The end-of-text id that ends each document; None: the embedded corpus's (needed with `data`).
    Resolved by __post_init__: set exactly when `pack_documents` is."""

    def __post_init__(self) -> None:
        if self.val_data is not None and self.data is None:
            raise ConfigError("--val-data needs --data (the embedded corpus has its own split)")
        if self.eot_id is not None and not self.pack_documents:
            raise ConfigError("--eot-id needs --pack-documents")
        if self.pack_documents and self.eot_id is None:
            if self.data is not None:
                raise ConfigError("--pack-documents with --data needs --eot-id (the token id that ends each "
                                  "document in the file, e.g. the tokenizer's <|endoftext|>)")
            self.eot_id = EOT_ID
        if self.eot_id is not None and self.eot_id < 0:
            raise ConfigError(f"--eot-id must be >= 0, got {self.eot_id}")


OPTIMIZER_IMPLEMENTATIONS = ("auto", "cs336", "torch-fused")
"""Values of --optimizer (see OptimizerConfig.implementation)."""


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
    implementation: str = "auto"
    """AdamW code (the same update): "cs336" (cs336_basics.optimizer.AdamW), "torch-fused"
    (torch.optim.AdamW(fused=True): one kernel per step for all parameters; CUDA only) or "auto"
    (torch-fused on CUDA, cs336 elsewhere)."""
    in_backward: bool = False
    """Step each parameter's AdamW inside backward, as soon as its gradient is complete, and free that
    gradient at once (training/optim_in_backward.py): no moment holds every gradient. Needs grad_clip 0,
    one process and one micro-batch per step (TrainConfig checks the last two)."""

    def __post_init__(self) -> None:
        if self.implementation not in OPTIMIZER_IMPLEMENTATIONS:
            raise ConfigError(f"--optimizer: unknown implementation {self.implementation!r} "
                              f"(choose from {', '.join(OPTIMIZER_IMPLEMENTATIONS)})")
        check_float(self.lr, "--lr", "positive")
        self.min_lr = self.lr / 10 if self.min_lr is None else check_float(self.min_lr, "--min-lr", "non-negative")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr must be in [0, --lr], got {self.min_lr}")
        check_float(self.weight_decay, "--weight-decay", "non-negative")
        check_float(self.grad_clip, "--grad-clip", "non-negative")
        if self.in_backward and self.grad_clip:
            raise ConfigError(f"--optimizer-in-backward needs --grad-clip 0 (got {self.grad_clip}): clipping scales "
                              "every gradient by the norm of all of them, known only after the last one, by when "
                              "the others have been applied and freed")


@dataclass(kw_only=True)
class ParallelConfig:
    """How many processes train together, and what they shard."""

    nproc: int | None = None
    """Local worker processes; None: torchrun's world size under torchrun, else one per GPU on CUDA
    and 2 on a CPU with at least 2 cores."""
    shard_optimizer: bool | None = None
    """Shard AdamW's state over the processes (ShardedOptimizer); no effect with one process. None (the
    default): on, unless `fsdp` (which shards the optimizer state with the parameters already)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state (parallel/fsdp.py) instead of DDP; weights are
    gathered in the compute dtype (bf16 with --bf16), gradients reduced in the reduce dtype
    (runtime.Precision). Excludes an explicit --shard-optimizer."""
    engine: str = "ours"
    """Whose data parallelism: "ours" (DDPBucketed, or FSDP with `fsdp`) or "torch" (torch's
    DistributedDataParallel, or FSDP2's fully_shard with `fsdp`): parallel/torch_engines.py."""
    bucket_size_mb: float = 25.0
    """Gradient bucket cap of DDPBucketed (and of torch's DDP), in MiB."""
    activation_checkpointing: ActivationCheckpointing = NO_CHECKPOINTING
    """Activation checkpointing policy (parallel/activation_checkpointing.py), parsed once here from its
    flag spelling (none, full, every:K, selective, selective:NAMES; a string given is parsed)."""
    torchrun: bool = field(default=False, init=False)
    """Set by `resolve`: this process is one of torchrun's workers (RANK and WORLD_SIZE are set)."""
    world_size: int = field(default=1, init=False)
    """Set by `resolve`: processes in the job, over all nodes."""

    def __post_init__(self) -> None:
        if self.nproc is not None and self.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {self.nproc}")
        check_float(self.bucket_size_mb, "--bucket-size-mb", "positive")
        # Parsed once, here: a ConfigError naming --activation-checkpointing; the value goes to parallelize.
        self.activation_checkpointing = parse_policy(self.activation_checkpointing)
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.fsdp and self.shard_optimizer:
            raise ConfigError("--fsdp and --shard-optimizer are mutually exclusive: FSDP shards the optimizer "
                              "state with the parameters (drop --shard-optimizer)")
        if self.shard_optimizer is None:
            self.shard_optimizer = not self.fsdp

    def resolve(self, device: torch.device) -> None:
        """Fix `world_size` from torchrun's environment, --nproc or the machine."""
        self.torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if self.torchrun:
            world = int(os.environ["WORLD_SIZE"])
            if self.nproc not in (None, world):
                raise ConfigError(f"--nproc {self.nproc}: under torchrun the world size is {world} "
                                  "(set by --nproc-per-node and --nnodes); drop --nproc")
            self.world_size = world
        elif device.type == "cuda":
            gpus = torch.cuda.device_count() if device.index is None else 1
            if self.nproc is not None and self.nproc > torch.cuda.device_count():
                raise ConfigError(f"--nproc {self.nproc}: only {torch.cuda.device_count()} GPUs (one per process)")
            self.world_size = self.nproc or gpus
        else:
            self.world_size = self.nproc or min(2, os.cpu_count() or 1)


@dataclass(kw_only=True)
class CheckpointConfig:
    """When to save checkpoints under OUT_DIR/checkpoints, and whether to resume from them."""

    every: int = 0
    """Save every this many steps and after the last one; 0: never."""
    resume: bool = False
    """Continue from the newest readable checkpoint; start fresh when there is none."""
    keep: int = 2
    """Newest checkpoints kept on disk; 2 or more leaves a fallback if the newest is damaged."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"--keep-checkpoints must be >= 1, got {self.keep}")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(attention="flash"))
    """Model shape and attention implementation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation tokens."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(compile=None))
    """Device, torch.compile and autocast."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Processes, data parallelism and optimizer sharding."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resuming."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per optimizer step over all processes (the global batch)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step on each process; batch_size must divide by processes x this."""
    context_length: int = 128
    """Tokens per sequence; at most model.context_length."""
    eval_every: int = 25
    """Evaluate on validation data every this many steps (and before and after training); 0: never."""
    eval_batches: int = 4
    """Validation data per evaluation, in global batches: fixed windows from the start of the split."""
    log_every: int = 10
    """Record metrics (and sync with the device for the loss) every this many steps."""
    seed: int = 0
    """Seeds parameter initialisation; with the step number, it also fixes every batch."""
    out_dir: str | None = "outputs/train"
    """Directory for config.json, metrics.jsonl, loss.png and checkpoints/; None writes nothing."""
    progress: bool = True
    """Show a progress bar (rank 0)."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project (needs the `wandb` extra)."""
    loss: str = "fused"
    """LM loss: "fused" (LM head + cross-entropy in chunks, never the whole logits) or "unfused"."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum_steps", "context_length", "log_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ConfigError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.loss not in LOSS_IMPLEMENTATIONS:
            raise ConfigError(f"--loss must be one of {', '.join(LOSS_IMPLEMENTATIONS)}, got {self.loss!r}")
        self.model.check_context(self.context_length)
        self.model.check_attention()
        if self.optimizer.warmup_steps is None:
            self.optimizer.warmup_steps = max(1, self.steps // 10)
        if not 0 <= self.optimizer.warmup_steps <= self.steps:
            raise ConfigError(f"--warmup-steps must be in [0, --steps], got {self.optimizer.warmup_steps}")
        self.parallel.resolve(torch.device(self.runtime.device))
        self._check_optimizer_in_backward()
        self.runtime.precision.check_engine(self.parallel.fsdp)  # --reduce-dtype other than --param-dtype: FSDP
        if self.optimizer.implementation == "torch-fused" and torch.device(self.runtime.device).type != "cuda":
            raise ConfigError(f"--optimizer torch-fused needs a CUDA device, got --device {self.runtime.device}")
        if self.batch_size % (self.parallel.world_size * self.grad_accum_steps):
            raise ConfigError(f"--batch-size {self.batch_size} is not divisible by processes x --grad-accum-steps "
                              f"({self.parallel.world_size} x {self.grad_accum_steps})")
        if (self.checkpoint.every or self.checkpoint.resume) and not self.out_dir:
            raise ConfigError("--checkpoint-every and --resume need --out-dir")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ConfigError("--wandb needs the wandb package: install the extra (uv sync --extra wandb)")

    def _check_optimizer_in_backward(self) -> None:
        """--optimizer-in-backward applies a gradient the moment backward completes it: only where nothing
        else still has to happen to it (after `parallel.resolve`: the number of processes)."""
        if not self.optimizer.in_backward:
            return
        if self.grad_accum_steps > 1:
            raise ConfigError(f"--optimizer-in-backward and --grad-accum-steps {self.grad_accum_steps}: accumulating "
                              "keeps every gradient from one micro-batch to the next, the memory the option saves; "
                              "use one micro-batch per step (--grad-accum-steps 1)")
        if self.parallel.world_size > 1:
            raise ConfigError(f"--optimizer-in-backward needs one process, got {self.parallel.world_size} (--nproc or "
                              "torchrun): DDP, FSDP and the sharded optimizer reduce each gradient over the processes "
                              "after backward completes it; use --nproc 1")
        for flag, given in (("--fsdp", self.parallel.fsdp), ("--engine torch", self.parallel.engine == "torch")):
            if given:
                raise ConfigError(f"--optimizer-in-backward and {flag}: a data-parallel engine reduces each gradient "
                                  "after backward completes it, and the option runs in one process; drop one")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per forward/backward on one process."""
        return self.batch_size // (self.parallel.world_size * self.grad_accum_steps)


# ---------------------------------------------------------------- command line


def _default(config_class: type, name: str) -> Any:
    """The dataclass field's default: each flag's default is written once, on its config field."""
    return next(f.default for f in fields(config_class) if f.name == name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `train` flag (see the config fields above for what each means)."""
    add_model_arguments(parser, default_preset="mini", default_attention="flash", jobs=JOB_PRESETS)
    train, opt = functools.partial(_default, TrainConfig), functools.partial(_default, OptimizerConfig)
    par, ckpt = functools.partial(_default, ParallelConfig), functools.partial(_default, CheckpointConfig)
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=train("steps"), help="optimizer steps (default: %(default)s)")
    group.add_argument("--batch-size", type=int,
                       help=f"sequences per step over all processes (default: {train('batch_size')})")
    group.add_argument("--grad-accum-steps", type=int, default=train("grad_accum_steps"),
                       help="micro-batches per step (default: %(default)s)")
    group.add_argument("--context-length", type=int,
                       help=f"tokens per sequence (default: {train('context_length')})")
    group.add_argument("--lr", type=positive_float, default=opt("lr"), help="peak learning rate (default: %(default)s)")
    group.add_argument("--min-lr", type=nonnegative_float, help="final learning rate (default: lr/10)")
    group.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 10%% of --steps)")
    group.add_argument("--weight-decay", type=nonnegative_float, default=opt("weight_decay"),
                       help="AdamW weight decay (default: %(default)s)")
    group.add_argument("--grad-clip", type=nonnegative_float, default=opt("grad_clip"),
                       help="max gradient norm, 0 = off (default: %(default)s)")
    group.add_argument("--optimizer", choices=OPTIMIZER_IMPLEMENTATIONS, default=opt("implementation"),
                       help="AdamW code: cs336, torch-fused (CUDA), auto = torch-fused on CUDA (default: %(default)s)")
    group.add_argument("--optimizer-in-backward", action="store_true",
                       help="step each parameter inside backward and free its gradient at once: no moment holds "
                            "every gradient (one process, --grad-clip 0, --grad-accum-steps 1)")
    group.add_argument("--loss", choices=LOSS_IMPLEMENTATIONS, default=train("loss"),
                       help="fused LM head + cross-entropy, or logits then cross-entropy (default: %(default)s)")
    group.add_argument("--seed", type=int, default=train("seed"),
                       help="initialisation and sampling seed (default: %(default)s)")
    group = parser.add_argument_group("processes")
    group.add_argument("--nproc", type=int, metavar="N",
                       help="local worker processes (default: one per GPU on CUDA, 2 on CPU; torchrun's under it)")
    group.add_argument("--shard-optimizer", action=argparse.BooleanOptionalAction, default=par("shard_optimizer"),
                       help="shard AdamW's state over the processes (default: on, off with --fsdp)")
    group.add_argument("--fsdp", action="store_true",
                       help="fully sharded data parallel: parameters, gradients and AdamW state sharded")
    group.add_argument("--engine", choices=ENGINES, default=par("engine"),
                       help="whose data parallelism: ours (DDP, --fsdp: our FSDP) or torch (DistributedDataParallel, "
                            "--fsdp: FSDP2) (default: %(default)s)")
    group.add_argument("--bucket-size-mb", type=positive_float, default=par("bucket_size_mb"),
                       help="DDP gradient bucket cap (default: %(default)s)")
    group.add_argument("--activation-checkpointing", metavar="POLICY",
                       help="recompute activations in backward: none, full, every:K, selective, selective:NAMES "
                            f"(default: {par('activation_checkpointing')})")
    group = parser.add_argument_group("data, output and checkpoints")
    group.add_argument("--data", metavar="FILE", help="training tokens, .npy or uint16 .bin (default: embedded corpus)")
    group.add_argument("--val-data", metavar="FILE", help="validation tokens (default: the corpus's split)")
    group.add_argument("--pack-documents", action="store_true",
                       help="attend and count RoPE positions within the documents of each window only")
    group.add_argument("--eot-id", type=int, metavar="ID",
                       help=f"the end-of-text id that ends each document (default: the corpus's, {EOT_ID}; "
                            "required with --data)")
    group.add_argument("--eval-every", type=int, default=train("eval_every"),
                       help="steps between evaluations, 0 = never (default: %(default)s)")
    group.add_argument("--eval-batches", type=int, default=train("eval_batches"),
                       help="global batches per evaluation (default: %(default)s)")
    group.add_argument("--log-every", type=int, default=train("log_every"),
                       help="steps between metrics records (default: %(default)s)")
    group.add_argument("--out-dir", type=directory, default=train("out_dir"),
                       help="config, metrics, plot and checkpoints go here")
    group.add_argument("--checkpoint-every", type=int, default=ckpt("every"), metavar="K",
                       help="checkpoint every K steps and at the end, 0 = never (default: %(default)s)")
    group.add_argument("--keep-checkpoints", type=int, default=ckpt("keep"), metavar="N",
                       help="newest checkpoints kept (default: %(default)s)")
    group.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint, if any")
    group.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_arguments(parser, compile_default=None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    # Flags a job preset may set default to None ("not given"): the preset's value, else the field's.
    args = apply_job_preset(args, {"context_length": _default(TrainConfig, "context_length"),
                                   "batch_size": _default(TrainConfig, "batch_size"),
                                   "param_dtype": RuntimeConfig.param_dtype,
                                   "activation_checkpointing": _default(ParallelConfig, "activation_checkpointing")})
    return TrainConfig(
        model=model_config_from_args(args, context_length=args.context_length),
        data=DataConfig(data=args.data, val_data=args.val_data, pack_documents=args.pack_documents,
                        eot_id=args.eot_id),
        optimizer=OptimizerConfig(lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                                  weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                                  implementation=args.optimizer, in_backward=args.optimizer_in_backward),
        runtime=runtime_config_from_args(args),
        parallel=ParallelConfig(nproc=args.nproc, shard_optimizer=args.shard_optimizer, fsdp=args.fsdp,
                                engine=args.engine, bucket_size_mb=args.bucket_size_mb,
                                activation_checkpointing=args.activation_checkpointing),
        checkpoint=CheckpointConfig(every=args.checkpoint_every, resume=args.resume, keep=args.keep_checkpoints),
        steps=args.steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
        context_length=args.context_length, eval_every=args.eval_every, eval_batches=args.eval_batches,
        log_every=args.log_every, seed=args.seed, out_dir=args.out_dir or None, progress=not args.no_progress,
        wandb_project=args.wandb, loss=args.loss,
    )
