"""The warp-specialised Gluon backward (gluon/kernels_bwd_ws.py): it compiles for sm_90 on any machine,
and on an sm_90 GPU its gradients match float64 as the one-pass Gluon backward's do.

The kernel's partitions wait on mbarriers: a wrong phase deadlocks instead of failing, so each CUDA
case runs in a child process under a time limit (`_isolated`): a hang fails that case alone.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flash_helpers import assert_close_to_reference, make_inputs
from test_gluon_compile import _ptxas_spills

from ops.flash_attn.gluon import TESTED_TRITON, gluon_available

pytestmark = pytest.mark.skipif(not gluon_available(), reason=f"Gluon kernels need triton {TESTED_TRITON}.x")


@pytest.mark.parametrize("group, documents", [(1, False), (4, False), (4, True)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_compiles_for_sm90(head_dim, causal, group, documents):
    """wgmma, the TMA ring on mbarriers, the dQ halves by bulk reductions, and setmaxnreg giving the load
    warp's registers to the two MMA warpgroups. At D = 64 without spills; at D = 128 ptxas spills a few
    registers (76-88 bytes, the MMA warpgroups hold dK and dV, 128 registers a thread, at a 240 cap)."""
    from ops.flash_attn.gluon import launch_bwd_ws

    compiled = launch_bwd_ws.compile_backward_ws(head_dim, causal, group=group, documents=documents)
    ptx = compiled.asm["ptx"]
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "mbarrier.try_wait" in ptx
    assert "cp.reduce.async.bulk.tensor" in ptx and "cp.async.bulk.tensor" in ptx
    assert "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{launch_bwd_ws.MMA_REGS}" in ptx
    assert ("ld.global" in ptx) == documents  # the document bounds, read only with documents
    if head_dim == 64:
        assert _ptxas_spills(ptx).startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
    assert compiled.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("documents", [False, True], ids=["gqa", "gqa+documents"])
def test_heads_first_compiles_with_the_same_resources(documents):
    """The (heads, key tiles) launch order changes which grid index names what: the same shared memory
    as the default order (ptxas may allocate registers a little differently: its spills are not compared)."""
    from ops.flash_attn.gluon import launch_bwd_ws

    default, heads_first = (launch_bwd_ws.compile_backward_ws(128, True, group=4, documents=documents,
                                                              heads_first=first) for first in (False, True))
    assert heads_first.metadata.shared == default.metadata.shared
    assert heads_first.asm["ptx"] != default.asm["ptx"]


cuda = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                          reason="needs an sm_90 GPU")


def _case(lead, n_q, n_k, head_dim, causal, gen, kv_heads=None, ids=None, heads_first=False):
    """(O, dQ, dK, dV) with the warp-specialised backward, and what the float64 oracle needs."""
    from ops.flash_attn.dispatch import attention_forward
    from ops.flash_attn.documents import document_bounds
    from ops.flash_attn.gluon.launch_bwd_ws import flash_backward_gluon_ws

    q, k, v = (x.detach() for x in make_inputs(lead, n_q, n_k, head_dim, torch.bfloat16, "cuda", gen,
                                               kv_heads=kv_heads))
    grad_out = torch.randn(q.shape, generator=gen).to("cuda", torch.bfloat16)
    scale = head_dim ** -0.5
    out, lse = attention_forward(q, k, v, causal, scale, ids)
    bounds = None if ids is None else document_bounds(ids, q.shape[:-1])
    grads = flash_backward_gluon_ws(grad_out, q, k, v, out, lse, causal, scale, bounds, heads_first=heads_first)
    assert all(g.shape == x.shape and g.dtype == x.dtype for g, x in zip(grads, (q, k, v)))
    return (out, *grads), (q, k, v, causal, grad_out)


def check_matches_float64(lead, n_q, n_k, head_dim, causal, heads_first=False):
    ours, inputs = _case(lead, n_q, n_k, head_dim, causal, torch.Generator().manual_seed(7), heads_first=heads_first)
    assert_close_to_reference(ours, *inputs)


def check_grouped_heads_and_documents(causal, documents, heads_first=False):
    gen = torch.Generator().manual_seed(7)
    ids = None
    if documents:  # documents of 1 to ~300 tokens, the same split for every head
        starts = torch.rand(2, 777, generator=gen) < 1 / 150
        ids = starts.cumsum(-1).to("cuda")[:, None, :]  # (B, 1, N)
    ours, inputs = _case((2, 8), 777, 777, 128, causal, gen, kv_heads=2, ids=ids, heads_first=heads_first)
    assert_close_to_reference(ours, *inputs, document_ids=ids)


HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
# A child compiles the tl forward and the warp-specialised backward (tens of seconds) and runs a few
# small float64 references; a kernel that waits on an mbarrier phase that never comes never returns.
CHILD_SECONDS = 300


def _isolated(check: str, *args) -> None:
    """Run `check(*args)` of this module in a child process under a time limit, so that a deadlocked
    kernel fails its test instead of hanging the whole run."""
    code = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); import test_gluon_ws_backward as t; "
            "getattr(t, sys.argv[2])(*json.loads(sys.argv[3]))")
    paths = [str(HERE), str(HERE.parents[1]), str(ROOT)]  # flash_helpers, numerics (tests/), ops
    try:
        run = subprocess.run([sys.executable, "-c", code, json.dumps(paths), check, json.dumps(args)],
                             capture_output=True, text=True, timeout=CHILD_SECONDS, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{check}{args}: no result in {CHILD_SECONDS} s (a deadlocked kernel?)")
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", [((2, 3), 200, 333), ((1,), 1030, 1030), ((2,), 77, 1030), ((1,), 1030, 77),
                                   ((3,), 1, 129)], ids=str)
def test_matches_float64(shape, head_dim, causal):
    _isolated("check_matches_float64", *shape, head_dim, causal)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("heads_first", [False, True], ids=["tiles-first", "heads-first"])
@pytest.mark.parametrize("documents", [False, True], ids=["gqa", "gqa+documents"])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_heads_and_documents_match_float64(causal, documents, heads_first):
    """With GQA and documents, and in both launch orders of the CTAs (kernels_bwd_ws._cta)."""
    _isolated("check_grouped_heads_and_documents", causal, documents, heads_first)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("causal", [False, True])
def test_heads_first_launch_order_matches_float64(causal):
    """The (heads, key tiles) grid at odd lengths, Nq != Nk, several heads and a batch."""
    _isolated("check_matches_float64", (2, 3), 200, 333, 128, causal, True)
