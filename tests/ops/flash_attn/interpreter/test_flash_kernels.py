"""The Triton kernels themselves, on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).

Collected only when that variable is set (tests/conftest.py); tests/test_flash_interpreter.py runs
this folder in a subprocess so the main suite covers it. Tiles are 16x16 here, so these small
shapes still cross tile edges, hit ragged last tiles and the causal diagonal.
"""

import pytest
import torch
from flash_helpers import IMPLEMENTATIONS, assert_close_to_reference, assert_forward_close, make_inputs

from ops.flash_attn import op

SHAPES = [((2,), 37, 37, 16), ((1,), 20, 45, 40), ((), 50, 19, 32), ((1, 2), 33, 33, 64), ((), 24, 40, 200)]


def test_interpreter_path_is_the_triton_one():
    assert op.use_triton(torch.empty(1))


# bfloat16 runs with the bf16_interpreter fixture (conftest.py), which mends the interpreter's bf16 math.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_match_float64(shape, causal, dtype, bf16_interpreter):
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_inputs(*shape, dtype, "cpu", gen)
    grad_out = torch.randn(q.shape, generator=gen).to(dtype)
    assert_close_to_reference(_run(q, k, v, causal, grad_out), q, k, v, causal, grad_out)


def _run(q, k, v, causal, grad_out):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = IMPLEMENTATIONS["op"](q, k, v, causal)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal", [False, True])
def test_any_strides(causal):
    """Contiguous tensors go to the kernels as they are, others as (BH, N, D) views: heads
    interleaved in rows, a sliced head dim, and dO expanded from a scalar (all strides 0)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 21, 2, 24, generator=gen).transpose(1, 2)  # (1, 2, 21, 24), rows of both heads interleaved
    k, v = (torch.randn(1, 2, 35, 32, generator=gen)[..., :24] for _ in range(2))  # row stride 32
    grad_out = torch.tensor(0.7).expand(q.shape)
    assert_close_to_reference(_run(q, k, v, causal, grad_out), q, k, v, causal, grad_out)


def test_logsumexp_from_kernel():
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_inputs((2,), 40, 29, 24, torch.float32, "cpu", gen)
    out, lse = torch.ops.cs336.flash_attn_fwd(q, k, v, True, 0.2)
    assert_forward_close(out, lse, q, k, v, True, 0.2)
