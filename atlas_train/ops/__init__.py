"""Sequence operators: the ATLAS memory scan and the Newton–Schulz step it uses."""

from atlas_train.ops.memory_scan import memory_scan
from atlas_train.ops.newton_schulz import newton_schulz

__all__ = ["memory_scan", "newton_schulz"]
