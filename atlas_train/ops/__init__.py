"""Sequence operators: the ATLAS memory scan, its plain reference, and the Newton–Schulz step it uses; and the
DeepTransformers' dual-form memory scan."""

from atlas_train.ops.dual_memory_scan import dual_memory_scan
from atlas_train.ops.memory_scan import memory_scan
from atlas_train.ops.naive import memory_scan_naive
from atlas_train.ops.newton_schulz import newton_schulz

__all__ = ["dual_memory_scan", "memory_scan", "memory_scan_naive", "newton_schulz"]
