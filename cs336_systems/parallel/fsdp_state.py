"""One sharded parameter of FSDP: this rank's fp32 shard, the gathered buffer, the link between them.

`ShardedParam` owns
- `shard`: an nn.Parameter (this rank's flat slice of the padded, flattened weight: the master
  copy in the parameter's dtype, what the optimizer updates);
- `flat`: the all-gather buffer, (world * shard_numel,) in the compute dtype, whose storage is
  allocated only while the full weight is needed and resized to 0 bytes otherwise;
- `full`: this forward's full weight, `_Unshard.apply(shard)`: a view of `flat` shaped like the
  original parameter, which the layers read. Every use of the parameter in one forward (a tied
  weight's two layers, a checkpointed block's recomputation) reads the same `full`, so autograd
  sums the gradients of all uses before `_Unshard.backward` sees them: one reduce-scatter per
  parameter and backward.

Storage is freed by resizing, never by dropping `full`: autograd keeps references to it (a matmul
saves its weight for backward), so dropping our reference would free nothing. Gathering again for
backward refills the same storage. The all-gather writes through `flat`, which shares no version
counter with `full` (`full` is a view of `flat.data`), so the writes do not trip autograd's check
that saved tensors were not modified.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class GatherStats:
    """A wrapper's gather buffers (shared by its params): bytes held now and at most since `reset`,
    and whether each all-gather had finished by the time a layer needed it."""

    current: int = 0
    peak: int = 0
    waits: int = 0  # all-gathers waited for
    late: int = 0  # of those, not finished when the weight was needed (the layer had to wait)
    late_seconds: float = 0.0  # host time spent waiting for the late ones

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def reset(self) -> None:
        self.peak, self.waits, self.late, self.late_seconds = self.current, 0, 0, 0.0


class ShardedParam:
    """One Parameter, flattened, padded to a multiple of the world size and split in dim 0."""

    def __init__(self, param: nn.Parameter, compute_dtype: torch.dtype | None, stats: GatherStats,
                 reduce_dtype: torch.dtype | None = None) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.shape, self.numel = param.shape, param.numel()
        self.shard_numel = -(-self.numel // self.world_size)  # ceil
        padded = self.shard_numel * self.world_size
        flat = torch.zeros(padded, dtype=param.dtype, device=param.device)
        flat[:self.numel] = param.detach().reshape(-1)
        self.shard = nn.Parameter(self._my_slice(flat).clone(), requires_grad=param.requires_grad)
        self.dtype = compute_dtype or param.dtype
        self.reduce_dtype = reduce_dtype or param.dtype  # gradients are averaged in this dtype
        self.flat = torch.empty(padded, dtype=self.dtype, device=param.device)
        self.stats = stats
        self._nbytes = padded * self.flat.element_size()
        self._placeholder = self._full_view()  # made while allocated: slicing empty storage is refused
        self.flat.untyped_storage().resize_(0)
        self.gathered = False  # flat holds the full weight (or will, once _work is waited for)
        self._work: dist.Work | None = None
        self._send: torch.Tensor | None = None  # the all-gather's input, alive until it is waited for
        self.full: torch.Tensor | None = None  # this forward's full weight (reset by the wrapper per forward)
        self._grads: list[tuple[dist.Work, torch.Tensor, torch.Tensor]] = []  # in-flight reduce-scatters

    def _my_slice(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.rank * self.shard_numel:(self.rank + 1) * self.shard_numel]

    def placeholder(self) -> torch.Tensor:
        """The full-shaped view of the (usually empty) buffer: what a layer holds between forwards."""
        return self._placeholder

    def _full_view(self) -> torch.Tensor:
        """The full weight inside `flat`, through an alias with its own version counter (see above)."""
        return self.flat.data[:self.numel].view(self.shape)

    # ---------------------------------------------------------------- all-gather

    def start_gather(self) -> None:
        """Start the asynchronous all-gather of the full weight (a no-op when gathered or in flight)."""
        if self.gathered:
            return
        self.flat.untyped_storage().resize_(self._nbytes)
        self.stats.add(self._nbytes)
        self._send = self.shard.detach().to(self.dtype)  # cast before the gather: half the bytes in bf16
        self._work = dist.all_gather_into_tensor(self.flat, self._send, async_op=True)
        self.gathered = True

    def wait_gather(self) -> None:
        self.start_gather()
        if self._work is None:
            return
        self.stats.waits += 1
        if not self._work.is_completed():  # exposed communication: the layer waits for its weight
            self.stats.late += 1
            start = time.perf_counter()
            with torch.profiler.record_function("fsdp::wait_all_gather"):
                self._work.wait()
            self.stats.late_seconds += time.perf_counter() - start
        self._work.wait()  # completed: returns at once (and surfaces a failed collective's error)
        self._work = self._send = None

    def free(self) -> None:
        """Release the full weight's memory (after waiting for an all-gather still writing to it)."""
        if not self.gathered:
            return
        self.wait_gather()
        self.flat.untyped_storage().resize_(0)
        self.stats.add(-self._nbytes)
        self.gathered = False

    def unsharded(self) -> torch.Tensor:
        """The full weight for a forward: gathered, and an autograd output of the shard."""
        self.wait_gather()
        if self.full is None or (torch.is_grad_enabled() and self.shard.requires_grad and self.full.grad_fn is None):
            self.full = _Unshard.apply(self.shard, self)
        return self.full

    @torch.no_grad()
    def gather_full(self, local: torch.Tensor | None = None) -> torch.Tensor:
        """The whole parameter in full precision, or the whole of `local`, a tensor shaped like the
        shard (e.g. its optimizer state): a new tensor of the parameter's shape; a collective."""
        local = self.shard.detach() if local is None else local.detach()
        out = torch.empty(self.shard_numel * self.world_size, dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(out, local.contiguous())
        return out[:self.numel].view(self.shape)

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard-shaped slice of `full` (shaped like the parameter, the same on every rank)."""
        if full.shape != self.shape:
            raise ValueError(f"expected a tensor of shape {tuple(self.shape)}, got {tuple(full.shape)}")
        flat = full.new_zeros(self.shard_numel * self.world_size)
        flat[:self.numel] = full.reshape(-1)
        return self._my_slice(flat).clone()

    @torch.no_grad()
    def load_full(self, full: torch.Tensor) -> None:
        """Take this rank's slice of `full` (the whole parameter, the same on every rank)."""
        self.shard.copy_(self.local_slice(full))

    # ---------------------------------------------------------------- reduce-scatter

    def reduce_scatter(self, grad: torch.Tensor) -> None:
        """Start averaging `grad` (the full weight's gradient on this rank) into this rank's shard, in the
        reduce dtype (the shard's unless FSDP was given another; `finish` rounds the result to the shard's)."""
        send = torch.zeros(self.shard_numel * self.world_size, dtype=self.reduce_dtype, device=grad.device)
        send[:self.numel] = grad.reshape(-1)
        send.div_(self.world_size)  # SUM of grad / world is the mean (gloo has no ReduceOp.AVG)
        out = torch.empty(self.shard_numel, dtype=self.reduce_dtype, device=grad.device)
        self._grads.append((dist.reduce_scatter_tensor(out, send, async_op=True), out, send))
        self.free()  # every use's backward has run: the full weight is not needed any more

    def finish(self) -> None:
        """Wait for this step's reduce-scatters and add them to `shard.grad`; drop an unused prefetch."""
        self.free()
        for work, out, _ in self._grads:
            work.wait()
            out = out.to(self.shard.dtype)  # a no-op unless reduced in another dtype
            if self.shard.grad is None:
                self.shard.grad = out
            else:
                self.shard.grad += out
        self._grads = []


class _Unshard(torch.autograd.Function):
    """shard -> full weight (already gathered by `sp`); backward reduce-scatters into `shard.grad` itself.

    The backward returns no gradient for the shard: the reduce-scatter is still in flight, and
    `ShardedParam.finish` puts its result into `shard.grad` once it has arrived.
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, sp: ShardedParam) -> torch.Tensor:
        ctx.sp = sp
        return sp._full_view()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None]:
        ctx.sp.reduce_scatter(grad)
        return None, None
