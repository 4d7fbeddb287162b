"""End-to-end timing of the cs336_basics LM: forward, backward and optimizer step (CS336 §1.1.3).

    python -m cs336_systems bench model --preset tiny --context-length 64 --device cpu    # seconds
    python -m cs336_systems bench model --preset small --context-length 512 --mode train-step --bf16
    python -m cs336_systems bench model --sweep             # CS336 sizes x 128..1024 (CPU: tiny, mini)
    nsys profile -o small python -m cs336_systems bench model --preset small     # NVTX range per phase
    python -m cs336_systems bench model --preset xl --memory-snapshot xl.pickle  # pytorch.org/memory_viz

Each configuration gets a freshly initialised model (vocabulary 10,000 unless --vocab-size) and one
random batch, runs `warmup` untimed steps, then `steps` timed ones. A step is split into phases,
each bracketed by device synchronizes, so a phase's time is its kernels' and not just their launch:
  forward    model + cross-entropy loss (in --mode forward under torch.no_grad: inference)
  backward   loss.backward()
  optimizer  cs336_basics AdamW step + zero_grad (--mode train-step only)
Mean and standard deviation over the timed steps are reported per phase and for the whole step.
A configuration that runs out of memory is recorded as "OOM" and the sweep goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cs336_systems.bench.common import OOM, Results, Stopwatch, environment, free_device_memory, is_oom, mean_std
from cs336_systems.errors import ConfigError, directory
from cs336_systems.parallel.parallelize import parallelize
from cs336_systems.presets import (
    CS336_PRESETS,
    VOCAB_SIZE,
    ModelConfig,
    add_model_arguments,
    get_preset,
    model_config_from_args,
)
from cs336_systems.runtime import (
    DTYPE_NAMES,
    RuntimeConfig,
    add_runtime_arguments,
    autocast,
    runtime_config_from_args,
)
from cs336_systems.training.loss import LOSS_IMPLEMENTATIONS, lm_loss

PHASES = {"forward": ("forward",), "forward-backward": ("forward", "backward"),
          "train-step": ("forward", "backward", "optimizer")}
"""--mode -> the phases one step times, in order."""
SWEEP_DEFAULTS = {"cuda": (CS336_PRESETS, (128, 256, 512, 1024)), "cpu": (("tiny", "mini"), (64, 128, 256))}
"""Device type -> (presets, context lengths) that --sweep runs unless given."""


@dataclass(kw_only=True)
class ModelBenchConfig:
    """One `bench model` run: one configuration, or a sweep of them."""

    cases: list[tuple[ModelConfig, int]]
    """(model, tokens per sequence) pairs to time, in order; one unless sweeping."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, torch.compile and bf16 autocast."""
    mode: str = "forward-backward"
    """What a step does: a key of PHASES."""
    loss: str = "fused"
    """LM loss: "fused" (never builds the logits) or "unfused" (logits + cross-entropy)."""
    batch_size: int = 4
    """Sequences per step."""
    warmup: int = 5
    """Untimed steps before the timed ones (compilation, allocator and cuBLAS warm-up)."""
    steps: int = 10
    """Timed steps."""
    memory_snapshot: str | None = None
    """Pickle of the CUDA allocator history over the timed steps (one file per case when sweeping)."""
    profile: str | None = None
    """torch.profiler Chrome trace of the timed steps (one file per case when sweeping)."""

    def __post_init__(self) -> None:
        if self.mode not in PHASES:
            raise ConfigError(f"--mode: unknown mode {self.mode!r} (choose from {', '.join(PHASES)})")
        for name in ("batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        for model, context_length in self.cases:  # every case checked before the first one runs
            if context_length < 1:
                raise ConfigError(f"--context-length must be positive, got {context_length}")
            model.check_context(context_length)
            model.check_attention()
        if self.memory_snapshot and self.device.type != "cuda":
            raise ConfigError(f"--memory-snapshot needs a CUDA device (the allocator history is CUDA's); "
                              f"this run is on {self.device}")

    @property
    def device(self) -> torch.device:
        return torch.device(self.runtime.device)

    def output_path(self, path: str | None, model: ModelConfig, context_length: int) -> Path | None:
        """`path`, or in a sweep `STEM-PRESET-CONTEXT.SUFFIX` next to it, its folder created."""
        if path is None:
            return None
        out = Path(path)
        if len(self.cases) > 1:
            out = out.with_name(f"{out.stem}-{model.preset or 'custom'}-{context_length}{out.suffix}")
        out.parent.mkdir(parents=True, exist_ok=True)
        return out


# ---------------------------------------------------------------- timing one case


@contextlib.contextmanager
def labelled(name: str, device: torch.device, profiling: bool) -> Iterator[None]:
    """An NVTX range on CUDA (for nsys) and, while profiling, a range in the profiler trace."""
    with contextlib.ExitStack() as ranges:
        if device.type == "cuda":
            ranges.enter_context(torch.cuda.nvtx.range(name))
        if profiling:
            ranges.enter_context(torch.profiler.record_function(name))
        yield


@contextlib.contextmanager
def timed_phase(name: str, times: dict[str, float], device: torch.device, profiling: bool) -> Iterator[None]:
    """Store the milliseconds of the block in `times[name]`, from an idle device to an idle device."""
    # The stopwatch drains the device at both ends: the phase ends when its kernels do.
    with labelled(name, device, profiling), Stopwatch(device) as watch:
        yield
    times[name] = watch.ms


@dataclass
class _Case:
    """What the steps of one configuration use."""

    model: torch.nn.Module
    forward: torch.nn.Module  # `model`, or its compiled wrapper
    optimizer: torch.optim.Optimizer | None
    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)


def _build_case(config: ModelBenchConfig, model_config: ModelConfig, context_length: int) -> _Case:
    from cs336_basics.optimizer import AdamW

    if config.runtime.compile:
        torch.compiler.reset()  # each case is a new module: start from an empty cache, not its recompile limit
    torch.manual_seed(0)
    model = model_config.build().to(config.device, config.runtime.precision.param)
    optimizer = AdamW(model.parameters(), lr=1e-4) if config.mode == "train-step" else None
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_config.vocab_size, (config.batch_size, context_length + 1), generator=generator)
    tokens = tokens.to(config.device)  # (B, T + 1)
    runtime = config.runtime
    forward, _ = parallelize(model, 1, compile_model=runtime.compile, compile_backend=runtime.compile_backend,
                             precision=runtime.precision)
    return _Case(model, forward, optimizer, tokens[:, :-1], tokens[:, 1:])


def _step(case: _Case, config: ModelBenchConfig, profiling: bool) -> dict[str, float]:
    """One step; returns the milliseconds of each of its phases."""
    times: dict[str, float] = {}
    no_grad = torch.no_grad() if config.mode == "forward" else contextlib.nullcontext()
    with timed_phase("forward", times, config.device, profiling), no_grad, autocast(config.runtime):
        loss = lm_loss(case.forward, case.inputs, case.targets, loss=config.loss)
    if config.mode == "forward":
        return times
    with timed_phase("backward", times, config.device, profiling):
        loss.backward()
    if case.optimizer is None:
        case.model.zero_grad(set_to_none=True)  # untimed: every step starts without gradients
        return times
    with timed_phase("optimizer", times, config.device, profiling):
        case.optimizer.step()
        case.optimizer.zero_grad(set_to_none=True)
    return times


@contextlib.contextmanager
def memory_history(path: Path | None) -> Iterator[None]:
    """Record the CUDA allocator's history over the block and pickle it for pytorch.org/memory_viz.

    The snapshot is written even when the block fails: the history of an OOM is the useful one.
    """
    if path is None:
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    try:
        yield
    finally:
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        print(f"wrote memory snapshot {path} (open it at https://pytorch.org/memory_viz)")


@contextlib.contextmanager
def profiled(path: Path | None, device: torch.device) -> Iterator[None]:
    """Profile the block with torch.profiler, write a Chrome trace and print the top operators."""
    if path is None:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        yield
    profiler.export_chrome_trace(str(path))
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=15))
    print(f"wrote profiler trace {path} (open it in chrome://tracing or ui.perfetto.dev)")


def _progress(message: str) -> None:
    """Long work says what it is doing (building an xl model on a CPU takes minutes)."""
    print(message, flush=True)


def time_case(config: ModelBenchConfig, model_config: ModelConfig, context_length: int) -> list[dict[str, float]]:
    """Phase milliseconds of each timed step of one configuration."""
    device, profiling = config.device, config.profile is not None
    name = f"{model_config.preset or 'custom'} T={context_length}"
    start = time.perf_counter()
    case = _build_case(config, model_config, context_length)
    _progress(f"{name}: model built ({time.perf_counter() - start:.1f} s)")
    with labelled("warmup", device, profiling=False):
        for i in range(config.warmup):
            start = time.perf_counter()
            _step(case, config, profiling=False)
            _progress(f"{name}: warm-up {i + 1}/{config.warmup} ({time.perf_counter() - start:.1f} s)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    snapshot = config.output_path(config.memory_snapshot, model_config, context_length)
    trace = config.output_path(config.profile, model_config, context_length)
    with memory_history(snapshot), profiled(trace, device), labelled("measure", device, profiling):
        return [_step(case, config, profiling) for _ in range(config.steps)]


# ---------------------------------------------------------------- rows


def timing_columns(mode: str) -> list[str]:
    return [name for phase in (*PHASES[mode], "step") for name in (f"{phase}_ms", f"{phase}_std_ms")]


def _row(config: ModelBenchConfig, model: ModelConfig, context_length: int, samples: list[dict] | None) -> dict:
    """The result row of one case; `samples` None means it ran out of memory."""
    row: dict[str, Any] = dict(
        preset=model.preset or "custom", context_length=context_length,
        params_m=model.shape.num_params(model.vocab_size) / 1e6, **asdict(model.shape),
        batch_size=config.batch_size, mode=config.mode, attention=model.attention,
        dtype="bf16-autocast" if config.runtime.precision.autocast else DTYPE_NAMES[config.runtime.precision.param],
        compile=config.runtime.compile_backend if config.runtime.compile else None,
    )
    if samples is None:
        return {**row, **dict.fromkeys(timing_columns(config.mode), OOM)}
    for phase in PHASES[config.mode]:
        row[f"{phase}_ms"], row[f"{phase}_std_ms"] = mean_std([s[phase] for s in samples])
    row["step_ms"], row["step_std_ms"] = mean_std([sum(s.values()) for s in samples])
    if config.device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(config.device) / 2**30
    return row


def run(config: ModelBenchConfig) -> list[dict[str, Any]]:
    """Time every case in order; an out-of-memory case becomes an OOM row."""
    rows = []
    for model, context_length in config.cases:
        try:
            samples = time_case(config, model, context_length)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_oom(error):
                raise
            samples = None
        finally:
            gc.collect()  # the case's model and activations, before the next case allocates its own
            free_device_memory()
        row = _row(config, model, context_length, samples)
        rows.append(row)
        timing = OOM if samples is None else f"{row['step_ms']:.2f} ± {row['step_std_ms']:.2f} ms per step"
        print(f"{row['preset']} T={context_length}: {timing}")
    return rows


def _draw(rows: list[dict[str, Any]], phases: tuple[str, ...]):
    """Stacked phase times over context length, one panel (with its own scale) per preset."""
    def draw(plt: Any) -> None:
        presets = list(dict.fromkeys(row["preset"] for row in rows))
        fig, axes = plt.subplots(1, len(presets), figsize=(1 + 3 * len(presets), 3.5), squeeze=False)
        for ax, preset in zip(axes[0], presets):
            mine = [row for row in rows if row["preset"] == preset]
            labels = [str(row["context_length"]) for row in mine]
            bottom = [0.0] * len(mine)
            for phase in phases:
                heights = [0.0 if row["step_ms"] == OOM else row[f"{phase}_ms"] for row in mine]
                ax.bar(labels, heights, bottom=bottom, label=phase)
                bottom = [b + h for b, h in zip(bottom, heights)]
            for i, row in enumerate(mine):
                if row["step_ms"] == OOM:
                    ax.text(i, 0, OOM, ha="center", va="bottom", rotation=90)
            ax.set(title=preset, xlabel="context length", ylabel="ms per step (mean)")
        axes[0][0].legend()
    return draw


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_preset="small")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--mode", choices=tuple(PHASES), default="forward-backward",
                       help="forward (inference), forward-backward or train-step (default: forward-backward)")
    group.add_argument("--loss", choices=LOSS_IMPLEMENTATIONS, default="fused",
                       help="fused LM head + cross-entropy, or logits then cross-entropy (default: fused)")
    group.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    group.add_argument("--context-length", type=int, default=128, help="tokens per sequence (default: 128)")
    group.add_argument("-w", "--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    group.add_argument("-n", "--steps", type=int, default=10, help="timed steps (default: 10)")
    group.add_argument("--out-dir", type=directory, default="outputs/bench/model", help="where model.{md,json,png} go")
    group = parser.add_argument_group("sweep (either list implies --sweep)")
    group.add_argument("--sweep", action="store_true", help="time every preset x context length below")
    group.add_argument("--sweep-presets", nargs="+", metavar="NAME",
                       help="default: small medium large xl 2.7B on CUDA, tiny mini on CPU")
    group.add_argument("--sweep-context-lengths", nargs="+", type=int, metavar="N",
                       help="default: 128 256 512 1024 on CUDA, 64 128 256 on CPU")
    group = parser.add_argument_group("diagnostics (timings taken under them carry their overhead)")
    group.add_argument("--memory-snapshot", metavar="PATH",
                       help="CUDA only: pickle the allocator history of the timed steps, for pytorch.org/memory_viz")
    group.add_argument("--profile", metavar="PATH", help="torch.profiler Chrome trace of the timed steps")
    add_runtime_arguments(parser)


def _model_config(args: argparse.Namespace, preset: str, context_length: int) -> ModelConfig:
    resolved = argparse.Namespace(**{**vars(args), "preset": preset, "vocab_size": args.vocab_size or VOCAB_SIZE})
    return model_config_from_args(resolved, context_length=context_length)


def cases_from_args(args: argparse.Namespace, device: torch.device) -> list[tuple[ModelConfig, int]]:
    if not (args.sweep or args.sweep_presets or args.sweep_context_lengths):
        return [(_model_config(args, args.preset, args.context_length), args.context_length)]
    default_presets, default_lengths = SWEEP_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    presets = args.sweep_presets or default_presets
    for preset in presets:
        get_preset(preset, flag="--sweep-presets")
    lengths = args.sweep_context_lengths or default_lengths
    return [(_model_config(args, preset, length), length) for preset in presets for length in lengths]


def main(args: argparse.Namespace) -> int:
    runtime = runtime_config_from_args(args)
    config = ModelBenchConfig(
        cases=cases_from_args(args, torch.device(runtime.device)), runtime=runtime, mode=args.mode, loss=args.loss,
        batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
        memory_snapshot=args.memory_snapshot, profile=args.profile,
    )
    rows = run(config)
    meta = {**environment(config.device), "mode": config.mode, "loss": config.loss, "batch_size": config.batch_size,
            "warmup": config.warmup, "steps": config.steps, "profiled": config.profile is not None}
    results = Results("model", meta=meta, rows=rows)
    columns = ["preset", "context_length", "params_m", *timing_columns(config.mode)]
    if config.device.type == "cuda":
        columns.append("peak_mem_gib")
    results.write(args.out_dir, columns=columns)
    results.plot(args.out_dir, _draw(rows, PHASES[config.mode]))
    return 0
