"""Data-parallel training that overlaps the gradient all-reduce with backward.

`DDPIndividualParameters(module)` all-reduces every gradient on its own; `DDPBucketed(module,
bucket_size_mb)` packs gradients into flat buckets of at most `bucket_size_mb` and all-reduces one
bucket per collective. Both are the same machine with a different bucket plan: the individual
wrapper is the bucketed one with one parameter per bucket.

    ddp = DDPBucketed(model, bucket_size_mb=25)     # broadcasts rank 0's parameters and buffers
    for batch in data:
        ddp.on_train_batch_start()
        loss_fn(ddp(batch)).backward()               # hooks start bucket all-reduces as grads arrive
        ddp.finish_gradient_synchronization()        # wait; param.grad now holds the rank average
        optimizer.step(); optimizer.zero_grad()

How it works:
- Buckets take the parameters that require grad in reverse `module.parameters()` order, which is
  roughly the order backward produces their gradients. Each bucket owns one flat buffer. After
  the first synchronised step the buckets are rebuilt once in the order gradients really
  arrived on rank 0, parameters that got none last (torch DDP does the same).
- A post-accumulate-grad hook per parameter fires once its gradient is complete (a tied weight
  reached twice fires once, after both uses). When every gradient of a bucket is in, the bucket
  is divided by the world size and all-reduced asynchronously while backward carries on.
- Buckets are launched strictly in bucket order (bucket i waits for buckets < i). Collectives are
  matched by issue order, so this keeps ranks agreeing even when they disagree on which
  parameters got a gradient this step; launching the first ready bucket instead would let two
  ranks pair up different buckets.
- A parameter with no gradient this step (unused in forward) leaves its bucket not ready during
  backward; `finish_gradient_synchronization` then launches the rest, reducing zeros for it.
  Each bucket carries one extra slot per parameter, "this rank had a gradient", summed by the
  same all-reduce: a parameter no rank produced a gradient for keeps `grad = None`, exactly as in
  single-process training; one that some ranks used gets sum(grads) / world_size, the gradient of
  the mean loss over all ranks' samples.

Compiled models: the hooks and collectives run in eager autograd, never inside a traced graph, so
`Wrapper(torch.compile(m))`, `torch.compile(Wrapper(m))` and per-block compilation all train like
eager. Overlap needs gradients to arrive during backward: with the whole model compiled as one
graph its backward is a single autograd node and every hook fires at its end (no overlap);
compiling each block separately keeps one node per block and so keeps the overlap. See
docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from cs336_systems.distributed.collectives import broadcast_from_rank0, check_same_parameters, require_process_group

MIB = 2**20


# ----------------------------------------------------------------------------------- replication


class Replicated(nn.Module):
    """A module replicated on every rank: checked for equal shapes, then synced to rank 0's values.

    The base of the overlapping wrappers here and of the benchmark baselines; `forward` delegates.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        what = type(self).__name__
        require_process_group(what)
        check_same_parameters(module, what)
        broadcast_from_rank0(module)
        self.module = module
        self.world_size = dist.get_world_size()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# ----------------------------------------------------------------------------------------- buckets


def plan_buckets(params: list[nn.Parameter], bucket_size_bytes: float | None) -> list[list[nn.Parameter]]:
    """Group `params` (already in launch order) into buckets of at most `bucket_size_bytes`.

    A parameter larger than the cap gets a bucket of its own; `None` means no cap (one bucket per
    dtype and device). A bucket never mixes dtypes or devices: its buffer is one tensor.
    """
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        full = bucket_size_bytes is not None and size + nbytes > bucket_size_bytes
        if not buckets or full or (p.dtype, p.device) != (buckets[-1][0].dtype, buckets[-1][0].device):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


@dataclass(eq=False)
class Bucket:
    """One flat buffer: the gradients of `params`, then one "had a gradient" flag per parameter."""

    params: list[nn.Parameter]
    buffer: torch.Tensor  # (sum of numels + len(params),)
    views: list[torch.Tensor] = field(init=False)  # views[i]: params[i]'s gradient inside `buffer`
    flags: torch.Tensor = field(init=False)  # (len(params),): after the all-reduce, (ranks with a grad) / world
    ready: list[bool] = field(init=False)
    handle: dist.Work | None = None

    def __post_init__(self) -> None:
        self.views, offset = [], 0
        for p in self.params:
            self.views.append(self.buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.flags = self.buffer[offset:]
        self.reset()

    @classmethod
    def for_params(cls, params: list[nn.Parameter]) -> Bucket:
        numel = sum(p.numel() for p in params) + len(params)
        return cls(params, torch.zeros(numel, dtype=params[0].dtype, device=params[0].device))

    def reset(self) -> None:
        self.ready = [False] * len(self.params)
        self.handle = None

    @property
    def is_ready(self) -> bool:
        return all(self.ready)


# ---------------------------------------------------------------------------------------- wrapper


class _OverlappedDDP(Replicated):
    """All-reduces gradients bucket by bucket during backward; subclasses choose the buckets."""

    def __init__(self, module: nn.Module, bucket_size_bytes: float | None, gradient_as_bucket_view: bool) -> None:
        super().__init__(module)
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self._bucket_size_bytes = bucket_size_bytes
        self._params = [p for p in module.parameters() if p.requires_grad]  # parameters() skips tied repeats
        self._assign_buckets(order=list(reversed(range(len(self._params)))))
        self._arrivals: list[int] | None = []  # gradient arrival order, recorded until the buckets are rebuilt
        self._next = 0  # index of the first bucket not launched yet this step
        self._sync = True  # False inside no_sync()
        self._accumulating = False  # the last backward ran under no_sync()
        # The hooks hold the wrapper weakly. A strong reference would make a cycle through autograd's
        # C++ side (parameter -> hook -> wrapper -> module -> parameter) that gc cannot see, leaking
        # every wrapper ever built, with its buckets, for the life of the process.
        me = weakref.ref(self)
        for index, p in enumerate(self._params):
            p.register_post_accumulate_grad_hook(functools.partial(_gradient_ready, me, index))

    def _assign_buckets(self, order: list[int]) -> None:
        """Bucket the parameters in launch order `order` (indices into `self._params`)."""
        groups = plan_buckets([self._params[i] for i in order], self._bucket_size_bytes)
        self.buckets = [Bucket.for_params(group) for group in groups]
        places = [(b, slot) for b, group in enumerate(groups) for slot in range(len(group))]
        self._place = dict(zip(order, places))  # parameter index -> (bucket index, slot)

    def _rebuild_buckets_once(self) -> None:
        """After the first synchronised step, re-bucket in the order gradients actually arrived.

        Reverse parameter order is only a guess at the backward order, and a parameter that gets
        no gradient would hold back every bucket after it. Rank 0's observed order (parameters
        that never arrived go last) is broadcast so that all ranks keep launching identically.
        """
        if self._arrivals is None:
            return
        observed = [self._arrivals]
        dist.broadcast_object_list(observed, src=0)
        arrived = set(observed[0])
        missing = [i for i in reversed(range(len(self._params))) if i not in arrived]
        self._assign_buckets(observed[0] + missing)
        self._arrivals = None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate into `.grad`; the first one outside syncs the sum."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def on_train_batch_start(self) -> None:
        """Check the previous step was finished and start a new one."""
        if any(b.handle is not None for b in self.buckets):
            raise RuntimeError(
                f"{type(self).__name__}: the previous step's all-reduces were never waited for: call "
                "finish_gradient_synchronization() after backward"
            )
        self._reset()

    @torch.compiler.disable
    def finish_gradient_synchronization(self) -> None:
        """Launch the buckets still waiting (unused parameters), wait for all, leave averages in `.grad`.

        A no-op after a backward run under `no_sync()`: those gradients keep accumulating.
        """
        if self._accumulating:
            return
        self._launch_in_order(force=True)
        locally_unused = []
        for bucket in self.buckets:
            bucket.handle.wait()
            for slot, p in enumerate(bucket.params):
                if p.grad is None:
                    locally_unused.append((bucket, slot))
                else:
                    self._store_average(bucket, slot)
        if locally_unused:  # reading the flags is a host sync, paid only when some gradient was missing
            counts = torch.stack([b.flags[s] for b, s in locally_unused]).tolist()
            for (bucket, slot), count in zip(locally_unused, counts):
                if count != 0:  # another rank had a gradient: take the average; else stay None
                    self._store_average(bucket, slot)
        self._rebuild_buckets_once()
        self._reset()

    # hooks and launching ------------------------------------------------------------------------

    @torch.compiler.disable
    def _on_gradient_ready(self, index: int, param: nn.Parameter) -> None:
        """Post-accumulate-grad hook: mark `param` ready and launch whatever buckets that completes."""
        if not self._sync:
            self._accumulating = True
            return
        b, slot = self._place[index]
        bucket = self.buckets[b]
        if bucket.ready[slot]:
            raise RuntimeError(
                f"{type(self).__name__}: a parameter of shape {tuple(param.shape)} got a gradient twice in one "
                "synchronised step; run all but the last backward under no_sync(), and call "
                "finish_gradient_synchronization() after each synchronised one"
            )
        self._accumulating = False
        bucket.ready[slot] = True
        if self._arrivals is not None:
            self._arrivals.append(index)
        self._launch_in_order(force=False)

    def _launch_in_order(self, force: bool) -> None:
        """Launch buckets in index order, stopping at the first one not ready unless `force`."""
        while self._next < len(self.buckets) and (force or self.buckets[self._next].is_ready):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: Bucket) -> None:
        """Pack gradients / world size (zeros for missing ones) and start the bucket's all-reduce.

        SUM of (g / world) is the average (gloo has no ReduceOp.AVG). The division is fused into
        the copy into the bucket, one pass over the gradient instead of two, as torch DDP does.
        """
        had_grad = [p.grad is not None for p in bucket.params]
        for p, view, present in zip(bucket.params, bucket.views, had_grad):
            if not present:
                view.zero_()
            elif p.grad.data_ptr() == view.data_ptr():  # gradient_as_bucket_view: already in place
                view.div_(self.world_size)
            else:
                torch.div(p.grad, self.world_size, out=view)
        if all(had_grad):
            bucket.flags.fill_(1 / self.world_size)
        else:
            bucket.flags.copy_(torch.tensor(had_grad, dtype=bucket.flags.dtype) / self.world_size)
        bucket.handle = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, async_op=True)

    def _store_average(self, bucket: Bucket, slot: int) -> None:
        p, view = bucket.params[slot], bucket.views[slot]
        if self.gradient_as_bucket_view:
            p.grad = view  # later backwards accumulate straight into the bucket
        elif p.grad is None:
            p.grad = view.clone()
        else:
            p.grad.copy_(view)

    def _reset(self) -> None:
        self._next = 0
        for bucket in self.buckets:
            bucket.reset()


def _gradient_ready(wrapper: weakref.ref[_OverlappedDDP], index: int, param: nn.Parameter) -> None:
    """The hook registered on parameter `index`: forwards to its wrapper while that one lives."""
    if (ddp := wrapper()) is not None:
        ddp._on_gradient_ready(index, param)


class DDPIndividualParameters(_OverlappedDDP):
    """Each gradient is all-reduced on its own, started as soon as backward has produced it.

    "As soon as" within the launch order every rank agrees on (reverse parameter order): a gradient
    that arrives before an earlier one in that order waits for it. `gradient_as_bucket_view=True`
    makes `.grad` a view of the communication buffer, saving one copy per gradient and step.
    """

    def __init__(self, module: nn.Module, gradient_as_bucket_view: bool = False) -> None:
        super().__init__(module, bucket_size_bytes=0, gradient_as_bucket_view=gradient_as_bucket_view)


class DDPBucketed(_OverlappedDDP):
    """Gradients all-reduced in flat buckets of at most `bucket_size_mb` MiB (`None`: one bucket).

    `gradient_as_bucket_view=True` makes each `.grad` a view into its bucket (no copy back after the
    all-reduce, and none at all once gradients are zeroed in place rather than set to None).
    """

    def __init__(self, module: nn.Module, bucket_size_mb: float | None = 25.0,
                 gradient_as_bucket_view: bool = False) -> None:
        if bucket_size_mb is not None and not bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb must be > 0 (or None for a single bucket), got {bucket_size_mb}")
        cap = None if bucket_size_mb is None else bucket_size_mb * MIB
        super().__init__(module, bucket_size_bytes=cap, gradient_as_bucket_view=gradient_as_bucket_view)
