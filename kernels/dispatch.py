"""Choosing the GPU fast path of `atlas_train.ops`, with a one-time note on every fallback.

The ops reach `newton_schulz_or_none`, `memory_mlp_or_none` (the memory MLP's token pass: reads and inner-loss
gradient factors, `memory_mlp_kernel`) and `token_momenta_or_none` (the token update's sums of outer products,
`token_momenta_kernel`, in the scan's product precision) through `atlas_train.ops.registry`, where `register` puts
them; None means "run your plain PyTorch path" (float32 products).

The operand precision of the fast paths' products follows one setting (`set_ns_precision`): by default Newton–Schulz
takes bf16 operands in a bf16/fp16 model and tf32 in a float32 one (`ns_precision`), the memory MLP kernel tf32
(`memory_mlp_precision`), and the scan's other float32 matmuls tf32 where NS takes bf16 (`scan_product_precision`). On a
GPU Newton–Schulz has two fast implementations: the Triton kernel (one program per matrix) and cuBLAS batched GEMMs with
a hand-written backward (newton_schulz_cublas). Which one takes a shape is a fixed rule from timings of both on the GPU,
not a timing at run time, so that every run (and every resume) computes the same numbers (`triton_takes`): the kernel
for a short side up to TRITON_MAX_SHORT_SIDE, and in bf16 over enough matrices to fill the card up to
TRITON_MAX_SHORT_SIDE_BF16_MANY (about one matrix per SM); cuBLAS above.

The first call for each matrix shape (each token-pass shape) runs the chosen implementation's forward and backward
once on a single random input of that shape and compares both with the float64 PyTorch path, so that a kernel
which cannot compile on this GPU (registers, shared memory) or computes wrong numbers falls back to the next
implementation instead of failing mid-training; every reason is logged once, so a training log says plainly which
path ran and why.
"""

from __future__ import annotations

import logging
import os

import torch

from atlas_train.kernels import newton_schulz_cublas
from atlas_train.kernels.dual_attention_kernel import KERNEL_NAME as DUAL_KERNEL_NAME
from atlas_train.kernels.dual_attention_kernel import dual_attention_unsupported, pass_results, random_pass
from atlas_train.kernels.dual_attention_kernel import implementation as dual_implementation
from atlas_train.kernels.memory_mlp_kernel import memory_mlp_pass, memory_mlp_unsupported
from atlas_train.kernels.muon_step_kernel import KERNEL_NAME as MUON_STEP_KERNEL
from atlas_train.kernels.muon_step_kernel import muon_step, muon_step_unsupported
from atlas_train.kernels.newton_schulz_kernel import newton_schulz, newton_schulz_unsupported
from atlas_train.kernels.token_momenta_kernel import token_momenta, token_momenta_unsupported
from atlas_train.kernels.triton_common import PRECISIONS
from atlas_train.ops import registry
from atlas_train.ops.dual_attention import TORCH, Implementation
from atlas_train.ops.memory_mlp import loss_gradient_factors, memory_forward
from atlas_train.ops.muon_step import muon_step_reference
from atlas_train.ops.newton_schulz import newton_schulz as torch_newton_schulz
from atlas_train.ops.outer_sums import weighted_outer_sums_reference

log = logging.getLogger(__name__)
_noted: set[str] = set()
_probed: dict[tuple, str | None] = {}  # (shape, dtype, device, precision) -> failure of the probe, None if it ran
# Operand precision of the fast paths' products (`set_ns_precision`, `ns_precision`); ATLAS_NS_PRECISION sets it for
# a process. 'auto' (the default) follows the model's dtype.
NS_PRECISION_SETTINGS = ("auto", *PRECISIONS)
_ns_precision = os.environ.get("ATLAS_NS_PRECISION", "auto")
if _ns_precision not in NS_PRECISION_SETTINGS:
    raise ValueError(f"ATLAS_NS_PRECISION={_ns_precision!r} is not one of {', '.join(NS_PRECISION_SETTINGS)}")
# Relative L2 error against float64 that each operand precision may reach (output and gradient): the probe's bound,
# and the benchmark's.
PROBE_TOLERANCE = {"ieee": 1e-4, "tf32": 1e-2, "bf16": 5e-2}
_enabled = True
# In tf32 (forward+backward over many matrices) the kernel is the faster path for a short side of 64 and cuBLAS for
# 128 and more; with one matrix per head (update="chunk") one program per matrix also leaves most of the card idle,
# which cuBLAS does not (benchmarks/RESULTS.md keeps the timings).
TRITON_MAX_SHORT_SIDE = 64
# In bf16 over many matrices the kernel is ahead of the cuBLAS path up to a short side of 128, since cuBLAS's bf16
# pays for float32 iterates and their bf16 copies. One program fills an SM (8 warps, up to 255 registers each), so
# "many" is about one matrix per SM: update="chunk" at the production shape (one W2 of 256 x 128 per chain, B·H = 128
# on 132 SMs) qualifies, and the chunk scan runs faster so; few matrices (B·H = 16) leave most SMs idle, which cuBLAS
# does not.
TRITON_MAX_SHORT_SIDE_BF16_MANY = 128
TRITON_MIN_SM_FILL_BF16 = 7 / 8  # matrices per SM from which bf16 NS up to TRITON_MAX_SHORT_SIDE_BF16_MANY is Triton's
SMS_OFF_GPU = 132  # the SM count the rule assumes off a GPU (tests, CPU emulation): the card it was timed on


def _switch(variable: str, default: str) -> bool:
    """An on/off environment setting read at import: 1 or 0, anything else a one-line ValueError (a misspelt value
    must not silently pick a path)."""
    setting = os.environ.get(variable, default)
    if setting not in ("0", "1"):
        raise ValueError(f"{variable}={setting!r}: expected 0 or 1")
    return setting == "1"


# The memory MLP kernel is on by default: it makes the CUDA-graphed scan faster and passes every tf32 scan check
# (benchmarks/RESULTS.md); its first-use probe still guards its numbers per shape and precision.
# ATLAS_MEMORY_MLP_KERNEL=0 or set_memory_mlp_kernel(False) switches it off (the PyTorch pass runs).
_mlp_kernel = _switch("ATLAS_MEMORY_MLP_KERNEL", "1")
MEMORY_MLP_KERNEL = "the memory MLP kernel"  # its name in fallback notes


# The fused Muon step of the chunk update (muon_step_kernel) is off by default until a GPU has timed it against the
# unfused step (`bench_memory_scan.py --variants graphs graphs+muon`); its probe guards its numbers per shape and
# precision. ATLAS_MUON_STEP_KERNEL=1 or set_muon_step_kernel(True) switches it on.
_muon_kernel = _switch("ATLAS_MUON_STEP_KERNEL", "0")


def set_muon_step_kernel(enabled: bool) -> None:
    """Use the fused Muon step kernel for the chunk update on the GPU (where it covers the step), or not."""
    global _muon_kernel
    _muon_kernel = bool(enabled)


def set_memory_mlp_kernel(enabled: bool) -> None:
    """Use the memory MLP's token-pass kernel on the GPU (where it covers the pass), or not."""
    global _mlp_kernel
    _mlp_kernel = bool(enabled)


def set_kernels_enabled(enabled: bool) -> None:
    """Switch the kernels off (or back on) for this process, e.g. to time or check the PyTorch path on a GPU."""
    global _enabled
    _enabled = bool(enabled)


def settings() -> tuple:
    """What decides the fast path's numbers: captured CUDA graphs keyed on it replay only under the same settings."""
    return _enabled, _ns_precision, _mlp_kernel, _muon_kernel


def set_ns_precision(precision: str) -> None:
    """Operand precision of the fast paths' products on the GPU: 'auto' (default; ATLAS_NS_PRECISION sets another),
    'ieee' (fp32), 'tf32' or 'bf16' (see `ns_precision` and `memory_mlp_precision` for what each path takes)."""
    global _ns_precision
    if precision not in NS_PRECISION_SETTINGS:
        raise ValueError(f"precision {precision!r} is not one of {NS_PRECISION_SETTINGS}")
    _ns_precision = precision


def ns_precision(half_inputs: bool) -> str:
    """Newton–Schulz's operand precision for a model in half precision (bf16/fp16) or not. Under 'auto': bf16 for a
    half-precision model, as docs/math.md §3.7 allows where the tolerance holds (the whole scan stays within the bf16
    bound with room, and runs faster than with tf32), and tf32 otherwise, so that a float32 model keeps tf32's
    bound."""
    if _ns_precision != "auto":
        return _ns_precision
    return "bf16" if half_inputs else "tf32"


def memory_mlp_precision() -> str:
    """The memory MLP kernel's operand precision: ieee if so set, else tf32, never bf16. In bf16 the kernel about
    doubles the chunk scan's error, close to the bf16 bound: its products make the memory's output itself, where
    NS's bf16 only perturbs an update direction; and at small B·H the kernel is bound by occupancy, not by
    tensor-core rate, so bf16 would buy little."""
    return "ieee" if _ns_precision == "ieee" else "tf32"


def scan_product_precision(half_inputs: bool) -> str:
    """Operand precision of the scan's own float32 products on the GPU (the cuBLAS matmuls around Newton–Schulz and
    the memory MLP kernel: window gradients, momentum sums, reads): tf32 where NS takes bf16 operands (a bf16/fp16
    model under 'auto', or 'bf16' set), exact float32 otherwise, and always with the fast paths off (the PyTorch
    path that baselines time). Why: in float32 these run on CUDA cores (FFMA GEMMs); tf32 makes the bf16 token scan
    faster with its error unchanged, while a float32 model's scan, whose bound is tf32's own, would come too close to
    that bound with them."""
    return "tf32" if _enabled and ns_precision(half_inputs) == "bf16" else "ieee"


def dual_attention_precision(half_inputs: bool) -> str:
    """Operand precision of the dual scan's attention passes: bf16 where NS takes bf16 operands, exact float32
    otherwise. Its kernel's products are the scores x·k and the sums over J's coefficients, each accumulated in
    float32 over unit vectors (every kernel term is at most 1), and a bf16 model's whole dual scan at 4K with them in
    bf16 stays within a sixth of the bf16 bound (`benchmarks/bench_dual_scan.py`'s check), while tf32 operands
    have half bf16's tensor-core rate on the scan's largest passes."""
    return "bf16" if _enabled and ns_precision(half_inputs) == "bf16" else "ieee"


def scan_products(half_inputs: bool):
    """Context in which the scan's float32 products on the GPU take `scan_product_precision(half_inputs)`."""
    return newton_schulz_cublas.cublas_precision(scan_product_precision(half_inputs))


def noted_fallbacks(what: str) -> list[str]:
    """The reasons noted so far for not using `what` (e.g. MEMORY_MLP_KERNEL): a benchmark that asked for a fast
    path can then say that some of its rows ran without it."""
    return sorted(key.split(": ", 1)[1] for key in _noted if key.startswith(f"{what}: "))


def note_fallback(what: str, reason: str) -> None:
    """Log once per (what, reason) that a fast path is not used, and why."""
    key = f"{what}: {reason}"
    if key not in _noted:
        _noted.add(key)
        log.warning("atlas_train.kernels: %s is not used (%s)", what, reason)


def _fast_forward_backward(impl: str, one: torch.Tensor, steps: int, upstream: torch.Tensor, precision: str):
    """An implementation's output and input gradient for one matrix and an upstream gradient (the Triton kernel's
    ops called directly; the cuBLAS one through its autograd function, under identity hooks like the reference)."""
    if impl == "triton":
        with torch.no_grad():
            out, iterates = torch.ops.atlas_train.newton_schulz_saving(one, steps, precision)
            grad = torch.ops.atlas_train.newton_schulz_backward(one, iterates, upstream, steps, precision)
        return out, grad
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        leaf = one.detach().clone().requires_grad_()
        out = newton_schulz_cublas.newton_schulz(leaf, steps, precision)
        (grad,) = torch.autograd.grad(out, leaf, upstream)
    return out.detach(), grad


def _reference_forward_backward(one: torch.Tensor, steps: int, upstream: torch.Tensor):
    """The PyTorch path's output and input gradient in float64 on the CPU (where no kernel is dispatched)."""
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        leaf = one.detach().double().cpu().requires_grad_()
        out = torch_newton_schulz(leaf, steps)
        (grad,) = torch.autograd.grad(out, leaf, upstream.double().cpu())
    return out.detach(), grad


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64 on the CPU; NaN or inf in `got` gives NaN or inf, which fails any bound."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _probe(fn):
    """How every first-use probe runs: eagerly even when its caller is being compiled, and outside inference mode
    (it differentiates, also when its caller only infers: under torch.inference_mode that would raise)."""
    return torch.compiler.disable(torch.inference_mode(False)(fn))


@_probe
def _probe_newton_schulz(impl: str, s: torch.Tensor, steps: int, precision: str) -> str | None:
    """Run an implementation's forward and backward on one random matrix shaped like s's and compare both with the
    float64 PyTorch path: the reason to fall back (failed to run, or disagrees beyond PROBE_TOLERANCE), or None.

    Checking the numbers, not only that it runs, guards against a compiler that miscompiles the kernel on some GPU
    (Triton 3.6 does on Hopper). Autograd runs under identity hooks: the probe may run inside an
    activation-checkpointed forward, whose saved-tensor bookkeeping must see the same tensors when that forward is
    recomputed.
    """
    key = (impl, tuple(s.shape[-2:]), s.dtype, s.device, precision, steps)
    if key not in _probed:  # random inputs only on a first call: the hot path draws nothing from the RNG
        one = torch.randn(1, *s.shape[-2:], device=s.device, dtype=s.dtype)
        upstream = torch.randn_like(one)
        _probed[key] = _verdict(impl, f"a random {tuple(s.shape[-2:])} matrix",
                                lambda: _fast_forward_backward(impl, one, steps, upstream, precision),
                                lambda: _reference_forward_backward(one, steps, upstream), precision)
    return _probed[key]


def _verdict(what: str, on: str, fast, reference, precision: str) -> str | None:
    """Why to fall back from a fast path (it failed to run, or one of its results is further than PROBE_TOLERANCE
    of its operand precision from the float64 reference's), or None. `fast` and `reference` return the same tuple
    of results (outputs and input gradients)."""
    try:
        got = fast()
    except Exception as exc:  # noqa: BLE001 — any compile/launch failure means: use the next path
        return f"{what} failed to run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    errors = [relative_error(g, w) for g, w in zip(got, reference(), strict=True)]
    bound = PROBE_TOLERANCE[precision]
    error = next((e for e in errors if not e <= bound), max(errors))  # NaN is never within the bound
    if error <= bound:
        return None
    return f"{what} disagrees with the PyTorch path on {on}: relative error {error:.1e} > {bound:.0e} ({precision})"


def triton_takes(s: torch.Tensor, precision: str) -> bool:
    """Whether the fixed rule gives NS of the matrices s (..., rows, cols) to the Triton kernel before cuBLAS."""
    short = min(s.shape[-2:])
    if short <= TRITON_MAX_SHORT_SIDE:
        return True
    matrices = s.numel() // max(1, s.shape[-2] * s.shape[-1])
    sms = torch.cuda.get_device_properties(s.device).multi_processor_count if s.is_cuda else SMS_OFF_GPU
    fills_card = matrices >= TRITON_MIN_SM_FILL_BF16 * sms
    return precision == "bf16" and short <= TRITON_MAX_SHORT_SIDE_BF16_MANY and fills_card


def _candidates(s: torch.Tensor, precision: str) -> tuple[str, ...]:
    """The fast paths for s in order of preference, by the fixed rule (see the module's docstring)."""
    return ("triton", "cublas") if triton_takes(s, precision) else ("cublas",)


def _unsupported(impl: str, s: torch.Tensor, precision: str) -> str | None:
    """Why an implementation cannot take s, or None."""
    if impl == "cublas":
        return None if s.dtype in (torch.float32, torch.float64) else f"dtype {s.dtype}"
    return newton_schulz_unsupported(s, precision)


def newton_schulz_or_none(s: torch.Tensor, steps: int, half_inputs: bool = False) -> torch.Tensor | None:
    """NS(s) by the first fast path the rule offers for a CUDA tensor s that takes it and passes its probe, in the
    operand precision of `ns_precision(half_inputs)`, else None: the caller's plain PyTorch path. Every reason to
    pass one by is noted once."""
    if not (_enabled and s.is_cuda):
        return None  # CPU runs, or fast paths switched off: the PyTorch path by design, nothing to note
    precision = ns_precision(half_inputs)
    for impl in _candidates(s, precision):
        reason = _unsupported(impl, s, precision) or _probe_newton_schulz(impl, s, steps, precision)
        if reason is None:
            if impl == "triton":
                return newton_schulz(s, steps, precision)
            return newton_schulz_cublas.newton_schulz(s, steps, precision)
        note_fallback(f"Newton-Schulz on {impl}", reason)
    note_fallback("the fast Newton-Schulz", "the plain PyTorch path runs, with float32 products")
    return None


def memory_mlp_or_none(weights: dict, z: torch.Tensor, ln: dict | None, *, v: torch.Tensor | None = None,
                       loss: str | None = None):
    """The memory MLP's token pass (reads f, and with v and a loss the gradient factors) by the Triton kernel for CUDA
    tensors it covers and whose probe passes, else None: the caller's PyTorch path. Reasons are noted once."""
    if not (_enabled and _mlp_kernel and z.is_cuda):
        return None
    reason = memory_mlp_refusal(weights, z, ln, factors=v is not None, loss=loss)
    if reason is not None:
        note_fallback(MEMORY_MLP_KERNEL, reason)
        return None
    return memory_mlp_pass(z, weights["W1"], weights["W2"], ln, v=v, loss=loss, precision=memory_mlp_precision())


def memory_mlp_refusal(weights: dict, z: torch.Tensor, ln: dict | None, *, factors: bool, loss: str | None):
    """Why the kernel does not take such a pass at the current precision (does not cover it, or its probe fails),
    or None; what `memory_mlp_or_none` decides by, for checks that must know the kernel really ran."""
    w1, w2 = weights["W1"], weights["W2"]
    return memory_mlp_unsupported(w1, w2, z, "W3" in weights, loss, memory_mlp_precision()) or _probe_memory_mlp(
        w1, w2, z, ln, factors, loss)


def memory_mlp_pass_results(z, w1, w2, ln, v, loss, upstream, kernel: bool) -> list[torch.Tensor]:
    """Outputs (f, and with v the factors g_out, hidden, g_pre) and then the gradients of z, W1, W2 (, v, the
    LayerNorm's weight and bias) of one token pass under `upstream`: the kernel's, or the PyTorch path's."""
    leaves = [t.detach().clone().requires_grad_() for t in (z, w1, w2, *(() if v is None else (v,)))]
    ln_leaves = None if ln is None else {k: t.detach().clone().requires_grad_() for k, t in ln.items()}
    lz, lw1, lw2, *lv = leaves
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        if kernel:
            outs = memory_mlp_pass(lz, lw1, lw2, ln_leaves, v=lv[0] if lv else None, loss=loss,
                                   precision=memory_mlp_precision())
        else:
            weights = {"W1": lw1, "W2": lw2}
            outs = memory_forward(weights, lz, lw1.shape[-2], ln_leaves)
            if lv:
                factors = loss_gradient_factors(weights, lz, lv[0], ln_leaves, loss)
                outs = (outs, factors["W1"][0], factors["W1"][1], factors["W2"][0])
        outs = outs if isinstance(outs, tuple) else (outs,)
        targets = leaves + ([] if ln_leaves is None else list(ln_leaves.values()))
        grads = torch.autograd.grad(outs, targets, upstream[: len(outs)])
    return [o.detach() for o in outs] + list(grads)


def random_memory_mlp_pass(dim: int, dv: int, hidden: int, *, heads: int, tokens: int, with_ln: bool, factors: bool,
                           device, dtype) -> tuple[dict, list, dict, list]:
    """Random inputs of one token pass (weights at initialisation scale) with upstream gradients of its four outputs,
    and their float64 CPU copies for the reference: keyword arguments of `memory_mlp_pass_results`, without `loss`
    and `kernel`."""
    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype) * scale

    inputs = dict(z=rand(1, heads, tokens, dim), w1=rand(1, heads, dv, hidden, scale=hidden ** -0.5),
                  w2=rand(1, heads, hidden, dim, scale=dim ** -0.5), v=rand(1, heads, tokens, dv) if factors else None,
                  ln=None if not with_ln else {"ln_weight": 1 + rand(heads, dv, scale=0.1),
                                               "ln_bias": rand(heads, dv, scale=0.1)})
    upstream = [rand(1, heads, tokens, width) for width in (dv, dv, hidden, hidden)]

    def on_cpu(t):
        return t.double().cpu()

    reference = dict(z=on_cpu(inputs["z"]), w1=on_cpu(inputs["w1"]), w2=on_cpu(inputs["w2"]),
                     v=None if not factors else on_cpu(inputs["v"]),
                     ln=None if not with_ln else {k: on_cpu(t) for k, t in inputs["ln"].items()})
    return inputs, upstream, reference, [on_cpu(u) for u in upstream]


@_probe
def _probe_memory_mlp(w1, w2, z, ln, factors: bool, loss: str | None) -> str | None:
    """The kernel's token pass on random inputs of this pass's sizes (one head, 40 tokens) against the float64
    PyTorch path: outputs and every input gradient (see `_verdict`)."""
    dim, (dv, hidden) = z.shape[-1], w1.shape[-2:]
    key = ("memory_mlp", dim, dv, hidden, ln is not None, factors, loss, z.dtype, z.device, memory_mlp_precision())
    if key in _probed:  # random inputs only on a first call: the hot path draws nothing from the RNG
        return _probed[key]
    inputs, upstream, reference, ref_upstream = random_memory_mlp_pass(
        dim, dv, hidden, heads=1, tokens=40, with_ln=ln is not None, factors=factors, device=z.device, dtype=z.dtype)
    _probed[key] = _verdict(MEMORY_MLP_KERNEL, f"a random pass (D={dim}, dv={dv}, hidden={hidden})",
                            lambda: memory_mlp_pass_results(**inputs, loss=loss, upstream=upstream, kernel=True),
                            lambda: memory_mlp_pass_results(**reference, loss=loss, upstream=ref_upstream,
                                                            kernel=False), memory_mlp_precision())
    return _probed[key]


TOKEN_MOMENTA_KERNEL = "the token momenta kernel"  # its name in fallback notes


def token_momenta_or_none(mix, left, right, scale, prev, half_inputs: bool):
    """A weighted sum of outer products for every token of a chunk (update="token": the momenta, and the gradient of
    the per-token updates; `token_momenta_kernel`) by the Triton kernel for CUDA tensors it covers and whose probe
    passes, in the scan's product precision, else None: the caller's PyTorch path. Reasons are noted once."""
    if not (_enabled and mix.is_cuda):
        return None
    precision = scan_product_precision(half_inputs)
    reason = token_momenta_unsupported(mix, left, right, precision) or _probe_token_momenta(mix, left, right,
                                                                                            precision)
    if reason is not None:
        note_fallback(TOKEN_MOMENTA_KERNEL, reason)
        return None
    return token_momenta(mix, left, right, scale, prev, precision)


def token_momenta_results(mix, left, right, scale, prev, upstream, kernel: bool, precision: str = "ieee"):
    """The momenta and the gradients of the five inputs under `upstream`: the kernel's (in `precision`), or the
    PyTorch path's (`outer_sums.weighted_outer_sums_reference`)."""
    leaves = [t.detach().clone().requires_grad_() for t in (mix, left, right, scale, prev)]
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = token_momenta(*leaves, precision) if kernel else weighted_outer_sums_reference(*leaves)
        grads = torch.autograd.grad(out, leaves, upstream)
    return [out.detach(), *grads]


def random_token_momenta(length: int, keys: int, n_out: int, n_in: int, *, heads: int, device, dtype) -> list:
    """Random mix, left, right, scale, prev and an upstream gradient of the momenta, one batch row of `heads` heads:
    the first six arguments of `token_momenta_results`."""
    shapes = [(length, keys), (keys, n_out), (keys, n_in), (length,), (n_out, n_in), (length, n_out, n_in)]
    return [torch.randn(1, heads, *shape, device=device, dtype=dtype) for shape in shapes]


@_probe
def _probe_token_momenta(mix, left, right, precision: str) -> str | None:
    """The kernel on random inputs of one head of this call's sizes against the float64 PyTorch path: momenta and
    every input gradient (see `_verdict`)."""
    length, keys, n_out, n_in = mix.shape[-2], mix.shape[-1], left.shape[-1], right.shape[-1]
    key = ("token_momenta", length, keys, n_out, n_in, mix.dtype, mix.device, precision)
    if key not in _probed:  # random inputs only on a first call: the hot path draws nothing from the RNG
        inputs = random_token_momenta(length, keys, n_out, n_in, heads=1, device=mix.device, dtype=mix.dtype)
        _probed[key] = _verdict(TOKEN_MOMENTA_KERNEL, f"random momenta (L={length}, K={keys}, {n_out}x{n_in})",
                                lambda: token_momenta_results(*inputs[:5], inputs[5], kernel=True,
                                                              precision=precision),
                                lambda: token_momenta_results(*(t.double().cpu() for t in inputs[:5]),
                                                              inputs[5].double().cpu(), kernel=False), precision)
    return _probed[key]


def muon_step_or_none(coef, left, right, prior, momentum, anchor, momentum_gate, descent, decay, steps: int,
                      half_inputs: bool):
    """The chunk update's Muon step (`atlas_train.ops.muon_step`'s arguments) by the fused kernel for CUDA tensors it
    covers and whose probe passes, with G's products in the scan's product precision and NS in its own, else None:
    the caller's PyTorch path. Reasons are noted once."""
    if not (_enabled and _muon_kernel and coef.is_cuda):
        return None
    product, precision = scan_product_precision(half_inputs), ns_precision(half_inputs)
    chains = momentum.expand(*coef.shape[:2], *momentum.shape[-2:])  # one matrix per (batch, head) chain
    reason = muon_step_unsupported(momentum, coef.shape[-1], steps, product, precision) or _muon_rule(
        chains, steps, precision) or _probe_muon_step(momentum, coef.shape[-1], prior is not None, steps, product,
                                                       precision)
    if reason is not None:
        note_fallback(MUON_STEP_KERNEL, reason)
        return None
    return muon_step(coef, left, right, prior, momentum, anchor, momentum_gate, descent, decay, steps, product,
                     precision)


def _muon_rule(momentum: torch.Tensor, steps: int, precision: str) -> str | None:
    """Why the fixed rule leaves this step unfused, or None. The fused step runs its Newton–Schulz on the NS kernel's
    code, one program per chain; where `triton_takes` gives these matrices to cuBLAS instead (too few of them to fill
    the card for their size: long context, B·H = 16 or 32), the unfused step does so too."""
    if steps == 0 or triton_takes(momentum, precision):
        return None
    return (f"Newton-Schulz of {momentum.numel() // (momentum.shape[-2] * momentum.shape[-1])} matrices of "
            f"{tuple(momentum.shape[-2:])} goes to cuBLAS by the dispatch rule")


def muon_step_results(inputs: list, upstream: list, steps: int, kernel: bool, product: str = "ieee",
                      precision: str = "ieee") -> list[torch.Tensor]:
    """M', A' and the gradients of every tensor input (the prior's where given) under `upstream` (M', A'): the
    kernel's in these precisions, or the PyTorch path's (`muon_step_reference`)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        if kernel:
            outs = muon_step(*leaves, steps, product, precision)
        else:
            outs = muon_step_reference(*leaves, steps, False)
        grads = torch.autograd.grad(outs, [t for t in leaves if t is not None], upstream)
    return [o.detach() for o in outs] + list(grads)


def random_muon_step(batch: int, heads: int, keys: int, n_out: int, n_in: int, *, prior: bool, device,
                     dtype) -> tuple[list, list]:
    """Random inputs of `muon_step` (coef, left, right, prior or None, momentum, anchor, and gates in the ranges the
    scan gives them: θ and decay in [0, 1), descent in (−1, 0]) and upstream gradients of M' and A'."""
    def rand(*shape):
        return torch.randn(batch, heads, *shape, device=device, dtype=dtype)

    def gate(sign=1.0):
        return sign * torch.rand(batch, heads, 1, 1, device=device, dtype=dtype)

    weights = (n_out, n_in)
    inputs = [rand(keys), rand(keys, n_out), rand(keys, n_in), rand(*weights) if prior else None, rand(*weights),
              rand(*weights), gate(), gate(-1.0), gate()]
    return inputs, [rand(*weights), rand(*weights)]


@_probe
def _probe_muon_step(momentum, keys: int, prior: bool, steps: int, product: str, precision: str) -> str | None:
    """The kernel on random inputs of one chain of this step's sizes against the float64 PyTorch path: M', A' and
    every input gradient (see `_verdict`; bound: NS's precision, the looser of the two)."""
    n_out, n_in = momentum.shape[-2:]
    key = ("muon_step", keys, n_out, n_in, prior, steps, momentum.dtype, momentum.device, product, precision)
    if key not in _probed:  # random inputs only on a first call: the hot path draws nothing from the RNG
        inputs, upstream = random_muon_step(1, 1, keys, n_out, n_in, prior=prior, device=momentum.device,
                                            dtype=momentum.dtype)

        def on_cpu(tensors):
            return [None if t is None else t.double().cpu() for t in tensors]

        _probed[key] = _verdict(MUON_STEP_KERNEL, f"a random step (K={keys}, {n_out}x{n_in})",
                                lambda: muon_step_results(inputs, upstream, steps, kernel=True, product=product,
                                                          precision=precision),
                                lambda: muon_step_results(on_cpu(inputs), on_cpu(upstream), steps, kernel=False),
                                precision)
    return _probed[key]


@_probe
def _probe_dual_attention(x: torch.Tensor, width: int, precision: str) -> str | None:
    """The kernel on random inputs of this pass's widths against the float64 PyTorch path (outputs and every
    gradient), once per (d, e, dtype, device, precision)."""
    key = ("dual_attention", x.shape[-1], width, x.dtype, x.device, precision)
    if key not in _probed:  # random inputs only on a first call: the hot path draws nothing from the RNG
        inputs, grad = random_pass(1, 2, 96, 150, x.shape[-1], width, device=x.device, dtype=x.dtype)
        reference = {n: t.double().cpu() if isinstance(t, torch.Tensor) and t.is_floating_point()
                     else t.cpu() if isinstance(t, torch.Tensor) else t for n, t in inputs.items()}
        _probed[key] = _verdict(DUAL_KERNEL_NAME, f"a random pass (d={x.shape[-1]}, e={width})",
                                lambda: pass_results(dual_implementation(precision), inputs, grad),
                                lambda: pass_results(TORCH, reference, grad.double().cpu()), precision)
    return _probed[key]


def dual_attention_fast(x: torch.Tensor, width: int, kind: str, precision: str) -> Implementation | None:
    """The kernel for passes over points like x with values `width` wide where it covers them and its probe passes,
    else None (the PyTorch pass); each reason is noted once. The signature of `atlas_train.ops.dual_attention.
    implementation` with the operand precision added: what a registry entry calls."""
    reason = dual_attention_unsupported(x, kind, precision) or _probe_dual_attention(x, width, precision)
    if reason is not None:
        note_fallback(DUAL_KERNEL_NAME, reason)
        return None
    return dual_implementation(precision)


def dual_attention_or_none(x: torch.Tensor, width: int, kind: str, half_inputs: bool) -> Implementation | None:
    """The fast path "dual_attention" (`atlas_train.ops.dual_attention.implementation`'s arguments): the kernel for
    CUDA points it covers and whose probe passes, in `dual_attention_precision` (bf16 for a bf16/fp16 model, exact
    float32 otherwise), else None; nothing while the kernels are switched off."""
    kernels_enabled = settings()[0]
    if not (kernels_enabled and x.is_cuda):
        return None
    return dual_attention_fast(x, width, kind, dual_attention_precision(half_inputs))


def register() -> None:
    """Register the fast paths of this module with `atlas_train.ops.registry` (the entry point of the group
    "atlas_train.fast_paths" in pyproject.toml, which the registry loads on its first lookup)."""
    registry.register("newton_schulz", newton_schulz_or_none)
    registry.register("memory_mlp_pass", memory_mlp_or_none)
    registry.register("weighted_outer_sums", token_momenta_or_none)
    registry.register("scan_products", scan_products)
    registry.register("settings", settings)
    registry.register("dual_attention", dual_attention_or_none)
    registry.register("muon_step", muon_step_or_none)
