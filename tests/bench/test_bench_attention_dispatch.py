"""`bench attention --dispatch-sweep` on CPU, and the Gluon mode switch it runs on: the modes' effect on the
dispatch rules (with stand-ins for CUDA tensors), the dispatch table's verdicts from stand-in timings,
the flags the sweep fills, and a tiny sweep end to end."""

import json
import math
import threading

import pytest
import torch
from gluon_stand_ins import fake_cuda, pretend_hopper, qkv
from helpers import assert_cli_error

import ops.flash_attn.gluon as gluon
from cs336_systems import cli
from cs336_systems.bench import attention
from cs336_systems.bench import attention_dispatch as sweep

FAST = ["--device", "cpu", "--warmup-ms", "1", "--rep-ms", "3"]


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv("CS336_GLUON", raising=False)
    gluon.gluon_enabled.cache_clear()
    gluon.gluon_available.cache_clear()
    gluon.set_gluon_mode("auto")
    yield
    gluon.set_gluon_mode("auto")  # the mode is process-global: no test leaves another one behind
    gluon.gluon_enabled.cache_clear()
    gluon.gluon_available.cache_clear()


@pytest.fixture
def supported(monkeypatch):
    """Every input passes gluon_forward_supported, so only the mode and the size rules decide."""
    monkeypatch.setattr(gluon, "gluon_forward_supported", lambda q, k, v, documents=False: True)


# Shapes where the automatic rules say no for one reason each (2 x 8 x 16384^2 x 64 = 2**38 is large).
SMALL = dict(n=2048)  # 2 x 8 x 2048^2 x 64 = 2**32 < GLUON_MIN_WORK
D64 = dict(d=64)  # large, but the backward measured slower at head dim 64
FEW_ROWS = dict(d=128, batch=1, heads=1)  # large, but a small grid for the backward


# ------------------------------------------------------------------------------------ the mode switch


def test_auto_is_the_measured_rule(supported):
    assert gluon.get_gluon_mode() == "auto"
    assert gluon.use_gluon_forward(*qkv()) and not gluon.use_gluon_forward(*qkv(**SMALL))
    assert gluon.use_gluon_backward(*qkv(d=128)) and gluon.use_gluon_backward(*qkv(**D64))
    for case in (SMALL, FEW_ROWS):
        assert not gluon.use_gluon_backward(*qkv(**case)), case


def test_off_never_takes_gluon(supported):
    with gluon.gluon_mode("off"):
        for case in ({}, dict(d=128), SMALL, D64, FEW_ROWS):
            assert not gluon.use_gluon_forward(*qkv(**case)) and not gluon.use_gluon_backward(*qkv(**case)), case


def test_force_takes_gluon_wherever_it_runs(supported):
    with gluon.gluon_mode("force"):
        for case in ({}, dict(d=128), SMALL, D64, FEW_ROWS):
            assert gluon.use_gluon_forward(*qkv(**case)) and gluon.use_gluon_backward(*qkv(**case)), case


def test_force_keeps_to_what_the_kernels_support(monkeypatch):
    pretend_hopper(monkeypatch)
    with gluon.gluon_mode("force"):
        assert gluon.use_gluon_forward(*qkv(**SMALL)) and gluon.use_gluon_backward(*qkv(**D64))
        for case in (dict(d=32), dict(dtype=torch.float32), dict(aligned=False)):
            assert not gluon.use_gluon_forward(*qkv(**case)) and not gluon.use_gluon_backward(*qkv(**case)), case
        q, longer = fake_cuda(), fake_cuda(n=16384 + 128)
        assert not gluon.use_gluon_backward(q, longer, longer, documents=True)  # documents need Nq == Nk


def test_env_switch_wins_over_force(monkeypatch):
    pretend_hopper(monkeypatch)
    monkeypatch.setenv("CS336_GLUON", "0")
    with gluon.gluon_mode("force"):
        assert not gluon.use_gluon_forward(*qkv()) and not gluon.use_gluon_backward(*qkv(d=128))


def test_force_never_takes_the_gluon_backward_in_deterministic_mode(supported):
    torch.use_deterministic_algorithms(True)
    try:
        with gluon.gluon_mode("force"):
            assert not gluon.use_gluon_backward(*qkv(d=128)) and not gluon.use_gluon_backward(*qkv(**SMALL))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("bad", ["on", "Auto", "", None])
def test_bad_mode_is_refused_naming_mode(bad):
    with pytest.raises(ValueError, match="mode must be one of auto, off, force"):
        gluon.set_gluon_mode(bad)
    with pytest.raises(ValueError, match="mode"), gluon.gluon_mode(bad):
        pass
    assert gluon.get_gluon_mode() == "auto"


def test_mode_is_process_global_and_restored_after_the_block():
    seen = []
    with gluon.gluon_mode("off"):
        thread = threading.Thread(target=lambda: seen.append(gluon.get_gluon_mode()))
        thread.start()
        thread.join()
        assert gluon.set_gluon_mode("force") == "off"  # the setter returns the mode it replaces
    assert seen == ["off"] and gluon.get_gluon_mode() == "auto"
    with pytest.raises(RuntimeError), gluon.gluon_mode("force"):
        raise RuntimeError
    assert gluon.get_gluon_mode() == "auto"


def test_mode_set_inside_a_compiled_function_holds_after_it():
    """What `ours-compiled` does: dynamo replays the global store at each call, graph and all."""
    def attention_like(x, mode):
        gluon.set_gluon_mode(mode)
        return x + 1

    compiled = torch.compile(attention_like, backend="eager", fullgraph=True)
    for mode in ("force", "off", "force"):
        assert torch.equal(compiled(torch.zeros(3), mode), torch.ones(3)) and gluon.get_gluon_mode() == mode


@pytest.mark.parametrize("impl, mode", [("ours-tl", "off"), ("ours-gluon", "force"), ("ours", "auto")])
def test_our_contenders_set_their_mode_at_each_call(impl, mode):
    q, k, v, grad = attention.make_inputs((1, 2, 24, 16), torch.float32, "cpu")
    fn = attention.IMPLEMENTATIONS[impl](True, tuple(q.shape))
    for previous in ("auto", "off", "force"):  # whatever the contender before it left
        gluon.set_gluon_mode(previous)
        out = fn(q, k, v)
        assert gluon.get_gluon_mode() == mode  # still set when autograd runs the backward
        out.backward(grad)


# ---------------------------------------------------------------------------------- the dispatch table


def test_judge_names_the_faster_kernel_and_whether_the_rule_took_it():
    right = sweep.judge(ours=0.81, tl=1.0, gluon=0.8)
    assert (right["faster"], right["rule_right"]) == ("gluon", True)
    assert right["faster_by"] == pytest.approx(1.25) and right["ours_over_best"] == pytest.approx(0.81 / 0.8)
    wrong = sweep.judge(ours=1.0, tl=1.0, gluon=0.8)
    assert (wrong["faster"], wrong["rule_right"], wrong["ours_over_best"]) == ("gluon", False, pytest.approx(1.25))
    assert sweep.judge(ours=0.5, tl=0.4, gluon=2.0)["faster"] == "tl"


def test_rule_slack_is_the_boundary():
    best = 0.5  # a power of two: best * RULE_SLACK / best is RULE_SLACK exactly
    assert sweep.judge(ours=best * sweep.RULE_SLACK, tl=best, gluon=1.0)["rule_right"]
    assert not sweep.judge(ours=best * sweep.RULE_SLACK * 1.001, tl=best, gluon=1.0)["rule_right"]


def test_judge_with_missing_times():
    only_tl = sweep.judge(ours=1.1, tl=1.0, gluon=None)  # ours-gluon failed: judged against tl alone
    assert only_tl["faster"] is None and only_tl["ours_over_best"] == pytest.approx(1.1) and not only_tl["rule_right"]
    assert sweep.judge(ours=None, tl=1.0, gluon=0.9)["rule_right"] is None


def _row(impl, ms, pass_name="forward", n=512, heads=4, causal=True):
    ok = ms is not None
    return dict(impl=impl, dtype="bfloat16", shape=f"1x{heads}x{n}x64", seq_len=n, head_dim=64, causal=causal,
                **{"pass": pass_name}, ms=ms, status="ok" if ok else "unsupported")


def _stand_in_rows():
    # Shape A (causal, BH 4, N 512): Gluon faster, ours took it; cuDNN failed.
    # Shape B (non-causal, BH 16, N 1024): tl faster, ours 1.5x slower than tl; cuDNN 2 ms.
    return [_row("ours", 0.8), _row("ours-tl", 1.0), _row("ours-gluon", 0.8), _row("sdpa-cudnn", None),
            *(_row(impl, ms, n=1024, heads=16, causal=False) for impl, ms in
              (("sdpa-cudnn", 2.0), ("ours", 3.0), ("ours-tl", 2.0), ("ours-gluon", 4.0)))]


def test_dispatch_table_has_one_row_per_shape_and_pass():
    table = sweep.dispatch_table(_stand_in_rows())
    assert [(r["causal"], r["batch_heads"], r["seq_len"]) for r in table] == [(True, 4, 512), (False, 16, 1024)]
    a, b = table
    assert (a["ours_ms"], a["tl_ms"], a["gluon_ms"], a["cudnn_ms"]) == (0.8, 1.0, 0.8, None)
    assert (a["faster"], a["rule_right"], a["ours_over_cudnn"]) == ("gluon", True, None)
    assert (b["faster"], b["faster_by"], b["rule_right"], b["ours_over_best"], b["ours_over_cudnn"]) == (
        "tl", 2.0, False, 1.5, 1.5)


def test_summary_counts_where_the_rule_is_off_and_the_worst_loss():
    stats = sweep.summary(sweep.dispatch_table(_stand_in_rows()))
    assert (stats["judged"], stats["rule_off"], stats["rule_off_by_pass"]) == (2, 1, {"forward": 1})
    assert stats["worst"] == dict(dtype="bfloat16", causal=False, head_dim=64, batch_heads=16, seq_len=1024,
                                  **{"pass": "forward"}, ours_over_best=1.5)
    assert (stats["slower_than_cudnn"], stats["with_cudnn"]) == (1, 1)
    assert "1 of 2" in sweep.summary_markdown(stats) and "1.500 x the faster kernel" in sweep.summary_markdown(stats)


# ---------------------------------------------------------------------------------------- flags


def _parsed(*argv: str):
    return attention.fill_shape(cli.build_parser().parse_args(["bench", "attention", *argv]))


def test_dispatch_sweep_fills_its_shapes():
    args = _parsed("--dispatch-sweep", "--device", "cpu")
    assert (args.impls, args.dtypes, args.head_dims, args.batch_heads, args.causals, args.rep_ms) == (
        ["ours", "ours-tl", "ours-gluon", "sdpa-cudnn"], ["bf16"], [64, 128], [1, 4, 16, 64], [True, False], 50.0)
    assert args.seq_lens == [512, 1024, 2048, 4096, 8192, 16384, 32768] and args.passes == list(attention.PASSES)
    assert len(attention.sweep_points(args)) == 2 * 2 * 4 * 7  # causal x D x BH x N
    assert attention.sweep_points(args)[0] == ("bf16", (1, 1, 512, 64), True)
    on_cuda = _parsed("--dispatch-sweep", "--device", "cuda")
    assert attention.planned_timings(on_cuda) == 4 * 112 * 3  # impls x shapes x passes


def test_explicit_flags_win_over_the_sweeps_values():
    args = _parsed("--dispatch-sweep", "--device", "cpu", "--seq-lens", "64", "--no-causal", "--rep-ms", "7",
                   "--batch-heads", "2", "--impls", "ours", "ours-tl", "--dtypes", "fp32", "--head-dims", "16")
    assert (args.impls, args.dtypes, args.seq_lens, args.head_dims, args.batch_heads, args.causals, args.rep_ms) == (
        ["ours", "ours-tl"], ["fp32"], [64], [16], [2], [False], 7.0)
    rows = _parsed("--dispatch-sweep", "--device", "cpu", "--heads", "8")  # --batch/--heads replace --batch-heads
    assert (rows.batch, rows.heads, rows.batch_heads) == (1, 8, None)
    assert attention.sweep_points(rows)[0] == ("bf16", (1, 8, 512, 64), True)


def test_plain_sweep_takes_batch_heads_and_keeps_its_defaults():
    args = _parsed("--device", "cpu", "--batch-heads", "3", "5", "--seq-lens", "32", "--head-dims", "16")
    assert [shape for _, shape, _ in attention.sweep_points(args)] == [(1, 3, 32, 16), (1, 5, 32, 16)]
    plain = _parsed("--device", "cpu")
    assert (plain.causals, plain.batch_heads, plain.rep_ms, plain.impls) == (
        [True], None, 100.0, ["ours", "naive", "sdpa-math", "sdpa-flash"])
    assert "ours-tl" not in _parsed("--device", "cuda").impls  # the dispatch contenders only when asked for


def run(tmp_path, *argv: str) -> int:
    return cli.main(["bench", "attention", *FAST, *argv, "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("argv, flag", [
    (["--dispatch-sweep", "--leaderboard"], "--dispatch-sweep"),
    (["--dispatch-sweep", "--kv-heads", "1"], "--dispatch-sweep"),
    (["--dispatch-sweep", "--preset", "8b"], "--dispatch-sweep"),
    (["--batch-heads", "2", "--heads", "4"], "--batch-heads"),
    (["--batch-heads", "0"], "--batch-heads"),
    (["--batch-heads", "2", "--kv-heads", "1"], "--batch-heads"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, argv, flag):
    assert run(tmp_path, *argv) == 2
    assert_cli_error(capsys, flag)


def test_the_whole_sweep_is_refused_on_a_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(attention, "make_inputs", lambda *args: pytest.fail("ran despite the refusal"))
    assert run(tmp_path, "--dispatch-sweep") == 2
    assert_cli_error(capsys, "--batch-heads 1 4 16 64", "--max-minutes 10")


# ---------------------------------------------------------------------------------------- end to end


def test_tiny_dispatch_sweep_writes_the_table_and_plot(tmp_path):
    assert run(tmp_path, "--dispatch-sweep", "--seq-lens", "24", "--head-dims", "16", "--batch-heads", "1", "2") == 0
    assert {p.name for p in tmp_path.iterdir()} == {"attention.md", "attention.json", "attention_dispatch.md",
                                                    "attention_dispatch.json", "attention_dispatch.png"}
    timings = json.loads((tmp_path / "attention.json").read_text())["rows"]
    assert len(timings) == 4 * 2 * 2 * 3  # impls x causal x BH x passes
    assert all(r["status"] == ("unsupported" if r["impl"] == "sdpa-cudnn" else "ok") for r in timings)
    result = json.loads((tmp_path / "attention_dispatch.json").read_text())
    table = result["rows"]
    assert len(table) == 2 * 2 * 3 and {(r["causal"], r["batch_heads"]) for r in table} == {
        (True, 1), (True, 2), (False, 1), (False, 2)}
    for row in table:  # on CPU the tl and Gluon contenders both run the op's tiled path; cuDNN needs CUDA
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("ours_ms", "tl_ms", "gluon_ms"))
        assert row["cudnn_ms"] is None and row["ours_over_cudnn"] is None
        assert row["ours_over_best"] == pytest.approx(row["ours_ms"] / min(row["tl_ms"], row["gluon_ms"]))
    summary = result["summary"]
    assert summary["judged"] == 12 and summary["rule_off"] == sum(not r["rule_right"] for r in table)
    assert "## summary" in (tmp_path / "attention_dispatch.md").read_text()
    assert gluon.get_gluon_mode() == "auto"  # the sweep hands back the mode it found


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_modes_route_our_contenders_to_their_kernels_on_sm90(monkeypatch, head_dim):
    """On an sm_90 GPU, at a shape under every Gluon threshold: `ours-tl` and `ours` (the rule) run the tl
    kernels forward and backward, `ours-gluon` the Gluon ones (their numerics: tests/ops/flash_attn)."""
    if torch.cuda.get_device_capability() != gluon.GLUON_CAPABILITY or not gluon.gluon_available():
        pytest.skip("needs an sm_90 GPU and the tested Triton")
    launch = pytest.importorskip("ops.flash_attn.gluon.launch")
    launch_bwd = pytest.importorskip("ops.flash_attn.gluon.launch_bwd_ws")
    calls = []
    for module, name in ((launch, "flash_forward_gluon"), (launch_bwd, "flash_backward_gluon_ws")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    q, k, v, grad = attention.make_inputs((1, 2, 512, head_dim), torch.bfloat16, "cuda")
    gluon_both = ["flash_forward_gluon", "flash_backward_gluon_ws"]
    for impl, expected in (("ours-tl", []), ("ours-gluon", gluon_both), ("ours", [])):  # 2 x 512^2 x D < 2**35
        calls.clear()
        attention.IMPLEMENTATIONS[impl](True, tuple(q.shape))(q, k, v).backward(grad)
        assert calls == expected, impl
