"""Multi-query associative recall (MQAR, Arora et al. 2023 "Zoology"): can the model look a value up by its key?

A row is `k1 v1 k2 v2 … kN vN` followed by the N keys again, in a random order and at random places among filler
tokens, each followed by its value: `… ki vi …`. Predicting vi right after the repeated ki needs the pair stored
somewhere N·2 tokens or more back, which is what a memory (or attention) is for. Keys and values come from
disjoint halves of the vocabulary, so a model cannot answer by guessing the kind of token.

Token ids: 0 is the filler, keys are 1..K, values K+1..2K with K = (vocab_size - 1) // 2.

Training shards and evaluation draw from distinct random streams (`streams.stream`), so an evaluation never replays
the training rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from atlas_train.eval.streams import stream

FILLER = 0


@dataclass(frozen=True)
class MQARSetting:
    num_pairs: int
    seq_len: int  # tokens the model reads; a row holds seq_len + 1 so that every position has a label
    vocab_size: int

    def check(self) -> None:
        if self.num_pairs < 1:
            raise ValueError(f"MQAR: num_pairs must be >= 1, got {self.num_pairs}")
        if 4 * self.num_pairs > self.seq_len + 1:
            raise ValueError(
                f"MQAR: {self.num_pairs} pairs need seq_len >= {4 * self.num_pairs - 1}, got {self.seq_len}"
            )
        if (self.vocab_size - 1) // 2 < self.num_pairs:
            raise ValueError(f"MQAR: vocab_size {self.vocab_size} has too few keys for {self.num_pairs} pairs")

    @property
    def name(self) -> str:
        return f"pairs={self.num_pairs} len={self.seq_len} vocab={self.vocab_size}"


def make_row(setting: MQARSetting, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One row: tokens (seq_len + 1,) int64 and the positions p of the repeated keys (tokens[p + 1] is the answer)."""
    setting.check()
    n, length = setting.num_pairs, setting.seq_len + 1
    half = (setting.vocab_size - 1) // 2
    keys = rng.choice(half, n, replace=False) + 1
    values = rng.choice(half, n, replace=False) + 1 + half
    tokens = np.full(length, FILLER, dtype=np.int64)
    tokens[0 : 2 * n : 2] = keys
    tokens[1 : 2 * n : 2] = values
    slots = (length - 2 * n) // 2  # two-token slots after the pairs; n of them hold a query and its answer
    chosen = np.sort(rng.choice(slots, n, replace=False))
    positions = 2 * n + 2 * chosen
    order = rng.permutation(n)
    tokens[positions] = keys[order]
    tokens[positions + 1] = values[order]
    return tokens, positions


def make_batch(setting: MQARSetting, batch_size: int, rng: np.random.Generator):
    """(tokens (B, L+1) LongTensor, query positions (B, N) LongTensor)."""
    rows = [make_row(setting, rng) for _ in range(batch_size)]
    tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
    positions = torch.from_numpy(np.stack([r[1] for r in rows]))
    return tokens, positions


def training_rows(
    seq_len: int, vocab_size: int, pair_counts: list[int], count: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`count` rows for `write_dataset`: each one document, its number of pairs drawn from `pair_counts`."""
    rng = stream("train", seed)
    doc_start = np.zeros(seq_len + 1, dtype=bool)
    doc_start[0] = True
    for _ in range(count):
        n = int(rng.choice(pair_counts))
        tokens, _ = make_row(MQARSetting(n, seq_len, vocab_size), rng)
        yield tokens, doc_start


@torch.no_grad()
def accuracy(model, setting: MQARSetting, num_samples: int, batch_size: int, seed: int, device) -> float:
    """Fraction of repeated keys whose value is the model's top prediction (teacher-forced, one full forward)."""
    rng = stream("eval", seed)
    correct = total = 0
    for start in range(0, num_samples, batch_size):
        tokens, positions = make_batch(setting, min(batch_size, num_samples - start), rng)
        tokens, positions = tokens.to(device), positions.to(device)
        logits = model(tokens[:, :-1]).logits
        predicted = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)
        correct += int((predicted == tokens.gather(1, positions + 1)).sum())
        total += positions.numel()
    return correct / total
