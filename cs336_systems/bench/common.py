"""What every benchmark shares: timing, OOM handling, run metadata and the results writer.

A benchmark only builds its setup and calls `time_ms`; rows go into a `Results`, which writes
`NAME.md` (markdown table), `NAME.json` (rows + metadata: device, versions, git revision, date)
and, when asked, `NAME.png`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from cs336_systems.errors import ConfigError
from cs336_systems.timing import Stopwatch, synchronize

__all__ = ["OOM", "UNSUPPORTED", "Results", "Stopwatch", "environment", "free_device_memory", "git_revision",
           "interleaved_rounds", "is_oom", "markdown_table", "mean_std", "synchronize", "time_ms", "check_flags",
           "check_backend", "extra_peak_mib"]

OOM = "OOM"
UNSUPPORTED = "unsupported"
T = TypeVar("T")


def time_ms(fn: Callable[[], Any], device: torch.device | str, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of `fn()`: triton.testing.do_bench on CUDA, a synchronised loop on CPU."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up: first-call costs (allocation, compilation) stay out of the numbers
    times, deadline = [], time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_rounds(names: Iterable[str], repeats: int, run: Callable[[str], T]) -> dict[str, list[T]]:
    """`run(name)` for every name, `repeats` rounds, the names interleaved within each round: a slow
    spell of the host or the card (clocks, temperature; small shapes time host work) hits them alike."""
    rounds: dict[str, list[T]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, runs in rounds.items():
            runs.append(run(name))
    return rounds


def mean_std(samples: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(samples), (statistics.stdev(samples) if len(samples) > 1 else 0.0)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_device_memory() -> None:
    """Drop cached blocks after an OOM so the next configuration starts clean."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def git_revision(cwd: str | Path | None = None) -> str:
    """The short commit the numbers come from: CS336_GIT_REVISION where set (a tree copied without its
    history, e.g. to a GPU host, can name its commit that way), else HEAD, with "-dirty" when tracked
    files differ from it (a copied working tree over a stale checkout shows as such); "unknown"
    outside a git checkout."""
    if os.environ.get("CS336_GIT_REVISION"):
        return os.environ["CS336_GIT_REVISION"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=cwd).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        if not head:
            return "unknown"
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device | str) -> dict[str, Any]:
    """Where and when the numbers were taken."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
        "git": git_revision(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        # CPU timings on a shared machine are only as good as its idleness: keep the evidence.
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **({"cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")} if device.type == "cuda" else {}),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Results:
    """Benchmark rows plus metadata, written as NAME.md / NAME.json (and NAME.png via `plot`)."""

    name: str
    meta: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        return row

    def write(self, out_dir: str | Path, columns: Sequence[str] | None = None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table = markdown_table(self.rows, columns)
        meta = ", ".join(f"{k}={v}" for k, v in self.meta.items())
        (out / f"{self.name}.md").write_text(f"# {self.name}\n\n{meta}\n\n{table}\n")
        (out / f"{self.name}.json").write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        print(table)
        print(f"wrote {out / self.name}.md and .json")
        return out

    def plot(self, out_dir: str | Path, draw: Callable[[Any], None]) -> Path | None:
        """Save `draw(plt)`'s figure as NAME.png; skipped (with a note) when matplotlib is absent."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
            return None
        path = Path(out_dir) / f"{self.name}.png"
        draw(plt)
        plt.tight_layout()
        plt.savefig(path, dpi=120)
        plt.close("all")
        return path


def check_flags(impls: list[str], known: tuple[str, ...] | list[str], device: str,
                positive: dict[str, list[int]]) -> None:
    """The checks every side-by-side benchmark makes before running: known --impls, a usable
    --device, and positive sizes (flag -> values); a ConfigError naming the flag otherwise."""
    unknown = [name for name in impls if name not in known]
    if unknown:
        raise ConfigError(f"--impls: unknown {unknown} (choose from {', '.join(known)})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    for flag, values in positive.items():
        if any(value <= 0 for value in values):
            raise ConfigError(f"{flag} must be positive, got {values}")


def check_backend(backend: str, nproc: int) -> None:
    """NCCL runs one rank per CUDA GPU: a ConfigError naming --backend when there are too few (torchrun
    sets the ranks and their GPUs itself), instead of a traceback from the launcher."""
    if backend != "nccl" or "RANK" in os.environ:
        return
    gpus = torch.cuda.device_count()
    if gpus < nproc:
        raise ConfigError(f"--backend nccl: {nproc} ranks need {nproc} CUDA GPUs (one per rank), found {gpus}; "
                          "use --backend gloo or a smaller --nproc")


def extra_peak_mib(run: Callable[[], Any], device: str, kept_bytes: int = 0) -> float | None:
    """Peak device memory of `run()` above what was allocated before it, less `kept_bytes` that it
    leaves behind on purpose (the gradients it returns), in MiB; None off CUDA."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before - kept_bytes) / 2**20
