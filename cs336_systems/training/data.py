"""Training tokens: loading and checking token files, and deterministic, rank-sharded batches.

The windows of optimizer step `s` are a pure function of (seed, s): a numpy generator seeded with
[seed, s] draws the start of every sequence of the *global* batch, and rank r reads only its own
contiguous slice of them. So the global batch is the same whatever the number of processes, and a
resumed run needs no sampler state beyond the step number.

    global batch (B sequences) = [rank 0: B/W rows | rank 1: B/W rows | ...]
    each rank's rows           = [micro-batch 0 | micro-batch 1 | ...]   (B/(W*A) rows, A accumulation steps)

Packed documents (`eot_id`): the token stream is documents, each ended by the end-of-text id, and a
window cuts across them. Each window then also carries document_ids: at position t, the number of
end-of-text tokens strictly before t within the window, so an end-of-text token is the last token
of its document and the next token starts a new one. The model attends and counts RoPE positions
within documents only; the targets are unchanged (the end-of-text position's target is the next
document's first token, as in unpacked training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cs336_systems.errors import ConfigError
from cs336_systems.training.corpus import VOCAB_SIZE as CORPUS_VOCAB_SIZE
from cs336_systems.training.corpus import CorpusConfig, load_corpus

Batch = tuple[torch.Tensor, ...]
"""(inputs, next-token targets), int64 (B, T) each; packing documents, also their document ids (B, T)
int32: `lm_loss(model, *batch)` takes either."""


def load_tokens(path: str, flag: str, scan: bool = True) -> np.ndarray:
    """Memory-map a flat token file; ConfigError naming `flag` and the file when it is missing, empty,
    malformed or (`scan`: reads every id) holds negative ids."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{flag}: no such file: {path}")
    if file.suffix not in (".npy", ".bin"):
        raise ConfigError(f"{flag}: expected a .npy or .bin token file, got {path}")
    if file.stat().st_size == 0:  # numpy would raise EOFError (.npy) or refuse to map it (.bin)
        raise ConfigError(f"{flag}: {path} is empty (0 bytes)")
    try:
        tokens = np.load(file, mmap_mode="r") if file.suffix == ".npy" else np.memmap(file, np.uint16, mode="r")
    except (OSError, ValueError, EOFError) as error:
        raise ConfigError(f"{flag}: cannot read {path}: {str(error).splitlines()[0]}") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise ConfigError(f"{flag}: expected a 1-D array of integer token ids in {path}, got {tokens.dtype} "
                          f"{tokens.shape}")
    if len(tokens) == 0:
        raise ConfigError(f"{flag}: {path} holds no tokens")
    # Only signed files can hold negative ids; they would index the embedding from its end, or fail
    # in the first step with an error that names no file.
    if scan and tokens.dtype.kind == "i" and (lowest := int(tokens.min())) < 0:
        raise ConfigError(f"{flag}: {path} holds a negative token id ({lowest}); ids must be >= 0")
    return tokens


def load_splits(data: str | None, val_data: str | None, corpus: CorpusConfig, context_length: int,
                vocab_size: int | None = None, scan: bool = True) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """(train tokens, validation tokens or None, smallest vocabulary that covers them), checked.

    `data=None` means the embedded corpus and its validation split. With `vocab_size` (--vocab-size),
    every split's ids must be smaller. `scan=False` reads no token values (no id checks, vocabulary
    None): for the workers, once the launcher's `prepare` has scanned the files (a whole pass over
    each, which a worker need not repeat).
    """
    if data is None:
        train, val = load_corpus(corpus)
        splits = {"--data": ("the embedded corpus", train, CORPUS_VOCAB_SIZE),
                  "--val-data": ("the embedded corpus", val, CORPUS_VOCAB_SIZE)}
    else:
        splits = {}
        for flag, path in (("--data", data), ("--val-data", val_data)):
            if path is not None:
                tokens = load_tokens(path, flag, scan)
                splits[flag] = (f"{flag} {path}", tokens, 1 + int(tokens.max()) if scan else None)
    for flag, (source, tokens, needed) in splits.items():
        if len(tokens) <= context_length:
            raise ConfigError(f"{flag}: {len(tokens)} tokens, too few for --context-length {context_length}")
        if vocab_size is not None and needed is not None and vocab_size < needed:
            raise ConfigError(f"--vocab-size {vocab_size} is smaller than the data's largest token id + 1 "
                              f"({needed}, in {source})")
    vocab = max(needed for _, _, needed in splits.values()) if scan else None
    return splits["--data"][1], splits["--val-data"][1] if "--val-data" in splits else None, vocab


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned memory lets the copy run asynchronously, overlapping the previous step's compute.
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def windows(tokens: np.ndarray, starts: np.ndarray, context_length: int, device: torch.device,
            eot_id: int | None = None) -> Batch:
    """Inputs and targets of the windows starting at `starts`: (len(starts), T) each; with `eot_id`,
    also the inputs' document ids."""
    rows = np.stack([np.asarray(tokens[s : s + context_length + 1], dtype=np.int64) for s in starts])  # (N, T+1)
    rows = to_device(torch.from_numpy(rows), device)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if eot_id is None:
        return inputs, targets
    return inputs, targets, document_ids_of(inputs, eot_id)


def document_ids_of(inputs: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(N, T) int32: the end-of-text tokens strictly before each position of its row. Computed on the
    batch's device (no extra copy from the host)."""
    ends = (inputs == eot_id).int()  # (N, T)
    return ends.cumsum(dim=-1, dtype=torch.int32) - ends


def split_rows(batch: Batch, rows: int) -> list[Batch]:
    """`batch` cut into consecutive batches of at most `rows` sequences."""
    return list(zip(*(part.split(rows) for part in batch)))


@dataclass(frozen=True, kw_only=True, eq=False)
class TokenBatches:
    """This rank's micro-batches of every step: see the module docstring."""

    tokens: np.ndarray
    batch_size: int  # global: sequences per optimizer step over all ranks
    context_length: int
    accumulation: int
    seed: int
    rank: int
    world_size: int
    device: torch.device
    eot_id: int | None = None  # packed documents: see the module docstring

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets of the global batch of optimizer step `step`: (batch_size,)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(len(self.tokens) - self.context_length, size=self.batch_size)

    def micro_batches(self, step: int) -> list[Batch]:
        """This rank's `accumulation` micro-batches of step `step`; only their windows are read."""
        per_rank = self.batch_size // self.world_size
        mine = self.global_starts(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        batch = windows(self.tokens, mine, self.context_length, self.device, self.eot_id)
        return split_rows(batch, per_rank // self.accumulation)


def validation_batches(tokens: np.ndarray, num_sequences: int, micro_batch: int, context_length: int,
                       rank: int, world_size: int, device: torch.device, eot_id: int | None = None) -> list[Batch]:
    """This rank's share of the same validation windows at every evaluation: consecutive windows from
    the start of the split, dealt out round-robin, in batches of at most `micro_batch` (with document
    ids when `eot_id` is given)."""
    count = min(num_sequences, (len(tokens) - 1) // context_length)
    starts = np.arange(count)[rank::world_size] * context_length
    if len(starts) == 0:
        return []
    return split_rows(windows(tokens, starts, context_length, device, eot_id), micro_batch)
