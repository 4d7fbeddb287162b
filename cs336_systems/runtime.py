"""Where and how a model runs: device choice, torch.compile and the precision policy (train and `bench model`).

The precision policy is one `Precision` value (parameter, compute and gradient-reduce dtypes), built once
from --param-dtype, --compute-dtype and --reduce-dtype (--bf16: a shortcut for --compute-dtype bf16) and
handed whole to the model build, autocast and the data-parallel engines (parallel/parallelize.py);
docs/training.md ("Precision") tabulates what each combination keeps in memory.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch

from cs336_systems.errors import ConfigError

ENGINES = ("ours", "torch")
"""Values of `parallelize`'s `engine` (train's --engine): our DDP/FSDP, or torch's
DistributedDataParallel/FSDP2. Here, not in parallelize.py: the flag's parser must not import
torch._dynamo (seconds of start-up)."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The dtypes a precision flag accepts, by name."""
PARAM_DTYPES = DTYPES
"""--param-dtype's choices (the same names)."""
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Precision:
    """Which dtype each part of a training step keeps: the one precision policy of a run.

    - `param`: the parameters, their gradients and the optimizer state (the master weights);
    - `compute`: what forward and backward compute in. Lower than `param` (fp32 parameters, bf16
      compute): the step runs under bf16 autocast (matmuls in bf16, norms, softmax and the loss in
      fp32), and FSDP (ours or torch's) gathers the weights in bf16;
    - `reduce`: what gradients are averaged over the ranks in. Higher than `param` (bf16 parameters,
      fp32 reduce): FSDP reduce-scatters in fp32 and rounds the averaged shard to bf16 once.

    Rules (checked here, each error naming its flag): compute is never higher than param (nothing
    upcasts bf16 weights for an fp32 compute; the result would be bf16-rounded weights computed in
    fp32, more memory than bf16 for no precision), and reduce is never lower than param (rounding
    gradients below the dtype they are stored in loses precision and saves no memory). A reduce dtype
    other than the parameters' is FSDP's alone: DDP all-reduces the gradients in their own dtype
    (`check_engine`).
    """

    param: torch.dtype = torch.float32
    compute: torch.dtype = torch.float32
    reduce: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name, flag in (("param", "--param-dtype"), ("compute", "--compute-dtype"), ("reduce", "--reduce-dtype")):
            if getattr(self, name) not in DTYPE_NAMES:
                raise ConfigError(f"{flag} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.compute.itemsize > self.param.itemsize:
            raise ConfigError(f"--compute-dtype {DTYPE_NAMES[self.compute]} is higher than --param-dtype "
                              f"{DTYPE_NAMES[self.param]}: compute in the parameters' dtype or lower")
        if self.reduce.itemsize < self.param.itemsize:
            raise ConfigError(f"--reduce-dtype {DTYPE_NAMES[self.reduce]} is lower than --param-dtype "
                              f"{DTYPE_NAMES[self.param]}: gradients would lose precision and save no memory")

    @classmethod
    def from_names(cls, param: str = "fp32", compute: str | None = None, reduce: str | None = None) -> Precision:
        """From flag values; compute and reduce default to the parameter dtype."""
        for value, flag in ((param, "--param-dtype"), (compute, "--compute-dtype"), (reduce, "--reduce-dtype")):
            if value is not None and value not in DTYPES:
                raise ConfigError(f"{flag} must be one of {', '.join(DTYPES)}, got {value!r}")
        return cls(param=DTYPES[param], compute=DTYPES[compute or param], reduce=DTYPES[reduce or param])

    @property
    def autocast(self) -> bool:
        """Forward and loss run under autocast to `compute` (it is lower than `param`)."""
        return self.compute != self.param

    @property
    def gather_dtype(self) -> torch.dtype | None:
        """FSDP's compute dtype (weights gathered in it), None: the parameters' own."""
        return self.compute if self.compute != self.param else None

    @property
    def reduce_dtype(self) -> torch.dtype | None:
        """FSDP's gradient-reduce dtype, None: the parameters' own."""
        return self.reduce if self.reduce != self.param else None

    def check_engine(self, fsdp: bool) -> None:
        """A reduce dtype other than the parameters' needs a sharding engine (ConfigError otherwise)."""
        if not fsdp and self.reduce != self.param:
            raise ConfigError(f"--reduce-dtype {DTYPE_NAMES[self.reduce]} with --param-dtype {DTYPE_NAMES[self.param]} "
                              "needs --fsdp: DDP all-reduces gradients in the parameters' dtype")

    def __str__(self) -> str:
        return "/".join(f"{part} {DTYPE_NAMES[getattr(self, part)]}" for part in ("param", "compute", "reduce"))


FP32 = Precision()
"""Everything in fp32: the default policy."""


@dataclass(kw_only=True)
class RuntimeConfig:
    """Where and how the model runs (shared with `bench model`)."""

    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    compile: bool | None = False
    """Wrap the model in torch.compile; None: on when the device is CUDA (inductor on CPU compiles slowly)."""
    compile_backend: str = "inductor"
    """torch.compile backend; "aot_eager" compiles fast and is what the CPU tests use."""
    bf16: bool = False
    """Compute in bf16 (the --bf16 shortcut for compute_dtype "bf16"): with fp32 parameters, forward and
    loss run under bf16 autocast (parameters and optimizer stay fp32), and FSDP gathers weights in bf16.
    Set by __post_init__ to whether the compute dtype is bf16."""
    param_dtype: str = "fp32"
    """Parameters (and so gradients and AdamW state) in "fp32" or "bf16": bf16 halves their memory,
    what an 8B model needs on one GPU (the CS336 2026 leaderboard step); no autocast is needed then."""
    compute_dtype: str | None = None
    """Forward and backward compute dtype; None: bf16 with --bf16, else param_dtype."""
    reduce_dtype: str | None = None
    """Gradient-reduce dtype of FSDP; None: param_dtype."""

    @property
    def precision(self) -> Precision:
        """The three dtypes as one validated value (built once, in __post_init__)."""
        return self._precision

    def __post_init__(self) -> None:
        self.device = str(pick_device(self.device))
        if self.compile is None:
            self.compile = torch.device(self.device).type == "cuda"
        if self.bf16 and self.compute_dtype not in (None, "bf16"):
            raise ConfigError(f"--bf16 means --compute-dtype bf16, and --compute-dtype is {self.compute_dtype}: "
                              "drop one")
        compute = "bf16" if self.bf16 else self.compute_dtype
        # Not a field: config.json and wandb get the flag values, `precision` is derived from them.
        self._precision = Precision.from_names(self.param_dtype, compute, self.reduce_dtype)
        self.bf16 = self._precision.compute == torch.bfloat16
        if self.compile and self.compile_backend not in torch.compiler.list_backends(exclude_tags=()):
            raise ConfigError(f"--compile-backend: unknown backend {self.compile_backend!r}")


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
    """Autocast to the compute dtype when it is lower than the parameters', else a no-op."""
    device_type = torch.device(runtime.device).type
    precision = runtime.precision
    return torch.autocast(device_type, dtype=precision.compute, enabled=precision.autocast)


def add_runtime_arguments(parser: argparse.ArgumentParser, compile_default: bool | None = False) -> None:
    """--device, --compile, --compile-backend, --bf16, --param-dtype, --compute-dtype, --reduce-dtype
    (see RuntimeConfig and Precision).

    `compile_default=None` makes --compile a --compile/--no-compile pair defaulting to "on CUDA".
    """
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    if compile_default is None:
        group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                           help="torch.compile the model (default: on CUDA only)")
    else:
        group.add_argument("--compile", action="store_true", default=compile_default, help="torch.compile the model")
    group.add_argument("--compile-backend", default="inductor", metavar="NAME",
                       help="torch.compile backend (default: inductor; aot_eager compiles fast)")
    group.add_argument("--bf16", action="store_true",
                       help="shortcut for --compute-dtype bf16: fp32 parameters, bf16 autocast, fp32 reduce")
    group.add_argument("--param-dtype", choices=tuple(DTYPES),
                       help=f"parameter, gradient and optimizer-state dtype (default: {RuntimeConfig.param_dtype})")
    group.add_argument("--compute-dtype", choices=tuple(DTYPES),
                       help="forward/backward dtype, at most --param-dtype (default: --param-dtype; bf16 with --bf16)")
    group.add_argument("--reduce-dtype", choices=tuple(DTYPES),
                       help="FSDP's gradient-reduce dtype, at least --param-dtype (default: --param-dtype)")


def runtime_config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(device=args.device, compile=args.compile, compile_backend=args.compile_backend,
                         bf16=args.bf16, param_dtype=getattr(args, "param_dtype", None) or RuntimeConfig.param_dtype,
                         compute_dtype=getattr(args, "compute_dtype", None),
                         reduce_dtype=getattr(args, "reduce_dtype", None))
