"""Multi-process (gloo) tests of TP / SP / CP / DP: each world size is one spawned job running many scenarios
(process start-up costs more than the tiny float64 models). Every scenario holds the parallel loss and gradients to
the single-process run of the same model; `steps > 1` also trains a few AdamW steps on both sides. The scenario
lists live in parallel_worker.SCENARIOS, which GPUs run as they are through torchrun."""

from __future__ import annotations

import pytest

from parallel_worker import SCENARIOS, spawn

pytestmark = pytest.mark.slow


def test_two_processes():
    spawn(2, SCENARIOS[2])


def test_four_processes():
    spawn(4, SCENARIOS[4])
