"""Regional compilation (parallelize's default): each block compiled in place, one graph reused by
every layer, the same loss and gradients as eager; "model" mode compiles the whole model instead."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from cs336_basics.model import BasicsTransformerLM
from cs336_systems.parallel.parallelize import apply_compile, parallelize
from cs336_systems.training.loss import lm_loss

VOCAB, CONTEXT = 64, 16


def tiny_model(layers: int) -> BasicsTransformerLM:
    torch.manual_seed(0)
    return BasicsTransformerLM(VOCAB, CONTEXT, d_model=32, num_layers=layers, num_heads=4, d_ff=64, attention="flash")


def step(model: torch.nn.Module, forward: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    tokens = torch.randint(0, VOCAB, (2, CONTEXT + 1), generator=torch.Generator().manual_seed(1))
    loss = lm_loss(forward, tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["regional", "model"])
def test_compiled_matches_eager(mode, fresh_dynamo):
    expected_loss, expected_grads = step(plain := tiny_model(3), plain)
    model = tiny_model(3)
    forward, _ = parallelize(model, 1, compile_model=True, compile_backend="aot_eager", compile_mode=mode)
    assert (forward is model) == (mode == "regional")
    loss, grads = step(model, forward)
    torch.testing.assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("layers", [2, 6])
def test_one_block_graph_for_all_layers(layers, fresh_dynamo):
    """Dynamo traces the block once and the final norm once, whatever the depth: no recompiles."""
    model = tiny_model(layers)
    forward, _ = parallelize(model, 1, compile_model=True, compile_backend="aot_eager")
    for _ in range(2):
        step(model, forward)
        model.zero_grad(set_to_none=True)
    assert fresh_dynamo["stats"]["unique_graphs"] == 2
    assert not fresh_dynamo["recompiles"] and not fresh_dynamo["graph_break"]
    # Every block call after the first found the cached graph.
    assert fresh_dynamo["frames"]["ok"] == 2


def test_regional_compile_works_in_place(fresh_dynamo):
    """Code that walks `model.layers` itself (a loss that stops before lm_head) runs compiled blocks."""
    model = tiny_model(2)
    assert apply_compile(model, True, backend="aot_eager") is model
    x = torch.randn(2, CONTEXT, 32, requires_grad=True)  # as the embedding output is
    for layer in model.layers:
        x = layer(x)
    assert fresh_dynamo["stats"]["unique_graphs"] == 1


def test_uncompiled_and_unknown_mode():
    model = tiny_model(1)
    assert apply_compile(model, False) is model
    with pytest.raises(ValueError, match="compile mode"):
        apply_compile(model, True, mode="everything")
