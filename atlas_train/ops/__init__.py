"""Sequence operators: the ATLAS memory scan, its plain reference, and the Newton–Schulz step it uses."""

from atlas_train.ops.memory_scan import memory_scan
from atlas_train.ops.naive import memory_scan_naive
from atlas_train.ops.newton_schulz import newton_schulz

__all__ = ["memory_scan", "memory_scan_naive", "newton_schulz"]
