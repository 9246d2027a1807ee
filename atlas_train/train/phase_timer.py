"""Where a training step's time goes: device time of its forward, backward and optimizer phases.

On a GPU each phase is bracketed by CUDA events on the current stream, read only when the step is logged (the loss
that is logged syncs anyway), so timing adds no sync of its own; an event pair measures the stream from the phase's
first kernel to its last, idle gaps inside the phase included. On CPU, where work is synchronous, the wall clock.
The rest of a step's wall time is data loading, logging and the host's own gaps.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class PhaseTimer:
    """Sums each phase's time between `collect()` calls; disabled, `phase()` costs nothing."""

    def __init__(self, enabled: bool, cuda: bool):
        self.enabled, self.cuda = enabled, cuda
        self._events: dict[str, list] = defaultdict(list)
        self._seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
        else:
            began = time.perf_counter()
            yield
            self._seconds[name] += time.perf_counter() - began

    def collect(self, steps: int) -> dict[str, float]:
        """Mean seconds per step of each phase since the last call (syncs on the last event), and start afresh."""
        totals = dict(self._seconds)
        for name, pairs in self._events.items():
            pairs[-1][1].synchronize()
            totals[name] = totals.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1e3
        self._events.clear()
        self._seconds.clear()
        return {name: value / steps for name, value in totals.items()}
