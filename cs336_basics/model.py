"""The CS336 Assignment-1 Transformer LM: pre-norm blocks, RMSNorm, RoPE, SwiGLU, no biases.

Classes in reading order: the LM, its block, attention, feed-forward, then the leaf layers.
Parameter names match the CS336 staff `cs336_basics` so checkpoints load in either.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cs336_basics.attention import get_attention, scaled_dot_product_attention, takes_document_ids
from cs336_basics.nn_utils import check_positive_int, softmax

__all__ = [
    "BasicsTransformerLM", "TransformerBlock", "CausalMultiHeadSelfAttention", "SwiGLU", "silu",
    "RotaryEmbedding", "RMSNorm", "Embedding", "Linear", "scaled_dot_product_attention",
]


class BasicsTransformerLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size).

    `attention` names an implementation in `cs336_basics.attention` ("naive", "sdpa", "flash", or one
    added with `register_attention`); `set_attention` switches every layer later. `num_kv_heads`
    (grouped-query attention): key/value heads, each shared by num_heads // num_kv_heads query heads;
    None means num_heads (multi-head attention).
    """

    def __init__(self, vocab_size: int, context_length: int, d_model: int, num_layers: int, num_heads: int,
                 d_ff: int, rope_theta: float = 10000.0, attention: str = "naive", num_kv_heads: int | None = None):
        super().__init__()
        check_positive_int(vocab_size=vocab_size, context_length=context_length, d_model=d_model,
                           num_layers=num_layers, num_heads=num_heads, d_ff=d_ff)
        _check_heads(d_model, num_heads, num_kv_heads)
        if (d_model // num_heads) % 2:
            raise ValueError(f"d_model // num_heads = {d_model // num_heads} must be even: RoPE rotates pairs of dims")
        # Constructor arguments, so a checkpoint can rebuild the model: `BasicsTransformerLM(**config)`.
        self.config = dict(vocab_size=vocab_size, context_length=context_length, d_model=d_model,
                           num_layers=num_layers, num_heads=num_heads, d_ff=d_ff, rope_theta=rope_theta,
                           attention=attention)
        if num_kv_heads is not None:  # only when set: configs saved before GQA existed still match
            self.config["num_kv_heads"] = num_kv_heads
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.token_embeddings = Embedding(vocab_size, d_model)
        # One RoPE table shared by every layer (its buffers are non-persistent, so not in the state dict).
        self.positional_encoder = RotaryEmbedding(context_length, d_model // num_heads, theta=rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, num_heads, d_ff, self.positional_encoder, attention, num_kv_heads)
            for _ in range(num_layers)
        )
        self.ln_final = RMSNorm(d_model)
        self.lm_head = Linear(d_model, vocab_size)

    def forward(self, token_ids: Tensor, targets: Tensor | None = None, document_ids: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab); or, given `targets` (B, T), the mean next-token cross-entropy
        computed by the fused LM head (`ops.linear_cross_entropy`), which never builds the logits.
        `document_ids`: see `hidden_states`."""
        hidden = self.hidden_states(token_ids, document_ids)  # (B, T, d_model)
        if targets is None:
            return self.lm_head(hidden)  # (B, T, vocab)
        return self.fused_loss(hidden, targets)

    def hidden_states(self, token_ids: Tensor, document_ids: Tensor | None = None) -> Tensor:
        """The final normalised hidden states (B, T, d_model): what the LM head reads.

        Packed documents: `document_ids` (B, T), nondecreasing along each row (not checked here: that
        reads the values, a host sync per step; the flash op checks it), marks which document each
        token belongs to. A token then attends only to earlier tokens of its own document, and its
        RoPE position counts from that document's first token, so each document is computed as if
        it were alone in its row.
        """
        _check_tokens(token_ids, document_ids, self.context_length)
        positions = attention_ids = None
        if document_ids is not None:
            positions = document_positions(document_ids)  # (B, T)
            attention_ids = document_ids.unsqueeze(-2)  # (B, 1, T): the same for every head
        x = self.token_embeddings(token_ids)  # (B, T, d_model)
        for layer in self.layers:
            # Positional: checkpointed block groups pass their extra arguments on as *args.
            x = layer(x, positions, attention_ids)
        return self.ln_final(x)

    def fused_loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of lm_head(hidden) (B, T, d_model) against targets (B, T), float32,
        in chunks of tokens: the (B, T, vocab) logits never exist at once."""
        from ops.linear_cross_entropy import linear_cross_entropy  # lazy: triton only when used

        weight = self.lm_head.weight  # (vocab, d_model)
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # the op is outside autocast: cast as its matmuls would
            dtype = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        elif weight.dtype != hidden.dtype:
            hidden = hidden.to(weight.dtype)
        with torch.autocast(device, enabled=False):  # its own precision: fp32 accumulation and loss
            return linear_cross_entropy(hidden, weight, targets)

    def set_attention(self, name: str) -> None:
        """Switch every attention layer to implementation `name` (takes effect on the next forward)."""
        get_attention(name)  # validate before touching any layer
        for module in self.modules():
            if isinstance(module, CausalMultiHeadSelfAttention):
                module.set_attention(name)
        self.config["attention"] = name

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; `non_embedding` leaves out the token-embedding table.

        The lookup table costs no FLOPs while lm_head is a real matmul, so this is the N of the
        6·N·D training-FLOPs estimate. (It equals the staff count, which drops lm_head: same size.)
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.token_embeddings.weight.numel()
        return n_params

    @torch.no_grad()
    def generate(self, x: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eos_token_id: int | None = None) -> Tensor:
        """Sample up to `max_new_tokens` after prompt `x` (T,) or (B, T); returns the new ids (B, n).

        `temperature=0` is greedy decoding. With `eos_token_id`, generation stops at the step where
        every row has produced it; that step is not returned (as in the CS336 staff model), and rows
        that finished earlier are padded with `eos_token_id`.
        """
        _check_sampling(max_new_tokens, temperature, top_k)
        x = x.unsqueeze(0) if x.dim() == 1 else x  # (B, T)
        new_tokens = []
        finished = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # (B,)
        for _ in range(max_new_tokens):
            logits = self(x[:, -self.context_length:])[:, -1]  # (B, vocab)
            next_token = _sample(logits, temperature, top_k)  # (B,)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
                # A CPU-GPU sync per token; fine for sampling, which is not a training hot path.
                if finished.all():
                    break
            new_tokens.append(next_token)
            x = torch.cat([x, next_token[:, None]], dim=1)  # (B, T + 1)
        return torch.stack(new_tokens, dim=1) if new_tokens else x.new_empty(x.shape[0], 0)


def document_positions(document_ids: Tensor) -> Tensor:
    """Each token's position within its document, (..., T) -> (..., T): t minus the index of the first
    token of t's run of equal ids. On the ids' device, without a host sync (a running max of starts)."""
    t = torch.arange(document_ids.shape[-1], device=document_ids.device)  # (T,)
    starts = F.pad(document_ids.diff(dim=-1) != 0, (1, 0), value=True)  # (..., T): a document begins here
    first = torch.where(starts, t, 0).cummax(dim=-1).values  # (..., T): the latest start at or before t
    return t - first


def _check_tokens(token_ids: Tensor, document_ids: Tensor | None, context_length: int) -> None:
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must have shape (batch, seq), got {tuple(token_ids.shape)}")
    if token_ids.shape[1] > context_length:
        raise ValueError(f"token_ids has {token_ids.shape[1]} tokens, more than context_length={context_length}")
    if document_ids is None:
        return
    if document_ids.shape != token_ids.shape:
        raise ValueError(f"document_ids must have the shape of token_ids {tuple(token_ids.shape)}, "
                         f"got {tuple(document_ids.shape)}")
    if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must be an integer tensor, got {document_ids.dtype}")


def _check_heads(d_model: int, num_heads: int, num_kv_heads: int | None = None) -> None:
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    if num_kv_heads is not None:
        check_positive_int(num_kv_heads=num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads} "
                             "(each kv head serves a whole group of query heads)")


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None:
        check_positive_int(top_k=top_k)


def _sample(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """One token id per row of `logits` (B, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    return torch.multinomial(softmax(logits, dim=-1), num_samples=1).squeeze(-1)  # (B,)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then + ffn(ln2(.))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, positional_encoder: RotaryEmbedding | None,
                 attention: str = "naive", num_kv_heads: int | None = None):
        super().__init__()
        self.ln1 = RMSNorm(d_model)
        self.attn = CausalMultiHeadSelfAttention(d_model, num_heads, positional_encoder, attention, num_kv_heads)
        self.ln2 = RMSNorm(d_model)
        self.ffn = SwiGLU(d_model, d_ff)

    def forward(self, x: Tensor, token_positions: Tensor | None = None, document_ids: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), token_positions, document_ids)
        return x + self.ffn(self.ln2(x))


class CausalMultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention with RoPE on queries and keys (None: no positional encoding).

    `num_kv_heads` (default num_heads): grouped-query attention, keys and values with fewer heads,
    each read by num_heads // num_kv_heads consecutive query heads; k_proj and v_proj shrink to
    num_kv_heads * head_dim outputs.
    """

    def __init__(self, d_model: int, num_heads: int, positional_encoder: RotaryEmbedding | None,
                 attention: str = "naive", num_kv_heads: int | None = None):
        super().__init__()
        check_positive_int(d_model=d_model, num_heads=num_heads)
        _check_heads(d_model, num_heads, num_kv_heads)
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = d_model // num_heads
        if positional_encoder is not None and positional_encoder.dim != self.head_dim:
            raise ValueError(f"positional_encoder.dim={positional_encoder.dim} must equal "
                             f"d_model // num_heads = {self.head_dim}")
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = Linear(d_model, d_model)
        self.k_proj = Linear(d_model, kv_dim)
        self.v_proj = Linear(d_model, kv_dim)
        self.output_proj = Linear(d_model, d_model)
        self.positional_encoder = positional_encoder
        self.set_attention(attention)

    def set_attention(self, name: str) -> None:
        # Resolve once here, not per forward: compiled graphs then see one fixed function.
        self.attention_fn = get_attention(name)
        self.attention = name
        self.attention_takes_documents = takes_document_ids(self.attention_fn)

    def forward(self, x: Tensor, token_positions: Tensor | None = None, document_ids: Tensor | None = None) -> Tensor:
        """x (..., T, d_model); token_positions (..., T) or (T,), default 0..T-1; document_ids
        broadcastable to (..., H, T), e.g. (B, 1, T): attend only within a document (see
        BasicsTransformerLM.hidden_states, which also restarts the positions per document)."""
        q = self._split_heads(self.q_proj(x), self.num_heads)  # (..., H, T, head_dim)
        k = self._split_heads(self.k_proj(x), self.num_kv_heads)  # (..., Hkv, T, head_dim)
        v = self._split_heads(self.v_proj(x), self.num_kv_heads)  # (..., Hkv, T, head_dim)
        if self.positional_encoder is not None:
            if token_positions is None:
                token_positions = torch.arange(x.shape[-2], device=x.device)  # (T,)
            else:
                token_positions = token_positions.unsqueeze(-2)  # (..., 1, T): the same for every head
            q = self.positional_encoder(q, token_positions)
            k = self.positional_encoder(k, token_positions)
        out = self._attend(q, k, v, document_ids)  # (..., H, T, head_dim)
        out = out.transpose(-3, -2).flatten(-2)  # (..., T, d_model)
        return self.output_proj(out)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor | None) -> Tensor:
        if document_ids is None:  # the four-argument call every registered implementation takes
            return self.attention_fn(q, k, v, True)
        if not self.attention_takes_documents:
            raise ValueError(f"document_ids given, but attention {self.attention!r} takes no document_ids argument")
        return self.attention_fn(q, k, v, True, document_ids=document_ids)

    def _split_heads(self, x: Tensor, heads: int) -> Tensor:
        x = x.unflatten(-1, (heads, self.head_dim))  # (..., T, heads, head_dim)
        return x.transpose(-3, -2)  # (..., heads, T, head_dim)

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return f"num_heads={self.num_heads}{kv}, head_dim={self.head_dim}, attention={self.attention!r}"


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): a gated feed-forward layer; w2 is the down projection."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = Linear(d_model, d_ff)
        self.w2 = Linear(d_ff, d_model)
        self.w3 = Linear(d_model, d_ff)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(silu(self.w1(x)) * self.w3(x))


def silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each pair of adjacent dims (2i, 2i+1) of a vector at position m by m * theta^(-2i/dim)."""

    def __init__(self, context_length: int, dim: int, theta: float = 10000.0):
        super().__init__()
        check_positive_int(context_length=context_length, dim=dim)
        if dim % 2:
            raise ValueError(f"dim must be even (RoPE rotates pairs of dims), got {dim}")
        if theta <= 0:
            raise ValueError(f"theta must be positive, got {theta}")
        self.context_length = context_length
        self.dim = dim
        # Angles in float64: in fp32, m * freq at m ~ 1e4 keeps only ~3 decimal digits of the phase.
        inv_freq = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        angles = torch.outer(torch.arange(context_length, dtype=torch.float64), inv_freq)  # (context, dim/2)
        # Non-persistent: derived from the config, so kept out of the state dict.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, pos_ids: Tensor) -> Tensor:
        """x (..., T, dim); pos_ids broadcastable to (..., T), e.g. (T,)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dim {self.dim} (the RoPE dim), got {tuple(x.shape)}")
        cos, sin = self.cos[pos_ids], self.sin[pos_ids]  # (..., T, dim/2)
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., T, dim/2) each: even and odd dims
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., T, dim/2, 2)
        return rotated.flatten(-2).to(x.dtype)  # (..., T, dim)

    def extra_repr(self) -> str:
        return f"context_length={self.context_length}, dim={self.dim}"


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (squares of bf16 activations overflow/lose precision)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        check_positive_int(hidden_size=hidden_size)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        x = x.to(torch.promote_types(in_dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x * self.weight).to(in_dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.shape[0]}, eps={self.eps}"


class Embedding(nn.Module):
    """A lookup table (num_embeddings, embedding_dim), initialised N(0, 1) truncated at +-3."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        check_positive_int(num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.weight[token_ids]  # (..., embedding_dim)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.weight.shape[0]}, embedding_dim={self.weight.shape[1]}"


class Linear(nn.Module):
    """y = x W^T without bias; W (out, in) ~ N(0, 2 / (in + out)) truncated at +-3 std."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        check_positive_int(in_features=in_features, out_features=out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        std = math.sqrt(2 / (in_features + out_features))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T  # (..., out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"
