"""`bench attention --kv-heads / --documents` on CPU: the inputs it draws, the FLOPs it counts, that its
contenders compute the same attention, the rows and fits it writes, and one-line errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_cli_error
from numerics import assert_within_oracle

from cs336_systems import cli
from cs336_systems.bench import attention_variants as variants

FAST = ["--device", "cpu", "--warmup-ms", "1", "--rep-ms", "3", "--dtypes", "fp32", "--head-dims", "16"]


def run(tmp_path, *argv: str) -> int:
    return cli.main(["bench", "attention", *FAST, *argv, "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("mean", [1.0, 7.5, 300.0])
def test_documents_fill_each_row_with_nondecreasing_ids(mean):
    ids, lengths = variants.document_ids(3, 97, mean, seed=1)
    assert ids.shape == (3, 97) and ids.dtype == torch.int32
    assert (ids[:, 1:] >= ids[:, :-1]).all()
    for row, row_lengths in zip(ids, lengths):
        assert sum(row_lengths) == 97 and min(row_lengths) >= 1
        assert torch.bincount(row.long()).tolist() == row_lengths


@pytest.mark.parametrize("causal", [False, True])
def test_document_flops_count_the_visible_pairs(causal):
    ids, lengths = variants.document_ids(2, 50, 6.0, seed=2)
    pairs = variants.dense_document_mask(ids, causal).sum().item()  # brute force over the dense mask
    assert variants.document_flops(lengths, heads=3, head_dim=8, causal=causal) == 4 * 8 * 3 * pairs


def _per_document(q, k, v, lengths, causal):
    """Each document attended alone in float64 (plain SDPA math): what a packed row must equal."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = torch.empty_like(q)
    for b, row in enumerate(lengths):
        start = 0
        for length in row:
            window = slice(start, start + length)
            out[b, :, window] = F.scaled_dot_product_attention(q[b, :, window], k[b, :, window], v[b, :, window],
                                                               is_causal=causal)
            start += length
    return out


@pytest.mark.parametrize("impl", ["naive", "sdpa-math"])
@pytest.mark.parametrize("causal", [False, True])
def test_contenders_compute_grouped_document_attention(impl, causal):
    ids, lengths = variants.document_ids(2, 40, 5.0, seed=3)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, 16, generator=gen)
    k, v = torch.randn(2, 2, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    ours = variants.build(impl, causal, ids, True, 40, "cpu")(q, k, v)  # (B, Hq, N, D) float32
    exact = _per_document(q.double(), k.double(), v.double(), lengths, causal)
    low = _per_document(q, k, v, lengths, causal)  # the same math per document in float32
    assert_within_oracle(f"{impl} documents causal={causal}", ours, low, exact)


def test_grouped_heads_sweep_writes_rows(tmp_path):
    assert run(tmp_path, "--kv-heads", "2", "--heads", "4", "--batch", "1", "--seq-lens", "24",
               "--impls", "naive", "sdpa-math", "sdpa-cudnn", "--passes", "forward") == 0
    rows = json.loads((tmp_path / "attention_variants.json").read_text())["rows"]
    status = {r["impl"]: r["status"] for r in rows}
    assert status == {"naive": "ok", "sdpa-math": "ok", "sdpa-cudnn": "unsupported"}
    assert all(r["shape"] == "1x4/2x24x16" for r in rows)


def test_document_sweep_fits_time_against_sum_of_squares(tmp_path):
    assert run(tmp_path, "--documents", "2", "6", "24", "--heads", "2", "--batch", "1", "--seq-lens", "48",
               "--impls", "naive", "--passes", "forward") == 0
    data = json.loads((tmp_path / "attention_variants.json").read_text())
    assert [r["doc_mean"] for r in data["rows"]] == [2, 6, 24]
    (fit,) = data["meta"]["sum_sq_fits"]
    assert fit["impl"] == "naive" and fit["points"] == 3
    assert "sum of squared document lengths" in (tmp_path / "attention_variants.md").read_text()


@pytest.mark.parametrize("argv, flag", [
    (["--kv-heads", "3", "--heads", "4"], "--kv-heads"),
    (["--kv-heads", "0", "--heads", "4"], "--kv-heads"),
    (["--documents", "0.5"], "--documents"),
    (["--documents", "8", "--impls", "ours-compiled"], "--impls"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, flag):
    assert run(tmp_path, *argv) == 2
    assert_cli_error(capsys, flag)
