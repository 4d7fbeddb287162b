"""Memory-budgeted checkpointing plans: the measured cost table equals independent counts of what a
block keeps, the solver picks the least recomputation that fits (exactly at the budget, more
recomputation one byte below it, an error naming the flag when nothing fits), per-layer wrapping
gives the plain model's gradients (eager bitwise, compiled within the measured compile gap), and
`auto` / `budget:GiB` parse, resolve and record."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from numerics import eps, magnitude, max_error

from cs336_basics.model import BasicsTransformerLM, RotaryEmbedding, TransformerBlock
from cs336_systems.errors import ConfigError
from cs336_systems.parallel.activation_checkpointing import (
    ActivationCheckpointing,
    CheckpointedBlocks,
    apply_activation_checkpointing,
    parse_policy,
)
from cs336_systems.parallel.checkpoint_plan import (
    CANDIDATES,
    GIB,
    CheckpointPlan,
    LayerCosts,
    measure_layer_costs,
    recompute_seconds,
    solve_plan,
)
from cs336_systems.parallel.parallelize import parallelize
from cs336_systems.presets import ModelConfig
from cs336_systems.training.loss import lm_loss
from cs336_systems.training.memory_plan import MemoryPlan, activation_budget, record_plan, resolve_checkpointing

B, T, D, H, FF = 2, 16, 32, 4, 64
VOCAB, LAYERS = 64, 4
FP32 = 4  # bytes


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the bitwise comparison then does not depend on how ops split their sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_block(attention: str = "sdpa", context: int = T) -> TransformerBlock:
    torch.manual_seed(0)
    return TransformerBlock(D, H, FF, RotaryEmbedding(context, D // H), attention=attention)


# ---------------------------------------------------------------- the cost table


def saved_by_autograd(block: torch.nn.Module, region: torch.nn.Module) -> int:
    """Independent count: bytes of the storages autograd's saved_tensors_hooks see packed by one forward
    of `region` (each storage once, the block's parameters and buffers left out). It sees everything
    under `none`, and under `full` the input the checkpoint saves (its recomputation hooks sit inside)."""
    own = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *block.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaf = torch.randn(B, T, D).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        region(leaf.clone())
    return sum(seen.values())


def test_kept_bytes_equal_independent_counts():
    block = tiny_block()
    costs = measure_layer_costs(block, B, T, runs=1)
    kept = dict(zip(costs.policies, costs.kept_bytes))
    assert list(kept.values()) == sorted(kept.values(), reverse=True) and len(set(kept.values())) == len(kept)
    assert kept["none"] == saved_by_autograd(block, block)
    assert kept["full"] == saved_by_autograd(block, CheckpointedBlocks([block], first=0)) == B * T * D * FP32
    # selective, by hand: input, SDPA's O (B, H, T, D/H) and logsumexp L (B, H, T), the output projection.
    block_values = B * T * D * FP32
    assert kept["selective"] == 3 * block_values + B * H * T * FP32
    assert kept["selective:q_proj+k_proj+v_proj+output_proj"] == kept["selective"] + 3 * block_values
    w1_w3 = 2 * B * T * FF * FP32
    assert kept["selective:q_proj+k_proj+v_proj+output_proj+w1+w3"] == \
        kept["selective:q_proj+k_proj+v_proj+output_proj"] + w1_w3


def test_flash_is_counted_as_the_op_the_compiled_run_saves():
    """Eager flash skips the dispatcher (the selective policy could not keep it): the table counts SDPA's
    O and L in its place, and the block keeps its attention afterwards."""
    flash, sdpa = tiny_block("flash"), tiny_block("sdpa")
    assert measure_layer_costs(flash, B, T, runs=1).kept_bytes == measure_layer_costs(sdpa, B, T, runs=1).kept_bytes
    assert flash.attn.attention == "flash"


def test_recompute_seconds_from_op_times():
    ops = {"block": 10.0, "attention": 3.0, "q_proj": 0.5, "k_proj": 0.5, "v_proj": 0.5, "output_proj": 0.5,
           "w1": 1.0, "w3": 1.0, "w2": 1.0}
    rest = 10.0 - 3.0 - 5.0  # norms, RoPE, pointwise
    assert recompute_seconds(ops, parse_policy("none")) == 0.0
    assert recompute_seconds(ops, parse_policy("full")) == rest + 3.0 + 4.0  # all but w2 (early stop)
    assert recompute_seconds(ops, parse_policy("selective")) == rest + 1.5 + 2.0
    assert recompute_seconds(ops, parse_policy("selective:q_proj+k_proj+v_proj+output_proj+w1+w3")) == rest
    assert recompute_seconds({**ops, "block": 1.0}, parse_policy("selective")) == 3.5  # the rest clamped at 0


def test_measured_seconds_are_ordered():
    """Keeping more never costs more: each candidate re-runs a subset of what the next one re-runs."""
    costs = measure_layer_costs(tiny_block(), B, T, runs=1)
    assert costs.recompute_s[0] == 0.0 and list(costs.recompute_s) == sorted(costs.recompute_s)
    assert costs.policies == CANDIDATES and "selective" in costs.describe()


# ---------------------------------------------------------------- the solver


def table() -> LayerCosts:
    return LayerCosts(policies=("none", "selective", "full"), kept_bytes=(10, 4, 1), recompute_s=(0.0, 1.0, 2.0))


def test_budget_that_fits_exactly():
    plan = solve_plan(table(), 4, budget=16)
    assert plan.counts == (("selective", 4),) and plan.kept_bytes == 16 and plan.recompute_s == 4.0


def test_one_byte_less_recomputes_more():
    plan = solve_plan(table(), 4, budget=15)
    assert dict(plan.counts) == {"full": 1, "selective": 3} and plan.kept_bytes == 13 and plan.recompute_s == 5.0
    assert [str(p) for p in plan.per_layer] == ["full", "selective", "selective", "selective"]  # least kept first


def test_huge_budget_keeps_everything():
    plan = solve_plan(table(), 4, budget=2**60)
    assert plan.counts == (("none", 4),) and plan.recompute_s == 0.0
    tie = LayerCosts(policies=("none", "selective"), kept_bytes=(10, 4), recompute_s=(0.0, 0.0))
    assert solve_plan(tie, 4, budget=2**60).counts == (("none", 4),)  # equal seconds: keep more


def test_mixed_plan_against_brute_force():
    """Every budget from the least to the most memory: the solver's seconds equal the best of all
    per-layer assignments (3^5 of them), and its bytes fit."""
    import itertools

    costs = LayerCosts(policies=("none", "a", "b", "c"), kept_bytes=(9, 5, 3, 1), recompute_s=(0.0, 0.7, 1.1, 2.0))
    for budget in range(5, 46):
        best = min(sum(costs.recompute_s[i] for i in choice) for choice in itertools.product(range(4), repeat=5)
                   if sum(costs.kept_bytes[i] for i in choice) <= budget)
        plan = solve_plan(costs, 5, budget)
        assert plan.recompute_s == pytest.approx(best, abs=1e-12) and plan.kept_bytes <= budget, budget


def test_no_plan_fits_names_the_flag_and_numbers():
    with pytest.raises(ConfigError, match=r"--activation-checkpointing: no plan fits a budget of .* GiB.*4 x full"):
        solve_plan(table(), 4, budget=3)


def test_plan_line_and_record(tmp_path, capsys):
    plan = solve_plan(LayerCosts(policies=("selective", "full"), kept_bytes=(3 * GIB, GIB), recompute_s=(0.01, 0.02)),
                      32, budget=44 * GIB, budget_terms="given")
    assert plan.describe() == "ac plan: 6 x selective, 26 x full; kept 44.0 GiB of 44.0 budget; recompute 0.58 s/step"
    record_plan(plan, str(tmp_path))
    assert capsys.readouterr().out.strip() == plan.describe()
    saved = json.loads((tmp_path / "ac_plan.json").read_text())
    assert saved["counts"] == {"full": 26, "selective": 6} and saved["budget_bytes"] == 44 * GIB
    assert saved["costs"]["policies"]["full"] == {"kept_bytes": GIB, "recompute_s": 0.02}


# ---------------------------------------------------------------- per-layer wrapping

PLAN = ("full", "selective", "none", "selective:output_proj+k_proj")


def tiny_model() -> BasicsTransformerLM:
    torch.manual_seed(0)
    return BasicsTransformerLM(VOCAB, T, d_model=D, num_layers=LAYERS, num_heads=H, d_ff=FF, attention="sdpa")


def loss_and_grads(model: torch.nn.Module, forward: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(1))
    loss = lm_loss(forward, tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_per_layer_wrapping():
    model = apply_activation_checkpointing(tiny_model(), tuple(parse_policy(p) for p in PLAN))
    kinds = [(type(layer).__name__, getattr(layer, "saved_matmuls", "-")) for layer in model.layers]
    assert kinds == [("CheckpointedBlocks", None), ("CheckpointedBlocks", ("output_proj",)),
                     ("TransformerBlock", "-"), ("CheckpointedBlocks", ("output_proj", "k_proj"))]
    plain = tiny_model()
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())  # the plain names load into the mixed wrappers and back
    plain.load_state_dict(model.state_dict())


def test_per_layer_gradients_are_bitwise_the_plain_ones_eager(one_thread):
    """Eager recomputation runs the same ops in the same order on the same data: the same bits."""
    expected_loss, expected = loss_and_grads(plain := tiny_model(), plain)
    model = tiny_model()
    forward, _ = parallelize(model, 1, activation_checkpointing=tuple(parse_policy(p) for p in PLAN))
    loss, grads = loss_and_grads(model, forward)
    assert torch.equal(loss, expected_loss)
    for grad, want in zip(grads, expected, strict=True):
        assert torch.equal(grad, want)


def test_per_layer_gradients_compiled(one_thread):
    """Compiled (aot_eager), the plan's gradients are within 2x of what compiling alone moves them from
    eager (measured here: the compiled model without checkpointing), plus one eps of each gradient."""
    _, eager = loss_and_grads(plain := tiny_model(), plain)
    compiled_plain = tiny_model()
    _, gap = loss_and_grads(compiled_plain, parallelize(compiled_plain, 1, compile_model=True,
                                                        compile_backend="aot_eager")[0])
    model = tiny_model()
    forward, _ = parallelize(model, 1, compile_model=True, compile_backend="aot_eager",
                             activation_checkpointing=tuple(parse_policy(p) for p in PLAN))
    _, grads = loss_and_grads(model, forward)
    for grad, want, moved in zip(grads, eager, gap, strict=True):
        bound = 2 * max_error(moved, want) + eps(torch.float32) * magnitude(want)
        assert max_error(grad, want) <= bound


def test_per_layer_input_errors():
    with pytest.raises(ValueError, match="one policy per layer: 4 layers, 2 policies"):
        apply_activation_checkpointing(tiny_model(), (parse_policy("full"), parse_policy("none")))
    with pytest.raises(ValueError, match="single-layer policies.*every:2"):
        apply_activation_checkpointing(tiny_model(), tuple(parse_policy(p) for p in ("every:2",) * LAYERS))
    with pytest.raises(TypeError, match="request for a plan: resolve it first"):
        apply_activation_checkpointing(tiny_model(), "auto")


# ---------------------------------------------------------------- auto and budget:GiB


@pytest.mark.parametrize("text, mode, gib", [("auto", "auto", None), ("auto:3", "auto", 3.0), ("auto:0", "auto", 0.0),
                                             ("budget:40", "budget", 40.0), ("budget:0.5", "budget", 0.5)])
def test_parse_planned(text, mode, gib):
    policy = parse_policy(text)
    assert (policy.mode, policy.gib, policy.planned) == (mode, gib, True)
    assert str(policy) == text and policy == text and policy != "full"


@pytest.mark.parametrize("text", ["auto:", "auto:-1", "auto:x", "auto:nan", "budget", "budget:", "budget:0",
                                  "budget:-3", "budget:inf", "Auto"])
def test_bad_planned_names_the_flag(text):
    with pytest.raises(ConfigError, match="--activation-checkpointing"):
        parse_policy(text)


def floor(params: int, grads: int) -> MemoryPlan:
    return MemoryPlan(parameters=params, optimizer=2 * params, gradients=grads, activations=0)


def test_auto_budget_arithmetic():
    budget, terms = activation_budget(parse_policy("auto:2"), floor(10 * GIB, 10 * GIB), available=80 * GIB,
                                      total=80 * GIB, loss_bytes=GIB)
    assert budget == (80 - 10 - 20 - 1 - 2) * GIB and "margin 2" in terms
    default, _ = activation_budget(parse_policy("auto"), floor(10 * GIB, 10 * GIB), available=80 * GIB,
                                   total=80 * GIB)
    assert default == 80 * GIB - 30 * GIB - int(0.02 * 80 * GIB)  # the margin: 2% of the device
    assert activation_budget(parse_policy("budget:7"), floor(GIB, GIB), available=0, total=0) == (7 * GIB, "given")
    with pytest.raises(ConfigError, match=r"--activation-checkpointing auto: no plan fits.*gradients \(55 GiB\)"):
        activation_budget(parse_policy("auto"), floor(10 * GIB, 55 * GIB), available=80 * GIB, total=80 * GIB)


def test_resolve_on_the_cpu():
    """The whole path on a tiny model: a huge budget keeps everything, the least memory recomputes most,
    a policy that is no request passes through."""
    model = ModelConfig(preset=None, d_model=D, d_ff=FF, num_layers=3, num_heads=H, vocab_size=VOCAB,
                        context_length=T, attention="sdpa")

    def resolve(policy: str, available: int = 2**40) -> ActivationCheckpointing | CheckpointPlan:
        return resolve_checkpointing(parse_policy(policy), model, batch=B, context_length=T, dtype=torch.float32,
                                     device="cpu", available=available)

    assert resolve("full") == "full"
    assert resolve("auto").counts == (("none", 3),)
    least = 3 * B * T * D * FP32  # three layers under full: their inputs
    plan = resolve(f"budget:{least / GIB!r}")
    assert plan.counts == (("full", 3),) and plan.kept_bytes == least and plan.budget_terms == "given"
    with pytest.raises(ConfigError, match="--activation-checkpointing budget:.* no plan fits"):
        resolve(f"budget:{(least - 1) / GIB!r}")


def test_train_flag_accepts_auto():
    from cs336_systems import cli
    from cs336_systems.training.config import config_from_args

    def parse_train(*flags: str):
        argv = ["train", "--nproc", "1", "--device", "cpu", "--preset", "tiny", "--steps", "2", "--out-dir", "", *flags]
        return config_from_args(cli.build_parser().parse_args(argv))

    assert parse_train("--activation-checkpointing", "auto:4").parallel.activation_checkpointing == "auto:4"
    with pytest.raises(ConfigError, match="--activation-checkpointing 'budget:0'"):
        parse_train("--activation-checkpointing", "budget:0")


def test_memory_floor_of_a_plan_request_is_full():
    """Before the plan exists (the refusal of `train` and `bench step`), auto and budget count as `full`,
    the least memory any plan keeps."""
    from cs336_systems.presets import get_preset
    from cs336_systems.training.memory_plan import estimate

    def floor_of(policy: str) -> MemoryPlan:
        return estimate(get_preset("small"), 10_000, tokens=4096, param_bytes=2, activation_bytes=2, policy=policy)

    assert floor_of("auto") == floor_of("budget:40") == floor_of("full") != floor_of("none")


@pytest.mark.cuda
def test_cuda_cost_table():
    """On the GPU in bf16: the table's order, `full` keeps its input alone, and every recomputation takes time."""
    block = tiny_block("flash", context=64).cuda().bfloat16()
    costs = measure_layer_costs(block, B, 64, runs=3)
    assert list(costs.kept_bytes) == sorted(costs.kept_bytes, reverse=True)
    assert costs.cost("full")[0] == B * 64 * D * 2 and costs.device.startswith("cuda")
    assert all(s > 0 for s in costs.recompute_s[1:])
    assert costs.backward_bytes is None and costs.transient("full") == costs.kept_bytes[0]


@pytest.mark.cuda
def test_cuda_compiled_cost_table():
    """Compiled on the GPU, read from the caching allocator: `full` keeps its input (one block of the
    allocator's, which rounds every allocation up to 512 bytes), every policy's backward adds at least
    the block's parameter gradients, and no compiled code is left for the run to trip over."""
    block = tiny_block("flash", context=64).cuda().bfloat16()
    costs = measure_layer_costs(block, B, 64, runs=3, compiled=True)
    input_bytes = B * 64 * D * 2
    assert costs.cost("full")[0] == -(-input_bytes // 512) * 512
    assert all(kept > 0 for kept in costs.kept_bytes)
    grads = sum(-(-p.numel() * p.element_size() // 512) * 512 for p in block.parameters())
    assert min(costs.backward_bytes) >= grads
    assert [costs.transient(p) for p in costs.policies] == list(costs.backward_bytes)
    assert all(p.grad is None for p in block.parameters())


def test_the_budget_holds_the_backward_of_the_policies_the_plan_uses():
    """With transient=True a plan reserves the largest backward among its own policies: a plan of
    `selective` alone does not pay for `full`'s larger backward, and one that needs `full` does."""
    costs = LayerCosts(policies=("none", "selective", "full"), kept_bytes=(10, 4, 1), recompute_s=(0.0, 1.0, 2.0),
                       backward_bytes=(2, 3, 6))
    plan = solve_plan(costs, 4, budget=19, transient=True)  # 4 x selective: 16 kept + 3
    assert plan.counts == (("selective", 4),) and plan.transient_bytes == 3
    assert "+ one layer's backward" in plan.describe() and plan.to_dict()["transient_bytes"] == 3
    plan = solve_plan(costs, 4, budget=18, transient=True)  # 1 x full: 13 kept + 6 > 18; 2 x full: 10 + 6
    assert dict(plan.counts) == {"full": 2, "selective": 2} and (plan.kept_bytes, plan.transient_bytes) == (10, 6)
    assert solve_plan(costs, 4, budget=18).counts == (("selective", 4),)  # kept bytes alone: 16 fit
    brute = min(sum(costs.recompute_s[i] for i in choice) for choice in itertools.product(range(3), repeat=4)
                if sum(costs.kept_bytes[i] for i in choice) + max(costs.backward_bytes[i] for i in choice) <= 18)
    assert plan.recompute_s == brute
    with pytest.raises(ConfigError, match=r"4 x full, keeps .* GiB and its backward"):
        solve_plan(costs, 4, budget=9, transient=True)


def test_transient_is_the_measured_backward_or_the_whole_forward():
    """The budget's one-layer term per policy: its measured backward working set, else `none`'s kept bytes."""
    eager = LayerCosts(policies=("none", "full"), kept_bytes=(10, 1), recompute_s=(0.0, 2.0))
    compiled = LayerCosts(policies=("none", "full"), kept_bytes=(8, 1), recompute_s=(0.0, 2.0), backward_bytes=(3, 12))
    assert [eager.transient(p) for p in ("none", "full")] == [10, 10]
    assert [compiled.transient(p) for p in ("none", "full")] == [3, 12]
    assert "backward adds" in compiled.describe() and "backward adds" not in eager.describe()
    assert compiled.to_dict()["policies"]["full"] == {"kept_bytes": 1, "recompute_s": 2.0, "backward_bytes": 12}
    with pytest.raises(ValueError, match="backward_bytes"):
        LayerCosts(policies=("none", "full"), kept_bytes=(8, 1), recompute_s=(0.0, 2.0), backward_bytes=(3,))


def test_compiled_table_off_cuda_is_the_eager_count():
    """Without CUDA's allocator to read, `compiled=True` measures as eager does: the same table."""
    block = tiny_block()
    assert measure_layer_costs(block, B, T, runs=1, compiled=True).kept_bytes == \
        measure_layer_costs(block, B, T, runs=1).kept_bytes


def test_train_builds_the_plan(tmp_path, capsys):
    """`train --activation-checkpointing budget:GiB`: the trainer resolves the plan before building the model,
    prints it, saves OUT_DIR/ac_plan.json and wraps each layer with its policy."""
    import dataclasses

    from cs336_systems import cli
    from cs336_systems.distributed.world import World
    from cs336_systems.training.config import config_from_args
    from cs336_systems.training.trainer import build_trainer

    argv = ["train", "--nproc", "1", "--device", "cpu", "--preset", "tiny", "--steps", "1", "--eval-every", "0",
            "--vocab-size", "256", "--batch-size", "2", "--context-length", "16", "--out-dir", str(tmp_path),
            "--activation-checkpointing", "budget:0.00016"]
    config = config_from_args(cli.build_parser().parse_args(argv))
    config.model = dataclasses.replace(config.model, attention="sdpa")
    trainer = build_trainer(config, World(rank=0, world_size=1, device=torch.device("cpu")))
    saved = json.loads((tmp_path / "ac_plan.json").read_text())
    assert saved["plan"] in capsys.readouterr().out and saved["budget"] == "given"
    assert saved["kept_bytes"] <= saved["budget_bytes"] == int(0.00016 * GIB)
    expected = [p for p, n in saved["counts"].items() for _ in range(n)]  # layer order: least kept first
    assert [policy_of(layer) for layer in trainer.model.layers] == expected and len(set(expected)) > 1


def policy_of(layer: torch.nn.Module) -> str:
    """The single-layer policy a layer of a wrapped model runs with."""
    if not isinstance(layer, CheckpointedBlocks):
        return "none"
    if layer.saved_matmuls is None:
        return "full"
    return str(ActivationCheckpointing(mode="selective", saved_matmuls=layer.saved_matmuls))
