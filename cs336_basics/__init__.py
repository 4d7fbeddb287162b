"""Our CS336 Assignment-1 Transformer LM, API-compatible with the CS336 staff `cs336_basics`."""

from cs336_basics.attention import ATTENTION_IMPLEMENTATIONS, get_attention, register_attention
from cs336_basics.data import get_batch
from cs336_basics.model import (
    BasicsTransformerLM,
    CausalMultiHeadSelfAttention,
    Embedding,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerBlock,
    scaled_dot_product_attention,
    silu,
)
from cs336_basics.nn_utils import clip_gradient, cross_entropy, log_softmax, softmax
from cs336_basics.optimizer import AdamW, get_cosine_lr

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "get_attention", "register_attention",
    "get_batch",
    "BasicsTransformerLM", "CausalMultiHeadSelfAttention", "Embedding", "Linear", "RMSNorm", "RotaryEmbedding",
    "SwiGLU", "TransformerBlock", "scaled_dot_product_attention", "silu",
    "clip_gradient", "cross_entropy", "log_softmax", "softmax",
    "AdamW", "get_cosine_lr",
]
