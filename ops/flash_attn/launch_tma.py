"""Launcher of the tensor-descriptor (TMA) forward, kernels_tma.flash_fwd_tma_kernel, and the
descriptor helpers that the one-pass backward (launch_onepass) shares.

Same contract as launch.flash_forward: a fresh contiguous O in q.dtype and L float32 (..., Nq) (the op
then lays O out like q).
Callers check `tma_supported(q, k, v)` first and fall back to launch.flash_forward when it is False.

The descriptors are host-side (`triton.tools.tensor_descriptor.TensorDescriptor`, kernel arguments),
which triton 3.6 and 3.9 both accept, compiled and under the interpreter. On sm_90+ triton encodes
each into a CUtensorMap at launch; host-side descriptors need no `triton.set_allocator` (only
device-side `tl.make_tensor_descriptor` does, for its global scratch).
"""

from __future__ import annotations

import torch
import triton.language as tl

from ops.flash_attn.kernels import LOG2E
from ops.flash_attn.kernels_tma import flash_fwd_tma_kernel
from ops.flash_attn.launch import as_bhnd, document_arrays, flash_forward, forward_outputs, group_size, launch_grid
from ops.flash_attn.tiles import Blocks, kernel_configs, precision
from ops.triton_utils import device_capability, interpreting
from ops.triton_utils.replay import ReplayLauncher

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4
    TensorDescriptor = None

HAS_TENSOR_DESCRIPTOR = TensorDescriptor is not None and hasattr(tl, "tensor_descriptor")
TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TMA_ALIGN = 16  # bytes: TMA needs the base address and every non-unit stride to be multiples of this
forward_tma_kernel = ReplayLauncher(flash_fwd_tma_kernel)  # see launch.forward_kernel


def tma_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when flash_forward_tma can run these inputs (else use launch.flash_forward)."""
    if not HAS_TENSOR_DESCRIPTOR or not tma_device(q.device):
        return False
    head_dim = q.shape[-1]
    if not (q.dtype == k.dtype == v.dtype and q.dtype in TMA_DTYPES and head_dim == k.shape[-1] == v.shape[-1]):
        return False
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return False  # the tile is exactly D wide: no column masks
    if q.numel() == 0 or k.numel() == 0:
        return False  # a descriptor needs positive extents
    return all(_aligned_after_as_bhnd(x) for x in (q, k, v))


def _aligned_after_as_bhnd(x: torch.Tensor) -> bool:
    """Whether as_bhnd(x) is TMA-aligned, without making the copy as_bhnd makes where the leading
    dims do not merge (a fresh contiguous copy is aligned: 16-bit, D a power of two >= 16)."""
    try:
        return tma_aligned(x.view(-1, x.shape[-2], x.shape[-1]))
    except RuntimeError:  # no (BH, N, D) view: as_bhnd copies
        return True


def tma_device(device: torch.device) -> bool:
    """True where descriptors become TMA copies (sm_90+), or on CPU under the interpreter."""
    if device.type == "cpu":
        return interpreting()
    # Before sm_90 triton lowers descriptors to plain loads: correct, but there is no TMA to test.
    return device.type == "cuda" and device_capability(device.index)[0] >= 9


def tma_aligned(x: torch.Tensor) -> bool:
    """TMA's rules for a tensor it copies: a 16-byte-aligned base, unit last stride, the others 16-byte
    multiples. (A loop, not all() over a generator: launchers call it once per operand.)"""
    strides = x.stride()
    if strides[-1] != 1 or x.data_ptr() % TMA_ALIGN:
        return False
    size = x.element_size()
    for stride in strides[:-1]:
        if stride * size % TMA_ALIGN:
            return False
    return True


def descriptor(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """Descriptor over the (BH, N, D) view x, one (1, block_rows, D) tile per access."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, block_rows, x.shape[-1]])


def flash_forward_tma(q, k, v, is_causal: bool, scale: float, blocks: Blocks | None = None,
                      bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (..., Hq, Nq, D), k/v (..., Hkv, Nk, D) -> O (..., Hq, Nq, D) in q.dtype, L (..., Hq, Nq) float32.

    Requires tma_supported(q, k, v), except that empty inputs go to launch.flash_forward; `blocks`
    overrides the tuned tile shapes (by default those of the pointer forward, launch.kernel_configs);
    `bounds`: packed documents (launch.flash_forward).
    """
    if q.numel() == 0 or k.numel() == 0:
        return flash_forward(q, k, v, is_causal, scale, blocks, bounds)  # descriptors need positive extents
    out, lse = forward_outputs(q)
    q3, k3, v3, o3 = (as_bhnd(t) for t in (q, k, v, out))  # descriptors take (BH, N, D) views
    bh, n_q, head_dim = q3.shape
    blocks = blocks or kernel_configs(head_dim, q.dtype, n_q, bh).forward
    forward_tma_kernel[launch_grid(n_q, blocks.block_m, bh)](
        descriptor(q3, blocks.block_m), descriptor(k3, blocks.block_n),  # (BH, Nq, D), (BHkv, Nk, D)
        descriptor(v3, blocks.block_n), descriptor(o3, blocks.block_m),  # (BHkv, Nk, D), (BH, Nq, D)
        lse, *document_arrays(bounds, lse),  # (..., Nq) float32, contiguous: (BH, Nq); (BH, Nq) int32 x2
        n_q, k3.shape[1], group_size(q, k), scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        IS_CAUSAL=is_causal, PRECISION=precision(q.dtype, head_dim), HAS_DOCS=bounds is not None,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return out, lse
