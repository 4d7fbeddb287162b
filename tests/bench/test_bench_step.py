"""`bench step` on a tiny CPU configuration: every contender runs and agrees on the first loss, the
FLOP count matches a hand count and torch's FLOP counter, OOM becomes a row, bad input fails."""

from __future__ import annotations

import argparse
import json
import math
import time

import pytest
import torch

from cs336_systems.bench import kernel_profile, stock_step
from cs336_systems.bench import step as step_bench
from cs336_systems.errors import ConfigError
from cs336_systems.presets import ModelConfig
from cs336_systems.training.report import training_flops

FAST = ["--preset", "tiny-step", "--device", "cpu", "--steps", "2", "--warmup", "0", "--matmul-size", "64"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    step_bench.add_arguments(parser)
    return parser.parse_args([*FAST, *argv])


def bench(tmp_path, *argv: str) -> dict:
    assert step_bench.main(parse(*argv, "--out-dir", str(tmp_path))) == 0
    return json.loads((tmp_path / "step.json").read_text())


def test_every_contender_runs_and_agrees(tmp_path):
    result = bench(tmp_path, "--no-compile", "--layers", "2", "--ctx", "32")
    rows = {row["contender"]: row for row in result["rows"]}
    assert list(rows) == ["ours", "stock", "ours-sdpa"]
    for row in rows.values():
        for key in ("ms_per_step", "tflops", "mfu", "first_step_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, key
    # Same model, seed and batch: the first losses agree up to bf16 rounding (about ln 256 at init).
    losses = [row["first_loss"] for row in rows.values()]
    assert max(losses) - min(losses) < 0.05 and abs(losses[0] - math.log(256)) < 1.0
    assert (rows["ours"]["attention"], rows["stock"]["attention"], rows["ours-sdpa"]["attention"]) == \
        ("flash", "sdpa", "sdpa")
    meta = result["meta"]
    assert (meta["layers"], meta["ctx"], meta["batch"], meta["vocab"]) == (2, 32, 2, 256)
    assert {p.name for p in tmp_path.iterdir()} == {"step.md", "step.json", "step.png"}
    # Ratios to stock only from this run, and the markdown says which contenders ran together.
    assert meta["ran_together"] == ["ours", "stock", "ours-sdpa"] and meta["protocol"] == "default"
    for row in rows.values():
        assert row["speedup_vs_stock"] == rows["stock"]["ms_per_step"] / row["ms_per_step"]
    assert "Contenders run together, one after another in this process on this machine: ours, stock, ours-sdpa." \
        in (tmp_path / "step.md").read_text()


def test_compiled_ours_with_selective_checkpointing(tmp_path):
    (row,) = bench(tmp_path, "--contenders", "ours", "--ac", "selective", "--layers", "2", "--ctx", "16")["rows"]
    assert row["ac"] == "selective" and row["ms_per_step"] > 0


def test_profile_reports_kernel_time_by_category(tmp_path):
    # Compiled (aot_eager on a CPU): our op is then dispatched as cs336::flash_attn_fwd/bwd, which
    # the profiler names (eager calls skip the dispatcher, ops.triton_utils.eager).
    result = bench(tmp_path, "--layers", "1", "--ctx", "32", "--contenders", "ours", "stock", "--profile")
    ours, stock = (row["kernel_ms"] for row in result["rows"])
    for times in (ours, stock):
        parts = {label: ms for label, ms in times.items() if label != "total"}
        assert times["total"] == pytest.approx(sum(parts.values())) and times["matmul"] > 0
    # On a CPU our op's own time is its self time: the tiled path's aten calls count elsewhere.
    assert ours["attention forward"] > 0 and ours["attention backward"] > 0
    assert "attention forward" not in stock  # SDPA's math backend on a CPU: matmuls and pointwise
    assert "Kernel time of one step by category" in (tmp_path / "step.md").read_text()


@pytest.mark.parametrize(("name", "label"), [
    # from an H200 profile of the 8B step (ours and cuDNN), and CPU operator names
    ("flash_fwd_ws_kernel", "attention forward"),
    ("flash_bwd_gluon_kernel", "attention backward"),
    ("flash_bwd_ws_kernel", "attention backward"),
    ("flash_bwd_onepass_preprocess_kernel", "attention backward"),
    ("flash_bwd_onepass_dq_kernel", "attention backward"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0",
     "attention forward"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0",
     "attention backward"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4> >(Flash_fwd_params)",
     "attention forward"),
    ("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", "matmul"),
    ("triton_poi_fused__unsafe_view_add_arange_flash_attn_fwd_index_mul_stack_sub_transpose_unbind_view_1",
     "fused pointwise (inductor)"),
    ("lce_rows_kernel", "lm loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor", "optimizer"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
     "direct_copy_kernel_cuda(at::TensorIteratorBase&)", "copy / fill"),
    ("cs336::flash_attn_bwd", "attention backward"),
    ("aten::mm", "matmul"),
    ("aten::add_", "other"),
])
def test_kernel_categories(name, label):
    assert kernel_profile.category(name) == label


def test_stock_loss_equals_the_plain_loss():
    """The stock recipe's chunked LM head + cross-entropy is the same mean loss (fp32, chunk boundary inside)."""
    from cs336_systems.training.loss import lm_loss

    torch.manual_seed(0)
    model = ModelConfig(preset="tiny", vocab_size=64, context_length=16).build()
    tokens = torch.randint(0, 64, (2, 17))
    old_chunk, stock_step.STOCK_LOSS_CHUNK = stock_step.STOCK_LOSS_CHUNK, 5
    try:
        stock = stock_step.stock_loss(model, tokens[:, :-1], tokens[:, 1:])
    finally:
        stock_step.STOCK_LOSS_CHUNK = old_chunk
    torch.testing.assert_close(stock, lm_loss(model, tokens[:, :-1], tokens[:, 1:]))


def test_flops_formula_hand_count():
    """L=1, d=4, d_ff=8, V=10, B=1, T=2. Weights: 4*16 + 3*4*8 + 10*4 = 200; 6 * 200 * 2 tokens = 2400.
    Attention: 4 B T^2 d L = 64, x3 (forward + backward) = 192, halved when causal = 96."""
    assert training_flops(200, 1, 4, 1, 2, causal=False) == 2400 + 192
    assert training_flops(200, 1, 4, 1, 2) == 2400 + 96
    model = ModelConfig(preset=None, d_model=4, d_ff=8, num_layers=1, num_heads=2, vocab_size=10, context_length=2)
    assert step_bench.matmul_params(model) == 200
    assert step_bench.step_flops(model, 1, 2) == 2400 + 96


def test_flops_formula_matches_torch_flop_counter():
    """Non-causal (naive attention computes every score), torch counts the same forward + backward FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from cs336_systems.training.loss import lm_loss

    model_config = ModelConfig(preset=None, d_model=16, d_ff=32, num_layers=2, num_heads=2, vocab_size=40,
                               context_length=8, attention="naive")
    model = model_config.build()
    tokens = torch.randint(0, 40, (3, 9))
    with FlopCounterMode(display=False) as counter:
        lm_loss(model, tokens[:, :-1], tokens[:, 1:], loss="unfused").backward()  # the model's FLOPs, unfused
    expected = training_flops(step_bench.matmul_params(model_config), 2, 16, 3, 8, causal=False)
    assert counter.get_total_flops() == expected


def test_oom_becomes_a_row(tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(step_bench, "stock_setup", out_of_memory)
    rows = bench(tmp_path, "--no-compile", "--contenders", "stock", "ours", "--layers", "1", "--ctx", "16")["rows"]
    assert rows[0]["contender"] == "stock" and rows[0]["ms_per_step"] == "OOM"
    assert "--ac full" in rows[0]["note"] and "--batch" in rows[0]["note"]
    assert rows[0]["oom_phase"] == "build"
    assert rows[0]["oom_message"] == "CUDA out of memory. Tried to allocate 80.00 GiB"
    assert rows[1]["ms_per_step"] > 0
    assert "OOM" in (tmp_path / "step.md").read_text()


def test_8b_32k_preset_resolves_without_building():
    config = step_bench.config_from_args(parse("--preset", "8b-32k", "--layers", "4"))
    model = config.model
    assert (model.d_model, model.d_ff, model.num_heads, model.num_layers) == (4096, 11008, 32, 4)
    assert (model.vocab_size, config.ctx, config.batch) == (151_936, 32_768, 2)
    full = step_bench.config_from_args(parse("--preset", "8b-32k"))
    assert full.model.shape.num_params(full.model.vocab_size) == pytest.approx(8.1e9, rel=0.01)
    # 6 N tokens (N without the embedding) + causal attention: 4.74 PFLOP (5.0 with the embedding counted).
    # 4.745e15 is written to 4 digits: equal to within half of its last digit.
    assert step_bench.step_flops(full.model, 2, 32_768) == pytest.approx(4.745e15, abs=0.0005e15)


@pytest.mark.parametrize("argv, flag", [
    (["--ac", "sometimes"], "--ac:"), (["--contenders", "fast"], "--contenders"),
    (["--steps", "0"], "--steps"), (["--ctx", "0"], "--ctx"),
])
def test_bad_input_names_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        step_bench.config_from_args(parse(*argv))


@pytest.mark.parametrize("argv, message", [
    (["--ac", "sometimes"], "--ac: unknown policy"), (["--heads", "3"], "not divisible by --heads 3"),
    (["--vocab", "0"], "--vocab must be positive"), (["--layers", "0"], "--layers must be positive"),
])
def test_errors_name_the_bench_flags_not_trains(argv, message):
    with pytest.raises(ConfigError, match=message) as error:
        step_bench.config_from_args(parse(*argv))
    assert not any(name in str(error.value) for name in step_bench.TRAIN_FLAGS), str(error.value)


def test_a_contender_too_big_for_memory_is_refused_before_building(monkeypatch):
    """The default 8b-32k on a machine with 16 GiB: refused from the memory floor (training/memory_plan.py),
    naming what fits, before any tensor exists."""
    config = step_bench.config_from_args(parse("--preset", "8b-32k", "--contenders", "stock", "ours"))
    monkeypatch.setattr(step_bench, "matmul_tflops", lambda *args: pytest.fail("ran despite the refusal"))
    monkeypatch.setattr(step_bench, "available_bytes", lambda device: 16 * 2**30)
    with pytest.raises(ConfigError, match=r"^--contenders stock \(8.13 B parameters.*needs at least .* GiB.*"
                                          r"16 GiB available; --layers \d+ fits; or --ac full"):
        step_bench.run(config)
    step_bench.check_memory(config, available=2**40)  # a terabyte: both fit
    with pytest.raises(ConfigError, match="--contenders ours .* leave ours out of --contenders"):
        step_bench.check_memory(config, available=70 * 2**30)  # stock (full) fits, ours (selective) does not


# ---------------------------------------------------------------- per-layer plans


def test_auto_and_budget_contenders_record_their_plan(tmp_path, capsys):
    """ours@auto and ours@budget:GiB measure a block, solve, print the plan line and save it; a budget
    nothing fits becomes a row naming --ac, and the other contenders still run."""
    result = bench(tmp_path, "--no-compile", "--contenders", "ours@auto", "ours@budget:0.0002", "ours@budget:1e-6",
                   "ours-sdpa@auto", "--layers", "2", "--ctx", "16")
    auto, budget, none_fits, sdpa = result["rows"]
    # The table is measured on the contender's own block: its attention, the run's batch and dtype.
    assert auto["ac_plan_detail"]["costs"]["attention"] == "flash"
    assert sdpa["ac_plan_detail"]["costs"]["attention"] == "sdpa"
    assert auto["ac_plan_detail"]["costs"]["shape"] == [2, 16, 64] and auto["ac_plan_detail"]["costs"]["dtype"] == \
        "bfloat16"
    out = capsys.readouterr().out
    for row in (auto, budget):
        assert row["ac_plan"].startswith("ac plan: ") and row["ac_plan"] in out and row["ms_per_step"] > 0
        detail = row["ac_plan_detail"]
        assert sum(detail["counts"].values()) == 2 and detail["kept_bytes"] <= detail["budget_bytes"]
        assert set(detail["costs"]["policies"]) >= {"none", "selective", "full"}
    assert auto["ac_plan_detail"]["counts"] == {"none": 2}  # a tiny model in a machine's free memory
    assert budget["ac_plan_detail"]["budget_bytes"] == int(0.0002 * 2**30) and budget["ac_plan_detail"]["budget"] == \
        "given"
    assert none_fits["ms_per_step"] == "no plan" and "--ac budget:1e-06: no plan fits" in none_fits["note"]
    assert "--activation-checkpointing" not in none_fits["note"]
    assert "ac plan: " in (tmp_path / "step.md").read_text()


@pytest.mark.parametrize("policy", ["auto:-1", "budget:0", "budget:x"])
def test_bad_plan_requests_name_ac(policy):
    with pytest.raises(ConfigError, match="--ac "):
        step_bench.config_from_args(parse("--ac", policy))
    with pytest.raises(ConfigError, match="--ac "):
        step_bench.config_from_args(parse("--contenders", f"ours@{policy}"))


# ---------------------------------------------------------------- the leaderboard protocol


def test_leaderboard_protocol_is_refused_on_a_cpu():
    with pytest.raises(ConfigError, match="--protocol leaderboard times with triton.testing.do_bench, which needs "
                                          "CUDA; --device is cpu"):
        step_bench.config_from_args(parse("--protocol", "leaderboard"))
    with pytest.raises(SystemExit):  # the argparse type refuses it, naming the flag
        parse("--leaderboard-rep-ms", "0")


def test_leaderboard_timing_arithmetic():
    """The step is timed by do_bench(step, warmup=10_000, rep=30_000) and its mean is the row's ms per step;
    the wall time runs from process start. A stand-in do_bench (CUDA is what the real one needs)."""
    import time

    from cs336_systems.bench.leaderboard import process_start_time

    config = step_bench.config_from_args(parse("--no-compile", "--contenders", "ours", "--layers", "1", "--ctx", "16"))
    config.protocol = "leaderboard"  # past the CUDA check: the timer below stands in for do_bench
    calls = []

    def do_bench(fn, warmup, rep):
        calls.append((warmup, rep))
        fn()
        return 250.0

    row = step_bench.run_contender("ours", config, flops=1e12, matmul_rate=10.0, do_bench=do_bench)
    assert calls == [(10_000, 30_000)] and row["protocol"] == "leaderboard"
    assert row["ms_per_step"] == 250.0 and row["tflops"] == 1e12 / 0.25 / 1e12 and row["mfu"] == row["tflops"] / 10
    assert 0 < row["wall_s"] <= time.time() - process_start_time()
    assert process_start_time() <= time.time() - row["wall_s"] + 1e-6  # measured from the process's start


def test_leaderboard_flags_reach_do_bench():
    from cs336_systems.bench.leaderboard import leaderboard_ms

    config = step_bench.config_from_args(parse("--leaderboard-warmup-ms", "5", "--leaderboard-rep-ms", "7"))
    seen = {}
    assert leaderboard_ms(lambda: None, config.leaderboard_warmup_ms, config.leaderboard_rep_ms,
                          lambda fn, **kw: seen.update(kw) or 3) == 3.0
    assert seen == {"warmup": 5.0, "rep": 7.0}


def test_empty_compile_cache(monkeypatch):
    """Fresh cache directories for inductor and Triton, the reusing caches off; restored after the test."""
    import os

    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from cs336_systems.bench.leaderboard import empty_compile_cache

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                 "TORCHINDUCTOR_AUTOGRAD_CACHE", "TORCHINDUCTOR_AUTOTUNE_LOCAL_CACHE",
                 "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE", "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE"):
        monkeypatch.setenv(name, "restored after the test")
    previous = inductor_config.fx_graph_cache
    inductor = ("fx_graph_cache", "fx_graph_remote_cache", "autotune_local_cache", "autotune_remote_cache",
                "bundled_autotune_remote_cache")
    functorch = ("enable_autograd_cache", "enable_remote_autograd_cache")
    # The configs' own patch contexts restore them (monkeypatch's undo deletes a config entry).
    with inductor_config.patch({name: getattr(inductor_config, name) for name in inductor}), \
            functorch_config.patch({name: getattr(functorch_config, name) for name in functorch}):
        path = empty_compile_cache()
        assert os.path.isdir(path) and not os.listdir(path)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == path and os.environ["TRITON_CACHE_DIR"].startswith(path)
        assert not (inductor_config.fx_graph_cache or inductor_config.autotune_local_cache
                    or functorch_config.enable_autograd_cache)
        assert empty_compile_cache() != path  # a fresh one each call
    assert inductor_config.fx_graph_cache == previous


def test_stock_ratio_only_with_stock():
    rows = [{"contender": "ours", "ms_per_step": 50.0}, {"contender": "stock", "ms_per_step": 100.0},
            {"contender": "ours@full", "ms_per_step": "OOM"}]
    ratio = step_bench.with_stock_ratio(rows)
    assert [row.get("speedup_vs_stock") for row in ratio] == [2.0, 1.0, None]
    assert "speedup_vs_stock = stock's ms per step / the row's" in step_bench.together_note(ratio)
    alone = step_bench.with_stock_ratio(rows[:1])
    assert "speedup_vs_stock" not in alone[0] and "Stock did not run" in step_bench.together_note(alone)
    oom_stock = [{"contender": "stock", "ms_per_step": "OOM"}, rows[0]]
    assert all("speedup_vs_stock" not in row for row in step_bench.with_stock_ratio(oom_stock))


@pytest.mark.cuda
def test_cuda_leaderboard_protocol(tmp_path):
    """The whole command in a fresh process, as the leaderboard runs it (do_bench shortened): the plan
    contender and stock side by side, the wall time from process start, the compile cache a new directory."""
    import os
    import subprocess
    import sys

    # A plan from a given budget: the free memory `auto` reads depends on whatever else shares the card.
    argv = ["--preset", "tiny-step", "--device", "cuda", "--contenders", "ours@budget:1", "stock", "--protocol",
            "leaderboard", "--leaderboard-warmup-ms", "50", "--leaderboard-rep-ms", "100", "--matmul-size", "1024",
            "--out-dir", str(tmp_path)]
    started = time.time()
    subprocess.run([sys.executable, "-m", "cs336_systems", "bench", "step", *argv], check=True,
                   env={**os.environ, "PYTHONPATH": os.getcwd()})
    result = json.loads((tmp_path / "step.json").read_text())
    ours, stock = result["rows"]
    assert ours["ac_plan"].startswith("ac plan: ") and stock["speedup_vs_stock"] == 1.0
    assert 0 < ours["wall_s"] < stock["wall_s"] < time.time() - started
    meta = result["meta"]
    assert meta["protocol"] == "leaderboard" and meta["do_bench_rep_ms"] == 100
    assert "leaderboard-cache" in meta["compile_cache"] and not os.path.exists(meta["compile_cache"])


def test_optimizer_in_backward_contender_takes_the_same_steps(tmp_path):
    """`ours+inbwd` updates inside backward: its losses over the steps are those of `ours` (bit for bit on
    a CPU: the same per-element AdamW arithmetic), and its row names the option."""
    result = bench(tmp_path, "--no-compile", "--layers", "2", "--ctx", "16", "--contenders", "ours@none",
                   "ours+inbwd@none", "--steps", "2", "--warmup", "1")
    plain, in_backward = result["rows"]
    assert in_backward["contender"] == "ours+inbwd@none" and in_backward["ac"] == "none"
    assert in_backward["first_loss"] == plain["first_loss"]


@pytest.mark.parametrize("name", ["stock+inbwd", "ours+fast", "ours-sdpa+inbwd+x@full"])
def test_unknown_or_misplaced_options_are_refused(name):
    with pytest.raises(ConfigError, match="--contenders"):
        step_bench.config_from_args(parse("--contenders", name))


def test_in_backward_floor_counts_one_parameter_of_gradients():
    from cs336_systems.training.memory_plan import estimate

    model = ModelConfig(preset="tiny", vocab_size=64, context_length=16)
    kwargs = dict(tokens=32, param_bytes=2, activation_bytes=2, policy="full")
    plain = estimate(model.shape, 64, **kwargs)
    in_backward = estimate(model.shape, 64, **kwargs, optimizer_in_backward=True)
    shape = model.shape
    assert plain.gradients == plain.parameters
    assert in_backward.gradients == max(64, shape.d_ff, shape.d_model) * shape.d_model * 2
    assert in_backward.per_process < plain.per_process or plain.activations >= plain.gradients
