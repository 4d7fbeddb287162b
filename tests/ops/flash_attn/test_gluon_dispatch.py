"""When the forward runs the Gluon kernel, checked on CPU with stand-ins for CUDA tensors and devices.

The rule (ops/flash_attn/gluon/__init__.py): sm_90 exactly, bf16/fp16, head dim 64 or 128, TMA-aligned
views, non-empty, CS336_GLUON not 0, and the Triton minor version the kernels were tested with;
with another Triton it warns once and the tl kernels run.
"""

import pytest
import torch
from gluon_stand_ins import fake_cuda, pretend_hopper, qkv

import ops.flash_attn.dispatch as dispatch
import ops.flash_attn.gluon as gluon


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    monkeypatch.delenv("CS336_GLUON", raising=False)
    gluon.gluon_enabled.cache_clear()
    gluon.gluon_available.cache_clear()
    yield
    gluon.gluon_enabled.cache_clear()
    gluon.gluon_available.cache_clear()


@pytest.fixture
def hopper(monkeypatch):
    return pretend_hopper(monkeypatch)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gluon_on_hopper_for_16_bit_d64_d128(hopper, d, dtype):
    assert gluon.use_gluon_forward(*qkv(d=d, dtype=dtype))


@pytest.mark.parametrize("case", [dict(dtype=torch.float32), dict(d=32), dict(d=80), dict(d=256),
                                  dict(aligned=False), dict(numel=0)], ids=str)
def test_tl_kernels_for_other_inputs(hopper, case):
    assert not gluon.use_gluon_forward(*qkv(**case))


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 1), (10, 0), (12, 0)])
def test_only_sm90(hopper, capability):
    hopper["value"] = capability
    assert not gluon.use_gluon_forward(*qkv())


def test_small_problems_stay_on_tl(hopper):
    # 2 * 8 * 2048 * 2048 * 64 = 2**32 and 2 * 2 * 8192**2 * 64 = 2**34: host time decides there.
    assert not gluon.use_gluon_forward(*qkv(n=2048))
    below = fake_cuda(n=8192, heads=2)
    assert not gluon.use_gluon_forward(below, below, below)
    big_enough = fake_cuda(n=8192, heads=4)  # 2 * 4 * 8192**2 * 64 = 2**35
    assert gluon.use_gluon_forward(big_enough, big_enough, big_enough)


def test_mixed_head_dims_or_dtypes_stay_on_tl(hopper):
    q = fake_cuda()
    assert not gluon.use_gluon_forward(q, fake_cuda(d=128), fake_cuda(d=128))
    assert not gluon.use_gluon_forward(fake_cuda(d=128), q, q)
    assert not gluon.use_gluon_forward(q, fake_cuda(dtype=torch.float16), q)


@pytest.mark.parametrize("kv_heads", [8, 4, 2, 1])
def test_gqa_forward_takes_gluon_when_kv_heads_divide(hopper, kv_heads):
    q, kv = fake_cuda(heads=8), fake_cuda(heads=kv_heads)
    assert gluon.use_gluon_forward(q, kv, kv)


@pytest.mark.parametrize("case", [dict(heads=3), dict(heads=16), dict(heads=2, batch=1)], ids=str)
def test_gqa_forward_stays_on_tl_when_heads_do_not_group(hopper, case):
    q, kv = fake_cuda(heads=8), fake_cuda(**case)
    assert not gluon.use_gluon_forward(q, kv, kv)
    assert not gluon.use_gluon_forward(q, kv, fake_cuda(heads=8))  # k and v must agree too


def test_documents_forward_needs_as_many_keys_as_queries(hopper):
    q = fake_cuda()
    assert gluon.use_gluon_forward(q, q, q, documents=True)
    assert gluon.use_gluon_forward(q, fake_cuda(heads=2), fake_cuda(heads=2), documents=True)
    longer = fake_cuda(n=16384 + 128)
    assert gluon.use_gluon_forward(q, longer, longer) and not gluon.use_gluon_forward(q, longer, longer, documents=True)


def test_cpu_tensors_never_take_gluon():
    x = torch.randn(1, 2, 128, 64, dtype=torch.bfloat16)
    assert not gluon.use_gluon_forward(x, x, x)


def test_env_switch_turns_gluon_off(hopper, monkeypatch):
    monkeypatch.setenv("CS336_GLUON", "0")
    assert not gluon.use_gluon_forward(*qkv())
    monkeypatch.setenv("CS336_GLUON", "1")
    gluon.gluon_enabled.cache_clear()
    assert gluon.use_gluon_forward(*qkv())


def test_other_triton_warns_once_and_falls_back(hopper, monkeypatch):
    monkeypatch.setattr(gluon.triton, "__version__", "3.7.1")
    with pytest.warns(RuntimeWarning, match="tested with triton 3.6") as record:
        assert not gluon.use_gluon_forward(*qkv())
        assert not gluon.use_gluon_forward(*qkv(d=128))
    assert len([w for w in record if "Gluon" in str(w.message)]) == 1


def test_disabled_path_never_checks_the_version(hopper, monkeypatch, recwarn):
    monkeypatch.setattr(gluon.triton, "__version__", "3.7.1")
    monkeypatch.setenv("CS336_GLUON", "0")
    assert not gluon.use_gluon_forward(*qkv())
    assert not [w for w in recwarn if "Gluon" in str(w.message)]


def test_gluon_backward_at_head_dims_64_and_128(hopper):
    assert gluon.use_gluon_backward(*qkv(d=128))
    assert gluon.use_gluon_backward(*qkv(d=128, dtype=torch.float16))
    assert gluon.use_gluon_backward(*qkv(d=64))  # the warp-specialised kernel beat the tl one-pass there
    with gluon.gluon_mode("off"):
        assert not gluon.use_gluon_backward(*qkv(d=64))


@pytest.mark.parametrize("case", [dict(n=2048, d=128), dict(d=128, dtype=torch.float32), dict(d=128, aligned=False),
                                  dict(n=16384, d=128, batch=1, heads=1)], ids=str)
def test_gluon_backward_follows_the_forward_rule_and_needs_rows(hopper, case):
    # The last case passes the forward's rule (2**35) but has one head: the tl small-grid tiles won.
    assert not gluon.use_gluon_backward(*qkv(**case))


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
def test_gqa_and_documents_backward_take_gluon(hopper, kv_heads):
    q, kv = fake_cuda(d=128), fake_cuda(d=128, heads=kv_heads)
    assert gluon.use_gluon_backward(q, kv, kv)
    assert gluon.use_gluon_backward(q, kv, kv, documents=True)
    assert not gluon.use_gluon_backward(q, fake_cuda(d=128, heads=3), fake_cuda(d=128, heads=3))
    longer = fake_cuda(d=128, n=16384 + 128, heads=kv_heads)
    assert not gluon.use_gluon_backward(q, longer, longer, documents=True)  # documents need Nq == Nk


def test_gqa_backward_grid_counts_kv_heads(hopper):
    # One batch, 8 query heads of 16384 rows: 8 x 16384 rows of CTAs without GQA; with one K/V head the
    # backward launches one head's worth (16384 rows), where the small-grid tl tiles won.
    q = fake_cuda(d=128, batch=1, heads=8)
    assert gluon.use_gluon_backward(q, q, q)
    kv = fake_cuda(d=128, batch=1, heads=1)
    assert gluon.use_gluon_forward(q, kv, kv) and not gluon.use_gluon_backward(q, kv, kv)


def test_deterministic_mode_keeps_the_tl_backward(hopper):
    torch.use_deterministic_algorithms(True)
    try:
        assert not gluon.use_gluon_backward(*qkv(d=128))
    finally:
        torch.use_deterministic_algorithms(False)
    assert gluon.use_gluon_backward(*qkv(d=128))


# (dispatch function, its Gluon rule, the other fast rule turned off, Gluon module and launcher, tl launcher)
ROUTES = {
    "forward": ("attention_forward", "use_gluon_forward", "use_tma_forward", "ops.flash_attn.gluon.launch",
                "flash_forward_gluon", "flash_forward"),
    "backward": ("attention_backward", "use_gluon_backward", "use_onepass_backward",
                 "ops.flash_attn.gluon.launch_bwd_ws", "flash_backward_gluon_ws", "flash_backward"),
}


@pytest.mark.parametrize("use_gluon", [True, False])
@pytest.mark.parametrize("direction", list(ROUTES))
def test_dispatch_routes_by_the_rule(monkeypatch, direction, use_gluon):
    entry, rule, other_rule, module, gluon_fn, tl_fn = ROUTES[direction]
    launcher = pytest.importorskip(module)
    calls = []
    monkeypatch.setattr(dispatch, rule, lambda q, k, v, *args, **kwargs: use_gluon)
    monkeypatch.setattr(dispatch, other_rule, lambda q, k, v, *args, **kwargs: False)
    monkeypatch.setattr(launcher, gluon_fn, lambda *args, **kwargs: calls.append("gluon") or "gluon")
    monkeypatch.setattr(dispatch, tl_fn, lambda *args, **kwargs: calls.append("tl") or "tl")
    x = torch.zeros(1, 16, 64)
    args = (x, x, x) if direction == "forward" else (x, x, x, x, x, x[..., 0])  # (q, k, v) / (dO, q, k, v, O, L)
    assert getattr(dispatch, entry)(*args, True, 0.125) == ("gluon" if use_gluon else "tl")
    assert calls == ["gluon" if use_gluon else "tl"]


# What the Gluon launchers hand their 4-D descriptors (CPU tensors: only shapes, strides and storage).
LAYOUTS = {
    "contiguous (B, H, N, D)": lambda: torch.zeros(2, 3, 40, 64),
    "transposed (B, N, H, D)": lambda: torch.zeros(2, 40, 3, 64).transpose(1, 2),
    "(BH, N, D)": lambda: torch.zeros(6, 40, 64),
    "(N, D)": lambda: torch.zeros(40, 64),
    "(A, B, H, N, D), outer dims merge": lambda: torch.zeros(2, 2, 3, 40, 64),
}


@pytest.mark.parametrize("make", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_tma_view_reads_the_usual_layouts_in_place(make):
    launch = pytest.importorskip("ops.flash_attn.gluon.launch")
    x = make()
    x4 = launch.tma_view(x)
    assert x4.dim() == 4 and x4.shape[-2:] == x.shape[-2:] and x4.shape[:2].numel() == x.shape[:-2].numel()
    assert x4.data_ptr() == x.data_ptr() and torch.equal(x4.reshape(x.shape), x)  # a view: no copy
    out, out4 = launch.output_like(x)
    assert out.stride() == torch.empty_like(x).stride() and out4.data_ptr() == out.data_ptr()


def test_tma_view_copies_what_tma_cannot_address():
    launch = pytest.importorskip("ops.flash_attn.gluon.launch")
    zero_strides = torch.ones(()).expand(2, 3, 40, 64)  # the gradient of .sum()
    x4 = launch.tma_view(zero_strides)
    assert x4.is_contiguous() and torch.equal(x4, zero_strides)
    padded = torch.zeros(2, 40, 3, 65)[..., :64].transpose(1, 2)  # rows 65 elements apart: not 16-byte aligned
    assert launch.tma_view(padded).is_contiguous()
    out, _ = launch.output_like(padded)  # empty_like makes it dense (permuted), which TMA takes
    assert out.stride() == torch.empty_like(padded).stride()
    column_major = torch.zeros(2, 3, 64, 40).transpose(-1, -2)  # D not the innermost dim
    out, out4 = launch.output_like(column_major)  # empty_like keeps that order: TMA cannot, so contiguous
    assert out.is_contiguous() and out4.data_ptr() == out.data_ptr()


def test_forward_launcher_refuses_bounds_it_cannot_read():
    launch = pytest.importorskip("ops.flash_attn.gluon.launch")
    q = torch.zeros(2, 4, 40, 64)  # (B, H, N, D): bounds are (B*H, N)
    good = torch.zeros(8, 40, dtype=torch.int32)
    assert launch.bounds_pointers(None, q) == (None, None)
    assert launch.bounds_pointers((good, good), q) == (good, good)
    for bad in (good.long(), torch.zeros(2, 40, dtype=torch.int32), torch.zeros(40, 8, dtype=torch.int32).t()):
        with pytest.raises(ValueError, match="bounds start"):
            launch.bounds_pointers((bad, good), q)
    with pytest.raises(ValueError, match="bounds end"):
        launch.bounds_pointers((good, good[:, :20]), q)


def test_forward_launcher_groups_query_heads():
    launch = pytest.importorskip("ops.flash_attn.gluon.launch")
    q4 = torch.zeros(2, 8, 40, 64)
    assert [launch.query_group(q4, torch.zeros(2, h, 40, 64)) for h in (8, 2, 1)] == [1, 4, 8]
    for k4 in (torch.zeros(2, 3, 40, 64), torch.zeros(1, 2, 40, 64)):
        with pytest.raises(ValueError, match="k's heads must divide q's"):
            launch.query_group(q4, k4)
