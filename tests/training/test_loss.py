"""training.loss.lm_loss: the fused LM head gives the unfused loss and gradients, eager and compiled,
through the wrappers a job uses."""

import copy

import pytest
import torch
from numerics import assert_within_oracle

from cs336_systems.presets import ModelConfig
from cs336_systems.training.loss import lm_loss


def _model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = ModelConfig(preset="tiny", vocab_size=300, context_length=16, attention="sdpa").build()
    tokens = torch.randint(0, 300, (3, 17))
    return model, tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model, forward, x, y, loss):
    model.zero_grad(set_to_none=True)
    value = lm_loss(forward, x, y, loss=loss)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_matches_unfused(compiled):
    model, x, y = _model_and_batch()
    ref_loss, ref_grads = _loss_and_grads(model, model, x, y, "unfused")
    forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    loss, grads = _loss_and_grads(model, forward, x, y, "fused")
    assert loss.dtype == torch.float32
    exact_model = copy.deepcopy(model).double()  # the oracle: the unfused loss in float64
    exact_loss, exact_grads = _loss_and_grads(exact_model, exact_model, x, y, "unfused")
    assert_within_oracle("loss", loss, ref_loss, exact_loss, torch.float32)
    for name, grad in ref_grads.items():
        assert_within_oracle(name, grads[name], grad, exact_grads[name], torch.float32)


def test_fused_under_bf16_autocast_is_close():
    model, x, y = _model_and_batch(1)
    ref = lm_loss(model, x, y, loss="unfused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = lm_loss(model, x, y, loss="fused")
    assert fused.dtype == torch.float32 and abs(fused.item() - ref.item()) < 2e-2 * ref.item()


def test_unknown_loss_is_an_error():
    model, x, y = _model_and_batch()
    with pytest.raises(ValueError, match="loss must be one of"):
        lm_loss(model, x, y, loss="fast")
