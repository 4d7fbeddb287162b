"""Attention implementations side by side: latency, TFLOP/s and peak memory, plus the CS336 leaderboard.

    python -m cs336_systems bench attention                  # the CS336 sweep on CUDA (a small one on CPU)
    python -m cs336_systems bench attention --impls ours sdpa-cudnn --dtypes bf16 --seq-lens 4096 16384
    python -m cs336_systems bench attention --leaderboard    # 16 x 16384 x 64 bf16 causal: ours vs SDPA
    python -m cs336_systems bench attention --leaderboard --repeats 3 --rep-ms 1000   # interleaved rounds
    python -m cs336_systems bench attention --impls ours sdpa-flash --seq-lens 1024 --repeats 5   # idem, sweep
    python -m cs336_systems bench attention --preset 8b --impls ours sdpa-cudnn   # the 8B model's attention layer
    python -m cs336_systems bench attention --dispatch-sweep   # our dispatch rule vs tl and Gluon kernels, cuDNN

Sweep (CS336 flash_benchmarking): batch 1, one head, causal, every (sequence length, head dim,
dtype); forward, backward and forward+backward latency (median of triton.testing.do_bench on
CUDA), inputs made before timing. The forward runs with inputs that require grad, as in training.
TFLOP/s counts 4·N²·D per forward (halved when causal) and 2.5x that for the backward. Failures are
rows too: "OOM", or "unsupported" with the reason (e.g. a SDPA backend that rejects the shape).
Presets fill the shape flags not given: `8b` is one attention layer of the CS336 2026 leaderboard step
(batch 2, 32 heads, 32768 tokens, head dim 128, bf16, causal); `--dispatch-sweep` is the sweep of
bench/attention_dispatch.py. `--batch-heads BH ...` sweeps batch 1 with BH heads instead of --batch/--heads.
The leaderboard timing is in bench/attention_leaderboard.py, the grouped-head and document sweeps in
bench/attention_variants.py.
Output: attention.md, attention.json and attention.png (latency vs N, a panel per head dim).
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch._functorch.config  # noqa: F401 - sweep() patches it; not loaded by `import torch` alone
import torch.nn.functional as F

from cs336_systems.bench.attention_timing import CUDA_ONLY, PASS_FLOP_FACTOR, Unsupported, time_passes
from cs336_systems.bench.common import (
    Results,
    check_flags,
    environment,
    interleaved_rounds,
)
from cs336_systems.errors import ConfigError, directory, nonnegative_float, positive_float

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("forward", "backward", "forward+backward")
# FLOPs of a pass relative to the forward's (FlashAttention-2 paper convention).
LEADERBOARD_SHAPE = (16, 16384, 64)  # (heads, sequence length, head dim), bf16, causal
# The least work of one timing: time_ms's warm-up call and its minimum of 3 timed calls (CUDA's do_bench
# runs more, for --rep-ms; that time is the user's choice, not counted).
TIMED_CALLS = 4
# Attention FLOP rates above what any implementation reaches, so that the time estimated from them is a
# floor: CPU per core (torch SDPA reached 10 to 25 GFLOP/s per core on a 2-core test machine, our tiled op
# less), CUDA (past the bf16 dense peak of an H100 or H200).
CPU_GFLOPS_PER_CORE = 10.0
CUDA_TFLOPS = 1000.0
# Shape flags a preset fills when they are not given (`--preset`).
# The 8B preset times each pass for seconds, not do_bench's default 100 ms (one or two calls of this
# shape): a card under sustained load settles at its power limit's clock within a few hundred ms, and
# every contender should be timed at that steady clock, as it runs inside a training step.
PRESETS = {"8b": {"batch": 2, "heads": 32, "seq_lens": [32768], "head_dims": [128], "dtypes": ["bf16"],
                  "warmup_ms": 2000.0, "rep_ms": 5000.0}}


# ------------------------------------------------------------------------------ implementations


def _ours(gluon_mode: str) -> Callable[[bool, tuple[int, ...]], AttentionFn]:
    """Our op with the Gluon kernels chosen by `gluon_mode`: "auto" (the dispatch rule), "off" (the tl
    kernels), "force" (Gluon wherever it runs)."""
    def build(causal: bool, shape: tuple[int, ...]) -> AttentionFn:
        from ops.flash_attn import flash_attn
        from ops.flash_attn.gluon import set_gluon_mode

        def attention(q, k, v):
            set_gluon_mode(gluon_mode)  # process-global: the backward, run after this returns, reads it too
            return flash_attn(q, k, v, causal)

        return attention

    return build


def _naive(causal: bool, shape: tuple[int, ...]) -> AttentionFn:
    from cs336_basics.attention import naive_attention

    return lambda q, k, v: naive_attention(q, k, v, causal)


def _sdpa(backend_name: str) -> Callable[[bool, tuple[int, ...]], AttentionFn]:
    def build(causal: bool, shape: tuple[int, ...]) -> AttentionFn:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def attention(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return attention

    return build


def _flex(causal: bool, shape: tuple[int, ...]) -> AttentionFn:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        raise Unsupported(f"FlexAttention is not in this torch: {error}") from None
    *lead, n, _ = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mask = None
    if causal:
        mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device=device)
    compiled = _compiled_flex(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


@functools.cache
def _compiled_flex(flex_attention: Callable) -> Callable:
    # One compiled wrapper for the whole sweep: FlexAttention is only fast compiled.
    return torch.compile(flex_attention)


def _compiled(build: Callable[[bool, tuple[int, ...]], AttentionFn]) -> Callable[[bool, tuple[int, ...]], AttentionFn]:
    """`build`'s function under torch.compile; one wrapper per (build, causal) so dynamo's automatic
    dynamic shapes reuse one graph across sequence lengths instead of recompiling per shape."""
    cache: dict[bool, AttentionFn] = {}

    def build_compiled(causal: bool, shape: tuple[int, ...]) -> AttentionFn:
        if causal not in cache:
            cache[causal] = torch.compile(build(causal, shape))
        return cache[causal]

    return build_compiled


IMPLEMENTATIONS: dict[str, Callable[[bool, tuple[int, ...]], AttentionFn]] = {
    "ours": _ours("auto"),
    "ours-compiled": _compiled(_ours("auto")),
    "ours-tl": _ours("off"),
    "ours-gluon": _ours("force"),
    "naive": _naive,
    "naive-compiled": _compiled(_naive),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa-math": _sdpa("MATH"),
    "flex": _flex,
}
DISPATCH_ONLY = ("ours-tl", "ours-gluon")  # in the dispatch sweep; the default --impls leave them out


# ------------------------------------------------------------------------------------- measuring


def attention_flops(shape: tuple[int, ...], causal: bool) -> float:
    """FLOPs of one forward pass over q, k, v of `shape` (..., N, D): two N x N x D matmuls."""
    *lead, n, d = shape
    batch = 1
    for size in lead:
        batch *= size
    return 4 * batch * n * n * d / (2 if causal else 1)


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0):
    """q, k, v (leaves that require grad) and a gradient for the output, all of `shape`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, grad = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad


def measure(impl: str, shape: tuple[int, ...], dtype: torch.dtype, causal: bool, device: str,
            passes: tuple[str, ...], warmup_ms: float, rep_ms: float) -> list[dict[str, Any]]:
    """One row per pass for `impl` at `shape`; a failure becomes rows with its status."""
    base = dict(impl=impl, dtype=str(dtype).removeprefix("torch."), shape="x".join(map(str, shape)),
                seq_len=shape[-2], head_dim=shape[-1], causal=causal)

    def build():
        q, k, v, grad = make_inputs(shape, dtype, device)
        return IMPLEMENTATIONS[impl](causal, shape), q, k, v, grad

    return time_passes(base, build, impl in CUDA_ONLY, attention_flops(shape, causal), device, passes, warmup_ms,
                       rep_ms)


# ------------------------------------------------------------------------------------ sweep, CLI


def sweep(args: argparse.Namespace, device: str) -> Results:
    results = Results("attention", meta={**environment(device), "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                                         "repeats": args.repeats})
    from ops.flash_attn.gluon import gluon_mode

    # The backward pass is timed by replaying one graph (retain_graph=True); compiled backward graphs
    # refuse that when AOTAutograd donates their saved buffers, so donation is off for the sweep. Our
    # contenders set the process-wide Gluon mode at each call: the one before the sweep comes back after.
    with torch._functorch.config.patch(donated_buffer=False), gluon_mode("auto"):
        _sweep_into(results, args, device)
    return results


def sweep_points(args: argparse.Namespace) -> list[tuple[str, tuple[int, ...], bool]]:
    """(dtype name, shape (B, H, N, D), causal) of every point of the sweep, in the order timed."""
    leads = [(1, bh) for bh in args.batch_heads] if args.batch_heads else [(args.batch, args.heads)]
    return [(dtype, (*lead, n, d), causal) for dtype in args.dtypes for causal in args.causals
            for d in args.head_dims for lead in leads for n in args.seq_lens]


def _sweep_into(results: Results, args: argparse.Namespace, device: str) -> None:
    for dtype_name, shape, causal in sweep_points(args):
        rounds = interleaved_rounds(args.impls, args.repeats, lambda impl: measure(
            impl, shape, DTYPES[dtype_name], causal, device, tuple(args.passes), args.warmup_ms, args.rep_ms))
        for runs in rounds.values():
            rows = [_median_row(same_pass) for same_pass in zip(*runs)]
            results.rows += rows
            _print_progress(rows)


def _median_row(rounds: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """One pass's row over the rounds: the median time (and its TFLOP/s) with every round's time,
    or the first failure's row if any round failed."""
    failed = [r for r in rounds if r["status"] != "ok"]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    times = [r["ms"] for r in rounds]
    row = dict(rounds[0], ms=statistics.median(times), ms_runs=times)
    row["tflops"] = rounds[0]["tflops"] * rounds[0]["ms"] / row["ms"]
    return row


def _print_progress(rows: list[dict[str, Any]]) -> None:
    cells = [f"{r['pass']} {r['ms']:.3f} ms" if r["status"] == "ok" else f"{r['pass']} {r['status']}" for r in rows]
    print(f"{rows[0]['impl']:>15} {rows[0]['dtype']:>8} {rows[0]['shape']:>18}: " + ", ".join(cells), flush=True)


def leaderboard_impls(device: str) -> list[str]:
    """The leaderboard's contenders on `device`: ours, then the SDPA backends and FlexAttention that run there."""
    others = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flex")
    return ["ours", *(impl for impl in others if device == "cuda" or impl not in CUDA_ONLY)]


def _draw(rows: list[dict[str, Any]], pass_name: str) -> Callable[[Any], None]:
    def draw(plt: Any) -> None:
        ok = [r for r in rows if r["status"] == "ok" and r["pass"] == pass_name]
        dtypes, dims = sorted({r["dtype"] for r in ok}), sorted({r["head_dim"] for r in ok})
        if not ok:
            return
        fig, axes = plt.subplots(len(dtypes), len(dims), figsize=(4 * len(dims), 3.2 * len(dtypes)), squeeze=False)
        # One colour per implementation in every panel, whichever implementations a panel lacks.
        colors = {impl: f"C{i}" for i, impl in enumerate(IMPLEMENTATIONS)}
        for i, dtype in enumerate(dtypes):
            for j, dim in enumerate(dims):
                ax = axes[i][j]
                for impl in dict.fromkeys(r["impl"] for r in ok):
                    series = [r for r in ok if (r["impl"], r["dtype"], r["head_dim"]) == (impl, dtype, dim)]
                    if series:
                        ax.plot([r["seq_len"] for r in series], [r["ms"] for r in series], marker=".", label=impl,
                                color=colors.get(impl))
                ax.set(xscale="log", yscale="log", title=f"{dtype}, D={dim}", xlabel="sequence length", ylabel="ms")
                ax.legend(fontsize=7)
        fig.suptitle(f"attention {pass_name} latency")
    return draw


# ------------------------------------------------------------------------------------ time estimate


def planned_flops(args: argparse.Namespace) -> float:
    """The least FLOPs the run executes: every timed pass TIMED_CALLS times (the sweep also runs one
    forward to record the graph each backward replays), per implementation that runs on the device,
    shape and round."""
    if args.leaderboard:
        heads, n, d = args.leaderboard_shape
        per_impl = TIMED_CALLS * (PASS_FLOP_FACTOR["forward"] + PASS_FLOP_FACTOR["forward+backward"])
        return attention_flops((heads, n, d), True) * per_impl * len(leaderboard_impls(args.device)) * args.repeats
    per_shape = 1 + TIMED_CALLS * sum(PASS_FLOP_FACTOR[name] for name in args.passes)
    shapes = sum(attention_flops(shape, causal) for _, shape, causal in sweep_points(args))
    return shapes * per_shape * len(_runnable(args)) * args.repeats


def _runnable(args: argparse.Namespace) -> list[str]:
    return [impl for impl in args.impls if args.device == "cuda" or impl not in CUDA_ONLY]


def planned_timings(args: argparse.Namespace) -> int:
    """time_ms calls of the run: each spends at least rep_ms / 2 in timed calls (do_bench runs
    int(rep_ms / a call's time) calls, at least one; the CPU loop runs until rep_ms has passed)."""
    if args.leaderboard:
        return 2 * len(leaderboard_impls(args.device)) * args.repeats
    return len(sweep_points(args)) * len(args.passes) * len(_runnable(args)) * args.repeats


def device_flop_rate(device: str) -> float:
    """FLOP/s no attention implementation beats on `device` (CPU: per core of torch's threads)."""
    return CUDA_TFLOPS * 1e12 if device == "cuda" else CPU_GFLOPS_PER_CORE * 1e9 * torch.get_num_threads()


def check_runtime(args: argparse.Namespace) -> None:
    """Print the least time the run takes: its FLOPs at a rate no implementation beats, or its timings'
    least time (planned_timings), whichever is longer; refuse it (one line naming the flags) past --max-minutes."""
    flops, rate, timings = planned_flops(args), device_flop_rate(args.device), planned_timings(args)
    seconds = max(flops / rate, timings * args.rep_ms / 2e3)
    estimate = (f"{flops / 1e9:,.0f} GFLOP of attention to time: at least {_duration(seconds)} at "
                f"{rate / 1e9:,.0f} GFLOP/s and {timings} timings of at least --rep-ms {args.rep_ms:g} / 2")
    if seconds > 60 * args.max_minutes:
        if args.leaderboard:
            what, smaller = f"--leaderboard-shape {_joined(args.leaderboard_shape)}", "a smaller shape"
        else:
            rows = f"--batch-heads {_joined(args.batch_heads)}" if args.batch_heads else \
                f"--batch {args.batch} --heads {args.heads}"
            what = f"the sweep ({rows} --seq-lens {_joined(args.seq_lens)} --head-dims {_joined(args.head_dims)})"
            smaller = "smaller sizes, fewer --impls"
        raise ConfigError(f"{what} on --device {args.device}: {estimate}, over --max-minutes {args.max_minutes:g}; "
                          f"use {smaller} or --repeats, a CUDA device, or a larger --max-minutes")
    print(estimate, flush=True)


def _joined(values: Iterable[int]) -> str:
    return " ".join(map(str, values))


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.3g} {unit}"
    return f"{seconds:.2g} s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--leaderboard", action="store_true", help="the CS336 leaderboard timing instead of the sweep")
    parser.add_argument("--leaderboard-shape", type=int, nargs=3, default=LEADERBOARD_SHAPE, metavar=("H", "N", "D"),
                        help="heads, sequence length, head dim (default: 16 16384 64)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all implementations (per shape in the sweep), interleaved; each time "
                             "is the median, every round's time is in the JSON (default: 1)")
    parser.add_argument("--impls", nargs="+", metavar="NAME",
                        help=f"implementations: {', '.join(IMPLEMENTATIONS)} (default: all but "
                             f"{', '.join(DISPATCH_ONLY)} on CUDA; ours naive sdpa-math sdpa-flash on CPU)")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="a named shape: 8b = B2 H32 N32768 D128 bf16 (explicit shape flags win)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        help="default: bf16 fp32 on CUDA, fp32 on CPU")
    parser.add_argument("--seq-lens", nargs="+", type=int, metavar="N",
                        help="default: 128 ... 65536 (powers of two) on CUDA, 64 128 256 on CPU")
    parser.add_argument("--head-dims", nargs="+", type=int, metavar="D", help="default: 16 32 64 128 (CPU: 16 32)")
    parser.add_argument("--batch", type=int, help="batch size (default: 1)")
    parser.add_argument("--heads", type=int, help="heads (default: 1)")
    parser.add_argument("--batch-heads", type=int, nargs="+", metavar="BH",
                        help="batch 1 with each of these head counts, instead of --batch/--heads")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction,
                        help="causal (default; --dispatch-sweep: both)")
    parser.add_argument("--dispatch-sweep", action="store_true", help="ours (the dispatch rule), ours-tl, "
                        "ours-gluon and cuDNN over the shapes the rule decides (bench/attention_dispatch.py)")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--warmup-ms", type=nonnegative_float,
                        help="do_bench warm-up (default: 25; leaderboard: 1000; preset 8b: 2000)")
    parser.add_argument("--rep-ms", type=positive_float,
                        help="do_bench repetition time (default: 100; leaderboard: 10000; dispatch sweep: 50; "
                             "preset 8b: 5000)")
    parser.add_argument("--kv-heads", type=int, help="grouped-query heads: k and v get this many heads (--heads a "
                        "multiple of it); the variant sweep of bench/attention_variants.py")
    parser.add_argument("--documents", type=positive_float, nargs="+", metavar="MEAN",
                        help="packed documents: rows filled with documents of these mean lengths (log-normal); "
                             "the variant sweep of bench/attention_variants.py")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--max-minutes", type=positive_float, default=10.0,
                        help="refuse a run whose attention FLOPs need longer at an optimistic device rate "
                             f"({CPU_GFLOPS_PER_CORE:g} GFLOP/s per CPU core, {CUDA_TFLOPS:g} TFLOP/s on CUDA) "
                             "(default: %(default)s)")
    parser.add_argument("--out-dir", type=directory, default="outputs/bench/attention", help="where .md/.json/.png go")


def _sweep_defaults(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device == "cuda"
    return {"impls": [i for i in IMPLEMENTATIONS if i not in DISPATCH_ONLY] if cuda else
            ["ours", "naive", "sdpa-math", "sdpa-flash"], "dtypes": ["bf16", "fp32"] if cuda else ["fp32"],
            "seq_lens": [2**i for i in range(7, 17)] if cuda else [64, 128, 256],
            "head_dims": [16, 32, 64, 128] if cuda else [16, 32], "batch": 1, "heads": 1, "batch_heads": None,
            "causals": [True], "warmup_ms": 1000.0 if args.leaderboard else 25.0,
            "rep_ms": 10000.0 if args.leaderboard else 100.0}


def fill_shape(args: argparse.Namespace) -> argparse.Namespace:
    """Flags not given: the preset's value, else the default. --batch-heads replaces --batch/--heads,
    so a preset's batch_heads is not filled when either is given."""
    preset = PRESETS.get(args.preset, {})
    if args.dispatch_sweep:
        from cs336_systems.bench.attention_dispatch import preset_for

        preset = preset_for(args)  # refuses flags of the other modes
    rows_given = args.batch is not None or args.heads is not None
    if rows_given and args.batch_heads:
        raise ConfigError("--batch-heads: sweeps batch 1 with each head count; give it or --batch/--heads, not both")
    args.causals = None if args.causal is None else [args.causal]
    for key, default in _sweep_defaults(args).items():
        if getattr(args, key) is None and not (key == "batch_heads" and rows_given):
            setattr(args, key, preset.get(key, default))
    args.causal = args.causals[0]  # what the single-mask runs (leaderboard, variants) read
    return args


def _check(args: argparse.Namespace) -> None:
    check_flags(args.impls, IMPLEMENTATIONS, args.device, {
        "--seq-lens": args.seq_lens, "--head-dims": args.head_dims, "--leaderboard-shape": args.leaderboard_shape,
        "--batch": [args.batch], "--heads": [args.heads], "--repeats": [args.repeats],
        "--batch-heads": args.batch_heads or []})
    if args.batch_heads and (args.leaderboard or args.kv_heads is not None or args.documents is not None):
        raise ConfigError("--batch-heads: sweeps only (not with --leaderboard, --kv-heads or --documents)")
    if any(d > 256 for d in args.head_dims):
        raise ConfigError(f"--head-dims: at most 256 (our op's limit), got {args.head_dims}")


def main(args: argparse.Namespace) -> int:
    _check(fill_shape(args))
    check_runtime(args)
    if args.kv_heads is not None or args.documents is not None:
        from cs336_systems.bench import attention_variants

        return attention_variants.run_variants(args, DTYPES)
    if args.leaderboard:
        from cs336_systems.bench.attention_leaderboard import leaderboard

        heads, n, d = args.leaderboard_shape
        others = {impl: IMPLEMENTATIONS[impl](True, (1, heads, n, d)) for impl in leaderboard_impls(args.device)[1:]}
        columns = ["impl", "forward_ms", "fwd_bwd_ms", "forward_ours_over_this", "fwd_bwd_ours_over_this", "status"]
        leaderboard(args, others).write(args.out_dir, columns)
        return 0
    results = sweep(args, args.device)
    if args.dispatch_sweep:
        from cs336_systems.bench import attention_dispatch

        return attention_dispatch.write(results, args)
    columns = ["impl", "dtype", "shape", "pass", "ms", "tflops", "sm_clock_mhz", "extra_peak_mib", "status",
               "reason"]
    results.write(args.out_dir, columns)
    results.plot(args.out_dir, _draw(results.rows, "forward+backward"))
    return 0
