"""Fully-sharded data parallelism (ZeRO stage 3): every rank keeps 1/world of each large weight.

    fsdp = FSDP(model, compute_dtype=torch.bfloat16)      # shards; broadcasts rank 0's initial values
    opt = torch.optim.AdamW(fsdp.parameters(), lr=1e-3)   # fp32 shards + replicated small parameters
    for batch in data:
        loss_fn(fsdp(batch)).backward()                     # all-gathers and reduce-scatters run inside
        fsdp.finish_gradient_synchronization()              # wait; shard grads = rank averages, fp32
        opt.step(); opt.zero_grad()

What is sharded: every parameter (weight, and bias if any) of every `Linear` and `Embedding`, ours
(cs336_basics.model) and torch.nn's, as flat dim-0 shards of the flattened tensor, zero-padded to
a multiple of the world size. The bias goes with its weight so that with a compute dtype the whole
layer computes in one dtype. Everything else (norms) stays replicated: their gradients are averaged
by one all-reduce in `finish_gradient_synchronization`.

Where the parameters are: each sharded layer's `weight` Parameter is replaced by a Parameter
`weight_shard` (this rank's slice, the fp32 master weight) and `weight` becomes a plain tensor
attribute, the gathered full weight during the layer's forward (an empty-storage placeholder of
the full shape otherwise). So `fsdp.module.parameters()` (= `fsdp.parameters()`) is exactly what
the optimizer updates, every one with a `.grad` of its own shape and dtype after
`finish_gradient_synchronization`; any torch.optim.Optimizer works unchanged. A Parameter tied to
two layers becomes one shard, registered on both (as the tied Parameter was).
`gather_full_params()`, `full_state_dict()` and `load_full_state_dict()` speak the full shapes
and the original names (checkpoints therefore resume on any number of ranks).

When communication happens (fsdp_state.py has the buffers):
- forward: a layer's pre-hook waits for its all-gather (starting it if nobody did); its post-hook
  frees the gathered storage and starts the all-gather of the layer two calls ahead in the
  previous forward's call order, so at most about two gathered layers are alive.
- backward: a hook on each layer's output fires when its gradient is ready, just before the
  layer's backward: it waits for the weight's all-gather (embeddings excepted: their backward
  needs only indices) and starts the one of the layer before it, which then runs during this
  layer's backward. When every use of a weight has been backpropagated, its gradient (summed
  over uses, in the compute dtype) is cast to fp32, divided by the world size and
  reduce-scattered asynchronously into the shard while backward goes on.
- a checkpointed block re-runs its layers' forwards during backward: those hooks only gather,
  since the weights are needed right after.
- the shallowest sharded layers (children of the wrapped module) may also be read without being
  called (the fused LM-head loss reads `lm_head.weight`): such a layer is gathered after the last
  layer call of the forward (in the first forward, before the call order is known, for the whole
  forward) and kept for backward.
Every rank must run the same layers in the same order (true of data parallelism): the
collectives are matched by issue order.

With a compute dtype, each sharded layer's floating-point inputs are cast to it too (its weight
is in that dtype), as FSDP2's `cast_forward_inputs`.

Compiled models: all hooks are `torch.compiler.disable`d and the collectives run in eager code.
`for b in model.layers: b.compile()` works: dynamo breaks the block's graph at each sharded
layer's hooks, so each block runs as a few compiled pieces between eager gathers (the layer's own
matmul stays compiled); backward still has one autograd node per piece, so reduce-scatters and
prefetches overlap backward as in eager. Compiling the whole model works the same way (graph
breaks at every layer). See docs/fsdp.md.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

from cs336_basics import model as basics
from cs336_systems.distributed.collectives import broadcast_from_rank0, check_same_parameters, require_process_group
from cs336_systems.parallel.ddp import Bucket, plan_buckets
from cs336_systems.parallel.fsdp_state import GatherStats, ShardedParam

SHARDED_LAYERS = (nn.Linear, nn.Embedding, basics.Linear, basics.Embedding)
"""Layer types whose parameters FSDP shards."""
NO_WEIGHT_IN_BACKWARD = (nn.Embedding, basics.Embedding)
"""Their backward needs only the indices: no all-gather for it."""
SHARD_SUFFIX = "_shard"
"""A sharded parameter NAME of a layer is registered as NAME + SHARD_SUFFIX."""
PREFETCH = 2
"""Forward: the all-gather of call i starts when call i - PREFETCH is done."""
BACKWARD_PREFETCH = 1
"""Backward: all-gathers started when a layer's backward is about to run, for the layers before it
(2 made no measurable difference on 2 CPU ranks and holds a third gathered layer)."""


class FSDP(nn.Module):
    """`module` with its Linear/Embedding parameters sharded over the ranks; `forward` delegates."""

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None,
                 reduce_dtype: torch.dtype | None = None) -> None:
        """`compute_dtype`: the dtype weights are gathered and computed in; `reduce_dtype`: the one the
        sharded layers' gradients are reduce-scattered in (then rounded to the shard's dtype once). None:
        the parameters' own. parallelize() takes both from the run's Precision."""
        super().__init__()
        for what, dtype in (("compute_dtype", compute_dtype), ("reduce_dtype", reduce_dtype)):
            if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise ValueError(f"FSDP: {what} must be a floating-point torch.dtype or None, got {dtype!r}")
        require_process_group("FSDP")
        check_same_parameters(module, "FSDP")
        broadcast_from_rank0(module)
        self.module = module
        self.compute_dtype = compute_dtype
        self.world_size = dist.get_world_size()
        self.gather_stats = GatherStats()
        self._layers, self._units, self._sharded = _shard(module, compute_dtype, self.gather_stats)
        self.reduce_dtype = reduce_dtype
        for sp in self._sharded:
            sp.reduce_dtype = reduce_dtype or sp.shard.dtype
        self._by_shard = {sp.shard: sp for sp in self._sharded}
        sharded_ids = {id(sp.shard) for sp in self._sharded}
        replicated = [p for p in module.parameters() if p.requires_grad and id(p) not in sharded_ids]
        self._buckets = [Bucket.for_params(group) for group in plan_buckets(replicated, None)]
        self._order = list(range(len(self._layers)))  # layer call order: registration order until observed
        self._calls: list[int] = []  # this forward's calls so far (layer indices)
        # The root's own layers: the shallowest ones (children of the root, or of the model inside a
        # torch.compile wrapper), which the root's forward may also read without calling them.
        depth = {layer: name.count(".") for name, layer in module.named_modules() if isinstance(layer, SHARDED_LAYERS)}
        self._root_layers = [i for i, layer in enumerate(self._layers) if depth[layer] == min(depth.values())]
        self._read_directly = list(self._root_layers)  # root layers not called by the last forward
        self._observed = False  # a forward has run: _order and _read_directly are known
        self._early: set[ShardedParam] = set()  # unsharded at the root pre-forward, not called yet
        self._backward_prefetch: list[list[int]] = []  # see _on_root_post_forward
        self._in_backward = False
        # Hooks hold the wrapper weakly (as in ddp.py): no leaked cycle through autograd's C++ side.
        me = weakref.ref(self)
        module.register_forward_pre_hook(functools.partial(_root_pre_forward, me))
        module.register_forward_hook(functools.partial(_root_post_forward, me))
        for index, layer in enumerate(self._layers):
            layer.register_forward_pre_hook(functools.partial(_pre_forward, me, index))
            layer.register_forward_hook(functools.partial(_post_forward, me, index))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # ---------------------------------------------------------------- hooks

    def _start_gathers(self, calls: list[int]) -> None:
        for index in calls:
            for _, sp in self._units[index]:
                sp.start_gather()

    def _on_root_forward(self) -> None:
        self._calls, self._in_backward = [], False
        for sp in self._sharded:
            sp.full = None  # a new forward: a new autograd link from each shard
        self._start_gathers(self._order[:PREFETCH])
        # The root's own layers that its forward may read without calling them (a fused LM-head
        # loss reads lm_head.weight): unsharded after the last layer call (see _on_post_forward);
        # before a forward has shown which they are, for the whole forward (as FSDP2's root unit).
        self._early = set()
        if not (self._observed and self._order):
            self._start_gathers(self._read_directly)
            for index in self._read_directly:
                self._unshard(index)
            self._early = {sp for i in self._read_directly for _, sp in self._units[i]}

    def _on_pre_forward(self, index: int, args: tuple) -> tuple:
        if not self._in_backward:
            self._calls.append(index)
        for _, sp in self._units[index]:
            if sp in self._early:  # unsharded by the first forward's root hook, but called after all:
                sp.full = None  # link anew, so that backward reaches it (and its reduce-scatter) in call order
                self._early.discard(sp)
        self._unshard(index)
        return self._cast_inputs(args)

    def _unshard(self, index: int) -> None:
        """Point layer `index`'s attributes at its full weights (gathering them if needed)."""
        for name, sp in self._units[index]:
            setattr(self._layers[index], name, sp.unsharded())

    def _cast_inputs(self, args: tuple) -> tuple:
        """Floating-point inputs of a sharded layer in the compute dtype (as the layer's weight is)."""
        if self.compute_dtype is None:
            return args
        return tuple(a.to(self.compute_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)

    def _on_post_forward(self, index: int, output) -> None:
        if self._in_backward:  # a checkpointed block's recomputation: backward needs the weights next
            return
        for _, sp in self._units[index]:
            sp.free()
        position = len(self._calls) - 1
        self._start_gathers(self._order[position + PREFETCH:position + PREFETCH + 1])
        if self._observed and position + PREFETCH >= len(self._order):  # next: the weights read directly
            self._start_gathers(self._read_directly)
            if position == len(self._order) - 1:
                for i in self._read_directly:
                    self._unshard(i)
        if torch.is_grad_enabled():
            hook = functools.partial(_pre_backward, weakref.ref(self), index, position)
            for tensor in tree_leaves(output):
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(hook)

    def _on_pre_backward(self, index: int, position: int) -> None:
        self._in_backward = True
        if not isinstance(self._layers[index], NO_WEIGHT_IN_BACKWARD):
            for _, sp in self._units[index]:
                sp.wait_gather()  # the layer's backward runs next and reads the weight
        # One layer ahead: its gather runs during this layer's backward, as in forward (where layer
        # i's starts when i - 2 is done, during i - 1): about two gathered layers at any time.
        if position < len(self._backward_prefetch):
            self._start_gathers(self._backward_prefetch[position])

    def _on_root_post_forward(self, output) -> None:
        if self._in_backward:
            return
        if self._calls and self._calls != self._order:
            self._order = list(self._calls)  # the same on every rank: prefetches stay matched
        outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        for index in self._read_directly:  # kept for a backward that needs them (it starts next)
            if not (outputs and torch.is_grad_enabled()) or isinstance(self._layers[index], NO_WEIGHT_IN_BACKWARD):
                for _, sp in self._units[index]:
                    sp.free()
        self._read_directly = [i for i in self._root_layers if i not in self._calls]
        self._observed = True
        self._backward_prefetch, previous = [], []  # per call: the last earlier ones that backward gathers
        for index in self._calls:
            self._backward_prefetch.append(previous[-BACKWARD_PREFETCH:][::-1])
            if not isinstance(self._layers[index], NO_WEIGHT_IN_BACKWARD):
                previous.append(index)
        if torch.is_grad_enabled():  # backward starts here: later forwards are recomputations
            for tensor in outputs:
                tensor.register_hook(functools.partial(_backward_started, weakref.ref(self)))

    def _on_backward_started(self) -> None:
        """Backward begins: the root layers read without a call need their weights again."""
        self._in_backward = True
        for index in self._read_directly:
            if not isinstance(self._layers[index], NO_WEIGHT_IN_BACKWARD):
                for _, sp in self._units[index]:
                    sp.wait_gather()

    # ---------------------------------------------------------------- after backward

    @torch.compiler.disable
    def finish_gradient_synchronization(self) -> None:
        """Wait for every reduce-scatter (shard grads: fp32 rank means) and average the replicated grads."""
        for sp in self._sharded:
            sp.finish()
        for bucket in self._buckets:
            self._all_reduce(bucket)
        self._in_backward = False

    def _all_reduce(self, bucket: Bucket) -> None:
        """Average the replicated gradients; one that no rank has stays None (as in ddp.py)."""
        had = [p.grad is not None for p in bucket.params]
        for p, view, present in zip(bucket.params, bucket.views, had):
            if present:
                view.copy_(p.grad)
            else:
                view.zero_()
        bucket.flags.copy_(torch.tensor(had, dtype=bucket.flags.dtype))
        bucket.buffer.div_(self.world_size)
        dist.all_reduce(bucket.buffer)
        for p, view, count in zip(bucket.params, bucket.views, bucket.flags.tolist()):
            if count and p.grad is not None:
                p.grad.copy_(view)
            elif count:
                p.grad = view.clone()

    def on_train_batch_start(self) -> None:
        """Nothing to reset (the DDP wrappers' interface)."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside still reduce-scatters: a shard keeps no full gradient to accumulate into,
        so every micro-batch's mean is reduced and summed into `shard.grad` (the same result)."""
        yield

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
        """cs336_basics.nn_utils.clip_gradient over the full gradients (a collective): the shards'
        squared norms are summed over ranks, the replicated ones (equal everywhere) counted once."""
        shards = [sp.shard.grad for sp in self._sharded if sp.shard.grad is not None]
        replicated = [p.grad for b in self._buckets for p in b.params if p.grad is not None]
        squares = torch.zeros(2, device=self._sharded[0].shard.device if self._sharded else None)
        for i, grads in enumerate((shards, replicated)):
            if grads:
                norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
                squares[i] = norms.square().sum()
        dist.all_reduce(squares[:1])
        total_norm = squares.sum().sqrt()
        scale = (max_norm / (total_norm + eps)).clamp(max=1.0)
        for g in shards + replicated:
            g.mul_(scale.to(g.dtype))
        return total_norm

    # ---------------------------------------------------------------- full tensors

    def gathered_bytes(self) -> int:
        """Bytes of gathered full weights held now."""
        return self.gather_stats.current

    @property
    def sharded_layers(self) -> tuple[nn.Module, ...]:
        """The layers whose parameters are sharded (SHARDED_LAYERS), in registration order; read-only."""
        return tuple(self._layers)

    @property
    def sharded_params(self) -> tuple[ShardedParam, ...]:
        """One ShardedParam per sharded Parameter (tied ones once), in layer order; read-only."""
        return tuple(self._sharded)

    @property
    def reduce_scatters_in_flight(self) -> int:
        """Gradient reduce-scatters that backward started and finish_gradient_synchronization has not waited for."""
        return sum(len(sp._grads) for sp in self._sharded)

    def _full_name(self, name: str, value: torch.Tensor) -> tuple[str, ShardedParam | None]:
        sp = self._by_shard.get(value)
        return (name.removesuffix(SHARD_SUFFIX), sp) if sp is not None else (name, None)

    @torch.no_grad()
    def gather_full_params(self) -> dict[str, torch.Tensor]:
        """{name in the wrapped module: full tensor}; a collective. Tied parameters appear once."""
        out = {}
        for name, p in self.module.named_parameters():
            full_name, sp = self._full_name(name, p)
            out[full_name] = sp.gather_full() if sp is not None else p.detach().clone()
        return out

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped module's state_dict as it was before sharding (names, shapes); a collective."""
        out = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            full_key, sp = self._full_name(key, value)
            out[full_key] = sp.gather_full() if sp is not None else value.detach().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a `full_state_dict()` (from any number of ranks, or a plain model's state_dict)."""
        local = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            full_key, sp = self._full_name(key, value)
            if full_key not in state_dict:
                raise KeyError(f"FSDP.load_full_state_dict: missing key {full_key!r}")
            if sp is not None:
                sp.load_full(state_dict[full_key])
            else:
                local[key] = state_dict[full_key]
        self.module.load_state_dict(local, strict=False)


    def full_optim_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()` (an optimizer over this wrapper's parameters) with each shard-shaped
        state tensor (Adam's moments) gathered to its parameter's full shape; a collective. Parameters
        keep their order for any world size, so this loads on any number of ranks (or into an
        optimizer over the plain model's parameters)."""
        state_dict = optimizer.state_dict()
        params, by_shard = _optimizer_params(optimizer), self._by_shard
        state = {}
        for index in sorted(state_dict["state"]):  # the same order on every rank: the gathers match
            sp = by_shard.get(params[index])
            state[index] = {key: sp.gather_full(value) if _shard_shaped(sp, value, sp.shard.shape if sp else None)
                            else value for key, value in state_dict["state"][index].items()}
        return {**state_dict, "state": state}

    def load_full_optim_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        """Load a `full_optim_state_dict()` into `optimizer`: each rank keeps its slices."""
        params, by_shard = _optimizer_params(optimizer), self._by_shard
        state = {}
        for index, per_param in state_dict["state"].items():
            sp = by_shard.get(params[int(index)])
            state[index] = {key: sp.local_slice(value) if _shard_shaped(sp, value, sp.shape if sp else None)
                            else value for key, value in per_param.items()}
        optimizer.load_state_dict({**state_dict, "state": state})


def _shard(module: nn.Module, compute_dtype: torch.dtype | None, stats: GatherStats):
    """Replace the sharded layers' Parameters by shards: (layers, per layer [(name, sp)], all sps)."""
    layers = [m for m in module.modules() if isinstance(m, SHARDED_LAYERS)]
    by_param: dict[nn.Parameter, ShardedParam] = {}
    units: list[list[tuple[str, ShardedParam]]] = []
    for layer in layers:
        units.append([])
        for name, p in list(layer.named_parameters(recurse=False)):
            if p not in by_param:  # a tied Parameter: one shard for all its layers
                by_param[p] = ShardedParam(p, compute_dtype, stats)
            sp = by_param[p]
            delattr(layer, name)
            layer.register_parameter(name + SHARD_SUFFIX, sp.shard)
            setattr(layer, name, sp.placeholder())
            units[-1].append((name, sp))
    return layers, units, list(by_param.values())


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _shard_shaped(sp: ShardedParam | None, value, shape: torch.Size | None) -> bool:
    """Is optimizer state `value` per element of sharded parameter `sp` (shaped `shape`)?"""
    return sp is not None and isinstance(value, torch.Tensor) and value.shape == shape


# Module-level hook functions holding the wrapper weakly; disabled so dynamo never traces them.


@torch.compiler.disable
def _root_pre_forward(me: weakref.ref[FSDP], module, args) -> None:
    if (fsdp := me()) is not None:
        fsdp._on_root_forward()


@torch.compiler.disable
def _root_post_forward(me: weakref.ref[FSDP], module, args, output) -> None:
    if (fsdp := me()) is not None:
        fsdp._on_root_post_forward(output)


@torch.compiler.disable
def _pre_forward(me: weakref.ref[FSDP], index: int, module, args) -> tuple | None:
    if (fsdp := me()) is not None:
        return fsdp._on_pre_forward(index, args)
    return None


@torch.compiler.disable
def _post_forward(me: weakref.ref[FSDP], index: int, module, args, output) -> None:
    if (fsdp := me()) is not None:
        fsdp._on_post_forward(index, output)


@torch.compiler.disable
def _pre_backward(me: weakref.ref[FSDP], index: int, position: int, grad: torch.Tensor) -> None:
    if (fsdp := me()) is not None:
        fsdp._on_pre_backward(index, position)


@torch.compiler.disable
def _backward_started(me: weakref.ref[FSDP], grad: torch.Tensor) -> None:
    if (fsdp := me()) is not None:
        fsdp._on_backward_started()
