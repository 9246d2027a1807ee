"""The DeepTransformers under tensor, data and context parallelism (gloo, float64): loss and gradients equal the
single-process run's (parallel_worker.equivalence). Context parallelism needs nothing of its own: each rank's blocks
pass their cache, which for these members holds J (every earlier key with its coefficient) and W1, to the next rank,
and its gradient back."""

from __future__ import annotations

import pytest

from parallel_worker import spawn

pytestmark = pytest.mark.slow

DUAL = ["deep_transformer", "swdt", "dot"]


def test_two_processes_tp_dp_cp():
    spawn(2, [("equivalence", dict(mixers=DUAL, tp=2, cp=1, sp=False)),
              ("equivalence", dict(mixers=DUAL, tp=1, cp=1, sp=False, steps=2)),  # DP = 2
              ("equivalence", dict(mixers=DUAL, tp=1, cp=2, sp=False, recompute=True))])
