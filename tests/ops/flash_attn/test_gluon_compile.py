"""The Gluon kernels compile for sm_90 ahead of time, on a machine without a GPU.

triton.compile takes the kernel's Gluon source, a signature (the host descriptors' types, as a launch
specialises them) and an explicit GPUTarget; ptxas ships inside the triton wheel, so this runs the
whole pipeline down to a cubin. The assertions pin what makes the kernel a Hopper kernel: wgmma,
TMA copies completing on mbarriers, setmaxnreg for the warp-specialised partitions, no spills
(for the backward through ptxas -v, which sees the spills the PTX does not show).
"""

import os
import re
import subprocess
import tempfile

import pytest
import torch

from ops.flash_attn.gluon import TESTED_TRITON, gluon_available

pytestmark = pytest.mark.skipif(not gluon_available(), reason=f"Gluon kernels need triton {TESTED_TRITON}.x")


@pytest.fixture(scope="module")
def launch():
    from ops.flash_attn.gluon import launch

    return launch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_forward_compiles_for_sm90(launch, head_dim, causal, dtype):
    assert_hopper_forward(launch, launch.compile_forward(head_dim, causal, dtype), head_dim)


# The grouped-query (GQA) variant: G query heads per K/V head (any G > 1 is the same code, a different constant).
@pytest.mark.parametrize("group", [4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_forward_gqa_compiles_for_sm90(launch, head_dim, causal, group):
    assert_hopper_forward(launch, launch.compile_forward(head_dim, causal, group=group), head_dim)


# Packed documents (HAS_DOCS) with GQA: per-row key ranges read from global memory (GROUP = 1 differs only in
# the constant: compiled on the GPU by the CUDA tests).
@pytest.mark.parametrize("group", [4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_forward_documents_compile_for_sm90_without_spills(launch, head_dim, causal, group):
    compiled = launch.compile_forward(head_dim, causal, group=group, documents=True)
    assert_hopper_forward(launch, compiled, head_dim)
    ptx = compiled.asm["ptx"]
    assert "ld.global" in ptx  # the document bounds
    assert _ptxas_spills(ptx).startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")


def assert_hopper_forward(launch, compiled, head_dim):
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    assert ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx and "wgmma.wait_group" in ptx
    assert "cp.async.bulk.tensor" in ptx  # TMA loads and the O store
    assert "mbarrier.try_wait" in ptx
    # The load warpgroup gives registers up, the consumer warpgroups take them.
    assert "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{launch.CONSUMER_REGS}" in ptx
    assert not re.search(r"\b(ld|st)\.local\b", ptx), "register spills"
    assert isinstance(cubin, bytes) and len(cubin) > 0
    tiles = launch.FORWARD_TILES[head_dim]
    stage_bytes = 2 * tiles.block_n * head_dim * 2  # one K and one V tile, 16-bit
    assert compiled.metadata.shared >= tiles.num_stages * stage_bytes
    assert compiled.metadata.shared <= 227 * 1024  # sm_90's shared memory per block


def _ptxas_spills(ptx: str) -> str:
    """ptxas -v's spill line for this PTX on sm_90a (ptxas ships inside the triton wheel)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", os.devnull], capture_output=True,
                             text=True, check=True)
    return next(line.strip() for line in run.stderr.splitlines() if "spill" in line)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_compiles_for_sm90_without_spills(head_dim, causal, dtype):
    from ops.flash_attn.gluon import launch_bwd

    assert_hopper_backward(launch_bwd.compile_backward(head_dim, causal, dtype))


# GQA (one CTA walks the G query heads of its K/V head) and packed documents (HAS_DOCS), apart and together.
@pytest.mark.parametrize("group, documents", [(4, False), (4, True)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_gqa_and_documents_compile_for_sm90_without_spills(head_dim, causal, group, documents):
    from ops.flash_attn.gluon import launch_bwd

    compiled = launch_bwd.compile_backward(head_dim, causal, group=group, documents=documents)
    assert_hopper_backward(compiled)
    assert ("ld.global" in compiled.asm["ptx"]) == documents  # the document bounds, read only with documents


def assert_hopper_backward(compiled):
    ptx = compiled.asm["ptx"]
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx
    assert "cp.reduce.async.bulk.tensor" in ptx and ".add." in ptx  # dQ tiles by bulk reductions
    assert "cp.async.bulk.tensor" in ptx and "mbarrier.try_wait" in ptx  # the TMA ring
    assert _ptxas_spills(ptx).startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
    assert compiled.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_dq_swizzle_variant_compiles_without_spills(head_dim):
    import dataclasses

    from ops.flash_attn.gluon import launch_bwd

    tiles = dataclasses.replace(launch_bwd.BACKWARD_TILES[head_dim], dq_swizzle=32)
    compiled = launch_bwd.compile_backward(head_dim, True, torch.bfloat16, tiles)
    assert "swizzlingByteWidth = 32, transposed = false, elementBitWidth = 32" in compiled.asm["ttgir"]
    assert _ptxas_spills(compiled.asm["ptx"]).startswith("0 bytes stack frame, 0 bytes spill stores")
