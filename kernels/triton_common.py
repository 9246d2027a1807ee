"""What the Triton kernels share: a tensor-core product in a chosen operand precision, and a launch spelled out so
that benchmarks/kernel_resources.py can compile it offline."""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

PRECISIONS = ("ieee", "tf32", "bf16")


@triton.jit
def mm(x, y, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """x @ y on tensor cores; 'bf16' rounds the operands, the accumulation stays in ACC (fp32 or fp64)."""
    if PRECISION == "bf16":
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), out_dtype=ACC)
    else:
        return tl.dot(x, y, input_precision=PRECISION, out_dtype=ACC)


class KernelCall(NamedTuple):
    """One kernel launch, spelled out so that it can also be compiled offline (benchmarks/kernel_resources.py)."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict  # constexpr parameters and launch options (num_warps, num_stages, maxnreg)

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.meta)
