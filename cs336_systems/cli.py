"""`python -m cs336_systems [train|bench NAME] ...`: argparse front end.

Each command lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`;
this file only wires them together. Running with no subcommand runs `train` with its defaults.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from cs336_systems.errors import ConfigError

# subcommand -> (module, one-line help). Only the chosen command's module is imported (the others
# cost seconds of start-up: dynamo, distributed); every module is checked to exist, so a typo here
# fails loudly instead of hiding a command.
COMMANDS = {"train": ("cs336_systems.training.command", "train a Transformer LM (the default command)")}
BENCHMARKS = {
    "model": ("cs336_systems.bench.model", "end-to-end model forward/backward/step timing (CS336 benchmarking)"),
    "attention": ("cs336_systems.bench.attention", "attention implementations: latency, TFLOP/s, leaderboard"),
    "allreduce": ("cs336_systems.bench.allreduce", "all-reduce latency and bus bandwidth over ranks and sizes"),
    "ddp": ("cs336_systems.bench.ddp", "DDP variants: time per step and communication share"),
    "sharding": ("cs336_systems.bench.sharding", "optimizer state sharding: memory breakdown and step time"),
    "fsdp": ("cs336_systems.bench.fsdp", "FSDP (ours) vs DDP, ZeRO-1 and torch FSDP2: per-rank memory and step time"),
    "lm-loss": ("cs336_systems.bench.lm_loss", "fused LM head + cross-entropy vs chunked and compiled PyTorch"),
    "step": ("cs336_systems.bench.step", "the CS336 2026 leaderboard training step: ours vs the stock recipe"),
    "memory": ("cs336_systems.bench.memory", "activation memory per checkpointing policy and group size"),
}


def _add_module_parser(subparsers, name: str, module_name: str, help_text: str, load: bool) -> None:
    if importlib.util.find_spec(module_name) is None:
        raise ModuleNotFoundError(f"cs336_systems.cli: command {name!r} names a missing module {module_name}",
                                  name=module_name)
    if not load:  # listed with its help; its flags are read only when it is the command being run
        subparsers.add_parser(name, help=help_text, add_help=False)
        return
    module = importlib.import_module(module_name)
    parser = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(_module=module)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of the command `argv` names (None: of every command)."""
    wanted = _command(argv)
    parser = argparse.ArgumentParser(prog="cs336-systems", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="{train,bench}")
    for name, (module_name, help_text) in COMMANDS.items():
        _add_module_parser(commands, name, module_name, help_text, wanted in (None, name))
    bench = commands.add_parser("bench", help="benchmarks (writes markdown + JSON + PNG)")
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="{" + ",".join(BENCHMARKS) + "}", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        _add_module_parser(benchmarks, name, module_name, help_text, wanted in (None, f"bench {name}"))
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
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # `python -m cs336_systems [--flags]` means train
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return args._module.main(args) or 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
