"""Assertions shared across the test folders (tests/ is on sys.path: `from helpers import ...`)."""

import pytest


def assert_cli_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    """The command printed one line to stderr, "error: ...", naming each of `words`; returns it."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    return err


def compute_in(model, dtype, layers) -> None:
    """Mixed precision without communication, as an oracle for FSDP's compute dtype: before each
    forward every parameter of a `layers` module (Linear, Embedding) is cast to `dtype` once, and each
    such layer computes with that copy (both, if tied) on its floating inputs cast to `dtype`, as
    FSDP's layers do. The fp32 originals stay the model's parameters (kept in `model.masters`, so
    `model.parameters()` lists them in another order) and get fp32 gradients."""
    from torch import nn

    uses = [(layer, name, p) for layer in model.modules() if isinstance(layer, layers)
            for name, p in list(layer.named_parameters(recurse=False))]
    masters = list(dict.fromkeys(p for _, _, p in uses))
    for layer, name, _ in uses:
        delattr(layer, name)
    model.masters = nn.ParameterList(masters)
    copies = {}

    def cast_weights(module, args) -> None:
        copies.update({p: p.to(dtype) for p in masters})

    def use_copies(layer, args) -> tuple:
        for used_by, name, p in uses:
            if used_by is layer:
                setattr(layer, name, copies[p])
        return tuple(a.to(dtype) if a.is_floating_point() else a for a in args)

    model.register_forward_pre_hook(cast_weights)
    for layer in dict.fromkeys(layer for layer, _, _ in uses):
        layer.register_forward_pre_hook(use_copies)


def split_sgd_step(model, optimizer, x, y) -> None:
    """One optimizer step on the mean of the two halves' cross-entropy gradients, in one process: the
    arithmetic of 2 data-parallel ranks without them (the oracle of the data-parallel tests)."""
    import torch.nn.functional as F

    halves = []
    for xh, yh in zip(x.chunk(2), y.chunk(2)):
        optimizer.zero_grad()
        F.cross_entropy(model(xh).float(), yh).backward()
        halves.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
    for p, g0, g1 in zip(model.parameters(), *halves):
        p.grad = None if g0 is None else (g0 + g1) / 2
    optimizer.step()


def max_distance(ours, theirs) -> float:
    """Largest absolute difference between two equally long sequences of tensors."""
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))
