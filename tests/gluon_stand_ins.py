"""Stand-ins for what the Gluon dispatch rules read (ops/flash_attn/gluon/__init__.py), so the rules run on
CPU: a pretend sm_90 device and CUDA tensors that are only shapes (tests/ is on sys.path)."""

from types import SimpleNamespace

import torch

import ops.flash_attn.gluon as gluon


def pretend_hopper(monkeypatch) -> dict:
    """A pretend sm_90 device (set ["value"] for another capability); stand-in tensors say themselves
    whether they are TMA-aligned; the Triton version the kernels were tested with."""
    capability = {"value": (9, 0)}
    monkeypatch.setattr(gluon, "device_capability", lambda index: capability["value"])
    monkeypatch.setattr(gluon, "heads_view", lambda x: x)
    monkeypatch.setattr(gluon, "tma_aligned", lambda x: x.aligned)
    monkeypatch.setattr(gluon.triton, "__version__", f"{gluon.TESTED_TRITON}.0")
    return capability


def fake_cuda(n=16384, d=64, dtype=torch.bfloat16, aligned=True, numel=None, heads=8, batch=2):
    """What the rule reads of a (batch, heads, n, d) CUDA tensor."""
    size = batch * heads * n * d if numel is None else numel
    return SimpleNamespace(is_cuda=True, dtype=dtype, shape=torch.Size((batch, heads, n, d)), numel=lambda: size,
                           device=SimpleNamespace(index=0), aligned=aligned)


def qkv(**kwargs):
    x = fake_cuda(**kwargs)
    return x, x, x
