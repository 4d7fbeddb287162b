"""`python -m cs336_systems [train|bench NAME] ...`: argparse front end.

Each command lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`;
this file only wires them together. Running with no subcommand runs `train` with its defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cs336_systems.errors import ConfigError

# subcommand -> (module, one-line help). Modules are imported when the parser is built, so keep
# their top level cheap.
COMMANDS = {"train": ("cs336_systems.training.command", "train a Transformer LM (the default command)")}
BENCHMARKS = {
    "model": ("cs336_systems.bench.model", "end-to-end model forward/backward/step timing (CS336 benchmarking)"),
    "attention": ("cs336_systems.bench.attention", "attention implementations: latency, TFLOP/s, leaderboard"),
    "allreduce": ("cs336_systems.bench.allreduce", "all-reduce latency and bus bandwidth over ranks and sizes"),
    "ddp": ("cs336_systems.bench.ddp", "DDP variants: time per step and communication share"),
    "sharding": ("cs336_systems.bench.sharding", "optimizer state sharding: memory breakdown and step time"),
}


def _add_module_parser(subparsers, name: str, module_name: str, help_text: str) -> None:
    # A missing module is a bug (a typo would otherwise hide a command): let the ImportError out.
    module = importlib.import_module(module_name)
    parser = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(_module=module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cs336-systems", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="{train,bench}")
    for name, (module_name, help_text) in COMMANDS.items():
        _add_module_parser(commands, name, module_name, help_text)
    bench = commands.add_parser("bench", help="benchmarks (writes markdown + JSON + PNG)")
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="{" + ",".join(BENCHMARKS) + "}", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        _add_module_parser(benchmarks, name, module_name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # `python -m cs336_systems [--flags]` means train
    args = parser.parse_args(argv)
    try:
        return args._module.main(args) or 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
