"""ops.triton_utils.replay: when a launch replays the compiled launcher, and with which arguments.

A fake kernel stands in for Triton's JITFunction here (no GPU in CI); the CUDA tests of the
attention op (tests/test_flash_attention.py) run the real kernels through it.
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ops.triton_utils import replay as triton_replay
from ops.triton_utils.replay import ReplayLauncher

STREAM = 1234


class FakeKernel:
    """Parameters (X, n, scale, BLOCK: constexpr, MODE: constexpr); records what launches how."""

    def __init__(self, compiled=True, constexpr_names=("BLOCK", "MODE")):
        names = ("X", "n", "scale", *constexpr_names)
        self.params = [SimpleNamespace(name=n, is_constexpr=n.isupper()) for n in names]
        self.pre_run_hooks = []
        self.full_launches = []  # (grid, args, meta) of every kernel[grid](...) call
        self.replayed = []  # the arguments the compiled launcher received when replayed
        self.compiled = SimpleNamespace(run=self._replay, function="fn", packed_metadata="meta") if compiled else None

    def __getitem__(self, grid):
        def full(*args, **meta):
            self.full_launches.append((grid, args, meta))
            return self.compiled
        return full

    def _replay(self, *launch_args):
        self.replayed.append(launch_args)


@pytest.fixture(autouse=True)
def fake_device(monkeypatch):
    monkeypatch.setattr(triton_replay, "_device_and_stream", lambda: (0, STREAM))
    monkeypatch.setattr(triton_replay, "ENABLED", True)


def launch(launcher, x, n=64, block=16):
    launcher[(3, 2)](x, n, 0.5, MODE="fast", BLOCK=block, num_warps=4)


def test_environment_switch():
    env = {**os.environ, "CS336_TRITON_REPLAY": "0"}
    code = "import ops.triton_utils.replay as r; print(r.ENABLED)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_second_identical_launch_replays_with_constexprs_in_parameter_order():
    kernel, x = FakeKernel(), torch.zeros(32)
    launcher = ReplayLauncher(kernel)
    launch(launcher, x)
    launch(launcher, x)
    assert len(kernel.full_launches) == 1 and launcher.replays == 1
    # grid padded to 3D, stream, handles, no launch metadata or hooks, then runtime args and constexprs.
    assert kernel.replayed == [(3, 2, 1, STREAM, "fn", "meta", None, None, None, x, 64, 0.5, 16, "fast")]


@pytest.mark.parametrize("change", ["int value", "int as float", "misaligned tensor", "dtype", "constexpr"])
def test_anything_triton_specialises_on_launches_through_triton(change):
    kernel, x = FakeKernel(), torch.zeros(32)
    launcher = ReplayLauncher(kernel)
    launch(launcher, x)
    if change == "int value":
        launch(launcher, x, n=65)
    elif change == "int as float":
        launch(launcher, x, n=64.0)
    elif change == "misaligned tensor":
        launch(launcher, x[1:])  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        launch(launcher, x.double())
    else:
        launch(launcher, x, block=32)
    assert len(kernel.full_launches) == 2 and launcher.replays == 0


def test_switched_off(monkeypatch):
    kernel, x = FakeKernel(), torch.zeros(32)
    launcher = ReplayLauncher(kernel)
    launch(launcher, x)
    monkeypatch.setattr(triton_replay, "ENABLED", False)  # what CS336_TRITON_REPLAY=0 sets
    launch(launcher, x)
    assert len(kernel.full_launches) == 2 and launcher.replays == 0


def test_launch_hooks_go_through_triton(monkeypatch):
    kernel, x = FakeKernel(), torch.zeros(32)
    launcher = ReplayLauncher(kernel)
    launch(launcher, x)
    monkeypatch.setattr(triton_replay, "_hooks_set", lambda: True)
    launch(launcher, x)
    assert len(kernel.full_launches) == 2 and launcher.replays == 0


def test_hook_detection():
    assert not triton_replay._active(None)
    assert not triton_replay._active(SimpleNamespace(calls=[]))  # an empty HookChain
    assert triton_replay._active(SimpleNamespace(calls=[print]))
    assert triton_replay._active(print)
    assert not triton_replay._hooks_set()  # nothing in this test process adds launch hooks


@pytest.mark.parametrize("kernel", [FakeKernel(compiled=False), FakeKernel(constexpr_names=("BLOCK", "MODE", "x"))],
                         ids=["no compiled kernel (interpreter)", "runtime argument by keyword"])
def test_never_replays_what_it_cannot(kernel):
    x = torch.zeros(32)
    launcher = ReplayLauncher(kernel)
    for _ in range(3):
        launcher[(1,)](x, 64, 0.5, MODE="fast", BLOCK=16, x=1)
    assert len(kernel.full_launches) == 3 and launcher.replays == 0


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(triton_replay, "MAX_ENTRIES", 4)
    kernel, x = FakeKernel(), torch.zeros(32)
    launcher = ReplayLauncher(kernel)
    for n in range(10):
        launch(launcher, x, n=n)
    assert len(launcher._entries) <= 4


def test_descriptor_arguments_key_on_their_fields_not_their_base():
    """Tensor descriptors replay when only the base tensor moves (the launcher encodes each call's
    base afresh) and launch through Triton when any other field or the base's dtype changes."""
    descriptor_class = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor

    def describe(x, block=(1, 4, 16), shape=None):
        return descriptor_class(x, list(shape or x.shape), list(x.stride()), list(block))

    kernel, x, y = FakeKernel(), torch.zeros(2, 8, 16), torch.ones(2, 8, 16)
    launcher = ReplayLauncher(kernel)
    launch(launcher, describe(x))
    launch(launcher, describe(y))  # same fields, another base
    assert len(kernel.full_launches) == 1 and launcher.replays == 1
    assert kernel.replayed[0][9].base is y
    for other in (describe(x, block=(1, 8, 16)), describe(x, shape=(2, 7, 16)), describe(x.double()),
                  describe(torch.zeros(2, 9, 16)[:, :8])):  # the last: other strides
        launch(launcher, other)
    assert len(kernel.full_launches) == 5 and launcher.replays == 1


def test_unset_constexpr_given_positionally_replays_and_keys_apart_from_a_tensor():
    """A constexpr parameter left None in the middle of the positional arguments (the Gluon
    kernels' document bounds without documents) replays; a tensor in its place is another key."""
    kernel, x = FakeKernel(), torch.zeros(32)
    launcher = ReplayLauncher(kernel)
    for bounds in (None, None, x, x):
        launcher[(1,)](x, bounds, 0.5, MODE="fast", BLOCK=16)
    assert len(kernel.full_launches) == 2 and launcher.replays == 2
    assert kernel.replayed[0][9:] == (x, None, 0.5, 16, "fast")
    assert kernel.replayed[1][9:] == (x, x, 0.5, 16, "fast")


def test_gluon_descriptors_key_on_their_layout():
    """Gluon's host descriptors replay like tl's, and a change of their shared-memory layout alone
    launches through Triton."""
    hopper = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from ops.flash_attn.gluon.launch import layout

    def describe(x, swizzle=None):
        block = [1, 4, 16]
        return hopper.TensorDescriptor(x, list(x.shape), list(x.stride()), block, layout(block, x.dtype, swizzle))

    kernel = FakeKernel()
    x, y = (torch.zeros(2, 8, 16, dtype=torch.bfloat16) for _ in range(2))
    launcher = ReplayLauncher(kernel)
    launch(launcher, describe(x))
    launch(launcher, describe(y))
    launch(launcher, describe(x, swizzle=32))
    assert len(kernel.full_launches) == 2 and launcher.replays == 1
    assert kernel.replayed[0][9].base is y
