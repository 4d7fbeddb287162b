"""The tensor-descriptor (TMA) forward on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).

Host-side TensorDescriptor arguments run in the interpreter (triton 3.6 and 3.9), which bounds-checks
them like TMA does, so ragged tiles and the per-head 3-D view are exercised here. Tiles are 16x16
unless a test passes its own Blocks. O and L are checked against float64 and against the pointer
forward (launch.flash_forward), which runs the same math.
"""

import pytest
import torch
from flash_helpers import assert_forward_close, make_inputs

from ops.flash_attn import launch_tma
from ops.flash_attn.launch import Blocks, as_bhnd, flash_forward
from ops.flash_attn.launch_tma import flash_forward_tma, tma_supported

# (leading dims, Nq, Nk, D): Nq != Nk both ways, lengths off the 16-row tiles, 0/1/2 leading dims.
SHAPES = [((2,), 37, 37, 16), ((1,), 20, 45, 32), ((), 50, 19, 64), ((1, 2), 33, 17, 16)]
SCALE = 0.3


def _assert_forward_correct(q, k, v, causal, blocks=None):
    out, lse = flash_forward_tma(q, k, v, causal, SCALE, blocks)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]

    assert_forward_close(out, lse, q, k, v, causal, SCALE)

    ptr_out, ptr_lse = flash_forward(q, k, v, causal, SCALE, blocks)
    torch.testing.assert_close(out, ptr_out)
    torch.testing.assert_close(lse, ptr_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_and_pointer_forward(shape, causal, dtype, bf16_interpreter):
    q, k, v = (x.detach() for x in make_inputs(*shape, dtype, "cpu", torch.Generator().manual_seed(5)))
    assert tma_supported(q, k, v)
    _assert_forward_correct(q, k, v, causal)


# Query tiles taller than key tiles (the causal diagonal spans two key tiles) and the reverse (the
# unmasked range ends a key tile before the query tile starts).
@pytest.mark.parametrize("blocks", [Blocks(32, 16, 1, 1), Blocks(16, 32, 1, 1)], ids=["tall_q", "tall_k"])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_tiles(blocks, causal):
    gen = torch.Generator().manual_seed(6)
    q, k, v = (x.detach() for x in make_inputs((2,), 45, 70, 32, torch.float32, "cpu", gen))
    _assert_forward_correct(q, k, v, causal, blocks)


def test_strided_heads():
    """(B, N, H, D) memory seen as (B, H, N, D): the descriptors take the strides, nothing is copied."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, n, 2, 16, generator=gen).transpose(1, 2) for n in (29, 40, 40))  # (1, 2, N, 16)
    assert as_bhnd(q).stride() == (16, 32, 1) and tma_supported(q, k, v)
    _assert_forward_correct(q, k, v, causal=True)


def test_empty_batch():
    q = torch.randn(0, 3, 16)
    out, lse = flash_forward_tma(q, q, q, False, SCALE)
    assert out.shape == q.shape and lse.shape == (0, 3)


def test_tma_supported_rejects(monkeypatch):
    x = torch.randn(2, 24, 32)
    assert tma_supported(x, x, x)
    unaligned = torch.randn(24 * 32 + 1)[1:].view(24, 32)  # base 4 bytes past an aligned address
    row_stride_18 = torch.randn(24, 18, dtype=torch.bfloat16)[:, :16]  # 36-byte rows
    cases = {
        "head dim not a power of two": (torch.randn(2, 24, 40),) * 3,
        "head dim below 16": (torch.randn(2, 24, 8),) * 3,
        "float64": (x.double(),) * 3,
        "mixed dtypes": (x, x.half(), x.half()),
        "last stride not 1": (torch.randn(2, 32, 24).transpose(-1, -2),) * 3,
        "unaligned base": (unaligned,) * 3,
        "unaligned row stride": (row_stride_18,) * 3,
        "empty": (torch.randn(2, 0, 32),) * 3,
    }
    for name, (q, k, v) in cases.items():
        assert not tma_supported(q, k, v), name
    monkeypatch.setattr(launch_tma, "interpreting", lambda: False)  # read once per process otherwise
    assert not tma_supported(x, x, x), "CPU tensors need the interpreter"
