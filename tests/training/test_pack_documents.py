"""`train --pack-documents`: windows carry document ids, the loss keeps its meaning, and the whole job
runs on CPU with grouped-query attention, eager and compiled."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_within_oracle

from cs336_basics.model import BasicsTransformerLM
from cs336_systems import cli
from cs336_systems.errors import ConfigError
from cs336_systems.training import command as train
from cs336_systems.training.config import config_from_args
from cs336_systems.training.corpus import EOT_ID, load_corpus
from cs336_systems.training.data import TokenBatches, document_ids_of, validation_batches
from cs336_systems.training.loss import lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["--preset", "tiny-gqa", "--context-length", "32", "--batch-size", "4", "--steps", "2", "--log-every", "1",
          "--eval-every", "2", "--eval-batches", "1", "--nproc", "1", "--no-progress"]


def parse(*flags: str):
    return config_from_args(cli.build_parser().parse_args(["train", *COMMON, *flags]))


def ids_by_loop(inputs: torch.Tensor, eot_id: int) -> torch.Tensor:
    """The definition, a plain loop: end-of-text tokens strictly before each position of its row."""
    out = torch.zeros_like(inputs)
    for row, values in enumerate(inputs.tolist()):
        seen = 0
        for t, token in enumerate(values):
            out[row, t] = seen
            seen += token == eot_id
    return out


# ---------------------------------------------------------------- document ids of a window


def test_document_ids_count_the_end_of_text_tokens_before_each_position():
    inputs = torch.tensor([[5, 0, 3, 4, 0, 0, 7], [0, 2, 2, 2, 2, 2, 0]])
    assert document_ids_of(inputs, eot_id=0).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    corpus = torch.from_numpy(load_corpus()[0][:4 * 64].astype(np.int64)).view(4, 64)
    ids = document_ids_of(corpus, EOT_ID)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ids_by_loop(corpus, EOT_ID))


def test_batches_carry_document_ids_only_when_packing():
    tokens = load_corpus()[0]
    common = dict(tokens=tokens, batch_size=8, context_length=32, accumulation=2, seed=0, rank=0, world_size=1,
                  device=torch.device("cpu"))
    plain, packed = TokenBatches(**common).micro_batches(3), TokenBatches(**common, eot_id=EOT_ID).micro_batches(3)
    assert [len(batch) for batch in plain] == [2, 2] and [len(batch) for batch in packed] == [3, 3]
    for (inputs, targets), (p_inputs, p_targets, ids) in zip(plain, packed, strict=True):
        assert torch.equal(inputs, p_inputs) and torch.equal(targets, p_targets)  # the same windows
        assert torch.equal(ids.long(), ids_by_loop(inputs, EOT_ID))
    val = validation_batches(tokens, 6, 4, 32, rank=0, world_size=1, device=torch.device("cpu"), eot_id=EOT_ID)
    assert [tuple(t.shape[0] for t in batch) for batch in val] == [(4, 4, 4), (2, 2, 2)]
    assert all(torch.equal(ids.long(), ids_by_loop(inputs, EOT_ID)) for inputs, _, ids in val)


# ---------------------------------------------------------------- the loss


@pytest.mark.numerics
@pytest.mark.parametrize("loss", ["fused", "unfused"])
def test_packed_loss_is_the_mean_over_every_position(loss):
    """Packing changes what the model sees, not what the loss averages: every position's next-token
    cross-entropy, the end-of-text position's target (the next document's first token) included."""
    torch.manual_seed(0)
    model = BasicsTransformerLM(vocab_size=64, context_length=16, d_model=32, num_layers=1, num_heads=4, d_ff=48,
                                num_kv_heads=2)
    inputs, targets = torch.randint(1, 64, (2, 17)).split([16, 1], dim=1)[0], torch.randint(64, (2, 16))
    inputs[0, [3, 9]] = inputs[1, 12] = 0  # end-of-text tokens
    ids = document_ids_of(inputs, 0)

    def mean_cross_entropy(m):
        logits = m(inputs, document_ids=ids)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    exact = mean_cross_entropy(copy.deepcopy(model).double())
    assert_within_oracle("loss", lm_loss(model, inputs, targets, ids, loss=loss), mean_cross_entropy(model), exact,
                         torch.float32)
    assert abs(lm_loss(model, inputs, targets, loss=loss).item() - exact.item()) > 1e-4  # the ids matter


# ---------------------------------------------------------------- flags


def test_pack_documents_flags():
    assert parse().data.eot_id is None
    assert parse("--pack-documents").data.eot_id == EOT_ID  # the embedded corpus's end-of-text id
    assert parse("--pack-documents", "--eot-id", "1").data.eot_id == 1
    assert parse("--num-kv-heads", "1").model.num_kv_heads == 1
    assert parse().model.num_kv_heads == 2  # tiny-gqa's


@pytest.mark.parametrize("flags, message", [
    (["--eot-id", "0"], "--eot-id needs --pack-documents"),
    (["--pack-documents", "--eot-id", "-1"], "--eot-id must be >= 0"),
    (["--num-kv-heads", "3"], "--num-kv-heads 3"),
    (["--num-kv-heads", "0"], "--num-kv-heads must be positive"),
])
def test_bad_flags_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse(*flags)


def test_pack_documents_with_a_token_file_needs_the_eot_id(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(100, dtype=np.uint16))
    with pytest.raises(ConfigError, match="--pack-documents with --data needs --eot-id"):
        parse("--pack-documents", "--data", str(path))
    assert parse("--pack-documents", "--data", str(path), "--eot-id", "7").data.eot_id == 7


# ---------------------------------------------------------------- the whole job


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("attention", ["naive", "sdpa", "flash"])
def test_train_packed_gqa(tmp_path, attention, compiled):
    flags = ["--attention", attention, "--pack-documents", "--out-dir", str(tmp_path)]
    if compiled:
        flags += ["--compile", "--compile-backend", "aot_eager"]
    summary = train.train(parse(*flags))
    assert np.isfinite(summary["last_loss"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["data"]["eot_id"] == EOT_ID and config["model"]["num_kv_heads"] == 2
    # The same run unpacked starts from the same weights and windows: its first loss differs only
    # because the packed model attends within documents.
    unpacked = train.train(parse("--attention", attention, "--steps", "1", "--out-dir", str(tmp_path / "plain")))
    assert summary["first_loss"] != unpacked["first_loss"]
