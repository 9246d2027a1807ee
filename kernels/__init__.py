"""Triton kernels for memory_scan (imported as atlas_train.kernels)."""
