"""`python -m cs336_systems [train|bench NAME] ...`: argparse front end.

Each command lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`;
this file only wires them together. Running with no subcommand runs `train` with its defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

from cs336_systems.errors import ConfigError

CUDA_ALLOCATOR = "expandable_segments:True"
"""The CUDA caching allocator's setting for every command, unless PYTORCH_CUDA_ALLOC_CONF is set (set it
empty for torch's default). Expandable segments grow one mapping instead of caching fixed blocks, so
memory freed by one phase of a step (activations in backward) is reusable by another of a different
shape (AdamW's state, the next forward): without them a step near the card's capacity can run out with
gigabytes reserved but unallocated (docs/activation_checkpointing.md, "Checked on a GPU")."""

# subcommand -> one-line help; `load` imports the command's module.
COMMANDS = {"train": "train a Transformer LM (the default command)"}
BENCHMARKS = {
    "model": "end-to-end model forward/backward/step timing (CS336 benchmarking)",
    "attention": "attention implementations: latency, TFLOP/s, leaderboard",
    "allreduce": "all-reduce latency and bus bandwidth over ranks and sizes",
    "ddp": "DDP variants: time per step and communication share",
    "sharding": "optimizer state sharding: memory breakdown and step time",
    "fsdp": "FSDP (ours) vs DDP, ZeRO-1 and torch FSDP2: per-rank memory and step time",
    "lm-loss": "fused LM head + cross-entropy vs chunked and compiled PyTorch",
    "step": "the CS336 2026 leaderboard training step: ours vs the stock recipe",
    "memory": "activation memory per checkpointing policy and group size",
}


def load(command: str) -> ModuleType:
    """The module of `command` ("train" or "bench NAME"). Imported here, when the command is chosen:
    the others cost seconds of start-up (dynamo, distributed). A name listed above without a module
    here is a LookupError, so a command is never hidden."""
    match command.split():
        case ["train"]:
            from cs336_systems.training import command as module
        case ["bench", "model"]:
            from cs336_systems.bench import model as module
        case ["bench", "attention"]:
            from cs336_systems.bench import attention as module
        case ["bench", "allreduce"]:
            from cs336_systems.bench import allreduce as module
        case ["bench", "ddp"]:
            from cs336_systems.bench import ddp as module
        case ["bench", "sharding"]:
            from cs336_systems.bench import sharding as module
        case ["bench", "fsdp"]:
            from cs336_systems.bench import fsdp as module
        case ["bench", "lm-loss"]:
            from cs336_systems.bench import lm_loss as module
        case ["bench", "step"]:
            from cs336_systems.bench import step as module
        case ["bench", "memory"]:
            from cs336_systems.bench import memory as module
        case _:
            raise LookupError(f"cs336_systems.cli: no module for the command {command!r}")
    return module


def _add_command_parser(subparsers, command: str, help_text: str, wanted: str | None) -> None:
    name = command.split()[-1]
    if wanted not in (None, command):  # listed with its help; its flags are read only when it is the command run
        subparsers.add_parser(name, help=help_text, add_help=False)
        return
    module = load(command)
    parser = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(_module=module)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of the command `argv` names (None: of every command)."""
    wanted = _command(argv)
    parser = argparse.ArgumentParser(prog="cs336-systems", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="{train,bench}")
    for name, help_text in COMMANDS.items():
        _add_command_parser(commands, name, help_text, wanted)
    bench = commands.add_parser("bench", help="benchmarks (writes markdown + JSON + PNG)")
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="{" + ",".join(BENCHMARKS) + "}", required=True)
    for name, help_text in BENCHMARKS.items():
        _add_command_parser(benchmarks, f"bench {name}", help_text, wanted)
    return parser


def _command(argv: list[str] | None) -> str | None:
    """"train", "bench NAME", or None when argv names no command (then every parser is built)."""
    if argv is None or not argv:
        return None
    if argv[0] == "bench":
        return f"bench {argv[1]}" if len(argv) > 1 and argv[1] in BENCHMARKS else None
    return argv[0] if argv[0] in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR)  # read when CUDA first allocates
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # `python -m cs336_systems [--flags]` means train
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return args._module.main(args) or 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
