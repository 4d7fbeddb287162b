"""The LM-head loss (logits = x @ W.T, then cross-entropy) fused and unfused: time, TFLOP/s, memory.

    python -m cs336_systems bench lm_loss                        # CUDA: 65536 tokens, D 4096, three vocabularies
    python -m cs336_systems bench lm_loss --vocab 151936 --impls ours chunked-checkpoint --rep-ms 2000
    python -m cs336_systems bench lm_loss --device cpu --tokens 64 --vocab 1000 --d-model 32

Contenders, all computing the mean loss over the tokens and its gradients in x and W:
  ours                torch.ops.cs336.linear_cross_entropy (ops/linear_cross_entropy, docs/lm_loss.md)
  chunked-checkpoint  plain PyTorch, 8192 tokens at a time, each chunk's loss under checkpoint
  torch               F.cross_entropy(x @ W.T): all N x V logits (OOM is a result, not a crash)
  compiled            torch.compile of the same unfused loss

Columns: forward+backward milliseconds (median of triton.testing.do_bench on CUDA), TFLOP/s
counting three N·D·V matmuls (3 · 2·N·D·V FLOPs, whatever a contender actually does), extra peak
memory (CUDA: peak allocated during forward+backward minus the inputs and the gradients), and the
loss's relative difference from `torch` where both ran.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cs336_systems.bench import common
from cs336_systems.bench.common import OOM, UNSUPPORTED, Results
from cs336_systems.errors import directory, nonnegative_float, positive_float

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHECKPOINT_CHUNK = 8192  # tokens per checkpointed chunk in the plain-PyTorch contender
COLUMNS = ["impl", "dtype", "tokens", "d_model", "vocab", "ms", "tflops", "extra_peak_mib", "loss_rel_err", "status",
           "reason"]


def _ours() -> LossFn:
    from ops.linear_cross_entropy import linear_cross_entropy

    return linear_cross_entropy


def _chunk_loss(x_c: torch.Tensor, weight: torch.Tensor, t_c: torch.Tensor, upcast: bool) -> torch.Tensor:
    logits = x_c @ weight.T  # (chunk, V)
    return F.cross_entropy(logits.float() if upcast else logits, t_c, reduction="sum")


def checkpointed_chunks_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int = CHECKPOINT_CHUNK, upcast: bool = False) -> torch.Tensor:
    """The plain-PyTorch memory-lean recipe: mean cross-entropy of x (N, D) @ weight.T against targets
    (N,), the LM head + F.cross_entropy of `chunk` tokens at a time under torch.utils.checkpoint, so
    one chunk's logits exist at a time in forward and in backward (`upcast`: their fp32 copy too)."""
    total = sum(checkpoint(_chunk_loss, x[i:i + chunk], weight, targets[i:i + chunk], upcast, use_reentrant=False)
                for i in range(0, x.shape[0], chunk))
    return total / (targets != -100).sum().clamp(min=1)


def _chunked_checkpoint() -> LossFn:
    return checkpointed_chunks_loss


def _torch() -> LossFn:
    from ops.linear_cross_entropy import linear_cross_entropy_reference

    return linear_cross_entropy_reference


@functools.cache
def _compiled() -> LossFn:
    # One compiled function for the whole run; shapes change per vocabulary, so dynamo recompiles per shape.
    return torch.compile(_torch())


IMPLEMENTATIONS: dict[str, Callable[[], LossFn]] = {
    "ours": _ours, "chunked-checkpoint": _chunked_checkpoint, "torch": _torch, "compiled": _compiled}


def lm_loss_flops(tokens: int, d_model: int, vocab: int) -> float:
    """Forward + backward FLOPs of the head: three N x D x V matmuls (logits, dX, dW)."""
    return 3 * 2 * tokens * d_model * vocab


def make_inputs(tokens: int, d_model: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """x (N, D) and W (V, D), leaves that require grad, logits ~ N(0, 1); targets (N,) with 1/16 ignored."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, d_model, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d_model, device=device, generator=gen) / d_model**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    targets[::16] = -100
    return x, weight, targets


def measure(impl: str, tokens: int, d_model: int, vocab: int, dtype: torch.dtype, args: argparse.Namespace):
    """One row for `impl` at one shape; the loss value (for the error column) or None on failure."""
    row: dict[str, Any] = dict(impl=impl, dtype=str(dtype).removeprefix("torch."), tokens=tokens, d_model=d_model,
                               vocab=vocab)
    try:
        x, weight, targets = make_inputs(tokens, d_model, vocab, dtype, args.device)
        fn = IMPLEMENTATIONS[impl]()

        def forward_backward() -> None:
            x.grad = weight.grad = None
            fn(x, weight, targets).backward()

        loss = fn(x, weight, targets).item()
        ms = common.time_ms(forward_backward, args.device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        x.grad = weight.grad = None
        grad_bytes = (x.numel() + weight.numel()) * x.element_size()
        row.update(ms=ms, tflops=lm_loss_flops(tokens, d_model, vocab) / ms / 1e9,
                   extra_peak_mib=common.extra_peak_mib(forward_backward, args.device, grad_bytes), status="ok")
        return row, loss
    except Exception as error:  # noqa: BLE001 - every failure is a result, never a crashed sweep
        status = OOM if common.is_oom(error) else UNSUPPORTED
        reason = "" if status == OOM else f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return dict(row, ms=None, tflops=None, extra_peak_mib=None, status=status, reason=reason), None
    finally:
        common.free_device_memory()


def sweep(args: argparse.Namespace) -> Results:
    dtype = DTYPES[args.dtype]
    results = Results("lm_loss", meta={**common.environment(args.device), "warmup_ms": args.warmup_ms,
                                       "rep_ms": args.rep_ms})
    for vocab in args.vocab:
        for tokens in args.tokens:
            measured = {impl: measure(impl, tokens, args.d_model, vocab, dtype, args) for impl in args.impls}
            reference = measured.get("torch", (None, None))[1]
            for impl, (row, loss) in measured.items():
                if loss is not None and reference is not None:
                    row["loss_rel_err"] = abs(loss - reference) / abs(reference)
                results.rows.append(row)
                status = f"{row['ms']:.3f} ms, {row['tflops']:.1f} TFLOP/s" if row["status"] == "ok" else row["status"]
                print(f"{impl:>18} N={tokens} D={args.d_model} V={vocab}: {status}", flush=True)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", nargs="+", type=int, metavar="N", default=[65536] if cuda else [256],
                        help="tokens per call (default: 65536 on CUDA, 256 on CPU)")
    parser.add_argument("--vocab", nargs="+", type=int, metavar="V", default=[10000, 50257, 151936])
    parser.add_argument("--d-model", type=int, default=4096 if cuda else 64, help="(default: 4096; CPU 64)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16" if cuda else "fp32")
    parser.add_argument("--impls", nargs="+", metavar="NAME",
                        default=list(IMPLEMENTATIONS) if cuda else ["ours", "chunked-checkpoint", "torch"],
                        help=f"contenders: {', '.join(IMPLEMENTATIONS)} (CPU default leaves out compiled)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--warmup-ms", type=nonnegative_float, default=100.0, help="do_bench warm-up (default: 100)")
    parser.add_argument("--rep-ms", type=positive_float, default=1000.0,
                        help="do_bench repetition time (default: 1000)")
    parser.add_argument("--out-dir", type=directory, default="outputs/bench", help="where lm_loss.md/.json go")


def _check(args: argparse.Namespace) -> None:
    common.check_flags(args.impls, IMPLEMENTATIONS, args.device,
                {"--tokens": args.tokens, "--vocab": args.vocab, "--d-model": [args.d_model]})


def main(args: argparse.Namespace) -> int:
    _check(args)
    sweep(args).write(args.out_dir, COLUMNS)
    return 0
