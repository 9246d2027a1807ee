"""What the Triton kernels share: a tensor-core product in a chosen operand precision, the rounding of a value to
that precision, and a launch spelled out so that benchmarks/kernel_resources.py can compile it offline."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from atlas_train.kernels.runtime import INTERPRETED

PRECISIONS = ("ieee", "tf32", "bf16")
# Compiled for a GPU, one PTX instruction (cvt.rna: to nearest, ties away from zero) rounds float32 to tf32, where the
# bit arithmetic below takes about seven; the interpreter runs no PTX. The two differ only on exact ties.
_TF32_BY_PTX = tl.constexpr(not INTERPRETED)


@triton.jit
def mm(x, y, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """x @ y on tensor cores, operands rounded to nearest in the operand precision, accumulation in ACC (fp32 or
    fp64). tf32 rounds explicitly: on Hopper `tl.dot` with input_precision="tf32" truncates float32 operands (the
    GPU's errors match emulated truncation, benchmarks/ns_rounding.py), which leaves the NS kernel less exact than
    cuBLAS, whose tf32 rounds."""
    if PRECISION == "bf16":
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), out_dtype=ACC)
    elif PRECISION == "tf32":
        return tl.dot(as_operand(x, PRECISION), as_operand(y, PRECISION), input_precision=PRECISION, out_dtype=ACC)
    else:
        return tl.dot(x, y, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def as_operand(x, PRECISION: tl.constexpr):
    """float32 x rounded to nearest, to the value `mm` multiplies with in this precision: tf32 keeps 10 mantissa
    bits, bf16 7; 'ieee' leaves x alone. Spelled out in bits (ties to even), so the interpreter rounds as the GPU does
    (its own float32 -> bfloat16 cast truncates); tf32 on a GPU by cvt.rna (`_TF32_BY_PTX`). NaN stays NaN; float64
    passes through (the interpreter's checks, where tensor cores take no part)."""
    if PRECISION == "ieee" or x.dtype != tl.float32:
        return x
    elif PRECISION == "tf32" and _TF32_BY_PTX:
        bits = tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,f", [x], dtype=tl.uint32, is_pure=True,
                                         pack=1)
        return bits.to(tl.float32, bitcast=True)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        if PRECISION == "bf16":
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        else:
            rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
        return tl.where(x == x, rounded.to(tl.float32, bitcast=True), x)


def input_refusal(t, precision: str, precisions: tuple) -> str | None:
    """Why a kernel cannot take tensor t with products in `precision` (one it has no mode for, a tensor off the GPU
    outside the interpreter, a dtype other than float32 or float64), or None."""
    if precision not in precisions:
        return f"precision {precision!r} is not one of {precisions}"
    if not (t.is_cuda or INTERPRETED):
        return "tensor is not on a CUDA device"
    if t.dtype not in (torch.float32, torch.float64):
        return f"dtype {t.dtype} (the scan computes in float32)"
    return None


def accumulator(dtype: torch.dtype):
    """The accumulation dtype of a launch: float64 for float64 tensors (the interpreter's exact checks), else
    float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def launch_precision(dtype: torch.dtype, precision: str) -> str:
    """The operand precision a launch multiplies in: 'ieee' under the interpreter (its bf16 `tl.dot` multiplies
    the raw bit patterns) and for float64 (no tf32/bf16 mode), else `precision`."""
    return "ieee" if INTERPRETED or dtype == torch.float64 else precision


class KernelCall(NamedTuple):
    """One kernel launch, spelled out so that it can also be compiled offline (benchmarks/kernel_resources.py)."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict  # constexpr parameters and launch options (num_warps, num_stages, maxnreg)

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.meta)
