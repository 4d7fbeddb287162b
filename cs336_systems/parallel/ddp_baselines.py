"""Data-parallel baselines that communicate only after backward: the yardsticks for cs336_systems.parallel.ddp.

`NaiveDDP` all-reduces every gradient with its own blocking collective; `FlatDDP` flattens all of
them into one buffer and issues a single collective. Neither overlaps communication with
backward, so `finish_gradient_synchronization()` is exactly the communication time the
benchmark reports for them. They reduce the gradients that exist, so they assume every rank
produces gradients for the same parameters (as torch DDP does without find_unused_parameters);
a parameter no rank used keeps `grad = None`, as in single-process training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from cs336_systems.parallel.ddp import Replicated


class _AfterBackwardDDP(Replicated):
    def on_train_batch_start(self) -> None:
        """Nothing to reset: all communication happens in `finish_gradient_synchronization`."""

    def _gradients(self) -> list[torch.Tensor]:
        return [p.grad for p in self.module.parameters() if p.grad is not None]


class NaiveDDP(_AfterBackwardDDP):
    """One blocking all-reduce per gradient, after backward."""

    @torch.compiler.disable
    @torch.no_grad()
    def finish_gradient_synchronization(self) -> None:
        for grad in self._gradients():
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad.div_(self.world_size)


class FlatDDP(_AfterBackwardDDP):
    """All gradients flattened into one buffer and all-reduced with a single collective."""

    @torch.compiler.disable
    @torch.no_grad()
    def finish_gradient_synchronization(self) -> None:
        grads = self._gradients()
        flat = _flatten_dense_tensors(grads)  # one copy of every gradient: the price of one collective
        flat.div_(self.world_size)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)
