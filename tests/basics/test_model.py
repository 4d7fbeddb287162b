"""cs336_basics.model and cs336_basics.attention against torch.nn.functional and first principles."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from numerics import ORACLE_FACTOR, assert_within_oracle, eps, gamma, max_error

from cs336_basics import attention
from cs336_basics.model import (
    BasicsTransformerLM,
    CausalMultiHeadSelfAttention,
    Embedding,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    scaled_dot_product_attention,
    silu,
)

CONFIG = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)
# std of a unit normal truncated at +-3: sqrt(1 - 6 phi(3) / (Phi(3) - Phi(-3))).
TRUNCATED_STD = 0.9866


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic parameter init and sampling per test, without leaking the global RNG state."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture
def isolated_registry(monkeypatch):
    """Let a test register attention implementations without leaving them behind."""
    monkeypatch.setattr(attention, "_REGISTRY", dict(attention._REGISTRY))
    monkeypatch.setattr(attention, "ATTENTION_IMPLEMENTATIONS", list(attention.ATTENTION_IMPLEMENTATIONS))


def make_model(**overrides) -> BasicsTransformerLM:
    return BasicsTransformerLM(**{**CONFIG, **overrides})


def random_tokens(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(CONFIG["vocab_size"], (batch, seq))


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex multiplication: pair (x[2i], x[2i+1]) is the number x[2i] + j x[2i+1]."""
    dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    rotation = torch.polar(torch.ones(()), (positions[..., None].double() * inv_freq).float())  # (..., T, dim/2)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())  # (..., T, dim/2)
    return torch.view_as_real(pairs * rotation).flatten(-2)  # (..., T, dim)


# ----------------------------------------------------------------------------- leaf layers


def sampling_error(weight: torch.Tensor) -> float:
    """Six standard errors of a sample standard deviation (relative: 1 / sqrt(2 N) for N draws): a
    right initialisation misses it with probability below 1e-8."""
    return 6 / math.sqrt(2 * weight.numel())


def test_linear_matches_f_linear_and_init():
    layer = Linear(96, 160)
    assert layer.weight.shape == (160, 96)
    std = math.sqrt(2 / (96 + 160))
    weight = layer.weight.detach()
    assert weight.abs().max() <= 3 * std
    assert weight.std().item() == pytest.approx(TRUNCATED_STD * std, rel=sampling_error(weight))
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    assert Linear(4, 3, dtype=torch.float64).weight.dtype == torch.float64


def test_embedding_matches_f_embedding_and_init():
    layer = Embedding(200, 64)
    weight = layer.weight.detach()
    assert weight.shape == (200, 64)
    assert weight.abs().max() <= 3.0
    assert weight.std().item() == pytest.approx(TRUNCATED_STD, rel=sampling_error(weight))
    ids = torch.randint(200, (3, 7))
    torch.testing.assert_close(layer(ids), F.embedding(ids, layer.weight))


def test_rmsnorm_matches_f_rms_norm():
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (24,), norm.weight, eps=1e-5))
    # bf16 in, bf16 out, but computed in fp32: as close to the fp32 result as bf16 rounding allows,
    # one bf16 ulp (eps |x|: a float32 result a few ulps off may round to the neighbouring bf16).
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = F.rms_norm(x.bfloat16().float(), (24,), norm.weight, eps=1e-5)
    assert ((out.float() - expected).abs() <= eps(torch.bfloat16) * expected.abs()).all()


def test_silu_and_swiglu_match_reference():
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(silu(x), F.silu(x))
    ffn = SwiGLU(16, 40)
    expected = F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.w2.weight.shape == (16, 40)  # w2 is the down projection


# ----------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("pos_shape", [(10,), (2, 10)])
def test_rope_matches_complex_rotation(pos_shape):
    rope = RotaryEmbedding(context_length=32, dim=16, theta=500.0)
    x = torch.randn(2, 10, 16)
    positions = torch.randint(32, pos_shape)
    torch.testing.assert_close(rope(x, positions), rope_reference(x, positions, theta=500.0))


def test_rope_preserves_norm_and_position_zero():
    rope = RotaryEmbedding(context_length=64, dim=8)
    x = torch.randn(3, 64, 8)
    out = rope(x, torch.arange(64))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[:, 0], x[:, 0])


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(context_length=64, dim=8)
    q, k = torch.randn(2, 1, 8).unbind(0)  # one (1, dim) query and key

    def score(m: int, n: int) -> torch.Tensor:
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum()

    # bound: float32 angles pos * theta (pos < 64, theta <= 1) round by u * 64, a rotation error that
    # moves each rotated vector by that much of its norm; the 8-term dot product adds gamma_8.
    bound = (2 * eps(torch.float32) * 64 + gamma(8, torch.float32)) * (q.norm() * k.norm()).item()
    for m, n in [(5, 2), (2, 5), (7, 7)]:
        for shift in (1, 13, 40):
            assert (score(m + shift, n + shift) - score(m, n)).abs().item() <= bound
    assert not torch.allclose(score(5, 2), score(2, 5))  # but it does depend on the offset


def test_rope_buffers_stay_out_of_the_state_dict():
    assert RotaryEmbedding(context_length=8, dim=4).state_dict() == {}
    assert not any("positional_encoder" in name for name in make_model().state_dict())


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("with_mask", [False, True])
def test_scaled_dot_product_attention_matches_torch(with_mask):
    q, k, v = torch.randn(3, 2, 3, 4, 6, 8).unbind(0)  # leading dims (2, 3, 4)
    mask = None
    if with_mask:
        mask = torch.rand(2, 3, 4, 6, 6) > 0.5
        mask |= torch.eye(6, dtype=torch.bool)  # keep at least one key per query
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask), expected)


@pytest.mark.parametrize("name", ["naive", "sdpa"])
def test_multihead_attention_matches_reference(name):
    d_model, num_heads, seq = 32, 4, 10
    rope = RotaryEmbedding(context_length=16, dim=d_model // num_heads)
    attn = CausalMultiHeadSelfAttention(d_model, num_heads, rope, attention=name)
    x = torch.randn(2, seq, d_model)

    def heads(weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight).view(2, seq, num_heads, -1).transpose(1, 2)  # (B, H, T, D)

    q, k, v = heads(attn.q_proj.weight), heads(attn.k_proj.weight), heads(attn.v_proj.weight)
    positions = torch.arange(seq)
    q, k = rope_reference(q, positions, 10000.0), rope_reference(k, positions, 10000.0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, seq, d_model)
    torch.testing.assert_close(attn(x), F.linear(out, attn.output_proj.weight))


def test_multihead_attention_uses_given_token_positions():
    attn = CausalMultiHeadSelfAttention(16, 2, RotaryEmbedding(context_length=32, dim=8))
    x = torch.randn(2, 6, 16)
    shifted = attn(x, token_positions=torch.arange(6).expand(2, 6) + 9)
    # RoPE scores depend only on relative positions, so a uniform shift changes nothing but rounding:
    # that of the cos/sin tables (the same in a float64 copy of the layer, `exact`: measured there) and
    # of the float32 arithmetic (each run against its float64 twin, twice).
    exact = copy.deepcopy(attn).double()
    exact_shifted, exact_plain = exact(x.double(), token_positions=torch.arange(6).expand(2, 6) + 9), exact(x.double())
    rounding = max_error(shifted, exact_shifted) + max_error(attn(x), exact_plain)
    assert max_error(shifted, attn(x)) <= max_error(exact_shifted, exact_plain) + ORACLE_FACTOR * rounding
    # ...while a non-uniform one does.
    assert not torch.allclose(attn(x, token_positions=torch.tensor([0, 1, 2, 3, 4, 20])), attn(x))


def test_get_attention_names_and_errors():
    assert {"naive", "sdpa", "flash"} <= set(attention.ATTENTION_IMPLEMENTATIONS)
    assert attention.get_attention("sdpa") is attention.sdpa_attention
    with pytest.raises(ValueError, match=r"attention must be one of \['naive', 'sdpa', 'flash'.*'nope'"):
        attention.get_attention("nope")


def test_register_attention(isolated_registry):
    calls = []

    def counting(q, k, v, is_causal):
        calls.append(q.shape)
        return attention.sdpa_attention(q, k, v, is_causal)

    attention.register_attention("counting", counting)
    attention.register_attention("counting", counting)  # same function again: a no-op
    assert attention.ATTENTION_IMPLEMENTATIONS.count("counting") == 1
    model = make_model(attention="counting")
    model(random_tokens(seq=5))
    assert calls == [(2, 4, 5, 8)] * CONFIG["num_layers"]
    with pytest.raises(ValueError, match="already registered"):
        attention.register_attention("counting", attention.naive_attention)
    with pytest.raises(ValueError, match="fn must be callable"):
        attention.register_attention("other", None)


def test_flash_attention_resolves_lazily():
    assert attention.get_attention("flash") is attention.flash_attention
    assert hasattr(torch.ops.cs336, "flash_attn")


# ----------------------------------------------------------------------------- the LM


def test_forward_shape_and_causality():
    model = make_model()
    ids = random_tokens(seq=12)
    logits = model(ids)
    assert logits.shape == (2, 12, CONFIG["vocab_size"])
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % CONFIG["vocab_size"]
    new_logits = model(changed)
    torch.testing.assert_close(new_logits[:, :8], logits[:, :8], atol=0, rtol=0)
    assert not torch.allclose(new_logits[:, 8:], logits[:, 8:])


def logits_and_grads(model: BasicsTransformerLM, ids: torch.Tensor, forward=None) -> tuple[torch.Tensor, dict]:
    """Logits and parameter gradients of a next-token loss; `forward` defaults to `model` itself."""
    model.zero_grad()
    logits = (model if forward is None else forward)(ids)
    F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, dims=1).flatten()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_logits_and_grads(actual: tuple, expected: tuple, model: BasicsTransformerLM, ids: torch.Tensor) -> None:
    """Logits and gradients of `actual` err from the float64 naive model at most twice what `expected`
    (the float32 eager naive model) does on this machine (tests/numerics.py)."""
    exact_model = copy.deepcopy(model).double()
    exact_model.set_attention("naive")
    exact = logits_and_grads(exact_model, ids.to(next(exact_model.parameters()).device))
    assert_within_oracle("logits", actual[0], expected[0], exact[0], torch.float32)
    assert actual[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        assert_within_oracle(name, actual[1][name], grad, exact[1][name], torch.float32)


def test_set_attention_switches_every_layer_and_matches_naive():
    model = make_model()
    ids = random_tokens()
    naive = logits_and_grads(model, ids)
    model.set_attention("sdpa")
    assert all(layer.attn.attention_fn is attention.sdpa_attention for layer in model.layers)
    assert model.config["attention"] == "sdpa"
    assert_same_logits_and_grads(logits_and_grads(model, ids), naive, model, ids)


def test_set_attention_unknown_name_changes_nothing():
    model = make_model(attention="sdpa")
    with pytest.raises(ValueError, match="attention must be one of"):
        model.set_attention("nope")
    assert all(layer.attn.attention == "sdpa" for layer in model.layers)
    assert model.config["attention"] == "sdpa"


# The flash op has a tiled PyTorch path on CPU and Triton kernels on CUDA (float32 at float32
# accuracy: three TF32 products per dot).
@pytest.mark.numerics
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_flash_attention_matches_naive_in_model(device):
    model = make_model().to(device)
    ids = random_tokens(seq=CONFIG["context_length"]).to(device)
    naive = logits_and_grads(model, ids)
    model.set_attention("flash")
    assert_same_logits_and_grads(logits_and_grads(model, ids), naive, model, ids)


@pytest.mark.parametrize("name", ["naive", "flash"])
def test_compiled_model_matches_eager(name):
    model = make_model(attention=name, num_layers=1)  # dynamo unrolls the layer loop: one layer is enough
    ids = random_tokens()
    eager = logits_and_grads(model, ids)
    # fullgraph=True: the attention function, RoPE and the validation all trace without a graph break.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_same_logits_and_grads(logits_and_grads(model, ids, forward=compiled), eager, model, ids)


def test_get_num_params():
    v, d, layers, d_ff = CONFIG["vocab_size"], CONFIG["d_model"], CONFIG["num_layers"], CONFIG["d_ff"]
    per_layer = 4 * d * d + 3 * d * d_ff + 2 * d  # q, k, v, out; w1, w2, w3; two RMSNorm weights
    total = v * d + layers * per_layer + d + d * v  # embeddings, layers, ln_final, lm_head
    model = make_model()
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - v * d


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(d_model=30), "num_heads"),
        (dict(d_model=12), "must be even"),  # head_dim 3
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_layers=2.0), "num_layers"),
        (dict(attention="nope"), "attention"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_model(**overrides)


def test_bad_inputs_raise():
    model = make_model()
    with pytest.raises(ValueError, match="context_length"):
        model(random_tokens(seq=CONFIG["context_length"] + 1))
    with pytest.raises(ValueError, match="token_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="dim"):
        RotaryEmbedding(context_length=8, dim=7)
    with pytest.raises(ValueError, match="positional_encoder"):
        CausalMultiHeadSelfAttention(32, 4, RotaryEmbedding(context_length=8, dim=4))


# ----------------------------------------------------------------------------- generation


def test_generate_shapes_and_greedy_decoding():
    model = make_model()
    prompt = random_tokens(batch=2, seq=CONFIG["context_length"])  # generating crops to the context
    out = model.generate(prompt, max_new_tokens=5, temperature=0)
    assert out.shape == (2, 5)
    sequence = prompt
    for _ in range(5):
        sequence = torch.cat([sequence, model(sequence[:, -CONFIG["context_length"]:])[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(out, sequence[:, -5:])
    # top_k=1 keeps only the argmax, so sampling from it is greedy too.
    torch.testing.assert_close(model.generate(prompt, max_new_tokens=5, top_k=1), out)
    assert model.generate(prompt[0], max_new_tokens=3).shape == (1, 3)  # a 1-D prompt is one row


def force_next_tokens(model: BasicsTransformerLM, tokens_per_call: list[list[int]]) -> None:
    """Make the model's last-position logits pick `tokens_per_call[i][row]` on its i-th forward."""
    calls = iter(tokens_per_call)

    def hook(module, inputs, logits):
        forced = torch.tensor(next(calls))  # (B,)
        logits = logits.clone()
        logits[torch.arange(len(forced)), -1, forced] = 1e4
        return logits

    model.lm_head.register_forward_hook(hook)


def test_generate_stops_at_eos():
    eos = 7
    model = make_model()
    force_next_tokens(model, [[eos]])
    assert model.generate(random_tokens(batch=1, seq=3), max_new_tokens=10, eos_token_id=eos).shape == (1, 0)

    # Row 0 finishes first and is padded with eos; the step where row 1 finishes is not returned.
    model = make_model()
    force_next_tokens(model, [[3, 5], [eos, 5], [1, 5], [2, eos]])
    out = model.generate(random_tokens(batch=2, seq=3), max_new_tokens=10, eos_token_id=eos)
    assert out.tolist() == [[3, eos, eos], [5, 5, 5]]


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens")],
)
def test_generate_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model().generate(random_tokens(), **{"max_new_tokens": 2, **kwargs})
