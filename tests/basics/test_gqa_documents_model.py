"""Grouped-query attention (num_kv_heads) and packed documents (document_ids) in cs336_basics.

The strong checks: a GQA layer is an MHA layer whose k/v weights repeat per query group; a packed row
of several documents gives each document the logits it gets alone; the default model is unchanged.
"""

import copy

import pytest
import torch
from numerics import ORACLE_FACTOR, assert_within_oracle, eps, max_error

from cs336_basics import attention
from cs336_basics.model import BasicsTransformerLM, CausalMultiHeadSelfAttention, RotaryEmbedding, document_positions
from cs336_systems.parallel.activation_checkpointing import apply_activation_checkpointing

CONFIG = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)
# Two rows of 13 tokens: documents of 4, 1, 5 and 3 tokens, then one document filling the row.
DOCUMENTS = torch.tensor([[0] * 4 + [1] + [2] * 5 + [3] * 3, [5] * 13])  # (2, 13)


@pytest.fixture(autouse=True)
def _seed():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def make_model(**overrides) -> BasicsTransformerLM:
    return BasicsTransformerLM(**{**CONFIG, **overrides})


def random_tokens(shape=(2, 13)) -> torch.Tensor:
    return torch.randint(CONFIG["vocab_size"], shape)


def runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document in `ids` (B, T), by a plain loop."""
    out = []
    for row, values in enumerate(ids.tolist()):
        start = 0
        for t in range(1, len(values) + 1):
            if t == len(values) or values[t] != values[start]:
                out.append((row, start, t))
                start = t
    return out


# ----------------------------------------------------------------------------- the default is unchanged


def test_default_model_keeps_its_parameters_and_config():
    d, v, ff = CONFIG["d_model"], CONFIG["vocab_size"], CONFIG["d_ff"]
    block = {"ln1.weight": (d,), "attn.q_proj.weight": (d, d), "attn.k_proj.weight": (d, d),
             "attn.v_proj.weight": (d, d), "attn.output_proj.weight": (d, d), "ln2.weight": (d,),
             "ffn.w1.weight": (ff, d), "ffn.w2.weight": (d, ff), "ffn.w3.weight": (ff, d)}
    expected = {"token_embeddings.weight": (v, d),
                **{f"layers.{i}.{name}": shape for i in range(CONFIG["num_layers"]) for name, shape in block.items()},
                "ln_final.weight": (d,), "lm_head.weight": (v, d)}
    model = make_model()
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == expected
    assert list(model.state_dict()) == list(expected)  # the same order too
    assert "num_kv_heads" not in model.config  # configs saved before GQA existed rebuild the same model
    # num_kv_heads == num_heads is the same model, computed by the same operations: bit-equal.
    same = make_model(num_kv_heads=CONFIG["num_heads"])
    same.load_state_dict(model.state_dict())
    ids = random_tokens()
    assert torch.equal(same(ids), model(ids))
    assert BasicsTransformerLM(**same.config).config["num_kv_heads"] == CONFIG["num_heads"]


# ----------------------------------------------------------------------------- grouped-query attention


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["naive", "sdpa"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_is_mha_with_kv_heads_repeated_per_group(name, kv_heads):
    d_model, heads, seq = 32, 4, 10
    rope = RotaryEmbedding(context_length=16, dim=d_model // heads)
    gqa = CausalMultiHeadSelfAttention(d_model, heads, rope, attention=name, num_kv_heads=kv_heads)
    assert gqa.k_proj.weight.shape == gqa.v_proj.weight.shape == (kv_heads * d_model // heads, d_model)
    # The MHA twin: query head h reads kv head h // (heads / kv_heads), so its k/v rows repeat that head's.
    mha = CausalMultiHeadSelfAttention(d_model, heads, rope, attention="naive")
    with torch.no_grad():
        for proj in ("q_proj", "output_proj"):
            getattr(mha, proj).weight.copy_(getattr(gqa, proj).weight)
        for proj in ("k_proj", "v_proj"):
            weight = getattr(gqa, proj).weight.unflatten(0, (kv_heads, -1))  # (Hkv, head_dim, d_model)
            getattr(mha, proj).weight.copy_(weight.repeat_interleave(heads // kv_heads, dim=0).flatten(0, 1))
    x = torch.randn(2, seq, d_model)
    exact = copy.deepcopy(mha).double()(x.double())
    assert_within_oracle("gqa", gqa(x), mha(x), exact)


@pytest.mark.parametrize(
    "overrides, match",
    [(dict(num_kv_heads=3), "num_kv_heads=3"), (dict(num_kv_heads=0), "num_kv_heads"),
     (dict(num_kv_heads=8), "num_kv_heads=8")],
)
def test_bad_num_kv_heads_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_model(**overrides)


def test_attention_rejects_heads_that_do_not_group():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8)
    for fn in (attention.naive_attention, attention.sdpa_attention):
        with pytest.raises(ValueError, match="multiple of k's"):
            fn(q, k, k, True)


# ----------------------------------------------------------------------------- packed documents


def test_document_positions_restart_at_each_document():
    positions = document_positions(DOCUMENTS)
    expected = torch.zeros_like(DOCUMENTS)
    for row, start, end in runs(DOCUMENTS):
        expected[row, start:end] = torch.arange(end - start)
    assert torch.equal(positions, expected)


def assert_each_document_as_if_alone(model: BasicsTransformerLM, packed: torch.Tensor, ids: torch.Tensor,
                                     exact_model: BasicsTransformerLM) -> None:
    """`packed` (logits of `ids`'s rows, packed) against each document run alone through the float64
    `exact_model`. The bound: ORACLE_FACTOR x the error of the same model run alone in float32
    against float64, scaled by eps(dtype) / eps(float32) (rounding errors scale with the unit
    roundoff), plus one eps(dtype) of the logits' size."""
    dtype = packed.dtype
    low_model = copy.deepcopy(exact_model).float()
    for row, start, end in runs(DOCUMENTS):
        alone = ids[row : row + 1, start:end]  # (1, n): the document alone
        exact = exact_model(alone)[0]
        float32_error = max_error(low_model(alone)[0], exact)
        bound = ORACLE_FACTOR * float32_error * eps(dtype) / eps(torch.float32) + eps(dtype) * exact.abs().max().item()
        error = max_error(packed[row, start:end], exact)
        assert error <= bound, f"document {row}:{start}-{end}: {error:.3e} > {bound:.3e}"


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["naive", "sdpa"])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_packed_documents_match_each_document_alone(name, kv_heads):
    model = make_model(attention=name, num_kv_heads=kv_heads).double()
    ids = random_tokens()
    packed = model(ids, document_ids=DOCUMENTS)  # (2, 13, vocab)
    assert_each_document_as_if_alone(model, packed, ids, model)
    # ...while without the ids the later documents see the earlier ones.
    assert max_error(model(ids)[0, 4:], packed[0, 4:]) > 1e-3


@pytest.mark.numerics
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_flash_packed_documents_match_each_document_alone(kv_heads):
    model = make_model(attention="flash", num_kv_heads=kv_heads)
    ids = random_tokens()
    exact_model = copy.deepcopy(model).double()
    exact_model.set_attention("naive")
    assert_each_document_as_if_alone(model, model(ids, document_ids=DOCUMENTS), ids, exact_model)


def logits_and_grads(model, forward, ids: torch.Tensor, documents: torch.Tensor) -> tuple:
    model.zero_grad()
    logits = forward(ids, document_ids=documents)
    logits.square().mean().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["naive", "sdpa", "flash"])
def test_compiled_packed_gqa_model_matches_eager(name):
    model = make_model(attention=name, num_kv_heads=2, num_layers=1)
    ids = random_tokens()
    eager = logits_and_grads(model, model, ids, DOCUMENTS)
    # fullgraph: the positions (a cummax), the masks and the attention trace without a graph break.
    compiled = logits_and_grads(model, torch.compile(model, backend="aot_eager", fullgraph=True), ids, DOCUMENTS)
    exact_model = copy.deepcopy(model).double()
    exact_model.set_attention("naive")
    exact = logits_and_grads(exact_model, exact_model, ids, DOCUMENTS)
    assert_within_oracle("logits", compiled[0], eager[0], exact[0])
    for param, grad in eager[1].items():
        assert_within_oracle(param, compiled[1][param], grad, exact[1][param])


def test_checkpointed_blocks_pass_the_documents_on():
    model = make_model(num_kv_heads=2)
    ids = random_tokens()
    plain = logits_and_grads(model, model, ids, DOCUMENTS)
    # Recomputation repeats the same operations in the same order on one machine: bit-equal.
    checkpointed = apply_activation_checkpointing(copy.deepcopy(model), "full")
    ours = logits_and_grads(checkpointed, checkpointed, ids, DOCUMENTS)
    assert torch.equal(ours[0], plain[0])
    # Wrapping renames the blocks' parameters (layers.0.blocks.0...) but keeps their order.
    assert len(ours[1]) == len(plain[1])
    for (param, grad), ours_grad in zip(plain[1].items(), ours[1].values(), strict=True):
        assert torch.equal(ours_grad, grad), param


def test_bad_document_ids_raise():
    model = make_model()
    ids = random_tokens()
    with pytest.raises(ValueError, match="document_ids must have the shape"):
        model(ids, document_ids=DOCUMENTS[:, :5])
    with pytest.raises(ValueError, match="document_ids must be an integer"):
        model(ids, document_ids=DOCUMENTS.float())


def test_four_argument_attention_still_works_without_documents(monkeypatch):
    monkeypatch.setattr(attention, "_REGISTRY", dict(attention._REGISTRY))
    monkeypatch.setattr(attention, "ATTENTION_IMPLEMENTATIONS", list(attention.ATTENTION_IMPLEMENTATIONS))

    def old_style(q, k, v, is_causal):
        return attention.sdpa_attention(q, k, v, is_causal)

    attention.register_attention("old-style", old_style)
    model = make_model(attention="old-style")
    ids = random_tokens()
    model.set_attention("sdpa")
    expected = model(ids)
    model.set_attention("old-style")
    assert torch.equal(model(ids), expected)  # it calls sdpa with the same arguments
    with pytest.raises(ValueError, match="'old-style' takes no document_ids"):
        model(ids, document_ids=DOCUMENTS)
