"""Activation checkpointing: every policy gives the un-checkpointed loss and gradients (eager and
compiled), keeps less than `none` in the expected order, keeps the plain state_dict names, fires
module hooks again in the recomputation, and rejects bad policy strings naming the flag."""

from __future__ import annotations

import pytest
import torch

from cs336_basics.model import BasicsTransformerLM
from cs336_systems.bench.memory import retained_bytes
from cs336_systems.errors import ConfigError
from cs336_systems.parallel.activation_checkpointing import (
    ActivationCheckpointing,
    CheckpointedBlocks,
    apply_activation_checkpointing,
    parse_policy,
)
from cs336_systems.parallel.parallelize import parallelize
from cs336_systems.training.loss import lm_loss

VOCAB, CONTEXT, LAYERS = 64, 16, 4
POLICIES = ("full", "every:2", "every:3", "selective", "selective:output_proj+k_proj")


def tiny_model(attention: str = "flash", device: str = "cpu") -> BasicsTransformerLM:
    torch.manual_seed(0)
    return BasicsTransformerLM(VOCAB, CONTEXT, d_model=32, num_layers=LAYERS, num_heads=4, d_ff=64,
                               attention=attention).to(device)


def batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (2, CONTEXT + 1), generator=torch.Generator().manual_seed(1)).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def loss_and_grads(model: torch.nn.Module, forward: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = lm_loss(forward, *batch(next(model.parameters()).device.type))
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]  # the same order with or without wrappers


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_matches_the_plain_model(policy, compiled):
    expected_loss, expected_grads = loss_and_grads(plain := tiny_model(), plain)
    model = tiny_model()
    forward, _ = parallelize(model, 1, compile_model=compiled, compile_backend="aot_eager",
                             activation_checkpointing=parse_policy(policy))
    loss, grads = loss_and_grads(model, forward)
    torch.testing.assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("policy, regions, sizes", [
    ("full", 4, [1, 1, 1, 1]), ("every:1", 4, [1, 1, 1, 1]), ("every:3", 2, [3, 1]), ("every:8", 1, [4]),
    ("selective", 4, [1, 1, 1, 1]),
])
def test_blocks_are_grouped(policy, regions, sizes):
    model = apply_activation_checkpointing(tiny_model(), policy)
    assert len(model.layers) == regions and all(isinstance(layer, CheckpointedBlocks) for layer in model.layers)
    assert [len(layer.blocks) for layer in model.layers] == sizes
    assert all(layer.selective == policy.startswith("selective") for layer in model.layers)


def test_none_leaves_the_model_alone():
    model = tiny_model()
    layers = list(model.layers)
    assert apply_activation_checkpointing(model, "none") is model and list(model.layers) == layers


@pytest.mark.parametrize("attention", ["sdpa", "flash"])
def test_saved_bytes_shrink_in_order(attention):
    """none > selective > full > every:2 of what the forward keeps for backward (eager).

    Eager "flash" bypasses the op dispatch, so selective keeps only the output projection there;
    SDPA's attention outputs are kept too.
    """
    saved = {}
    for policy in ("none", "selective", "full", "every:2"):
        model = apply_activation_checkpointing(tiny_model(attention), policy)
        saved[policy], loss = retained_bytes(lm_loss, model, *batch())
        loss.backward()
    assert saved["none"] > saved["selective"] > saved["full"] > saved["every:2"], saved
    block_input = 2 * CONTEXT * 32 * 4  # (B, T, d_model) fp32
    assert saved["full"] - saved["every:2"] == 2 * block_input  # one kept input per group: 4 -> 2
    per_block = (saved["selective"] - saved["full"]) / LAYERS
    attention_out = block_input + 2 * 4 * CONTEXT * 4  # O (B, T, d) and the logsumexp L (B, H, T) fp32
    assert per_block == block_input + (attention_out if attention == "sdpa" else 0)  # + output projection


def test_selective_keeps_the_named_matmuls():
    """Each extra matmul named keeps one more (B, T, d_model) output per block (eager, SDPA)."""
    saved = {}
    for policy in ("selective", "selective:output_proj+k_proj", "selective:output_proj+k_proj+w1"):
        model = apply_activation_checkpointing(tiny_model("sdpa"), policy)
        saved[policy], loss = retained_bytes(lm_loss, model, *batch())
        loss.backward()
    block_output = 2 * CONTEXT * 32 * 4  # (B, T, d_model) fp32
    assert saved["selective:output_proj+k_proj"] - saved["selective"] == LAYERS * block_output
    assert saved["selective:output_proj+k_proj+w1"] - saved["selective:output_proj+k_proj"] == LAYERS * 2 * block_output


def test_selective_saves_our_attention_op_when_compiled():
    """Compiled, `cs336::flash_attn_fwd` is in the graph and its outputs are kept: it runs once per
    layer in forward and not again in backward's recomputation (which `full` does)."""
    for policy, runs in (("selective", 1), ("full", 2)):
        model = tiny_model()
        forward, _ = parallelize(model, 1, compile_model=True, compile_backend="aot_eager",
                                 activation_checkpointing=parse_policy(policy))
        loss_and_grads(model, forward)  # compiles (or hits a cache an earlier test filled): tracing calls the op too
        with torch.profiler.profile() as prof:
            loss_and_grads(model, forward)
        assert [e.name for e in prof.events()].count("cs336::flash_attn_fwd") == runs * LAYERS, policy


def test_state_dict_keeps_the_plain_names():
    plain = tiny_model()
    for policy in ("full", "every:3", "selective"):
        model = apply_activation_checkpointing(tiny_model(), policy)
        state = model.state_dict()
        assert list(state) == list(plain.state_dict())
        fresh = apply_activation_checkpointing(tiny_model(), "every:2")
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        fresh.load_state_dict(state)  # across policies
        for a, b in zip(fresh.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a, b)
    plain.load_state_dict(apply_activation_checkpointing(tiny_model(), "every:2").state_dict())


def test_linear_hooks_fire_again_in_the_recomputation():
    """What FSDP needs: a pre-forward hook on every Linear runs in forward and again in recomputation."""
    from cs336_basics.model import Linear

    for policy, forward_calls in (("none", 1), ("full", 2), ("selective", 2)):
        model = apply_activation_checkpointing(tiny_model(), policy)
        calls = []
        for module in model.modules():
            if isinstance(module, Linear) and module is not model.lm_head:
                module.register_forward_pre_hook(lambda module, args: calls.append(module))
        loss_and_grads(model, model)
        assert len(calls) == forward_calls * LAYERS * 7, policy


def test_compiles_one_graph_for_all_layers():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model()
    forward, _ = parallelize(model, 1, compile_model=True, compile_backend="aot_eager",
                             activation_checkpointing=parse_policy("full"))
    loss_and_grads(model, forward)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the block wrapper and the final norm
    assert not torch._dynamo.utils.counters["recompiles"]


@pytest.mark.parametrize("text", ["", "Full", "every", "every:0", "every:-1", "every:x", "selective:2", "sometimes",
                                  "selective:", "selective:k_proj+k_proj", "selective:output_proj,k_proj"])
def test_bad_policy_names_the_flag(text):
    with pytest.raises(ConfigError, match="--activation-checkpointing"):
        parse_policy(text)


@pytest.mark.parametrize("text, policy", [
    ("none", ActivationCheckpointing(mode="none")), ("full", ActivationCheckpointing(mode="full")),
    ("every:4", ActivationCheckpointing(mode="full", group_size=4)),
    ("selective", ActivationCheckpointing(mode="selective")),
    ("selective:output_proj+k_proj",
     ActivationCheckpointing(mode="selective", saved_matmuls=("output_proj", "k_proj"))),
])
def test_parse_policy(text, policy):
    assert parse_policy(text) == policy
    assert str(policy) == ("full" if text == "every:1" else text)
    assert parse_policy(policy) is policy  # parsed once: a parsed policy passes through
    assert policy == text and policy != "sometimes"  # a policy equals its flag spelling


def test_parallelize_refuses_a_policy_string():
    """Parsed once, where the configuration is read: parallelize takes the value, not its spelling."""
    with pytest.raises(TypeError, match="parse_policy"):
        parallelize(tiny_model(), 1, activation_checkpointing="full")


def test_twice_is_an_error():
    model = apply_activation_checkpointing(tiny_model(), "full")
    with pytest.raises(ValueError, match="already"):
        apply_activation_checkpointing(model, "full")


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["full", "every:2", "selective"])
def test_cuda_inductor_policy_matches(policy):
    """On the GPU, inductor-compiled (our Triton attention, fp32): every policy gives the loss and
    gradients of the same model compiled without checkpointing."""
    plain = tiny_model(device="cuda")
    expected_loss, expected_grads = loss_and_grads(plain, parallelize(plain, 1, compile_model=True)[0])
    model = tiny_model(device="cuda")
    forward, _ = parallelize(model, 1, compile_model=True, activation_checkpointing=parse_policy(policy))
    loss, grads = loss_and_grads(model, forward)
    torch.testing.assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected)


@pytest.mark.cuda
def test_cuda_selective_keeps_less_than_none_more_than_full():
    peaks = {}
    for policy in ("none", "selective", "full"):
        model = apply_activation_checkpointing(tiny_model(device="cuda").bfloat16(), policy)
        peaks[policy], loss = retained_bytes(lm_loss, model, *batch("cuda"))
        loss.backward()
    assert peaks["none"] > peaks["selective"] > peaks["full"]


# ---------------------------------------------------------------- the train flag


def parse_train(*flags: str):
    from cs336_systems import cli
    from cs336_systems.training.config import config_from_args

    argv = ["train", "--nproc", "1", "--device", "cpu", "--preset", "tiny", "--steps", "2", "--eval-every", "0",
            "--no-progress", "--out-dir", "", *flags]
    return config_from_args(cli.build_parser().parse_args(argv))


def test_train_flag():
    assert parse_train().parallel.activation_checkpointing == "none"  # the dataclass field's default
    assert parse_train("--activation-checkpointing", "every:2").parallel.activation_checkpointing == "every:2"
    with pytest.raises(ConfigError, match="--activation-checkpointing"):
        parse_train("--activation-checkpointing", "most")


def test_train_out_of_memory_names_the_options(monkeypatch):
    """A step that runs out of device memory ends the job with one line naming what reduces memory."""
    from cs336_systems.training import command, trainer

    def out_of_memory(state):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer, "train_step", out_of_memory)
    with pytest.raises(ConfigError, match="ran out of memory in step 1") as error:
        command.train(parse_train("--activation-checkpointing", "full"))
    for flag in ("--activation-checkpointing full", "--batch-size", "--context-length", "--fsdp"):
        assert flag in str(error.value)
