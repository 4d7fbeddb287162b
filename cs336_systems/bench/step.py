"""The CS336 2026 leaderboard step on one GPU: our training step against the stock PyTorch recipe.

    python -m cs336_systems bench step                                   # preset 8b-32k: the leaderboard
    python -m cs336_systems bench step --layers 4 --steps 3              # the 8B widths, 4 layers
    python -m cs336_systems bench step --preset tiny-step --device cpu   # CI: seconds
    python -m cs336_systems bench step --layers 2 --profile              # + kernel time by category
    python -m cs336_systems bench step --contenders ours@auto --protocol leaderboard   # as the leaderboard

One step is what the leaderboard times: zero_grad, forward, loss, backward and the AdamW step of
BasicsTransformerLM with bf16 parameters (built in bf16, no autocast), causal attention. The
contenders run one after another in one process, on the same model definition, seed and batch:

  ours       attention "flash" (our op), training.loss.lm_loss, activation checkpointing --ac
             (default selective: 10.89 s vs full's 11.95 at 8b-32k, 107 vs 76 GiB), regional compile
             (parallelize), AdamW by training.optim (fused on CUDA)
  stock      the recipe below, written plainly: SDPA, torch.utils.checkpoint around every block,
             each block compiled with block.compile(), LM head + F.cross_entropy in checkpointed
             chunks of 8192 tokens, torch.optim.AdamW(fused=True)
  ours-sdpa  ours with SDPA attention

`ours+inbwd` runs the AdamW update inside backward (each gradient freed once its parameter is updated:
training/optim_in_backward.py); options come before the policy, `ours+inbwd@auto`.
A contender of ours may name its own checkpointing policy, `ours@selective`, `ours-sdpa@every:2`,
so one run compares policies side by side; without one it takes --ac. `ours@auto[:MARGIN]` and
`ours@budget:GiB` first measure one block's cost table and solve a per-layer plan (printed, and
saved in the row); a plan that cannot fit becomes a "no plan" row.

Each contender: build (seeded, on the device), a first step from an empty compile cache (its
seconds reported: compilation included), --warmup steps, then --steps steps each timed between
device synchronizes; the median is reported with model TFLOP/s (training_flops: 6 N per token +
causal attention), MFU against a bf16 matmul rate measured in this run (median of 8192^3 torch.mm;
the datasheet's 989 TFLOP/s is not reached by any matmul), the peak allocated memory of the
steps after the first, and the first step's loss (the contenders must agree). A contender that
runs out of memory becomes an OOM row naming the options that reduce memory. `--protocol
leaderboard` times instead with the CS336 2026 script's do_bench call, from an empty compile cache,
and reports the wall time from process start (bench/leaderboard.py); ratios to stock are given
only when stock ran in the same process.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cs336_systems.bench.common import OOM, Results, environment, free_device_memory, is_oom, synchronize, time_ms
from cs336_systems.bench.gpu_monitor import GpuMonitor
from cs336_systems.bench.kernel_profile import kernel_table, kernel_times
from cs336_systems.bench.leaderboard import (
    LEADERBOARD_REP_MS,
    LEADERBOARD_WARMUP_MS,
    empty_compile_cache,
    leaderboard_meta,
    time_as_leaderboard,
    together_note,
    with_stock_ratio,
)
from cs336_systems.bench.stock_step import ADAMW, stock_setup
from cs336_systems.errors import ConfigError, directory, flags_renamed, nonnegative_float, positive_float
from cs336_systems.parallel.activation_checkpointing import ActivationCheckpointing, parse_policy
from cs336_systems.parallel.checkpoint_plan import CheckpointPlan
from cs336_systems.parallel.parallelize import COMPILE_MODES, parallelize
from cs336_systems.presets import ModelConfig
from cs336_systems.runtime import pick_device
from cs336_systems.training.jobs import JOB_PRESETS
from cs336_systems.training.loss import lm_loss
from cs336_systems.training.memory_plan import (
    MemoryPlan,
    available_bytes,
    check_fits,
    estimate,
    largest_fitting,
    resolve_checkpointing,
)
from cs336_systems.training.optim import adamw
from cs336_systems.training.optim_in_backward import InBackwardOptimizer, attach
from cs336_systems.training.report import training_flops

STEP_PRESETS: dict[str, dict[str, Any]] = {
    # The CS336 2026 leaderboard: 8.1 B parameters, 64 Ki tokens per step.
    "8b-32k": {"model": JOB_PRESETS["8b-32k"]["preset"], "vocab": JOB_PRESETS["8b-32k"]["vocab_size"],
               "ctx": JOB_PRESETS["8b-32k"]["context_length"], "batch": JOB_PRESETS["8b-32k"]["batch_size"]},
    # CI: the same code paths in seconds on a CPU.
    "tiny-step": {"model": "tiny", "vocab": 256, "ctx": 64, "batch": 2},
}
CONTENDERS = ("ours", "stock", "ours-sdpa")
OPTIONS = {"inbwd": "the AdamW update inside backward, each gradient freed at once (training/optim_in_backward.py)"}
"""`ours+OPTION`: options of our contenders."""
OOM_ADVICE = "reduce memory: --ac full (or every:K, auto, budget:GiB), a smaller --batch or --ctx"
NO_PLAN = "no plan"
PROTOCOLS = ("default", "leaderboard")
TRAIN_FLAGS = {"--num-layers": "--layers", "--num-heads": "--heads", "--vocab-size": "--vocab",
               "--context-length": "--ctx", "--model-context-length": "--ctx", "--batch-size": "--batch",
               "--activation-checkpointing": "--ac"}
"""train's flag names (in the errors of ModelConfig and the checkpointing policies) -> this command's."""


@dataclass(kw_only=True)
class StepBenchConfig:
    """One `bench step` run."""

    model: ModelConfig
    """Model shape and vocabulary (attention is set per contender)."""
    batch: int
    """Sequences per step."""
    ctx: int
    """Tokens per sequence."""
    contenders: tuple[str, ...] = CONTENDERS
    """Which to run, in order; ours and ours-sdpa may carry a policy: `ours@selective`."""
    ac: str = "selective"
    """Activation checkpointing policy of ours and ours-sdpa."""
    compile: bool = True
    """Compile (ours: parallelize's regional compile; stock: block.compile())."""
    compile_backend: str | None = None
    """torch.compile backend; None: inductor on CUDA, aot_eager on CPU (inductor's C++ build is slow)."""
    compile_mode: str = "regional"
    """ours: "regional" (each block) or "model" (the whole model)."""
    steps: int = 5  # timed steps; the median is reported
    warmup: int = 2  # untimed steps after the first
    device: str = "auto"  # where to run
    matmul_size: int | None = None
    """n of the n^3 bf16 matmul whose rate MFU is measured against; None: 8192 on CUDA, 512 on CPU."""
    profile: bool = False
    """After the timed steps, one more under torch.profiler: kernel time by category (kernel_profile.py)."""
    protocol: str = "default"
    """How steps are timed: "default" (--warmup steps, then the median of --steps) or "leaderboard"
    (triton.testing.do_bench(step, warmup=10_000, rep=30_000), as the CS336 2026 timing script: CUDA only)."""
    leaderboard_warmup_ms: float = LEADERBOARD_WARMUP_MS  # do_bench's warm-up (the leaderboard's: 10 000 ms)
    leaderboard_rep_ms: float = LEADERBOARD_REP_MS  # do_bench's measured time (the leaderboard's: 30 000 ms)

    def __post_init__(self) -> None:
        self.device = str(pick_device(self.device))
        for name in ("batch", "ctx", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        self._check_protocol()
        unknown = [name for name in self.contenders if contender_base(name) not in CONTENDERS
                   or not contender_options(name) <= OPTIONS.keys()
                   or (contender_options(name) and contender_base(name) == "stock")]
        if unknown or not self.contenders:
            raise ConfigError(f"--contenders: unknown {unknown} (choose from {', '.join(CONTENDERS)}, "
                              f"ours and ours-sdpa with +OPTION ({', '.join(OPTIONS)}) and @POLICY)")
        parse_policy(self.ac)
        for name in self.contenders:
            parse_policy(self.policy(name))
            if "@" in name and contender_base(name) == "stock":
                raise ConfigError(f"--contenders {name}: stock has its own checkpointing (every block)")
        self.model.check_context(self.ctx)
        if self.compile_backend is None:
            self.compile_backend = "inductor" if self.device_type == "cuda" else "aot_eager"
        if self.matmul_size is None:
            self.matmul_size = 8192 if self.device_type == "cuda" else 512

    def _check_protocol(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        for name in ("leaderboard_warmup_ms", "leaderboard_rep_ms"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.protocol == "leaderboard" and self.device_type != "cuda":
            raise ConfigError(f"--protocol leaderboard times with triton.testing.do_bench, which needs CUDA; "
                              f"--device is {self.device} (use the default protocol there)")

    def policy(self, contender: str) -> str:
        """The checkpointing policy a contender of ours runs with: its own `@POLICY`, else --ac."""
        return contender.split("@", 1)[1] if "@" in contender else self.ac

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


# ---------------------------------------------------------------- the contenders (stock: stock_step.py)


def contender_base(name: str) -> str:
    """`ours+inbwd@selective` -> `ours`."""
    return name.split("@", 1)[0].split("+", 1)[0]


def contender_options(name: str) -> set[str]:
    """`ours+inbwd@selective` -> {"inbwd"}."""
    return set(name.split("@", 1)[0].split("+")[1:])


def ours_setup(model: nn.Module, config: StepBenchConfig, policy: ActivationCheckpointing | CheckpointPlan,
               in_backward: bool = False) -> tuple[Callable, torch.optim.Optimizer | InBackwardOptimizer]:
    checkpointing = policy.per_layer if isinstance(policy, CheckpointPlan) else policy
    forward, _ = parallelize(model, 1, compile_model=config.compile, compile_backend=config.compile_backend,
                             compile_mode=config.compile_mode, activation_checkpointing=checkpointing)
    optimizer_cls, extra = adamw("auto", torch.device(config.device))
    optimizer = (attach(model, lambda params: optimizer_cls(params, **ADAMW, **extra)) if in_backward
                 else optimizer_cls(model.parameters(), **ADAMW, **extra))
    return (lambda x, y: lm_loss(forward, x, y)), optimizer


# ---------------------------------------------------------------- timing


def matmul_tflops(n: int, device: str) -> float:
    """Median TFLOP/s of an n x n x n bf16 torch.mm on `device` (random data). The warm-up is long: with
    100 ms of it, the first H200 run read 683 TFLOP/s where 769 to 798 was measured before on such
    machines, maybe clocks still rising; MFU is only as good as this reference."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = time_ms(lambda: torch.mm(a, b), device, warmup_ms=1000, rep_ms=1000)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def resolve_policy(name: str, config: StepBenchConfig, model: ModelConfig) -> ActivationCheckpointing | CheckpointPlan:
    """A contender of ours: its policy, or for auto / budget:GiB the plan solved from the costs of one block
    of `model` (the contender's attention), measured now on the device (before the model exists: the free
    memory is what the run gets)."""
    policy = parse_policy(config.policy(name))
    if not policy.planned:
        return policy
    with flags_renamed(TRAIN_FLAGS):
        plan = resolve_checkpointing(policy, model, batch=config.batch, context_length=config.ctx,
                                     dtype=torch.bfloat16, device=config.device,
                                     optimizer_in_backward="inbwd" in contender_options(name),
                                     compiled=config.compile)
    print(f"{name}: {plan.costs.describe()}\n{name}: {plan.describe()}", flush=True)
    return plan


def run_contender(name: str, config: StepBenchConfig, flops: float, matmul_rate: float,
                  do_bench: Callable[..., float] | None = None, phase: dict[str, str] | None = None) -> dict[str, Any]:
    """Build, compile (first step), warm up and time one contender; its result row. `do_bench` (the
    leaderboard protocol's timer) defaults to triton.testing.do_bench; tests pass a stand-in. `phase`
    ["now"] says how far it got (plan, build, first step, steps): an OOM row names it."""
    phase = {} if phase is None else phase
    phase["now"] = "plan"
    torch.compiler.reset()  # the first step compiles from an empty cache
    base = contender_base(name)
    model_config = ModelConfig(**{**vars(config.model), "attention": "sdpa" if base != "ours" else "flash"})
    policy = None if base == "stock" else resolve_policy(name, config, model_config)
    phase["now"] = "build"
    torch.manual_seed(0)
    with torch.device(config.device):  # initialised in place: an 8B model is slow to fill on a CPU
        model = model_config.build()
    model.to(torch.bfloat16)
    if base == "stock":
        loss_fn, optimizer = stock_setup(model, config.compile_backend, config.compile)
    else:
        loss_fn, optimizer = ours_setup(model, config, policy, "inbwd" in contender_options(name))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_config.vocab_size, (config.batch, config.ctx + 1), generator=generator)
    inputs, targets = tokens[:, :-1].to(config.device), tokens[:, 1:].to(config.device)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(inputs, targets)
        loss.backward()
        if not isinstance(optimizer, InBackwardOptimizer):  # that one stepped inside backward
            optimizer.step()
        return loss.detach()

    phase["now"] = "first step"
    first_s, loss = _timed(step, config.device)
    first_loss = loss.item()
    phase["now"] = "steps"  # the optimizer state now exists: the steady-state peak
    print(f"{name}: first step (compilation included) {first_s:.1f} s, loss {first_loss:.4f}", flush=True)
    if config.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(config.device)
    row = {"contender": name, "attention": model_config.attention,
           "ac": "full (stock)" if base == "stock" else config.policy(name), "protocol": config.protocol}
    if isinstance(policy, CheckpointPlan):
        row["ac_plan"], row["ac_plan_detail"] = policy.describe(), policy.to_dict()
    if config.protocol == "leaderboard":
        ms, row["wall_s"] = time_as_leaderboard(name, step, config.leaderboard_warmup_ms, config.leaderboard_rep_ms,
                                                do_bench)
        seconds = ms / 1e3
    else:
        for _ in range(config.warmup):
            step()
        with GpuMonitor() as monitor:  # the card's clock and power while the timed steps run
            seconds = statistics.median(_timed(step, config.device)[0] for _ in range(config.steps))
        if config.device_type == "cuda":
            row["gpu"] = monitor.summary()
    row.update({"ms_per_step": seconds * 1e3, "tflops": flops / seconds / 1e12,
                "mfu": flops / seconds / 1e12 / matmul_rate, "first_step_s": first_s, "first_loss": first_loss})
    row.update(_peaks(config))
    if config.profile:
        row["kernel_ms"] = kernel_times(step, config.device)
    return row


def oom_row(name: str, error: BaseException, phase: str, config: StepBenchConfig) -> dict[str, Any]:
    """The row of a contender that ran out of memory: where (plan, build, first step, steps), the
    allocator's own words (how much it tried to allocate, what was free, reserved but unallocated) and,
    on CUDA, the peak allocated since the first step, to compare with a plan's accounting."""
    row = {"contender": name, "ms_per_step": OOM, "note": OOM_ADVICE, "oom_phase": phase,
           "oom_message": " ".join(str(error).split())[:400]}
    return {**row, **_peaks(config, "_before_oom")}


def _peaks(config: StepBenchConfig, suffix: str = "") -> dict[str, float]:
    """CUDA: the peak GiB allocated and reserved by the caching allocator since its last reset."""
    if config.device_type != "cuda":
        return {}
    return {f"peak_gib{suffix}": torch.cuda.max_memory_allocated(config.device) / 2**30,
            f"peak_reserved_gib{suffix}": torch.cuda.max_memory_reserved(config.device) / 2**30}


def matmul_params(model: ModelConfig) -> int:
    """Weights that multiply activations: per block Q, K, V, O (4 d^2) and SwiGLU (3 d d_ff), plus the
    LM head (V d). Not the embedding table (a lookup) nor the norm gains (elementwise)."""
    d = model.d_model
    return model.num_layers * (4 * d * d + 3 * d * model.d_ff) + model.vocab_size * d


def step_flops(model: ModelConfig, batch: int, ctx: int) -> float:
    """Model FLOPs of one leaderboard step (causal attention counted at half)."""
    return training_flops(matmul_params(model), model.num_layers, model.d_model, batch, ctx, causal=True)


def run(config: StepBenchConfig, on_row: Callable[[list[dict[str, Any]], dict[str, Any]], None] | None = None,
        do_bench: Callable[..., float] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every contender's row (an OOM row where one runs out of memory, a "no plan" row where its auto /
    budget:GiB plan does not fit) and the run's numbers; `on_row(rows, numbers)` after each contender
    (main writes the results so far: a long run that is stopped keeps them). `do_bench`: see run_contender."""
    check_memory(config)
    flops = step_flops(config.model, config.batch, config.ctx)
    rate = matmul_tflops(config.matmul_size, config.device)
    print(f"{flops / 1e12:.4g} TFLOP per step; bf16 {config.matmul_size}^3 matmul: {rate:.4g} TFLOP/s", flush=True)
    model = config.model
    numbers = {"params": model.shape.num_params(model.vocab_size), "matmul_params": matmul_params(model),
               "pflop_per_step": flops / 1e15, "matmul_tflops": rate}
    rows: list[dict[str, Any]] = []
    for name in config.contenders:
        phase: dict[str, str] = {}
        try:
            row = run_contender(name, config, flops, rate, do_bench, phase)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_oom(error):
                raise
            row = oom_row(name, error, phase.get("now", "plan"), config)
        except ConfigError as error:  # an auto / budget:GiB plan that does not fit: the others still run
            row = {"contender": name, "ms_per_step": NO_PLAN, "note": str(error)}
        finally:
            torch.compiler.reset()  # compiled code may hold the contender's module: drop it first
            gc.collect()  # the contender's model, optimizer state and activations, before the next one
            free_device_memory()
        rows.append(row)
        print(f"{name}: {row}", flush=True)
        if on_row is not None:
            on_row(rows, numbers)
    return rows, numbers


def check_memory(config: StepBenchConfig, available: int | None = None) -> None:
    """Refuse, before anything is built, a contender whose memory floor (training/memory_plan.py: bf16
    parameters, gradients and AdamW state, its checkpointing's activations) exceeds the device's memory,
    `available` bytes (default: what is free now). On a CPU running out of memory kills the process."""
    available = available_bytes(config.device) if available is None else available
    model = config.model

    def floor(contender: str, layers: int) -> MemoryPlan:
        policy = "full" if contender_base(contender) == "stock" else config.policy(contender)
        shape = dataclasses.replace(model.shape, num_layers=layers)
        return estimate(shape, model.vocab_size, tokens=config.batch * config.ctx, param_bytes=2, activation_bytes=2,
                        policy=policy, optimizer_in_backward="inbwd" in contender_options(contender))

    for name in config.contenders:
        if floor(name, model.num_layers).total <= available:
            continue
        layers = largest_fitting({str(k): floor(name, k) for k in range(1, model.num_layers)}, available)
        advice = f"--layers {layers} fits; or" if layers else "reduce memory:"
        what = (f"--contenders {name} ({model.shape.num_params(model.vocab_size) / 1e9:.3g} B parameters, "
                f"--batch {config.batch} x --ctx {config.ctx})")
        check_fits(floor(name, model.num_layers), available, what,
                   f"{advice} --ac full, a smaller --batch or --ctx, or leave {name} out of --contenders")


def _draw(rows: list[dict[str, Any]]):
    def draw(plt: Any) -> None:
        fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(rows), 3.5))
        names = [row["contender"] for row in rows]
        times = [row["ms_per_step"] / 1e3 if isinstance(row["ms_per_step"], float) else 0.0 for row in rows]
        bars = ax.bar(names, times)
        for bar, row in zip(bars, rows):
            ms = row["ms_per_step"]
            label = ms if isinstance(ms, str) else f"{ms / 1e3:.2f} s"  # OOM, no plan
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        ax.set(ylabel="seconds per step (median)", title="training step")
    return draw


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and batch (a preset, any field overridden)")
    group.add_argument("--preset", default="8b-32k", choices=tuple(STEP_PRESETS),
                       help="8b-32k (the leaderboard) or tiny-step (CI) (default: 8b-32k)")
    for flag, text in (("--layers", "blocks"), ("--d-model", "residual width"), ("--d-ff", "feed-forward width"),
                       ("--heads", "attention heads"), ("--vocab", "vocabulary"), ("--ctx", "tokens per sequence"),
                       ("--batch", "sequences per step")):
        group.add_argument(flag, type=int, metavar="N", help=f"{text} (default: the preset's)")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--contenders", nargs="+", default=list(CONTENDERS), metavar="NAME",
                       help=f"which to run, in order: {', '.join(CONTENDERS)} (default: all)")
    group.add_argument("--ac", default=StepBenchConfig.__dataclass_fields__["ac"].default, metavar="POLICY",
                       help="activation checkpointing of ours: none, full, every:K, selective[:NAMES], or a "
                            "per-layer plan: auto[:MARGIN_GiB], budget:GiB (default: %(default)s)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="compile (default: on)")
    group.add_argument("--compile-backend", metavar="NAME", help="default: inductor on CUDA, aot_eager on CPU")
    group.add_argument("--compile-mode", choices=COMPILE_MODES, default="regional", help="ours (default: regional)")
    group.add_argument("-n", "--steps", type=int, default=5, help="timed steps (default: 5)")
    group.add_argument("-w", "--warmup", type=int, default=2, help="untimed steps after the first (default: 2)")
    group.add_argument("--matmul-size", type=int, metavar="N", help="MFU's reference matmul (default: 8192 on CUDA)")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    group.add_argument("--profile", action="store_true",
                       help="one more step per contender under torch.profiler: kernel time by category, in "
                            "step.md/json (run two --layers values and subtract for one layer's share)")
    group.add_argument("--protocol", choices=PROTOCOLS, default="default",
                       help="default: --warmup steps then the median of --steps; leaderboard: the CS336 2026 "
                            "timing, do_bench(step, warmup=10_000, rep=30_000) from an empty compile cache, with "
                            "the wall time from process start (CUDA only)")
    group.add_argument("--leaderboard-warmup-ms", type=nonnegative_float, default=LEADERBOARD_WARMUP_MS, metavar="MS",
                       help="do_bench warm-up of --protocol leaderboard (default: the leaderboard's %(default)s)")
    group.add_argument("--leaderboard-rep-ms", type=positive_float, default=LEADERBOARD_REP_MS, metavar="MS",
                       help="do_bench measured time of --protocol leaderboard (default: the leaderboard's "
                            "%(default)s)")
    group.add_argument("--out-dir", type=directory, default="outputs/bench/step", help="where step.{md,json,png} go")


def config_from_args(args: argparse.Namespace) -> StepBenchConfig:
    with flags_renamed(TRAIN_FLAGS):
        return _config_from_args(args)


def _config_from_args(args: argparse.Namespace) -> StepBenchConfig:
    preset = {key: value if getattr(args, key) is None else getattr(args, key)
              for key, value in STEP_PRESETS[args.preset].items() if key != "model"}
    ctx = max(preset["ctx"], 1)  # the model's RoPE table; a bad --ctx is reported by StepBenchConfig
    model = ModelConfig(preset=STEP_PRESETS[args.preset]["model"], num_layers=args.layers, d_model=args.d_model,
                        d_ff=args.d_ff, num_heads=args.heads, vocab_size=preset["vocab"], context_length=ctx)
    return StepBenchConfig(model=model, batch=preset["batch"], ctx=preset["ctx"],
                           contenders=tuple(args.contenders), ac=args.ac, compile=args.compile,
                           compile_backend=args.compile_backend, compile_mode=args.compile_mode, steps=args.steps,
                           warmup=args.warmup, device=args.device, matmul_size=args.matmul_size,
                           profile=args.profile, protocol=args.protocol,
                           leaderboard_warmup_ms=args.leaderboard_warmup_ms,
                           leaderboard_rep_ms=args.leaderboard_rep_ms)


def write(args: argparse.Namespace, config: StepBenchConfig, rows: list[dict[str, Any]], numbers: dict) -> None:
    model = config.model
    meta = {**environment(config.device), "preset": args.preset, "layers": model.num_layers, "d_model": model.d_model,
            "d_ff": model.d_ff, "heads": model.num_heads, "vocab": model.vocab_size, "ctx": config.ctx,
            "batch": config.batch, "dtype": "bf16 parameters", "compile": config.compile_backend if config.compile
            else None, "protocol": config.protocol, **_protocol_meta(config),
            "ran_together": [row["contender"] for row in rows], **numbers}
    rows = with_stock_ratio(rows)
    results = Results("step", meta=meta, rows=rows)
    columns = ["contender", "attention", "ac", "ms_per_step", "tflops", "mfu", "first_step_s", "first_loss"]
    memory = ["peak_gib", "peak_reserved_gib"] if config.device_type == "cuda" else []
    optional = ["speedup_vs_stock", "wall_s", "ac_plan", *memory]
    columns += [name for name in [*optional, "note"] if any(name in row for row in rows)]
    out = results.write(args.out_dir, columns=columns)
    with open(out / f"{results.name}.md", "a") as md:
        md.write(f"\n{together_note(rows)}\n")
        kernels = kernel_table(rows)
        if kernels:  # appended under the step table: one step's kernel time by category
            md.write(f"\nKernel time of one step by category (torch.profiler):\n\n{kernels}\n")
            print(kernels)
    results.plot(args.out_dir, _draw(rows))


def _protocol_meta(config: StepBenchConfig) -> dict[str, Any]:
    if config.protocol == "default":
        return {"steps": config.steps, "warmup": config.warmup}
    return leaderboard_meta(config.leaderboard_warmup_ms, config.leaderboard_rep_ms)


def main(args: argparse.Namespace) -> int:
    if args.protocol == "leaderboard":  # first: nothing may compile into (or from) another cache before
        print(f"compile cache: {empty_compile_cache()} (empty; FX graph, autotune and AOTAutograd caches off)")
    config = config_from_args(args)
    run(config, on_row=lambda rows, numbers: write(args, config, rows, numbers))
    return 0
