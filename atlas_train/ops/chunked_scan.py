"""The chunk-parallel implementation of `memory_scan` (docs/math.md §3.3-3.6) and its autograd.

A call is cut into the pieces of the chunk grid (`_chunk_schedule`), and each piece advances the carry by one chunk
step (scan_chunks.py: all tokens of the chunk at once). Activation memory is one carry (fast-weight snapshot) per
chunk: the forward runs without an autograd graph, and the backward recomputes each chunk from its saved carry, in
reverse, and pushes the output gradient plus the carried gradient through it with `torch.autograd.grad`. Every
chunk's forward and backward go through cuda_graphs.py, which replays them as CUDA graphs on a GPU.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from atlas_train.ops.cuda_graphs import run_backward, run_forward
from atlas_train.ops.precision import compute_dtype, is_half, scan_precision
from atlas_train.ops.scan_chunks import (
    ChunkInputs,
    ChunkSumInputs,
    ScanOptions,
    carry_keys,
    check_state,
    chunk_carry_keys,
    chunk_update_sums,
    initial_carry,
    scan_input_names,
    step_chunk_update,
    step_token_update,
    token_update_coefficients,
)

_NON_DIFFERENTIABLE = ("count", "window_valid")


def chunked_scan(zq, zk, v, alpha, eta, theta, gamma, params, *, doc_start, state, chunk_size, ns_steps, update,
                 loss):
    """`memory_scan` on inputs it has checked: (y (B, T, H, dv) in the input dtype, the new state)."""
    batch, length, heads, _ = zq.shape
    dtype = compute_dtype(zq.dtype)
    weight_names = ("W1", "W2", "W3") if "W3" in params else ("W1", "W2")
    opts = ScanOptions(update, loss, int(ns_steps), int(chunk_size), gamma.shape[-1], v.shape[-1], weight_names,
                       is_half(zq.dtype))

    def per_head(t):  # (B, T, H, ...) -> (B, H, T, ...) in the compute dtype
        return t.to(dtype).transpose(1, 2)

    inputs = [per_head(t) for t in (zq, zk, v, alpha, eta, theta, gamma)]
    reset = (torch.zeros(batch, length, dtype=torch.bool, device=zq.device) if doc_start is None
             else doc_start.clone())
    if state is None:
        reset[:, 0] = True
    fast = [params[w].to(dtype).unsqueeze(0) for w in weight_names]
    ln = [params[k].to(dtype) for k in ("ln_weight", "ln_bias")] if "ln_weight" in params else []
    keys = carry_keys(opts)
    if state is None:
        carry = initial_carry(dict(zip(weight_names, fast)), batch, inputs[1], inputs[2], opts)
        start = 0
    else:
        carry = _carry_from_state(state, keys, opts, batch, heads, zq.shape[-1], dtype)
        start = int(state["pos"])
    schedule = _chunk_schedule(start, length, opts.chunk_size, reset.any(0).nonzero().flatten().tolist())
    offset = start % opts.chunk_size
    terms = _carry_free_terms(opts, *inputs[3:], reset, carry["window_valid"], offset)
    flat = [*inputs[:3], *terms, reset, *fast, *ln, *(carry[k] for k in keys)]
    outputs = _ScanFunction.apply(opts, schedule, offset, bool(ln), grad_wanted(flat), *flat)
    y = outputs[0].transpose(1, 2).to(zq.dtype)
    new_state = dict(zip(keys, outputs[1:]))
    new_state["pos"] = torch.tensor(start + length, dtype=torch.long, device=zq.device)
    return y, new_state


def _carry_free_terms(opts: ScanOptions, alpha, eta, theta, gamma, reset, window_valid, offset: int) -> tuple:
    """What each chunk needs of the gates and window weights, for all chunks of the call at once (it does not depend
    on the carry; scan_chunks.chunk_update_sums, token_update_coefficients). Under autograd the batched products are
    recomputed in backward rather than kept: the token update's gate products alone would keep several (L, L+1)
    matrices per chunk and head, about half a fast-weight carry at dh 64."""
    def terms(alpha, eta, theta, gamma):
        with scan_precision(reset.device, opts.half_inputs):  # also when backward recomputes them
            if opts.update == "chunk":
                gates = torch.stack([alpha, theta, eta], dim=-1)
                return chunk_update_sums(gamma, gates, reset, window_valid, offset, opts.chunk_size)
            return token_update_coefficients(gamma, alpha, eta, theta, reset, window_valid, offset, opts.chunk_size)

    if not grad_wanted([alpha, eta, theta, gamma]):
        return terms(alpha, eta, theta, gamma)
    return checkpoint(terms, alpha, eta, theta, gamma, use_reentrant=False)


def grad_wanted(tensors) -> bool:
    """Whether autograd will ask for gradients of a call on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _chunk_schedule(start: int, length: int, chunk_size: int, reset_positions: list[int]) -> tuple:
    """(begin, end, closes_grid_chunk, has_reset) for each piece of the call between grid boundaries (multiples of
    chunk_size counted from the first call's token 0); has_reset: a document starts inside the piece in some row.
    The reset positions come to the host once per call, not once per chunk."""
    pieces, begin = [], 0
    while begin < length:
        end = min(length, begin + chunk_size - (start + begin) % chunk_size)
        has_reset = any(begin <= p < end for p in reset_positions)
        pieces.append((begin, end, (start + end) % chunk_size == 0, has_reset))
        begin = end
    return tuple(pieces)


def _chunk_slices(opts: ScanOptions, inputs, index: int, begin: int, end: int, offset: int) -> list:
    """The scan inputs' parts of piece `index` (tokens begin:end), as views: queries, keys and values along the token
    axis; the per-piece terms (on the chunk grid, see chunk_update_sums) at the piece's place in its grid chunk,
    which is `offset` tokens in for the call's first piece and 0 for the others."""
    zq, zk, v, *terms = inputs
    first, n = (offset if index == 0 else 0), end - begin
    rows, keys = slice(first, first + n), slice(first, first + opts.window - 1 + n)
    if opts.update == "token":
        mix, momentum_scale, decay_start, reset_weight, decay_in = (t[:, :, index] for t in terms)
        terms = [mix[..., rows, keys], momentum_scale[..., rows], decay_start[..., rows], reset_weight[..., rows],
                 decay_in[..., rows, rows]]
    else:
        key_coef, gate_sums = terms
        terms = [key_coef[:, :, index, keys], gate_sums[:, :, index]]
    return [zq[:, :, begin:end], zk[:, :, begin:end], v[:, :, begin:end], *terms]


def _differentiable(keys):
    return [k for k in keys if k not in _NON_DIFFERENTIABLE]


class ChunkStep(NamedTuple):
    """One chunk's computation, as far as its code depends on the chunk: the scan's options and the chunk's flags
    (it closes a grid chunk; a document starts in it; the memory has a LayerNorm; it opens a grid chunk). Each method
    takes the chunk's tensors as one flat list (its carry keys in order, the update's input pieces, reset, params,
    ln), so that it can run on static buffers: all chunks with equal steps and shapes share one CUDA graph
    (cuda_graphs.py)."""

    opts: ScanOptions
    closes: bool
    has_reset: bool
    has_ln: bool
    opens: bool  # begins on the grid: the carried partial sums are zero (step_chunk_update)

    def keys(self) -> list[str]:
        """The carry keys this step takes and hands on (`chunk_carry_keys`)."""
        return chunk_carry_keys(self.opts, self.opens, self.closes)

    def forward(self, *tensors) -> list[torch.Tensor]:
        """[y, *carry out in `keys` order], without an autograd graph."""
        carry, pieces, reset, params, ln, _ = self._split(tensors)
        with torch.no_grad(), scan_precision(tensors[0].device, self.opts.half_inputs):
            y, out = self._advance(carry, pieces, reset, params, ln)
        return [y, *(out[k] for k in self.keys())]

    def backward(self, *tensors) -> list[torch.Tensor]:
        """Recompute the chunk under autograd and push (grad_y, gradients of the carry out) through it. Takes the
        chunk's tensors, then grad_y, then the carry-out gradients of the differentiable keys (zeros stand for absent
        gradients); returns the gradients of the differentiable carry keys, the input pieces, params and ln (zeros
        where unused)."""
        diff_keys = _differentiable(self.keys())
        carry, pieces, reset, params, ln, rest = self._split(tensors)
        grad_y, grad_carry = rest[0], dict(zip(diff_keys, rest[1:]))
        carry = {k: t.detach().requires_grad_() if k in grad_carry else t for k, t in carry.items()}
        pieces = [t.detach().requires_grad_() for t in pieces]
        params = {k: t.detach().requires_grad_() for k, t in params.items()}
        ln = None if ln is None else {k: t.detach().requires_grad_() for k, t in ln.items()}
        with torch.enable_grad(), scan_precision(reset.device, self.opts.half_inputs):  # the backward's products too
            y, carry_out = self._advance(carry, pieces, reset, params, ln)
            outs, grads = [y], [grad_y]
            for k in diff_keys:
                if carry_out[k].requires_grad:
                    outs.append(carry_out[k])
                    grads.append(grad_carry[k])
            targets = [carry[k] for k in diff_keys] + pieces + list(params.values()) + (
                [] if ln is None else list(ln.values()))
            found = torch.autograd.grad(outs, targets, grads, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(found, targets)]

    def output_gradients(self, outputs) -> list[torch.Tensor]:
        """Zero gradients of forward's outputs as backward takes them: y's, then the differentiable carry keys'."""
        y, *carry_out = outputs
        return [torch.zeros_like(y)] + [torch.zeros_like(t) for k, t in zip(self.keys(), carry_out)
                                        if k not in _NON_DIFFERENTIABLE]

    def _advance(self, carry, pieces, reset, params, ln):
        """(y, carry out) of the chunk, by the chunk step of the scan's update."""
        if self.opts.update == "token":
            return step_token_update(carry, ChunkInputs(*pieces, reset, self.has_reset), params, ln, self.opts,
                                     self.closes)
        return step_chunk_update(carry, ChunkSumInputs(*pieces, reset, self.has_reset), params, ln, self.opts,
                                 self.closes, self.opens)

    def _split(self, tensors):
        """carry (`keys` order), the input pieces, reset, params, ln (dicts), then whatever follows."""
        keys = self.keys()
        n_weights, n_inputs = len(self.opts.weight_names), len(scan_input_names(self.opts))
        carry = dict(zip(keys, tensors[: len(keys)]))
        rest = tensors[len(keys):]
        pieces, reset, rest = list(rest[:n_inputs]), rest[n_inputs], rest[n_inputs + 1:]
        params, rest = dict(zip(self.opts.weight_names, rest[:n_weights])), rest[n_weights:]
        ln = None
        if self.has_ln:
            ln, rest = {"ln_weight": rest[0], "ln_bias": rest[1]}, rest[2:]
        return carry, pieces, reset, params, ln, rest


class _ScanFunction(torch.autograd.Function):
    """Chunked scan with per-chunk recomputation in backward (saves one carry per chunk, not per token).

    A chunk step takes and hands on only its own carry keys (`ChunkStep.keys`): a whole grid chunk of update="chunk"
    leaves its gradient sums out, and they are filled in with zeros (`_zero_sums`) only where a later piece or the
    returned state needs them, forward and backward alike."""

    @staticmethod
    def forward(ctx, opts, schedule, offset, has_ln, need_backward, *tensors):
        inputs, reset, params, ln, carry, keys = _unpack(opts, has_ln, tensors)
        ctx.opts, ctx.schedule, ctx.offset, ctx.has_ln = opts, schedule, offset, has_ln
        fixed = [*params.values(), *([] if ln is None else ln.values())]
        saved_carries, ys = [], []
        for index, (begin, end, closes, has_reset) in enumerate(schedule):
            step = ChunkStep(opts, closes, has_reset, has_ln, index > 0 or offset == 0)
            carry = _zero_sums(carry, step.keys())
            saved_carries.extend(carry[k] for k in step.keys())
            chunk = [*(carry[k] for k in step.keys()), *_chunk_slices(opts, inputs, index, begin, end, offset),
                     reset[:, begin:end], *fixed]
            y, *carry_out = run_forward(step, chunk, need_backward)
            carry = dict(zip(step.keys(), carry_out))
            ys.append(y)
        carry = _zero_sums(carry, keys)
        ctx.save_for_backward(*tensors[: len(tensors) - len(keys)], *saved_carries)
        seen, outputs = {id(t) for t in tensors}, []
        for k in keys:  # autograd needs every output to be a distinct, new tensor
            t = carry[k].clone() if id(carry[k]) in seen else carry[k]
            seen.add(id(t))
            outputs.append(t)
        ctx.mark_non_differentiable(*(t for k, t in zip(keys, outputs) if k in _NON_DIFFERENTIABLE))
        return (torch.cat(ys, dim=2), *outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *grad_carry_out):
        opts, schedule = ctx.opts, ctx.schedule
        keys = carry_keys(opts)
        diff_keys = _differentiable(keys)
        steps = [ChunkStep(opts, closes, has_reset, ctx.has_ln, index > 0 or ctx.offset == 0)
                 for index, (_, _, closes, has_reset) in enumerate(schedule)]
        ends = list(itertools.accumulate(len(step.keys()) for step in steps))
        saved = ctx.saved_tensors
        n_fixed = len(saved) - ends[-1]
        inputs, reset, params, ln, _, _ = _unpack(opts, ctx.has_ln, saved[:n_fixed])
        fixed = [*params.values(), *([] if ln is None else ln.values())]
        fixed_grads = [torch.zeros_like(t) for t in fixed]
        input_grads = [torch.zeros_like(t) for t in inputs]
        last = _zero_sums(dict(zip(steps[-1].keys(), saved[n_fixed + ends[-1] - len(steps[-1].keys()):])), keys)
        zeros = {k: torch.zeros_like(last[k]) for k in diff_keys}  # the gradient of an unused or absent key
        carry_grad = {k: zeros[k] if g is None else g for k, g in zip(keys, grad_carry_out) if k in diff_keys}
        for index in reversed(range(len(schedule))):
            begin, end, _, _ = schedule[index]
            step, step_keys = steps[index], _differentiable(steps[index].keys())
            snapshot = saved[n_fixed + ends[index] - len(steps[index].keys()): n_fixed + ends[index]]
            chunk = [*snapshot, *_chunk_slices(opts, inputs, index, begin, end, ctx.offset), reset[:, begin:end],
                     *fixed, grad_y[:, :, begin:end], *(carry_grad[k] for k in step_keys)]
            found = run_backward(step, chunk)
            carry_grad = _zero_sums(dict(zip(step_keys, found[: len(step_keys)])), diff_keys, zeros)
            found = found[len(step_keys):]
            for buffer, g in zip(_chunk_slices(opts, input_grads, index, begin, end, ctx.offset),
                                 found[: len(inputs)]):
                buffer += g
            for buffer, g in zip(fixed_grads, found[len(inputs):]):
                buffer += g
        grads_in = {k: g.clone() for k, g in carry_grad.items()}  # off the static buffers
        n_weights = len(opts.weight_names)
        grad_ln = fixed_grads[n_weights:]
        return (None, None, None, None, None, *input_grads, None, *fixed_grads[:n_weights], *grad_ln,
                *(grads_in.get(k) for k in keys))


def _zero_sums(carry: dict, keys, zeros: dict | None = None) -> dict:
    """`carry` with every key of `keys` that it lacks (gradient sums a whole grid chunk left out) filled in with zeros:
    `zeros`'s tensor of that key (shared, never written), else a new one shaped like the same weight's anchor. The
    zero sum a closing chunk leaves; the zero gradient of a sum a step does not read."""
    missing = [k for k in keys if k not in carry]
    if not missing:
        return carry
    filled = dict(carry)
    for k in missing:
        filled[k] = zeros[k] if zeros is not None else torch.zeros_like(carry[k.replace("grad_sum.", "anchor.")])
    return filled


def _unpack(opts, has_ln, tensors):
    """Split the autograd function's flat tensor list back into its parts."""
    n_inputs = len(scan_input_names(opts))
    inputs, reset = list(tensors[:n_inputs]), tensors[n_inputs]
    rest = tensors[n_inputs + 1:]
    params = dict(zip(opts.weight_names, rest[: len(opts.weight_names)]))
    rest = rest[len(opts.weight_names):]
    ln = None
    if has_ln:
        ln, rest = {"ln_weight": rest[0], "ln_bias": rest[1]}, rest[2:]
    keys = carry_keys(opts)
    return inputs, reset, params, ln, dict(zip(keys, rest)), keys


def _carry_from_state(state, keys, opts, batch, heads, dim, dtype) -> dict:
    """Check a state dict from an earlier call against this call and cast its float tensors to the compute dtype."""
    check_state(state, opts, batch, heads, dim)
    return {k: state[k] if k in _NON_DIFFERENTIABLE else state[k].to(dtype) for k in keys}
