"""Random-token batches in the loader's format, for benchmarks that must leave the data pipeline out of the timing."""

from __future__ import annotations

import torch


class SyntheticLoader:
    """Endless {"tokens", "doc_start"} batches; batch i is a pure function of (seed, dp_rank, i), so it resumes."""

    def __init__(self, vocab_size: int, *, seq_len: int, micro_batch_size: int, dp_rank: int, seed: int):
        self.shape = (micro_batch_size, seq_len + 1)
        self.vocab_size, self.dp_rank, self.seed = vocab_size, dp_rank, seed
        self.index = 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.dp_rank * 7919 + self.index)
            self.index += 1
            tokens = torch.randint(0, self.vocab_size, self.shape, generator=gen)
            doc_start = torch.zeros(self.shape, dtype=torch.bool)
            doc_start[:, 0] = True
            yield {"tokens": tokens, "doc_start": doc_start}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]
