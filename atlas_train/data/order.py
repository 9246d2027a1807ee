"""The loader's sample order: a pure function of (seed, epoch) over (shard, row-in-shard), computed from counts alone.

Epoch e lays the shards end to end in a seeded random order, cuts that sequence into windows of `shuffle_buffer`
rows and permutes each window with its own seeded generator (a shard shuffle plus a buffer shuffle, as webdataset
does, but addressable). Global batch k of an epoch is positions [k·G, (k+1)·G) with G = dp_size · micro_batch;
rank r takes the r-th slice of B rows. Because the sequence does not depend on dp_size, worker count or timing, a
saved position (epoch, first row of the next global batch) resumes exactly, even with another dp_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


class SampleOrder:
    """Maps (epoch, position) to (shard id, row in shard) for shards of the given sizes."""

    def __init__(self, shard_sizes: list[int], seed: int, shuffle: bool, shuffle_buffer: int):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.num_samples = int(self.sizes.sum())
        self.seed, self.shuffle = seed, shuffle
        self.window = shuffle_buffer if shuffle and shuffle_buffer > 1 else 0
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, shard order, its row offsets)
        self._cached_window: tuple[int, int, np.ndarray] | None = None  # (epoch, window, permutation)

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.sizes))
            else:
                order = np.arange(len(self.sizes))
            starts = np.concatenate([[0], np.cumsum(self.sizes[order])])
            self._cached = (epoch, order, starts)
        return self._cached[1], self._cached[2]

    def _window_perm(self, epoch: int, w: int) -> np.ndarray:
        if self._cached_window is None or self._cached_window[:2] != (epoch, w):
            length = min(self.window, self.num_samples - w * self.window)
            perm = np.random.default_rng([self.seed, epoch, 1, w]).permutation(length)
            self._cached_window = (epoch, w, perm)
        return self._cached_window[2]

    def region_of(self, epoch: int, position: int) -> int:
        """The span a reader works through: a shuffle window, or without one the shard holding `position`."""
        if self.window:
            return position // self.window
        return int(np.searchsorted(self._layout(epoch)[1], position, side="right")) - 1

    def shards_of_region(self, epoch: int, region: int) -> set[int]:
        """The shard ids a region draws rows from (what a reader must keep loaded while inside it)."""
        order, starts = self._layout(epoch)
        if not self.window:
            return {int(order[region])}
        lo, hi = region * self.window, min((region + 1) * self.window, self.num_samples)
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi - 1, side="right")) - 1
        return {int(s) for s in order[first : last + 1]}

    def lookup(self, epoch: int, position: int) -> tuple[int, int]:
        """(shard id, row in shard) of the row at `position` of epoch `epoch`."""
        if not 0 <= position < self.num_samples:
            raise IndexError(position)
        order, starts = self._layout(epoch)
        if self.window:
            w = position // self.window
            position = w * self.window + int(self._window_perm(epoch, w)[position - w * self.window])
        slot = int(np.searchsorted(starts, position, side="right")) - 1
        return int(order[slot]), position - int(starts[slot])


@dataclass(frozen=True)
class Position:
    """Where the next global batch starts: `epoch`, and `sample`, its first row in that epoch's sequence."""

    epoch: int = 0
    sample: int = 0


def normalize(pos: Position, num_samples: int, global_batch: int) -> Position:
    """A position with too few rows left for a full global batch moves to the start of the next epoch."""
    if pos.sample + global_batch > num_samples:
        return Position(pos.epoch + 1, 0)
    return pos


def global_batches(start: Position, num_samples: int, global_batch: int, loop: bool) -> Iterator[Position]:
    """Start positions of successive global batches from `start` (epochs repeat when `loop`; the tail is dropped)."""
    pos = normalize(start, num_samples, global_batch)
    while loop or pos.epoch == start.epoch:
        yield pos
        pos = normalize(Position(pos.epoch, pos.sample + global_batch), num_samples, global_batch)
