"""Pack tokenized documents into rows of seq_len + 1 tokens, each document followed by EOS.

Rows overlap by one token (row k is stream[k·L : k·L + L + 1]), so every token of the stream except the first is
a training target exactly once. `doc_start` marks each document's first token; the tail shorter than a row is
dropped and counted.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class RowPacker:
    def __init__(self, seq_len: int, eos_id: int):
        self.seq_len, self.eos_id = seq_len, eos_id
        self._tokens: list[np.ndarray] = []
        self._starts: list[np.ndarray] = []
        self._pending = 0
        self.rows = 0

    def add(self, doc_tokens: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Append one document; yield every row that is now complete."""
        tokens = np.append(np.asarray(doc_tokens, dtype=np.int64), self.eos_id)
        starts = np.zeros(tokens.size, dtype=bool)
        starts[0] = True
        self._tokens.append(tokens)
        self._starts.append(starts)
        self._pending += tokens.size
        row_len = self.seq_len + 1
        if self._pending < row_len:
            return
        tokens, starts = np.concatenate(self._tokens), np.concatenate(self._starts)
        n = (tokens.size - 1) // self.seq_len
        for k in range(n):
            lo = k * self.seq_len
            yield tokens[lo : lo + row_len], starts[lo : lo + row_len]
        self.rows += n
        rest = n * self.seq_len
        self._tokens, self._starts = [tokens[rest:]], [starts[rest:]]
        self._pending = tokens.size - rest

    @property
    def dropped_tokens(self) -> int:
        """Tokens after the last full row (only the final one is lost when rows overlap)."""
        return self._pending - 1 if self.rows else self._pending
