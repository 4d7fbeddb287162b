"""Fixtures of the Triton-interpreter tests (collected only with TRITON_INTERPRET=1)."""

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpreterBuilder, TensorHandle


@pytest.fixture
def bf16_interpreter(monkeypatch):
    """Make the interpreter's bfloat16 math what the GPU does. It stores bf16 as uint16 and (triton
    3.9) its tl.dot multiplies those bit patterns, and its float32 -> bf16 casts truncate instead of
    rounding to nearest even, which doubles the error. Upcast dot operands; round casts with torch."""
    create_dot, cast_impl = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def upcast(builder, x):
        return cast_impl(builder, x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x

    def dot(builder, a, b, d, *args):
        return create_dot(builder, upcast(builder, a), upcast(builder, b), d, *args)

    def cast(builder, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast_impl(builder, src, dst_type)
        rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
        return TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", dot)
    monkeypatch.setattr(InterpreterBuilder, "cast_impl", cast)
