"""Where and how a model runs: device choice, torch.compile and bf16 autocast (train and `bench model`)."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch

from cs336_systems.errors import ConfigError

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    """Run forward and loss under bfloat16 autocast (parameters and optimizer stay fp32)."""
    param_dtype: str = "fp32"
    """Parameters (and so gradients and AdamW state) in "fp32" or "bf16": bf16 halves their memory,
    what an 8B model needs on one GPU (the CS336 2026 leaderboard step); no autocast is needed then."""

    def __post_init__(self) -> None:
        self.device = str(pick_device(self.device))
        if self.compile is None:
            self.compile = torch.device(self.device).type == "cuda"
        if self.param_dtype not in PARAM_DTYPES:
            raise ConfigError(f"--param-dtype must be one of {', '.join(PARAM_DTYPES)}, got {self.param_dtype!r}")
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
    """bf16 autocast when asked for, else a no-op."""
    device_type = torch.device(runtime.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=runtime.bf16)


def add_runtime_arguments(parser: argparse.ArgumentParser, compile_default: bool | None = False) -> None:
    """--device, --compile, --compile-backend, --bf16 (see RuntimeConfig).

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
    group.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward and loss")
    group.add_argument("--param-dtype", choices=tuple(PARAM_DTYPES),
                       help=f"parameter, gradient and optimizer-state dtype (default: {RuntimeConfig.param_dtype})")


def runtime_config_from_args(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(device=args.device, compile=args.compile, compile_backend=args.compile_backend,
                         bf16=args.bf16, param_dtype=getattr(args, "param_dtype", None) or RuntimeConfig.param_dtype)
