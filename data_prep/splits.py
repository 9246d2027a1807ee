"""Routing documents to their split's rows, so that every split atlas-prep writes holds at least one row.

Documents go to val by a hash of their text (encode.is_val), which on a small corpus can leave a split without a
single row. So each split holds its newest documents back from its packer, at least a row's worth of tokens, until
the corpus ends. A split that then has no row takes held-back documents from the other one, newest first, as long as
the other keeps a row; failing that, it takes the tail of the other's newest document (with one document, each split
gets a slice of its rows). When even that cannot give both splits a row, prep stops and names the flag to change.
Held-back documents are packed in their original order, so a corpus whose splits both have rows packs exactly as
without the hold-back.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Optional

import numpy as np

from atlas_train.data_prep.errors import PrepError
from atlas_train.data_prep.pack import RowPacker

Row = tuple[str, np.ndarray, np.ndarray]  # (split, tokens, doc_start)


class SplitRouter:
    """Packs each split's documents into rows; `add` and `finish` yield (split, row tokens, row doc_start)."""

    def __init__(self, splits: list[str], seq_len: int, eos_id: int, val_fraction: float):
        self.packers = {s: RowPacker(seq_len, eos_id) for s in splits}
        self.documents = dict.fromkeys(splits, 0)
        self.row_len = seq_len + 1
        self.val_fraction = val_fraction
        self._held: dict[str, deque] = {s: deque() for s in splits}
        self._held_tokens = dict.fromkeys(splits, 0)  # stream tokens (a document's ids and its EOS) held back
        self._packed_tokens = dict.fromkeys(splits, 0)  # stream tokens given to the packer

    def _total(self, split: str) -> int:
        return self._packed_tokens[split] + self._held_tokens[split]

    def _hold(self, split: str, tokens: np.ndarray) -> None:
        self._held[split].append(tokens)
        self._held_tokens[split] += tokens.size + 1

    def _take_newest(self, split: str) -> np.ndarray:
        tokens = self._held[split].pop()
        self._held_tokens[split] -= tokens.size + 1
        return tokens

    def _release_oldest(self, split: str) -> Iterator[Row]:
        tokens = self._held[split].popleft()
        self._held_tokens[split] -= tokens.size + 1
        self._packed_tokens[split] += tokens.size + 1
        for row_tokens, row_starts in self.packers[split].add(tokens):
            yield split, row_tokens, row_starts

    def add(self, split: str, tokens: np.ndarray) -> Iterator[Row]:
        """One document of `split`; yields the rows this completes."""
        self.documents[split] += 1
        self._hold(split, tokens)
        held = self._held[split]
        while self._held_tokens[split] - (held[0].size + 1) >= self.row_len:
            yield from self._release_oldest(split)

    def finish(self) -> Iterator[Row]:
        """Give a split without a row some of the other's tokens, then pack everything held back. Sets `note` to a
        line saying what moved (None when nothing did); PrepError when the corpus is too small for every split."""
        self.note: Optional[str] = None
        short = [s for s in self.packers if self._total(s) < self.row_len]
        if short:
            self._rebalance(short)
        for split in self.packers:
            while self._held[split]:
                yield from self._release_oldest(split)

    def _too_small(self) -> PrepError:
        tokens, docs = sum(map(self._total, self.packers)), sum(self.documents.values())
        if len(self.packers) == 1:
            return PrepError(f"the corpus holds {tokens} tokens ({docs} documents), too few for one row of "
                             f"--seq-len + 1 = {self.row_len} tokens: lower --seq-len")
        return PrepError(f"the corpus holds {tokens} tokens ({docs} documents), too few for a training and a "
                         f"validation row of --seq-len + 1 = {self.row_len} tokens each: lower --seq-len, or pass "
                         "--val-fraction 0 to write no validation split")

    def _rebalance(self, short: list[str]) -> None:
        if len(short) > 1 or len(self.packers) == 1:
            raise self._too_small()
        (taker,) = short
        (giver,) = (s for s in self.packers if s != taker)
        share = self.val_fraction if taker == "val" else 1.0 - self.val_fraction
        moved = sliced = 0
        while self._total(taker) < self.row_len:
            if not self._held[giver]:
                raise self._too_small()
            newest = self._held[giver][-1]
            need = self.row_len - self._total(taker)  # stream tokens the taker lacks
            spare = self._total(giver) - self.row_len  # stream tokens the giver can lose and keep a row
            if newest.size + 1 <= spare:
                self._hold(taker, self._take_newest(giver))
                self.documents[giver] -= 1
                self.documents[taker] += 1
                moved += 1
                continue
            tail = min(max(need - 1, int(share * newest.size)), spare, newest.size - 1)  # tail ids (+ an EOS)
            if tail + 1 < need or tail < 1:
                raise self._too_small()
            self._take_newest(giver)
            self._hold(giver, newest[: newest.size - tail])
            self._hold(taker, newest[newest.size - tail:])
            self.documents[taker] += 1
            sliced = tail
        what = f"{moved} document(s)" if moved else ""
        if sliced:
            what += f"{' and ' if moved else ''}the last {sliced} tokens of a document"
        self.note = f"the {taker} split had no row of its own: it takes {what} from the {giver} split"
