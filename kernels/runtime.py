"""Where the kernels run: on a CUDA device, or on CPU under the Triton interpreter (tests, smoke checks)."""

from triton import knobs

# Triton picks interpreter or compiler when a kernel is decorated, i.e. when this package is imported; this constant
# is read at the same moment, so it always tells how the kernels in this process actually run.
INTERPRETED: bool = bool(knobs.runtime.interpret)
