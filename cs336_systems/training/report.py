"""What rank 0 shows and writes about a run: progress bar, metrics, plot, wandb and the summary table.

OUT_DIR/config.json     the resolved TrainConfig, parameter count and world size
OUT_DIR/metrics.jsonl   one JSON object per record: {"kind": "train", "step", "loss", "lr", "tokens_per_s",
                        "train_seconds", "comm_seconds" (rank 0's)[, "mfu"]} or {"kind": "eval", "step", "val_loss"}
OUT_DIR/loss.png        train and validation loss against step, drawn from metrics.jsonl at the end

MFU (CUDA only) counts 6 N + 6 L T d FLOPs per token (N: parameters without the embedding table;
the second term is attention's two score matmuls, PaLM appendix B, halved for the causal mask as the
CS336 leaderboard counts them; `training_flops`) against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cs336_systems.distributed.world import World
from cs336_systems.training.config import TrainConfig

# Dense bf16 tensor-core peak per GPU; more specific names first.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of `device`, None on CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def training_flops(matmul_params: int, num_layers: int, d_model: int, batch_size: int, context_length: int,
                   causal: bool = True) -> float:
    """Model FLOPs of one training step (forward + backward, no recomputation counted).

    6 N per token for the weight matmuls (N = `matmul_params`: parameters without the embedding
    table, which is a lookup), plus attention's two score matmuls, 4 B T^2 d per layer forward,
    times 3 for forward + backward, halved when causal (only the lower triangle is computed).
    """
    tokens = batch_size * context_length
    attention = 4 * batch_size * context_length**2 * d_model * num_layers * (0.5 if causal else 1.0)
    return 6 * matmul_params * tokens + 3 * attention


def flops_per_token(config: TrainConfig, num_params: int) -> float:
    """Training (forward + backward) matmul FLOPs per token; `num_params` without the embedding table."""
    model, context = config.model, config.context_length
    return training_flops(num_params, model.num_layers, model.d_model, 1, context) / context


class Report:
    """Rank 0's record sink: call it with every record, then `close()`."""

    def __init__(self, config: TrainConfig, world: World, num_params: int, resumed_from: int | None) -> None:
        self.config, self.world, self.records = config, world, []
        peak = peak_flops(world.device)
        self.flops_per_gpu_token = flops_per_token(config, num_params) / world.world_size / peak if peak else None
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.metrics = None
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            resolved = {**dataclasses.asdict(config), "num_params": num_params, "world_size": world.world_size}
            (self.out_dir / "config.json").write_text(json.dumps(resolved, indent=1))
            self.metrics = open_metrics(self.out_dir / "metrics.jsonl", resumed_from)
        self.bar = tqdm(total=config.steps, initial=resumed_from or 0, desc="train", unit="step",
                        disable=not config.progress, dynamic_ncols=True)
        self.wandb = _wandb_run(config, self.out_dir) if config.wandb_project else None

    def __call__(self, record: dict[str, Any]) -> None:
        if record["kind"] == "train" and self.flops_per_gpu_token:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_gpu_token
        self.records.append(record)
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()  # a crashed run keeps its metrics
        if record["kind"] == "train":
            self.bar.update(record["step"] - self.bar.n)
            postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
            if "mfu" in record:
                postfix["mfu"] = f"{record['mfu']:.1%}"
            self.bar.set_postfix(postfix)
        else:
            self.bar.write(f"step {record['step']}: val loss {record['val_loss']:.3f}")
        if self.wandb:
            prefix = "train" if record["kind"] == "train" else "val"
            self.wandb.log({f"{prefix}/{k}": v for k, v in record.items() if k not in ("kind", "step")},
                           step=record["step"])

    def close(self) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()
            plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
        if self.wandb:
            self.wandb.finish()


def open_metrics(path: Path, resumed_from: int | None):
    """metrics.jsonl opened for appending; a resumed run first drops what came after its checkpoint."""
    if resumed_from is None or not path.exists():
        return path.open("w")
    kept = [line for line in path.read_text().splitlines() if line.strip() and _before(json.loads(line), resumed_from)]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def _before(record: dict[str, Any], step: int) -> bool:
    # The checkpoint of step k is written after step k's train record and before its evaluation.
    return record["step"] < step or (record["step"] == step and record["kind"] == "train")


def _wandb_run(config: TrainConfig, out_dir: Path | None):
    try:
        import wandb
    except ImportError:
        from cs336_systems.errors import ConfigError

        raise ConfigError("--wandb needs the wandb package: install the extra (uv sync --extra wandb)") from None
    return wandb.init(project=config.wandb_project, config=dataclasses.asdict(config),
                      dir=str(out_dir) if out_dir else None, name=out_dir.name if out_dir else None)


def plot_losses(metrics: Path, png: Path) -> None:
    """Train and validation loss against step, from every record in `metrics`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, key, label in (("train", "loss", "train"), ("eval", "val_loss", "validation")):
        points = [(r["step"], r[key]) for r in records if r["kind"] == kind]
        if points:
            ax.plot(*zip(*points), marker="o" if kind == "eval" else None, markersize=3, label=label)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- summary


def summarize(config: TrainConfig, records: list[dict[str, Any]], timings: dict[str, float]) -> dict[str, Any]:
    """Headline numbers of a run from this attempt's records and fit()'s timings."""
    train = [r for r in records if r["kind"] == "train"]
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    seconds = timings["train_seconds"]
    tokens = timings["steps"] * config.batch_size * config.context_length
    return {
        "first_loss": train[0]["loss"] if train else None, "last_loss": train[-1]["loss"] if train else None,
        "first_val_loss": evals[0] if evals else None, "last_val_loss": evals[-1] if evals else None,
        "tokens_per_s": tokens / seconds if tokens else None, "mfu": train[-1].get("mfu") if train else None,
        **timings, "compute_seconds": seconds - timings["comm_seconds"],
    }


def format_summary(config: TrainConfig, summary: dict[str, Any]) -> str:
    """The table printed at the end of a run (`summary`: summarize()'s, plus the run's world and wall time)."""
    model, runtime, world_size = config.model, config.runtime, summary["world_size"]
    setup = f"{world_size} process{_es(world_size)} on {summary['device']}"
    if world_size > 1:
        if config.parallel.fsdp:
            setup += f" ({summary['backend']}), FSDP"
        else:
            sharded = " + sharded AdamW" if config.parallel.shard_optimizer else ""
            setup += f" ({summary['backend']}), DDP{sharded}"
    header = (f"{model.preset or 'custom'} model ({summary['num_params'] / 1e6:.2f}M params, {model.attention} "
              f"attention{', compiled' if runtime.compile else ''}{', bf16' if runtime.bf16 else ''}), {setup}\n"
              f"{config.steps} steps x {config.batch_size} sequences x {config.context_length} tokens "
              f"(per step: {world_size} x {config.grad_accum_steps} micro-batch{_es(config.grad_accum_steps)} "
              f"of {config.micro_batch_size})")
    seconds = summary["train_seconds"] or float("nan")
    rows = [("metric", "value")]
    if summary["first_loss"] is not None:
        rows.append(("train loss", f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f}"))
    if summary["first_val_loss"] is not None:
        rows.append(("val loss", f"{summary['first_val_loss']:.3f} -> {summary['last_val_loss']:.3f}"))
    if summary["tokens_per_s"] is not None:
        rows.append(("tokens/s", f"{summary['tokens_per_s']:,.0f}"))
    if summary["mfu"] is not None:
        rows.append(("MFU (last interval)", f"{summary['mfu']:.1%}"))
    for name, key in (("compute", "compute_seconds"), ("communication", "comm_seconds")):
        rows.append((name, f"{summary[key]:.1f} s ({summary[key] / seconds:.0%} of training)"))
    if summary["checkpoint_seconds"]:
        rows.append(("checkpointing", f"{summary['checkpoint_seconds']:.1f} s"))
    rows.append(("wall time", f"{summary['wall_seconds']:.1f} s (with start-up)"))
    if summary.get("resumed_from") is not None:
        rows.append(("resumed from", f"step {summary['resumed_from']}"))
    width = max(len(name) for name, _ in rows)
    rows.insert(1, ("-" * width, "-" * max(len(value) for _, value in rows)))
    return header + "\n\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _es(count: int) -> str:
    return "es" if count > 1 else ""
