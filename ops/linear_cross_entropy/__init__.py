"""Fused LM head + cross-entropy: `torch.ops.cs336.linear_cross_entropy`, never holding all the logits.

Importing this package registers the ops. Files, in reading order: reference.py (the math, unfused),
chunked.py (chunked PyTorch, the CPU path), kernels.py (Triton: loss and dlogits of a chunk of
logits), launch.py (cuBLAS matmuls around the kernel, chunk by chunk), op.py (torch.library
registration, fakes, autograd). docs/lm_loss.md explains the algorithm and its memory and FLOPs.
"""

from ops.linear_cross_entropy.op import LinearCrossEntropyFunction, check_inputs, linear_cross_entropy
from ops.linear_cross_entropy.reference import linear_cross_entropy_reference

__all__ = ["LinearCrossEntropyFunction", "check_inputs", "linear_cross_entropy", "linear_cross_entropy_reference"]
