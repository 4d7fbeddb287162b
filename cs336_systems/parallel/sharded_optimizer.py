"""Optimizer state sharding (ZeRO stage 1) around any `torch.optim.Optimizer`.

Every rank keeps all parameters and all gradients, but each parameter is *owned* by one rank, and
only the owner's inner optimizer holds its state (e.g. AdamW's two moments) and updates it. After
the owners step, each rank broadcasts the parameters it owns, so every rank receives the values of
the parameters it does not own.

The trainable parameters owned by one rank live in one flat buffer per (device, dtype): each
parameter's `.data` is made a view of it (as torch's ZeroRedundancyOptimizer does with
`parameters_as_bucket_view=True`). The owner's update then lands in the buffer and the broadcast
writes straight into the receivers' parameters: no packing or unpacking copies, no extra memory.
(Packing into temporary buffers instead made the step about 1.5x slower on 2 CPU ranks; see
docs/sharding.md.) Consequences: a parameter's storage is shared with the other parameters of its
buffer, so `torch.save` of a single parameter saves the whole buffer; when a parameter's `.data`
is replaced later (`module.to(...)` does that) or `requires_grad` changes, the buffers are rebuilt.

Broadcasts rather than one all-gather: the bytes on the wire are the same, no buffer needs
padding to equal shard sizes, and on gloo two broadcasts took half the time of one all-gather of
the same 14 MB (2 CPU ranks). NCCL's broadcast reaches the bus bandwidth of its all-gather, so the
choice costs little on GPUs.

    model = DDPBucketed(model, bucket_size_mb=25)            # gradients averaged over ranks
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    opt.compile_step()                                        # optional: compile the local update
    loss.backward(); model.finish_gradient_synchronization(); opt.step()

`state_dict()` is a collective that returns the consolidated, unsharded format on every rank, so a
plain `optimizer_cls` or a `ShardedOptimizer` on any number of ranks can load it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from cs336_systems.distributed.collectives import require_process_group

# Keys of a param group that name its tensors rather than hyperparameters: never copied between the
# public groups (all parameters) and the local optimizer's groups (this rank's parameters).
_TENSOR_KEYS = ("params", "param_names")


def partition_by_size(params: Iterable[torch.Tensor], loads: list[int]) -> list[int]:
    """Owner rank of each of `params`: largest first onto the least-loaded rank (ties: lower index).

    `loads` (numel per rank so far) is updated in place, so successive param groups keep the ranks
    balanced overall. Pure function of sizes and order, hence identical on every rank.
    """
    params = list(params)
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        rank = min(range(len(loads)), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += params[i].numel()
    return owners


def state_bytes(state: Mapping[Any, Mapping[str, Any]]) -> int:
    """Bytes held by the tensors of an optimizer's `state` (param -> {name: value})."""
    return sum(
        value.numel() * value.element_size()
        for per_param in state.values() for value in per_param.values() if isinstance(value, torch.Tensor)
    )


def _hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key not in _TENSOR_KEYS}


class ShardedOptimizer(Optimizer):
    """`optimizer_cls(**kwargs)` on this rank's share of `params`; the others' shares are broadcast.

    `param_groups` lists every parameter with the full hyperparameters; edits to them (LR schedulers,
    `group["lr"] = ...`) are copied into the local optimizer at the start of each `step`.
    `local_optimizer.state` holds this rank's shard of the state. `communication_timer`, a context
    manager (e.g. a `cs336_systems.timing.Stopwatch`), is entered around the parameter broadcast of
    every step: the training loop measures exposed communication with it.
    """

    def __init__(self, params: Iterable[Any], optimizer_cls: type[Optimizer], *,
                 communication_timer: contextlib.AbstractContextManager | None = None, **kwargs: Any) -> None:
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
            raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
        require_process_group("ShardedOptimizer")
        self.optimizer_cls, self.optimizer_kwargs = optimizer_cls, kwargs
        self.communication_timer = communication_timer or contextlib.nullcontext()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_optimizer: Optimizer | None = None  # built by the first add_param_group
        self.owner: dict[torch.Tensor, int] = {}
        self._loads = [0] * self.world_size
        self._buffers: list[tuple[int, torch.Tensor]] = []  # (owner, flat buffer), same order on every rank
        self._layout: tuple[tuple[int, int], ...] = ()  # what the buffers were built for (_layout_key)
        super().__init__(params, defaults=kwargs)
        self._local_step = self.local_optimizer.step  # compile_step swaps in a compiled version
        self._flatten()  # now rather than in the first step: the model may be compiled in between

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: partition its parameters and give this rank's ones to the local optimizer."""
        super().add_param_group(param_group)  # validates, fills defaults, appends to self.param_groups
        group = self.param_groups[-1]
        fresh = [p for p in dict.fromkeys(group["params"]) if p not in self.owner]  # tied: once
        self.owner.update(zip(fresh, partition_by_size(fresh, self._loads)))
        local_group = self._local_group(group)
        if self.local_optimizer is None:
            # An empty group is legal, so a rank that owns nothing still gets an optimizer.
            self.local_optimizer = self.optimizer_cls([local_group], **self.optimizer_kwargs)
        else:
            self.local_optimizer.add_param_group(local_group)
        # The public group takes the optimizer's own defaults too (e.g. AdamW's betas), so that the
        # consolidated state_dict carries every hyperparameter a plain optimizer_cls needs.
        for key, value in _hyperparameters(self.local_optimizer.param_groups[-1]).items():
            group.setdefault(key, value)
        # The buffers are rebuilt by the next step, which notices the new parameters.

    def _local_group(self, group: Mapping[str, Any]) -> dict[str, Any]:
        mine = [i for i, p in enumerate(group["params"]) if self.owner[p] == self.rank]
        local = {**_hyperparameters(group), "params": [group["params"][i] for i in mine]}
        if "param_names" in group:
            local["param_names"] = [group["param_names"][i] for i in mine]
        return local

    def step(self, closure: Callable[[], float] | None = None, **kwargs: Any) -> Any:
        """Update this rank's parameters, then receive everyone else's."""
        self._push_hyperparameters()
        loss = self._local_step(closure, **kwargs)
        with self.communication_timer:
            self._gather_parameters()
        return loss

    def _push_hyperparameters(self) -> None:
        for group, local in zip(self.param_groups, self.local_optimizer.param_groups, strict=True):
            local.update(_hyperparameters(group))

    def compile_step(self, **compile_kwargs: Any) -> None:
        """Compile the local optimizer's update with `torch.compile(**compile_kwargs)`.

        Only the per-rank math is traced; the broadcasts stay eager in `step` (also when the
        whole `step` is compiled, since `_gather_parameters` is excluded from tracing). The compiled
        function is kept here rather than assigned to `local_optimizer.step`, which LR schedulers
        expect to be a bound method.
        """
        self._local_step = torch.compile(self.local_optimizer.step, **compile_kwargs)

    @torch.compiler.disable
    @torch.no_grad()
    def _gather_parameters(self) -> None:
        """Every owner broadcasts its buffers; all are started before any is waited for."""
        if self._layout_key() != self._layout:  # unfrozen, frozen or re-assigned since last time
            self._flatten()
        handles = [dist.broadcast(flat, src=owner, async_op=True) for owner, flat in self._buffers]
        for handle in handles:
            handle.wait()

    @torch.no_grad()
    def _flatten(self) -> None:
        """Make each rank's trainable parameters views of one flat buffer per (device, dtype).

        Frozen parameters never change, so they are neither buffered nor sent; one frozen since
        the last layout gets its own storage back, lest its view keep the whole old buffer alive.
        The layout depends only on the parameters' order, sizes and `requires_grad` (the model's
        structure, the same on every rank), so every rank builds the same buffers in the same order.
        """
        buffered = {key for key, _ in self._layout}
        for p in self.owner:
            if not p.requires_grad and id(p) in buffered:
                p.data = p.data.clone()
        self._buffers = []
        for shards in self._trainable_shards().values():
            self._buffers += [(owner, _flatten_into_views(shard)) for owner, shard in enumerate(shards) if shard]
        self._layout = self._layout_key()

    def _layout_key(self) -> tuple[tuple[int, int], ...]:
        """Which parameters are trainable and where their data is: changes when the buffers must."""
        return tuple((id(p), p.data_ptr()) for p in self.owner if p.requires_grad)

    def _trainable_shards(self) -> dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]]:
        """Per (device, dtype): the trainable parameters owned by each rank, in param_groups order."""
        shards: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}
        for p, rank in self.owner.items():
            if p.requires_grad:
                shards.setdefault((p.device, p.dtype), [[] for _ in range(self.world_size)])[rank].append(p)
        return shards

    def state_dict(self) -> dict[str, Any]:
        """The consolidated (unsharded) state dict, on every rank; a collective, so call it on all.

        Tensors are moved to CPU: the shards travel through `all_gather_object`, and a CPU
        checkpoint loads onto any device layout.
        """
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        local = self.local_optimizer.state_dict()
        local_params = [p for g in self.local_optimizer.param_groups for p in g["params"]]
        mine = {index[local_params[i]]: _to_cpu(s) for i, s in local["state"].items()}
        shards: list[dict[int, Any]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(shards, mine)
        groups = [{**_hyperparameters(g), "params": [index[p] for p in g["params"]]} for g in self.param_groups]
        for group, public in zip(groups, self.param_groups, strict=True):
            if "param_names" in public:
                group["param_names"] = list(public["param_names"])
        state = {i: s for shard in shards for i, s in shard.items()}
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a consolidated state dict (from `state_dict()` here or a plain optimizer_cls)."""
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("loaded state dict's param groups do not match this optimizer's in number or size")
        local_groups = []
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            group.update(_hyperparameters(saved))
            ids = [i for i, p in zip(saved["params"], group["params"], strict=True) if self.owner[p] == self.rank]
            local_groups.append({**_hyperparameters(saved), "params": ids})
        # The saved ids are global; the local optimizer maps them positionally onto its own params.
        local_state = {i: state_dict["state"][i] for g in local_groups for i in g["params"] if i in state_dict["state"]}
        self.local_optimizer.load_state_dict({"state": local_state, "param_groups": local_groups})

def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _flatten_into_views(params: list[torch.Tensor]) -> torch.Tensor:
    """A new flat buffer holding `params`' values, each parameter's `.data` now a view of it."""
    flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    for p, view in zip(params, flat.split([p.numel() for p in params]), strict=True):
        view.copy_(p.reshape(-1))
        p.data = view.view(p.shape)
    return flat
