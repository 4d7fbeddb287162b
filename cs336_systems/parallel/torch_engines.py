"""torch's own data-parallel engines behind our wrappers' interface: the trusted references `train
--engine torch` runs instead of ours (parallelize.py picks; docs/training.md, "Engines").

    TorchDDP(module, bucket_size_mb)     torch.nn.parallel.DistributedDataParallel
    TorchFSDP2(model, precision)         torch.distributed.fsdp.fully_shard (FSDP2), per block and the root

Both offer what the training step calls on ours: `on_train_batch_start()`, `no_sync()` and
`finish_gradient_synchronization()` (a no-op: torch's engines finish their reductions inside
backward, so `train` counts no exposed communication time for them). The trainer calls
`forward` (`TorchDDP.module`, or the sharded model itself) and keeps the plain model.

FSDP2's parameters are DTensors (this rank's shard of each); the optimizer updates them as they
are and the gradient clipping reduces their norms over the ranks. Checkpoints hold full tensors:
`full_state_dicts` makes `model.state_dict()` and `optimizer.state_dict()` gather every DTensor
(`full_tensor()`, a collective every rank joins, as `train` does when it checkpoints), and
`load_state_dict` take full tensors and keep this rank's shard, so a checkpoint moves between
engines and numbers of ranks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from cs336_systems.distributed.collectives import require_process_group
from cs336_systems.runtime import Precision


class TorchDDP:
    """torch's DistributedDataParallel around `module` (its gradient buckets capped at `bucket_size_mb`)."""

    def __init__(self, module: nn.Module, bucket_size_mb: float | None = 25.0) -> None:
        require_process_group("torch DDP")
        # Buffers (RoPE tables) are the same on every rank by construction: no broadcast per forward.
        self.module = nn.parallel.DistributedDataParallel(module, bucket_cap_mb=bucket_size_mb,
                                                          broadcast_buffers=False)

    def on_train_batch_start(self) -> None:
        pass

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with self.module.no_sync():
            yield

    def finish_gradient_synchronization(self) -> None:
        pass  # the all-reduces ran (and were waited for) in backward


class TorchFSDP2:
    """torch's FSDP2 on `model` in place: each of `model.layers` (blocks, or checkpointed groups of
    them) is one unit, the root the rest (embedding, final norm, LM head). Weights are gathered in
    `precision.compute` when it is lower than the parameters' dtype, gradients reduced in
    `precision.reduce`: FSDP2's MixedPrecisionPolicy, built from the same Precision as ours."""

    def __init__(self, model: nn.Module, precision: Precision) -> None:
        require_process_group("torch FSDP2")
        self.precision = precision
        self.policy = MixedPrecisionPolicy(param_dtype=precision.gather_dtype, reduce_dtype=precision.reduce)
        layers = getattr(model, "layers", None)
        for layer in layers if isinstance(layers, nn.ModuleList) else ():
            fully_shard(layer, mp_policy=self.policy)
        fully_shard(model, mp_policy=self.policy)
        self.module: FSDPModule = model  # type: ignore[assignment]
        model.register_state_dict_post_hook(_full_tensors)
        model.register_load_state_dict_pre_hook(_shards_of_full_tensors)

    def full_state_dicts(self, optimizer: torch.optim.Optimizer) -> None:
        """Make `optimizer`'s state_dict hold full tensors (and its load_state_dict take them), as the model's does."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.register_state_dict_post_hook(_full_optimizer_state)
        optimizer.register_load_state_dict_pre_hook(functools.partial(_sharded_optimizer_state, params=params))

    def on_train_batch_start(self) -> None:
        pass

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate this micro-batch's gradients unreduced (FSDP2 reduces them with the next synced one)."""
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def finish_gradient_synchronization(self) -> None:
        pass  # FSDP2 waits for its reduce-scatters at the end of backward


def _full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def _full_tensors(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: every DTensor gathered into the full tensor (a collective)."""
    for key, value in state_dict.items():
        state_dict[key] = _full(value)


def _shards_of_full_tensors(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a full tensor for a DTensor parameter becomes its shard of it."""
    params = {prefix + name: p for name, p in module.named_parameters()}
    for key, value in state_dict.items():
        param = params.get(key)
        if isinstance(param, DTensor) and not isinstance(value, DTensor):
            state_dict[key] = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh,
                                                param.placements)


def _full_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    state = {index: {name: _full(value) for name, value in entry.items()}
             for index, entry in state_dict["state"].items()}
    return {**state_dict, "state": state}


def _sharded_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict, *, params: list) -> dict:
    def shard(value, param):
        if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor) \
                and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        return value

    state = {index: {name: shard(value, params[index]) for name, value in entry.items()}
             for index, entry in state_dict["state"].items()}
    return {**state_dict, "state": state}
