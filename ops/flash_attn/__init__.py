"""FlashAttention-2: `torch.ops.cs336.flash_attn` and the CS336 autograd Functions.

Importing this package registers the ops. Files, in reading order: reference.py (the math),
documents.py (packed documents: per-token ids -> each token's document range),
tiled.py (pure-PyTorch tiles, the CPU path), kernels.py / kernels_bwd.py (Triton: forward, two-pass
backward), kernels_tma.py / kernels_bwd_onepass.py (Hopper variants: descriptor forward, single-pass
backward), launch*.py (launchers and tile tables), dispatch.py (which variant runs), op.py
(torch.library registration, fakes, autograd, Functions).
"""

from ops.flash_attn.op import FlashAttention2PyTorch, FlashAttention2Triton, check_inputs, flash_attn
from ops.flash_attn.reference import attention_reference

__all__ = ["FlashAttention2PyTorch", "FlashAttention2Triton", "attention_reference", "check_inputs", "flash_attn"]
