"""`bench attention --kv-heads` / `--documents`: grouped-query heads and packed documents, side by side.

    python -m cs336_systems bench attention --kv-heads 8 --heads 32 --head-dims 128 --seq-lens 4096 16384 32768
    python -m cs336_systems bench attention --documents 512 2048 8192 --seq-lens 32768 --heads 16 --head-dims 128

Grouped-query heads (`--kv-heads`): q has --heads heads, k and v --kv-heads. Contenders: ours (k, v as
they are), SDPA with `enable_gqa=True` per backend (a backend that rejects it is an "unsupported" row),
FlexAttention (`enable_gqa=True`), naive (k, v repeated per query head: the memory GQA saves).

Packed documents (`--documents MEAN ...`): every row of the batch is filled with documents whose lengths
are drawn from a long-tailed (log-normal, sigma 1) distribution with that mean, cut at the row's end.
Contenders: ours (`document_ids`), FlexAttention with a document block mask (its tiles across documents
are skipped too), SDPA with the dense (B, 1, N, N) boolean mask (what a model without a document-aware
kernel does), naive with the same mask. TFLOP/s counts only the FLOPs inside documents
(4·D·Σ L² per head, halved when causal), so a kernel that skips cross-document tiles shows its real
rate. The markdown ends with a least-squares fit of each implementation's time against Σ L² at each
sequence length: time proportional to Σ L² (not N²) is what skipping buys.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from cs336_basics.attention import naive_attention
from cs336_systems.bench.attention_timing import CUDA_ONLY, Unsupported, time_passes
from cs336_systems.bench.common import Results, environment
from cs336_systems.errors import ConfigError
from ops.flash_attn.documents import document_mask

# Contenders of the variant sweeps (the names match `bench attention --impls`).
VARIANT_IMPLS = ("ours", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "flex", "naive")
SDPA_BACKENDS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
LENGTH_SIGMA = 1.0  # log-normal sigma of document lengths: a long tail of long documents


# -------------------------------------------------------------------------------- inputs


def document_lengths(n: int, mean: float, generator: torch.Generator) -> list[int]:
    """Lengths (>= 1) of documents filling a row of n tokens, log-normal with mean `mean`, the last cut."""
    mu = math.log(mean) - LENGTH_SIGMA**2 / 2  # a log-normal's mean is exp(mu + sigma^2 / 2)
    lengths, total = [], 0
    while total < n:
        draw = torch.empty(1).log_normal_(mu, LENGTH_SIGMA, generator=generator).item()
        length = min(max(1, round(draw)), n - total)
        lengths.append(length)
        total += length
    return lengths


def document_ids(batch: int, n: int, mean: float, seed: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """(ids (batch, N) int32 nondecreasing per row, each row's document lengths)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [document_lengths(n, mean, generator) for _ in range(batch)]
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])  # (B, N)
    return ids.to(torch.int32), rows


def document_flops(lengths: list[list[int]], heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs inside documents: 4·D per visible (query, key) pair, per head."""
    pairs = sum(length * (length + 1) / 2 if causal else length * length for row in lengths for length in row)
    return 4.0 * head_dim * heads * pairs


def dense_document_mask(ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, N, N) bool, True where attention is kept: same document (and key <= query when causal)."""
    keep = document_mask(ids[:, None])  # (B, 1, N, N)
    if causal:
        keep &= torch.ones(ids.shape[-1], ids.shape[-1], dtype=torch.bool, device=ids.device).tril()
    return keep


# ------------------------------------------------------------------------------- contenders


def build(impl: str, causal: bool, ids: torch.Tensor | None, gqa: bool, n: int, device: str) -> Callable:
    """fn(q, k, v) for `impl` with the variant's extra input (document ids, or grouped heads)."""
    if impl == "ours":
        from ops.flash_attn import flash_attn

        doc = None if ids is None else ids[:, None]  # (B, 1, N): one id per token, shared by the heads
        return lambda q, k, v: flash_attn(q, k, v, causal, document_ids=doc)
    if impl == "flex":
        return _flex(causal, ids, gqa, n, device)
    if impl == "naive":  # cs336_basics' reference: k, v repeated per query head, one dense mask
        doc = None if ids is None else ids[:, None]
        return lambda q, k, v: naive_attention(q, k, v, causal, document_ids=doc)
    mask = None if ids is None else dense_document_mask(ids, causal)
    return _sdpa(SDPA_BACKENDS[impl], causal, mask, gqa)


def _sdpa(backend_name: str, causal: bool, mask: torch.Tensor | None, gqa: bool) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def attention(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                  enable_gqa=gqa)
    return attention


def _flex(causal: bool, ids: torch.Tensor | None, gqa: bool, n: int, device: str) -> Callable:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        raise Unsupported(f"FlexAttention is not in this torch: {error}") from None

    def keep(b, h, q_idx, kv_idx):
        visible = ids[b, q_idx] == ids[b, kv_idx] if ids is not None else q_idx >= 0
        return visible & (q_idx >= kv_idx) if causal else visible

    block_mask = None
    if ids is not None or causal:
        batch = None if ids is None else ids.shape[0]
        block_mask = create_block_mask(keep, batch, None, n, n, device=device)
    compiled = torch.compile(flex_attention)  # FlexAttention is only fast compiled
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


# ------------------------------------------------------------------------------------ measuring


def measure(impl: str, spec: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per pass for `impl` at one variant shape; a failure becomes rows with its status."""
    base = {key: spec[key] for key in ("shape", "kv_heads", "doc_mean", "documents", "sum_sq")}
    base.update(impl=impl, seq_len=spec["n"], head_dim=spec["d"], causal=args.causal)

    def make():
        q, k, v, grad = spec["make"]()
        fn = build(impl, args.causal, spec["ids"], spec["kv_heads"] != spec["heads"], spec["n"], args.device)
        return fn, q, k, v, grad

    return time_passes(base, make, impl in CUDA_ONLY, spec["flops"], args.device, args.passes, args.warmup_ms,
                       args.rep_ms)


def specs(args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, Any]]:
    """The variant shapes to time: every (head dim, sequence length[, document mean])."""
    out = []
    kv_heads = args.kv_heads or args.heads
    for d in args.head_dims:
        for n in args.seq_lens:
            for mean in args.documents or [None]:
                out.append(_spec(args, dtype, n, d, kv_heads, mean))
    return out


def _spec(args: argparse.Namespace, dtype: torch.dtype, n: int, d: int, kv_heads: int, mean: float | None):
    ids, lengths = (None, [[n]] * args.batch) if mean is None else document_ids(args.batch, n, mean)
    q_shape, kv_shape = (args.batch, args.heads, n, d), (args.batch, kv_heads, n, d)

    def make():
        gen = torch.Generator(device=args.device).manual_seed(0)
        q, grad = (torch.randn(q_shape, device=args.device, dtype=dtype, generator=gen) for _ in range(2))
        k, v = (torch.randn(kv_shape, device=args.device, dtype=dtype, generator=gen) for _ in range(2))
        return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad

    return dict(n=n, d=d, heads=args.heads, kv_heads=kv_heads, doc_mean=mean, make=make,
                ids=None if ids is None else ids.to(args.device),
                documents=sum(len(r) for r in lengths), sum_sq=sum(x * x for r in lengths for x in r),
                shape=f"{args.batch}x{args.heads}/{kv_heads}x{n}x{d}",
                flops=document_flops(lengths, args.heads, d, args.causal))


def fits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (impl, pass, N, D) over the document means: ms = a·ΣL² + b by least squares, and R²."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok" and row["doc_mean"] is not None:
            groups.setdefault((row["impl"], row["pass"], row["seq_len"], row["head_dim"]), []).append(row)
    out = []
    for (impl, name, n, d), group in groups.items():
        if len(group) < 3:
            continue
        x = torch.tensor([r["sum_sq"] for r in group], dtype=torch.float64)
        y = torch.tensor([r["ms"] for r in group], dtype=torch.float64)
        a, b = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y[:, None]).solution.flatten().tolist()
        residual = y - (a * x + b)
        r2 = 1 - float((residual**2).sum() / ((y - y.mean()) ** 2).sum().clamp_min(1e-30))
        out.append(dict(impl=impl, **{"pass": name}, seq_len=n, head_dim=d, ms_per_mega_sum_sq=a * 1e6,
                        intercept_ms=b, r2=r2, points=len(group)))
    return out


def check(args: argparse.Namespace) -> None:
    if args.kv_heads is not None and (args.kv_heads <= 0 or args.heads % args.kv_heads):
        raise ConfigError(f"--kv-heads must divide --heads ({args.heads}), got {args.kv_heads}")
    if args.documents is not None and any(not (mean >= 1) for mean in args.documents):
        raise ConfigError(f"--documents: mean document lengths must be >= 1, got {args.documents}")
    unknown = [impl for impl in args.impls if impl not in VARIANT_IMPLS]
    if unknown:
        raise ConfigError(f"--impls: {unknown} have no grouped-head / document variant (choose from "
                          f"{', '.join(VARIANT_IMPLS)})")


def run_variants(args: argparse.Namespace, dtypes: dict[str, torch.dtype]) -> int:
    check(args)
    results = Results("attention_variants", meta={**environment(args.device), "warmup_ms": args.warmup_ms,
                                                  "rep_ms": args.rep_ms, "causal": args.causal})
    with torch._functorch.config.patch(donated_buffer=False):  # the backward replays one graph
        for dtype_name in args.dtypes:
            for spec in specs(args, dtypes[dtype_name]):
                for impl in args.impls:
                    rows = [dict(r, dtype=dtype_name) for r in measure(impl, spec, args)]
                    results.rows += rows
                    print(f"{impl:>15} {spec['shape']:>24} docs={spec['documents']}: "
                          + ", ".join(f"{r['pass']} {r['ms']:.3f} ms" if r["ms"] else f"{r['pass']} {r['status']}"
                                      for r in rows), flush=True)
    fitted = fits(results.rows)
    results.meta["sum_sq_fits"] = fitted
    columns = ["impl", "dtype", "shape", "doc_mean", "documents", "pass", "ms", "tflops", "sm_clock_mhz",
               "extra_peak_mib", "status", "reason"]
    out = results.write(args.out_dir, columns)
    if fitted:
        from cs336_systems.bench.common import markdown_table

        with open(out / "attention_variants.md", "a") as md:
            md.write("\n## time against the sum of squared document lengths (ms = a·ΣL² + b)\n\n"
                     + markdown_table(fitted) + "\n")
    return 0
