"""The optimizer step inside backward (training/optim_in_backward.py): the same bits as optimizer.step()
after backward, eager and compiled, for every AdamW we build; checkpoints that resume across the
setting both ways; no moment of backward holding every gradient; refusals naming both flags; and
`train --optimizer-in-backward` ending with the weights of a run without it.

Bit equality is asserted on CPU because it holds by construction there: AdamW updates each parameter
from that parameter, its gradient and its state alone, with the same ops in the same order whether
one optimizer steps all parameters or one optimizer per parameter steps each; and one thread (the
`one_thread` fixture) makes the forward and backward repeat their bits. On CUDA the backward's
kernels may add in a varying order, so the bound there is what two runs without the option differ.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_cli_error

from cs336_basics.optimizer import AdamW
from cs336_systems import cli
from cs336_systems.errors import ConfigError
from cs336_systems.parallel.activation_checkpointing import apply_activation_checkpointing, parse_policy
from cs336_systems.presets import ModelConfig
from cs336_systems.training import checkpoint
from cs336_systems.training.config import OptimizerConfig, config_from_args
from cs336_systems.training.loss import lm_loss
from cs336_systems.training.optim import build_optimizer, learning_rate
from cs336_systems.training.optim_in_backward import InBackwardOptimizer, attach

pytestmark = pytest.mark.usefixtures("one_thread")  # in this process: one thread, so backward repeats its bits
STEPS = 3
SCHEDULE = OptimizerConfig(lr=1e-2, warmup_steps=1)  # a cosine learning rate that changes every step
HYPER = {"lr": SCHEDULE.lr, "betas": SCHEDULE.betas, "eps": SCHEDULE.eps, "weight_decay": SCHEDULE.weight_decay}
FACTORIES = {  # every AdamW the mechanism may step, built as a single optimizer would be
    "cs336": lambda params: AdamW(params, **HYPER),
    "torch-single": lambda params: torch.optim.AdamW(params, **HYPER, foreach=False),
    "torch-foreach": lambda params: torch.optim.AdamW(params, **HYPER, foreach=True),
    "torch-fused": lambda params: torch.optim.AdamW(params, **HYPER, fused=True),
}


def tiny_model(device: str = "cpu", vocab_size: int = 300, attention: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return ModelConfig(preset="tiny", vocab_size=vocab_size, context_length=16, attention=attention).build().to(device)


def batches(steps: int, vocab_size: int = 300, device: str = "cpu", batch: int = 3) -> list[tuple]:
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, vocab_size, (batch, 17), generator=generator).to(device) for _ in range(steps)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]  # (inputs, targets), each (B, T)


def train(model, optimizer, data, first_step: int = 1, compiled: bool = False, backend: str = "aot_eager") -> None:
    """Steps `first_step`, ... of `data` with the cosine schedule: optimizer.step() after backward,
    or nothing after it when `optimizer` steps inside backward."""
    forward = torch.compile(model, backend=backend) if compiled else model
    for step, (inputs, targets) in enumerate(data, start=first_step):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(SCHEDULE, step, STEPS)
        lm_loss(forward, inputs, targets).backward()
        if not isinstance(optimizer, InBackwardOptimizer):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def both_ways(factory, compiled: bool = False, device: str = "cpu", backend: str = "aot_eager",
              checkpointing: str = "none", **model_args):
    """(model, optimizer) after STEPS steps: stepped after backward, and stepped inside it."""
    data = batches(STEPS, device=device, vocab_size=model_args.get("vocab_size", 300))
    after = tiny_model(device, **model_args)
    apply_activation_checkpointing(after, parse_policy(checkpointing))
    inside = copy.deepcopy(after)
    runs = [(after, factory(list(after.parameters()))), (inside, attach(inside, factory))]
    for model, optimizer in runs:
        train(model, optimizer, data, compiled=compiled, backend=backend)
    return runs


def assert_same_bits(ours, theirs, where: str = "") -> None:
    """Equal structure and equal values: tensors bit for bit (dtype and device too), the rest by ==."""
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            assert_same_bits(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(ours, torch.Tensor):
        assert ours.dtype == theirs.dtype and ours.device == theirs.device, where
        assert torch.equal(ours, theirs), where
    else:
        assert ours == theirs, where


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_same_bits_as_stepping_after_backward(name, compiled):
    (after, optimizer), (inside, in_backward) = both_ways(FACTORIES[name], compiled)
    assert all(p.grad is None for p in inside.parameters())
    assert_same_bits(inside.state_dict(), after.state_dict(), "model")
    assert_same_bits(in_backward.state_dict(), optimizer.state_dict(), "optimizer")  # the same format, too
    assert float(in_backward.state_dict()["state"][0]["step"]) == STEPS


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_same_bits_with_activation_checkpointing(policy):
    """Recomputed blocks make their gradients inside backward too; the hooks still run once per
    parameter, after its gradient is complete."""
    (after, optimizer), (inside, in_backward) = both_ways(FACTORIES["cs336"], checkpointing=policy)
    assert_same_bits(inside.state_dict(), after.state_dict(), "model")
    assert_same_bits(in_backward.state_dict(), optimizer.state_dict(), "optimizer")


def roundtrip(state: dict) -> dict:
    """`state` through torch.save and torch.load, as a checkpoint holds it (no tensor shared)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("resume_inside", [True, False], ids=["after-to-inside", "inside-to-after"])
def test_checkpoint_resumes_across_the_setting(resume_inside):
    """2 steps one way, saved; a fresh model and optimizer of the other way load it and take step 3:
    the bits of 3 steps taken the first way."""
    factory, data = FACTORIES["cs336"], batches(STEPS)

    def build(inside: bool):
        model = tiny_model()
        return model, attach(model, factory) if inside else factory(list(model.parameters()))

    model, optimizer = build(not resume_inside)
    train(model, optimizer, data[:2])
    saved = roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    train(model, optimizer, data[2:], first_step=3)  # the uninterrupted run
    resumed, resumed_optimizer = build(resume_inside)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train(resumed, resumed_optimizer, data[2:], first_step=3)
    assert_same_bits(resumed.state_dict(), model.state_dict(), "model")
    assert_same_bits(resumed_optimizer.state_dict(), optimizer.state_dict(), "optimizer")


def test_gradients_are_freed_during_backward():
    """At each per-parameter step, the only live gradient is that parameter's own: the others were
    freed by their hooks or are not complete yet. Kept gradients would count up to all of them."""
    model = tiny_model()
    live = []

    class Counting(AdamW):
        def step(self, closure=None):
            live.append(sum(p.grad is not None for p in model.parameters()))
            return super().step(closure)

    optimizer = attach(model, lambda params: Counting(params, **HYPER))
    train(model, optimizer, batches(2))
    count = len(list(model.parameters()))
    assert live == [1] * (2 * count), live
    assert all(p.grad is None for p in model.parameters())


def test_a_parameter_used_twice_steps_once_on_its_summed_gradient():
    """The hook runs after every use's gradient is summed into .grad: one step, on the whole gradient;
    a parameter that gets no gradient gets no step and no state (as in one optimizer)."""
    used, unused = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    reference = [torch.nn.Parameter(p.detach().clone()) for p in (used, unused)]
    x = torch.randn(2, 4)
    for params, optimizer in (([used, unused], InBackwardOptimizer([used, unused], FACTORIES["cs336"])),
                              (reference, FACTORIES["cs336"](reference))):
        (x @ params[0] @ params[0]).square().sum().backward()
        if not isinstance(optimizer, InBackwardOptimizer):
            optimizer.step()
        assert list(optimizer.state_dict()["state"]) == [0] and optimizer.state_dict()["state"][0]["step"] == 1
    assert torch.equal(used, reference[0]) and torch.equal(unused, reference[1])


def test_build_optimizer_with_in_backward_is_one_adamw_per_parameter():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = build_optimizer(params, OptimizerConfig(in_backward=True, grad_clip=0))
    assert isinstance(optimizer, InBackwardOptimizer) and [type(o) for o in optimizer.optimizers] == [AdamW, AdamW]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.1]
    with pytest.raises(ValueError, match="cannot be sharded"):
        build_optimizer(params, OptimizerConfig(in_backward=True, grad_clip=0), shard=True)


def test_state_dict_refuses_what_one_optimizer_cannot_hold():
    model = tiny_model()
    optimizer = attach(model, FACTORIES["cs336"])
    optimizer.param_groups[1]["lr"] = 0.5
    with pytest.raises(ValueError, match="parameter 1 has other lr than parameter 0"):
        optimizer.state_dict()
    with pytest.raises(ValueError, match="expected one parameter group of"):
        optimizer.load_state_dict({"state": {}, "param_groups": [{"params": [0]}]})
    with pytest.raises(ValueError, match="exactly the one parameter"):
        attach(model, lambda params: AdamW([*params, torch.nn.Parameter(torch.zeros(1))]))


def test_remove_hooks_leaves_gradients():
    model = tiny_model()
    optimizer = attach(model, FACTORIES["cs336"])
    optimizer.remove_hooks()
    before = copy.deepcopy(model.state_dict())
    inputs, targets = batches(1)[0]
    lm_loss(model, inputs, targets).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert_same_bits(model.state_dict(), before)


# ---------------------------------------------------------------- refused combinations


TRAIN = ["train", "--preset", "tiny", "--context-length", "32", "--batch-size", "8", "--lr", "1e-2", "--no-progress"]
REFUSED = [
    ([], "--optimizer-in-backward needs --grad-clip 0 (got 1.0)"),
    (["--grad-clip", "0", "--nproc", "1", "--grad-accum-steps", "2"],
     "--optimizer-in-backward and --grad-accum-steps 2"),
    (["--grad-clip", "0", "--nproc", "2"], "--optimizer-in-backward needs one process, got 2 (--nproc or torchrun)"),
    (["--grad-clip", "0", "--nproc", "1", "--fsdp"], "--optimizer-in-backward and --fsdp"),
    (["--grad-clip", "0", "--nproc", "1", "--engine", "torch"], "--optimizer-in-backward and --engine torch"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=["grad-clip", "grad-accum", "nproc", "fsdp", "engine"])
def test_refused_combinations_name_both_flags(flags, message):
    with pytest.raises(ConfigError) as error:
        config_from_args(cli.build_parser().parse_args([*TRAIN, "--optimizer-in-backward", *flags]))
    assert str(error.value).startswith(message), str(error.value)


def test_refused_under_torchrun_with_two_workers(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="needs one process, got 2"):
        config_from_args(cli.build_parser().parse_args([*TRAIN, "--optimizer-in-backward", "--grad-clip", "0"]))


def test_refusal_is_one_cli_line(tmp_path, capsys):
    argv = [*TRAIN, "--optimizer-in-backward", "--grad-clip", "0", "--nproc", "2", "--out-dir", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert_cli_error(capsys, "--optimizer-in-backward", "--nproc")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the train command


RUN = [*TRAIN, "--nproc", "1", "--steps", "4", "--grad-clip", "0", "--log-every", "1", "--eval-every", "0",
       "--checkpoint-every", "2", "--keep-checkpoints", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[bool, Path]:
    """`train` for 4 steps, checkpoints at 2 and 4, without (False) and with (True) the option."""
    out = {}
    for inside in (False, True):
        out[inside] = tmp_path_factory.mktemp(f"inside-{inside}")
        assert cli.main([*RUN, *(["--optimizer-in-backward"] if inside else []), "--out-dir", str(out[inside])]) == 0
    return out


def final_state(out_dir: Path) -> dict:
    path = checkpoint.list_checkpoints(out_dir / "checkpoints")[-1]
    state = checkpoint.load(path)
    assert state["step"] == 4
    return state


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(out_dir) if r["kind"] == "train"]


def test_train_ends_with_the_same_bits(runs):
    after, inside = final_state(runs[False]), final_state(runs[True])
    assert_same_bits(inside["model"], after["model"], "model")
    assert_same_bits(inside["optimizer"], after["optimizer"], "optimizer")
    assert losses(runs[True]) == losses(runs[False]) and len(losses(runs[True])) == 4


def test_train_logs_the_same_metrics(runs):
    """No logged value depends on gradients that no longer exist: the records have the same fields
    with the option, and none is a gradient norm (train logs none)."""
    fields = [set(record) for record in records(runs[True])]
    assert fields == [set(record) for record in records(runs[False])]
    assert not any("grad" in key for keys in fields for key in keys)


@pytest.mark.parametrize("resume_inside", [True, False], ids=["after-to-inside", "inside-to-after"])
def test_train_resumes_across_the_setting(runs, tmp_path, resume_inside):
    """The other setting's run, cut back to its step-2 checkpoint and resumed with this setting,
    ends with the bits both runs end with."""
    shutil.copytree(runs[not resume_inside], tmp_path, dirs_exist_ok=True)
    checkpoint.checkpoint_path(tmp_path / "checkpoints", 4).unlink()
    flags = ["--optimizer-in-backward"] if resume_inside else []
    assert cli.main([*RUN, *flags, "--resume", "--out-dir", str(tmp_path)]) == 0
    assert_same_bits(final_state(tmp_path)["model"], final_state(runs[resume_inside])["model"], "model")
    assert losses(tmp_path) == losses(runs[resume_inside])


# ---------------------------------------------------------------- CUDA


def largest_difference(runs) -> float:
    (model_a, _), (model_b, _) = runs
    return max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True))


@pytest.mark.cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_cuda_steps_like_after_backward(compiled):
    """torch's fused AdamW on CUDA (what `auto` picks there), inductor-compiled or eager. The
    difference from stepping after backward is at most what two runs stepping after backward differ
    by (the backward's kernels may add in varying order; where they do not, both are 0: bit equality)."""
    factory = FACTORIES["torch-fused"]
    ours = largest_difference(both_ways(factory, compiled, "cuda", backend="inductor", attention="naive"))
    (first, _), (second, _) = [both_ways(factory, compiled, "cuda", backend="inductor", attention="naive")[0]
                                for _ in range(2)]
    gap = max((a - b).abs().max().item() for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert ours <= 2 * gap, f"{ours:.3e} > 2 x {gap:.3e}"


@pytest.mark.cuda
def test_cuda_peak_memory_never_holds_every_gradient():
    """Step 2 (AdamW state exists), fused AdamW, batch 1 x 16 tokens of a 4096-token vocabulary: the
    gradients G (2.6 MB, 1 MB of them the LM head's) outweigh the activations (~0.3 MB). Stepping
    after backward, the peak holds every gradient at once: >= base + G, with base the memory before
    the forward (parameters, AdamW state, the batch). Inside backward, each gradient is freed as soon
    as it is applied, so the peak stays below base + G, and backward leaves no gradient behind."""
    peaks = {}
    for inside in (False, True):
        model = tiny_model("cuda", vocab_size=4096, attention="naive")
        params = list(model.parameters())
        optimizer = attach(model, FACTORIES["torch-fused"]) if inside else FACTORIES["torch-fused"](params)
        data = batches(2, vocab_size=4096, device="cuda", batch=1)
        train(model, optimizer, data[:1])
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train(model, optimizer, data[1:], first_step=2)
        torch.cuda.synchronize()
        peaks[inside] = torch.cuda.max_memory_allocated() - base
        if inside:
            assert torch.cuda.memory_allocated() == base  # no gradient left over
    gradients = sum(p.numel() * p.element_size() for p in params)
    assert peaks[False] >= gradients > peaks[True], (peaks, gradients)
