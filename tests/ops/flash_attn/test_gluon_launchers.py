"""The Gluon backward launchers' wiring, on CPU: with the three launches recorded instead of run, each
gets the tensors, grid and compile-time arguments it must (the kernels themselves run only on an sm_90
GPU: test_gluon_cuda.py, test_gluon_ws_backward.py)."""

import pytest
import torch

from ops.flash_attn.gluon import TESTED_TRITON, gluon_available

pytestmark = pytest.mark.skipif(not gluon_available(), reason=f"Gluon kernels need triton {TESTED_TRITON}.x")


class _Recorder:
    """Stands in for a launcher: `launcher[grid](*args, **meta)` appends (name, grid, args, meta)."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((self.name, grid, args, meta))


@pytest.mark.parametrize("documents", [False, True], ids=["plain", "documents"])
@pytest.mark.parametrize("warp_specialized", [False, True], ids=["one-pass", "warp-specialised"])
def test_backward_launches_get_their_tensors(monkeypatch, warp_specialized, documents):
    from ops.flash_attn.documents import document_bounds
    from ops.flash_attn.gluon import launch_bwd, launch_bwd_ws

    calls: list = []
    monkeypatch.setattr(launch_bwd, "preprocess_kernel", _Recorder("preprocess", calls))
    monkeypatch.setattr(launch_bwd, "dq_convert_kernel", _Recorder("convert", calls))
    monkeypatch.setattr(launch_bwd, "_BACKWARD", _Recorder("gluon", calls))
    monkeypatch.setattr(launch_bwd_ws, "_KERNEL", _Recorder("gluon", calls))
    q, grad_out, out = (torch.randn(2, 8, 100, 128, dtype=torch.bfloat16) for _ in range(3))  # (B, Hq, N, D)
    k, v = (torch.randn(2, 2, 100, 128, dtype=torch.bfloat16) for _ in range(2))  # (B, Hkv, N, D): GQA, G = 4
    lse = torch.randn(2, 8, 100)  # (B, Hq, N) float32
    ids = torch.arange(100).div(30, rounding_mode="floor")[None, None]  # (1, 1, N)
    bounds = document_bounds(ids, q.shape[:-1]) if documents else None
    launcher = launch_bwd_ws.flash_backward_gluon_ws if warp_specialized else launch_bwd.flash_backward_gluon
    dq, dk, dv = launcher(grad_out, q, k, v, out, lse, True, 0.125, bounds)

    assert [c[0] for c in calls] == ["preprocess", "gluon", "convert"]
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    dq_acc = calls[0][2][3]  # (BH, Nq, D) float32: zeroed by the preprocess, converted last
    assert dq_acc.shape == (16, 100, 128) and dq_acc.dtype == torch.float32 and calls[2][2][0] is dq_acc
    _, grid, args, meta = calls[1]
    assert grid == (1, 2 * 2)  # one 128-key tile, B * Hkv CTAs
    assert [a.base.data_ptr() for a in args[:6]] == [x.data_ptr() for x in (q, k, v, grad_out, dk, dv)]
    assert args[6].base is dq_acc and args[6].block_shape[-1] == (64 if warp_specialized else 128)
    assert args[7].base.shape == args[8].base.shape == (16, 100)  # L and Delta, (BH, Nq)
    assert (args[9] is None) == (not documents) and (args[10] is None) == (not documents)
    assert args[11:] == (100, 100, 2, pytest.approx(0.125 * 1.4426950408889634), 0.125)
    assert (meta["GROUP"], meta["HAS_DOCS"], meta["IS_CAUSAL"], meta["HEAD_DIM"]) == (4, documents, True, 128)
    options = {"num_warps": 4, "maxnreg": 168} if warp_specialized else {"num_warps": 8}  # 4 + 4 + 1 warps; 8
    assert {name: meta.get(name) for name in options} == options


def test_heads_first_grid_puts_the_heads_first(monkeypatch):
    """The warp-specialised backward's other launch order: grid (K/V heads, key tiles), the kernel told so."""
    from ops.flash_attn.gluon import launch_bwd, launch_bwd_ws

    calls: list = []
    launches = ((launch_bwd, "preprocess_kernel"), (launch_bwd, "dq_convert_kernel"), (launch_bwd_ws, "_KERNEL"))
    for module, name in launches:
        monkeypatch.setattr(module, name, _Recorder(name, calls))
    q, grad_out, out = (torch.randn(2, 8, 300, 64, dtype=torch.bfloat16) for _ in range(3))  # (B, Hq, N, D)
    k, v = (torch.randn(2, 2, 300, 64, dtype=torch.bfloat16) for _ in range(2))  # (B, Hkv, N, D)
    lse = torch.randn(2, 8, 300)
    for heads_first, grid in ((False, (3, 4)), (True, (4, 3))):  # 3 key tiles of 128, B * Hkv = 4
        calls.clear()
        launch_bwd_ws.flash_backward_gluon_ws(grad_out, q, k, v, out, lse, True, 0.125, heads_first=heads_first)
        assert calls[1][1] == grid and calls[1][3]["HEADS_FIRST"] == heads_first
    calls.clear()  # by default the rule decides, and on CPU tensors never launches heads first
    launch_bwd_ws.flash_backward_gluon_ws(grad_out, q, k, v, out, lse, True, 0.125)
    assert calls[1][1] == (3, 4) and calls[1][3]["HEADS_FIRST"] is False


def test_heads_first_rule_picks_short_causal_grids(monkeypatch):
    """Heads first for causal grids of at most HEADS_FIRST_MAX_WAVES CTAs per SM, on CUDA only."""
    from ops.flash_attn.gluon import launch_bwd_ws

    monkeypatch.setattr(launch_bwd_ws, "sm_count", lambda index: 132)
    limit = launch_bwd_ws.HEADS_FIRST_MAX_WAVES * 132
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert launch_bwd_ws.heads_first_rule(True, limit, cuda) and launch_bwd_ws.heads_first_rule(True, 256, cuda)
    assert not launch_bwd_ws.heads_first_rule(True, limit + 1, cuda)
    assert not launch_bwd_ws.heads_first_rule(False, 256, cuda) and not launch_bwd_ws.heads_first_rule(True, 256, cpu)


@pytest.mark.parametrize("make", [lambda: torch.zeros(2, 3, 40, 64, dtype=torch.bfloat16),
                                  lambda: torch.zeros(2, 40, 3, 128, dtype=torch.float16).transpose(1, 2),
                                  lambda: torch.zeros(6, 40, 64)], ids=["contiguous", "transposed", "float32 3-D"])
def test_descriptors_hold_what_the_checked_constructor_would(make):
    """launch.descriptor skips TensorDescriptor's checks: its fields, in order, are the constructor's, and
    the constructor accepts the same arguments (so nothing those checks would refuse is built)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ops.flash_attn.gluon import launch

    x = make()
    fast = launch.descriptor(x, 64, cols=32)
    checked = TensorDescriptor(x, list(x.shape), list(x.stride()), fast.block_shape, fast.layout)
    assert type(fast) is TensorDescriptor and list(vars(fast)) == list(vars(checked))
    assert fast.base is checked.base
    assert all(vars(fast)[name] == vars(checked)[name] for name in vars(fast) if name != "base")


ROWS = {"aligned": lambda: torch.randn(4, 8), "odd width": lambda: torch.randn(4, 7),
        "strided": lambda: torch.randn(4, 9)[:, 1:], "offset": lambda: torch.randn(37)[1:].view(4, 9)}


@pytest.mark.parametrize("make", list(ROWS.values()), ids=list(ROWS))
def test_row_descriptors_are_tma_aligned_with_the_values(make):
    """L and Delta rows: used as they are where TMA takes them, else copied into 16-byte-aligned rows;
    the descriptor shows the logical (BH, Nq) values either way."""
    from ops.flash_attn.gluon.launch_bwd import row_descriptor
    from ops.flash_attn.launch_tma import tma_aligned

    x = make()
    desc = row_descriptor(x, 64)
    assert tma_aligned(desc.base) and desc.shape == list(x.shape) and torch.equal(desc.base, x)
    assert (desc.base.data_ptr() == x.data_ptr()) == tma_aligned(x)
