"""cs336_basics.data.get_batch: shapes, shift-by-one targets, memmaps, reproducibility, errors."""

import numpy as np
import pytest
import torch

from cs336_basics.data import get_batch


def test_shapes_and_shift_by_one():
    dataset = np.arange(100)
    x, y = get_batch(dataset, batch_size=8, context_length=12, device="cpu", generator=np.random.default_rng(0))
    for t in (x, y):
        assert t.shape == (8, 12) and t.dtype == torch.int64 and t.device.type == "cpu" and t.is_contiguous()
    # On arange data each row is consecutive and its targets are the inputs plus one.
    torch.testing.assert_close(y, x + 1)
    torch.testing.assert_close(x - x[:, :1], torch.arange(12).expand(8, 12))
    assert x.min() >= 0 and y.max() <= 99


def test_every_start_is_reachable():
    dataset = np.arange(10)
    x, _ = get_batch(dataset, batch_size=2000, context_length=4, device="cpu", generator=np.random.default_rng(0))
    assert set(x[:, 0].tolist()) == set(range(6))  # starts 0..len-T-1


def test_minimal_dataset_has_one_window():
    dataset = np.arange(5, 10)
    x, y = get_batch(dataset, batch_size=3, context_length=4, device="cpu")
    assert x.tolist() == [[5, 6, 7, 8]] * 3 and y.tolist() == [[6, 7, 8, 9]] * 3


def test_memmap_uint16(tmp_path):
    path = tmp_path / "tokens.bin"
    values = np.arange(1000) * 61  # up to 60939: beyond int16, so a signed conversion would show
    values.astype(np.uint16).tofile(path)
    dataset = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = get_batch(dataset, batch_size=4, context_length=16, device="cpu", generator=np.random.default_rng(1))
    assert x.dtype == torch.int64
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = row_x[0] // 61
        assert row_x == values[start : start + 16].tolist() and row_y == values[start + 1 : start + 17].tolist()


class ReadSpy:
    """A 1-D token array that records every read, to check get_batch reads only its windows."""

    ndim = 1

    def __init__(self, values: np.ndarray):
        self.values, self.reads = values, []

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        result = self.values[index]
        self.reads.append(result.size)
        return result


def test_reads_only_the_sampled_windows():
    spy = ReadSpy(np.arange(10_000))
    get_batch(spy, batch_size=5, context_length=8, device="cpu", generator=np.random.default_rng(0))
    assert spy.reads == [9] * 5


@pytest.mark.parametrize("make_generator", [np.random.default_rng, lambda seed: torch.Generator().manual_seed(seed)])
def test_generator_makes_batches_reproducible(make_generator):
    dataset = np.arange(10_000)

    def batch(seed: int):
        return get_batch(dataset, batch_size=4, context_length=8, device="cpu", generator=make_generator(seed))

    first, again, other = batch(0), batch(0), batch(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_without_generator_uses_numpy_global_rng():
    state = np.random.get_state()
    try:
        batches = []
        for _ in range(2):
            np.random.seed(0)
            batches.append(get_batch(np.arange(10_000), batch_size=4, context_length=8, device="cpu"))
    finally:
        np.random.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(*batches))


@pytest.mark.parametrize(
    "dataset, kwargs, match",
    [
        (np.arange(8), dict(context_length=8), "dataset has 8 tokens"),
        (np.zeros((4, 20)), dict(context_length=4), "1-D"),
        (np.arange(100), dict(context_length=0), "context_length"),
        (np.arange(100), dict(context_length=4, batch_size=0), "batch_size"),
    ],
)
def test_bad_inputs_raise(dataset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_batch(dataset, **{"batch_size": 2, "device": "cpu", **kwargs})


@pytest.mark.cuda
def test_cuda_device():
    x, y = get_batch(np.arange(100), batch_size=2, context_length=4, device="cuda:0")
    assert x.device.type == y.device.type == "cuda"
    torch.testing.assert_close(y, x + 1)
