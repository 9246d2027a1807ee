"""The chunk-parallel implementation of `dual_memory_scan` (docs/math.md §8), with its own backward.

J, the first memory layer in dual form, is the written keys with a coefficient each (a KV cache whose values change).
A chunk n of L tokens, starting at a grid position, reads and writes only its window: its c − 1 preceding keys and its
own L keys. Keys before the window hold their final coefficients by then; the window's first c − 1 keys hold
partial ones ("tails", kept for each chunk). So, per chunk:

1. anchor pass (sequential: each chunk needs the coefficients the chunks before it wrote): h at the window's keys,
   pulled from J as it stands at the chunk's start (`dual_attention`, value dimension hid);
2. the window keys' inner gradients at the anchor, and the coefficients and W1 the chunk leaves (`dual_terms`).

After the loop, every chunk's reads at once: the pull over the keys that were final before each chunk (one attention
pass over the whole call, limited by chunk), plus each chunk's window terms.

The autograd function keeps, per chunk, only what the sequential part produced (h at the window keys, W1 at the chunk's
start, the tails): O(T·hid) per head, never the J each chunk saw. Backward runs the chunks in reverse: a chunk's
coefficient gains get their gradient from every later use of them, which is the pull with points and keys swapped
(every later anchor pass read them, a later chunk's read through the final values or a tail); then the chunk's own
terms are recomputed under autograd and differentiated. The gradients of the attention passes with respect to points,
keys and θ come last, each pass at once.

A chunk's own terms (`DualChunkStep`) are a few dozen small operators forward and more in backward, the same for every
chunk: they run through cuda_graphs.py like `memory_scan`'s chunk steps, so that on a GPU each is one graph replay
instead of a launch per operator. What they take from outside the chain and that depends on the inputs alone (the
persistent pairs' part of h at the window keys, M's row that weighs a chunk's gains) is made for all chunks before
the loop and differentiated at once after it, like `memory_scan`'s carry-free terms: a replayed graph still runs
every kernel it holds, and most of these are small. The attention passes stay outside the graphs: they read all of
J, far too large to copy into a graph's static buffers every chunk.

The terms can also run compiled (`torch.compile`, forward and, through AOTAutograd, the recomputation's backward;
ATLAS_DUAL_COMPILED_TERMS=1), before their graphs are captured. They are elementwise passes (GELU, LayerNorm, their
derivatives) over (W, hid) tensors between four small products: the bytes of those passes, not launches or
arithmetic, are what a replayed graph still spends, and Inductor fuses them. Off by default: it costs a compilation
per chunk shape, and `benchmarks/bench_dual_scan.py --compiled-terms` times what it buys beside the default.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from atlas_train.ops.cuda_graphs import run_backward, run_forward
from atlas_train.ops.dual_attention import Implementation, kernel_values
from atlas_train.ops.dual_terms import DualOptions, Params, anchor_terms, chunk_step, mixing, persistent_h, reads
from atlas_train.ops.precision import scan_precision

PAD_DOC = -2  # document id of the padding that fills the last chunk: shares no document with anything


class Layout(NamedTuple):
    """Host-side facts of one call: keys carried in, lengths, and per chunk whether a document starts in it and which
    row is its last real token."""

    carried: int  # N0: keys in the state (padding included)
    length: int  # T
    chunks: int
    resets: tuple  # bool per chunk
    last_rows: tuple  # int per chunk


def make_layout(carried: int, length: int, opts: DualOptions, reset: torch.Tensor) -> Layout:
    """The layout of a call of `length` tokens after `carried` keys; reset (B, T) bool (one host sync)."""
    size = opts.chunk_size
    chunks = math.ceil(length / size)
    starts = set((reset.any(0).nonzero().flatten() // size).tolist())
    return Layout(carried, length, chunks, tuple(n in starts for n in range(chunks)),
                  tuple(min(size, length - n * size) - 1 for n in range(chunks)))


class _Limits(NamedTuple):
    """The attention passes' key limits, on the device (made there: no host-to-device copy, which would sync)."""

    starts: torch.Tensor  # (C,): J's size at each chunk's start, what its anchor pass sees
    reads: torch.Tensor  # (C·L,): a query sees the keys before this by their final coefficients
    anchors: torch.Tensor  # (C·W,): the same for the window keys as points of the anchor pass


def _limits(layout: Layout, opts: DualOptions, device) -> _Limits:
    size, past = opts.chunk_size, opts.window - 1
    starts = layout.carried + size * torch.arange(layout.chunks, device=device)
    return _Limits(starts, (starts - past).repeat_interleave(size), (starts - past).repeat_interleave(size + past))


def windows(t: torch.Tensor, start: int, opts: DualOptions, chunks: int, dim: int = 2) -> torch.Tensor:
    """Every chunk's window of rows of t (rows along `dim`) beginning at `start` for chunk 0: (…, C, W, …)."""
    size, width = opts.chunk_size, opts.chunk_size + opts.window - 1
    out = t.narrow(dim, start, (chunks - 1) * size + width).unfold(dim, width, size)
    return out.movedim(-1, dim + 1)


def _unwindow(grad: torch.Tensor, rows: int, start: int, opts: DualOptions) -> torch.Tensor:
    """The gradient of `windows` (dim 2): per-chunk window gradients (B, H, C, W, f) summed into (B, H, rows, f), by
    autograd through `windows` itself (unfold's backward: a few operators, not one per chunk)."""
    rows_of = torch.zeros(*grad.shape[:2], rows, grad.shape[-1], dtype=grad.dtype, device=grad.device,
                          requires_grad=True)
    with torch.enable_grad():
        return torch.autograd.grad(windows(rows_of, start, opts, grad.shape[2]), rows_of, grad)[0]


class _Views(NamedTuple):
    """The per-chunk views of one call's inputs that forward and backward share."""

    kwin: torch.Tensor  # (B, H, C, W, dh) window keys
    vwin: torch.Tensor  # (B, H, C, W, dh) their values
    win_doc: torch.Tensor  # (B, C, W)
    tok_doc: torch.Tensor  # (B, C, L)
    carry_doc: torch.Tensor  # (B, C): the document the weights carried into each chunk belong to
    eta: torch.Tensor  # (B, H, C, L)
    gamma: torch.Tensor  # (B, H, C, L, c)


def _views(kall, vall, eta, gamma, tok_doc, key_doc, layout: Layout, opts: DualOptions) -> _Views:
    batch, heads = eta.shape[:2]
    chunks, size, past = layout.chunks, opts.chunk_size, opts.window - 1
    tok = tok_doc.reshape(batch, chunks, size)
    carry = torch.cat([tok.new_zeros(batch, 1), tok[:, :-1, -1]], dim=1)
    return _Views(windows(kall, layout.carried - past, opts, chunks), windows(vall, 0, opts, chunks),
                  windows(key_doc, layout.carried - past, opts, chunks, dim=1), tok, carry,
                  eta.reshape(batch, heads, chunks, size), gamma.reshape(batch, heads, chunks, size, gamma.shape[-1]))


def _chunk(views: _Views, n: int) -> _Views:
    """Chunk n alone (a chunk dimension of 1)."""
    per_head = ("kwin", "vwin", "eta", "gamma")
    return _Views(*(t[:, :, n:n + 1] if name in per_head else t[:, n:n + 1] for name, t in views._asdict().items()))


def _last_mixing(views: _Views, layout: Layout) -> torch.Tensor:
    """M's row at each chunk's last real token (B, H, C, W): how much of each window key's gradient the weights a
    chunk hands on hold. It depends on the gates and documents alone, so it is made for all chunks at once, before
    the chain of chunk steps, and differentiated at once after it."""
    m = mixing(views.eta, views.gamma, views.tok_doc, views.win_doc)
    return torch.cat([m[:, :, :-1, -1], m[:, :, -1:, layout.last_rows[-1]]], dim=2)


def _anchor_inputs(views: _Views, p: Params, opts: DualOptions) -> torch.Tensor:
    """The persistent pairs' part of h at every chunk's window keys (B, H, C, W, hid): it does not depend on the
    coefficients, so it is made for all chunks at once; each chunk's anchor pass adds its pull to its slice."""
    return persistent_h(views.kwin, p, opts.kind)


def _local_step(h, w1c, m_last, kwin, vwin, win_doc, tok_doc, carry_doc, p: Params, opts: DualOptions,
                has_reset: bool, last_row: int):
    """One chunk's terms: (δ, g_out, gelu(h), coefficient gains, W1 after its last token), from h at its window keys
    and M's row at its last real token (`_last_mixing`)."""
    delta, g_out, hidden = anchor_terms(h, w1c, kwin, vwin, win_doc, carry_doc, p, opts, has_reset)
    gains, w1_next = chunk_step(delta, g_out, hidden, w1c, m_last, tok_doc[..., last_row], carry_doc, p)
    return delta, g_out, hidden, gains, w1_next


_COMPILE_ENV = "ATLAS_DUAL_COMPILED_TERMS"


def compiled_terms() -> bool:
    """Whether the chunk terms run compiled (ATLAS_DUAL_COMPILED_TERMS=1, see the module's docstring); never inside a
    region being compiled, which traces them itself."""
    setting = os.environ.get(_COMPILE_ENV, "0")
    if setting not in ("0", "1"):
        raise ValueError(f"{_COMPILE_ENV}={setting!r}: expected 0 or 1")
    return setting == "1" and not torch.compiler.is_compiling()


@functools.cache
def _compiled_local_step():
    """`_local_step` under torch.compile: static shapes (every chunk of a call has the same), one graph."""
    return torch.compile(_local_step, dynamic=False, fullgraph=True)


class DualChunkStep(NamedTuple):
    """One chunk's terms (`_local_step`) as a function of a flat tensor list, so that cuda_graphs.py can run it on
    static buffers: every chunk with equal flags and shapes shares one CUDA graph. The list (`_step_tensors`): h at
    the window keys (B, H, 1, W, hid), W1 at the chunk's start, M's last row, the window keys and values, the document
    ids (window, tokens, carried), then the parameters the terms use (`_step_params`: the initial W1, and the
    LayerNorm's where the memory has one; the persistent pairs and θ enter through h)."""

    opts: DualOptions
    has_reset: bool  # a document starts inside the chunk
    last_row: int  # the chunk's last real token
    has_ln: bool
    compiled: bool  # `compiled_terms`: part of the graphs' key, so that a graph never replays the other choice

    def forward(self, *tensors) -> list[torch.Tensor]:
        """[δ, g_out, gelu(h), coefficient gains, W1 after the chunk], without an autograd graph."""
        with torch.no_grad():
            return list(self._step(*tensors))

    def backward(self, *tensors) -> list[torch.Tensor]:
        """Takes forward's tensors, then the gradients of its five outputs; returns the gradients of h at the window
        keys, W1 at the start, M's last row, the window keys and values, and the parameters of the list (zeros where
        unused), recomputing the chunk under autograd."""
        count = len(tensors) - 5
        inputs = list(tensors[:count])
        differentiable = inputs[:_N_DIFFERENTIABLE] + inputs[count - self._n_params():]

        def step(h, w1c, m_last, kwin, vwin, *params):
            return self._step(h, w1c, m_last, kwin, vwin, *inputs[_N_DIFFERENTIABLE:count - self._n_params()],
                              *params)

        return _grads(step, differentiable, list(tensors[count:]))

    def output_gradients(self, outputs) -> list[torch.Tensor]:
        """Zero gradients of forward's outputs, as backward takes them."""
        return [torch.zeros_like(t) for t in outputs]

    def _n_params(self) -> int:
        return len(_step_params(self.has_ln))

    def _step(self, h, w1c, m_last, kwin, vwin, win_doc, tok_doc, carry_doc, *params):
        p = Params(None, None, None, None, None, None)._replace(**dict(zip(_step_params(self.has_ln), params)))
        local_step = _compiled_local_step() if self.compiled else _local_step
        return local_step(h, w1c, m_last, kwin, vwin, win_doc, tok_doc, carry_doc, p, self.opts, self.has_reset,
                          self.last_row)


_N_DIFFERENTIABLE = 5  # h, W1 at the start, M's last row, window keys, window values: the step's inputs with gradients


def _step_params(has_ln: bool) -> tuple[str, ...]:
    """The `Params` fields a chunk's terms use, in the order `DualChunkStep` takes them."""
    return ("w1", "ln_weight", "ln_bias") if has_ln else ("w1",)


def _step_tensors(h, w1c, m_last, view: _Views, p: Params) -> list[torch.Tensor]:
    """`DualChunkStep`'s tensor list for one chunk (view: `_chunk`'s; h, w1c, m_last with a chunk dimension of 1)."""
    return [h, w1c, m_last, view.kwin, view.vwin, view.win_doc, view.tok_doc, view.carry_doc,
            *(getattr(p, name) for name in _step_params(p.ln_weight is not None))]


def _reads(q, h_main, tails, terms, w1c, views: _Views, p: Params, opts: DualOptions, has_reset: bool):
    """Every chunk's reads (B, H, T_pad, dh)."""
    batch, heads, chunks, size = views.eta.shape
    m = mixing(views.eta, views.gamma, views.tok_doc, views.win_doc)
    y = reads(q.reshape(batch, heads, chunks, size, -1), h_main.reshape(batch, heads, chunks, size, -1), tails, *terms,
              w1c, views.kwin, m, views.tok_doc, views.win_doc, views.carry_doc, p, opts, has_reset)
    return y.reshape(batch, heads, chunks * size, -1)


def _grads(fn, inputs: list, grad_outputs: list) -> list:
    """Gradients of fn(*inputs) (a tensor or tuple) with respect to every input (zeros where unused, None for None)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        outputs = fn(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        wanted = [t for t in leaves if t is not None]
        found = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True))
    result = []
    for t in leaves:
        g = None if t is None else next(found)
        result.append(None if t is None else torch.zeros_like(t) if g is None else g)
    return result


class DualScanFunction(torch.autograd.Function):
    """The chunked dual scan on padded inputs (B, H, C·L, ·): returns y, the final coefficients of every key, W1 after
    the last real token, and the last chunk's tails and start W1 (a state that ends inside a chunk keeps them)."""

    @staticmethod
    def forward(ctx, opts: DualOptions, layout: Layout, impl: Implementation, need_backward: bool, q, k, v, eta, gamma,
                w1, k0, a0, theta, ln_weight, ln_bias, keys0, coef0, w1c0, window_v0, tok_doc, key_doc):
        p = Params(w1, k0, a0, theta, ln_weight, ln_bias)
        past, size = opts.window - 1, opts.chunk_size
        kall, vall = torch.cat([keys0, k], dim=2), torch.cat([window_v0, v], dim=2)
        coef = torch.cat([coef0, coef0.new_zeros(*coef0.shape[:2], q.shape[2], coef0.shape[-1])], dim=2)
        views = _views(kall, vall, eta, gamma, tok_doc, key_doc, layout, opts)
        h_anchor, m_last = _anchor_inputs(views, p, opts), _last_mixing(views, layout)
        w1cs, tails, terms = [], [], []
        w1c = w1c0
        limits = _limits(layout, opts, q.device)
        ctx.compiled = compiled = compiled_terms()
        for n in range(layout.chunks):
            start = layout.carried + n * size
            h_anchor[:, :, n] += impl.forward(views.kwin[:, :, n], kall, coef, limits.starts[n].expand(past + size),
                                              views.win_doc[:, n], key_doc, opts.kind, theta)
            tails.append(coef[:, :, start - past:start].clone())
            step = DualChunkStep(opts, layout.resets[n], layout.last_rows[n], ln_weight is not None, compiled)
            tensors = _step_tensors(h_anchor[:, :, n:n + 1], w1c[:, :, None], m_last[:, :, n:n + 1], _chunk(views, n),
                                    p)
            *chunk_terms, gains, w1_next = run_forward(step, tensors, need_backward)
            coef[:, :, start - past:start + size] += gains[:, :, 0]
            w1cs.append(w1c)
            terms.append(chunk_terms)
            w1c = w1_next[:, :, 0]
        w1c_all, tails = torch.stack(w1cs, 2), torch.stack(tails, 2)
        h_main = impl.forward(q, kall, coef, limits.reads, tok_doc, key_doc, opts.kind, theta)
        terms = [torch.cat(t, 2) for t in zip(*terms)]
        y = _reads(q, h_main, tails, terms, w1c_all, views, p, opts, any(layout.resets))
        ctx.opts, ctx.layout, ctx.impl = opts, layout, impl
        ctx.save_for_backward(q, k, v, eta, gamma, w1, k0, a0, theta, ln_weight, ln_bias, keys0, window_v0, tok_doc,
                              key_doc, coef, h_anchor, m_last, w1c_all, tails, h_main)
        return y, coef, w1c, tails[:, :, -1].clone(), w1c_all[:, :, -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dcoef_out, dw1_cur, dtail_last, dw1c_last):
        # The autograd engine runs this outside the forward's precision context: it is entered again.
        with scan_precision(dy.device, ctx.opts.half_inputs):
            return DualScanFunction._backward(ctx, dy, dcoef_out, dw1_cur, dtail_last, dw1c_last)

    @staticmethod
    def _backward(ctx, dy, dcoef_out, dw1_cur, dtail_last, dw1c_last):
        opts, layout, impl = ctx.opts, ctx.layout, ctx.impl
        (q, k, v, eta, gamma, w1, k0, a0, theta, ln_weight, ln_bias, keys0, window_v0, tok_doc, key_doc, coef,
         h_anchor, m_last, w1c_all, tails, h_main) = ctx.saved_tensors
        past, size, chunks, n0 = opts.window - 1, opts.chunk_size, layout.chunks, layout.carried
        kall, vall = torch.cat([keys0, k], dim=2), torch.cat([window_v0, v], dim=2)
        views = _views(kall, vall, eta, gamma, tok_doc, key_doc, layout, opts)
        p = Params(w1, k0, a0, theta, ln_weight, ln_bias)
        zero = [torch.zeros_like(t) if g is None else g for g, t in
                zip((dcoef_out, dw1_cur, dtail_last, dw1c_last), (coef, w1c_all[:, :, 0], tails[:, :, 0],
                                                                   w1c_all[:, :, 0]))]
        dcoef_out, dw1_cur, dtail_last, dw1c_last = zero

        def with_views(kall_, vall_, eta_, gamma_):
            return _views(kall_, vall_, eta_, gamma_, tok_doc, key_doc, layout, opts)

        # The reads, recomputed from the sequential part's results, differentiated at once.
        with torch.no_grad():
            terms = anchor_terms(h_anchor, w1c_all, views.kwin, views.vwin, views.win_doc, views.carry_doc, p, opts,
                                 any(layout.resets))

        def read_fn(q_, kall_, vall_, eta_, gamma_, h_main_, tails_, delta_, g_out_, hidden_, w1c_, *params):
            return _reads(q_, h_main_, tails_, (delta_, g_out_, hidden_), w1c_, with_views(kall_, vall_, eta_, gamma_),
                          Params(*params), opts, any(layout.resets))

        (dq, dkall, dvall, deta, dgamma, dh_main, dtails, ddelta, dg_out, dhidden, dw1c_read, *dparams) = _grads(
            read_fn, [q, kall, vall, eta, gamma, h_main, tails, *terms, w1c_all, *p], [dy])
        dparams = [g if g is None else g.clone() for g in dparams]
        limits = _limits(layout, opts, q.device)
        dq_main, dk_main, dcoef_read, dtheta = impl.backward(q, kall, coef, limits.reads, tok_doc, key_doc,
                                                             opts.kind, theta, dh_main, True)
        dq += dq_main
        dkall += dk_main
        dparams[3] += dtheta

        # Reverse over chunks: the gains' gradient, then the chunk's terms. The window keys as points, and their h's
        # gradients, are kept in reverse chunk order, so that the later chunks' are a prefix the pass can limit to.
        fixed = dcoef_out + dcoef_read  # gradient of the final coefficients
        tail_sum = torch.zeros_like(coef)  # Σ over later chunks of the gradients of their tails
        dh_reversed = torch.zeros_like(h_anchor)
        dm_last = torch.zeros_like(m_last)
        points_reversed, doc_reversed = views.kwin.flip(2).flatten(2, 3), views.win_doc.flip(1).flatten(1, 2)
        width = past + size
        dw1_next = dw1_cur
        # Chunk n's pass sees the later chunks' points: a prefix of the reversed order, (C − 1 − n)·W of them.
        later = ((chunks - 1 - torch.arange(chunks, device=q.device)) * width)[:, None].repeat(1, width)
        for n in reversed(range(chunks)):
            start = n0 + n * size
            window = slice(start - past, start + size)
            dgains = fixed[:, :, window] + tail_sum[:, :, window]
            if n + 1 < chunks:
                dgains = dgains + impl.forward(views.kwin[:, :, n], points_reversed, dh_reversed.flatten(2, 3),
                                               later[n], views.win_doc[:, n], doc_reversed, opts.kind, theta)
            step = DualChunkStep(opts, layout.resets[n], layout.last_rows[n], ln_weight is not None, ctx.compiled)
            grads = run_backward(step, [*_step_tensors(h_anchor[:, :, n:n + 1], w1c_all[:, :, n:n + 1],
                                                       m_last[:, :, n:n + 1], _chunk(views, n), p),
                                        ddelta[:, :, n:n + 1], dg_out[:, :, n:n + 1], dhidden[:, :, n:n + 1],
                                        dgains[:, :, None], dw1_next[:, :, None]])
            dh_reversed[:, :, chunks - 1 - n] = grads[0][:, :, 0]
            dm_last[:, :, n] = grads[2][:, :, 0]
            dkall[:, :, window] += grads[3][:, :, 0]
            dvall[:, :, n * size:n * size + width] += grads[4][:, :, 0]
            for name, g in zip(_step_params(ln_weight is not None), grads[5:]):
                dparams[Params._fields.index(name)] += g
            dw1_next = grads[1][:, :, 0] + dw1c_read[:, :, n] + (dw1c_last if n == chunks - 1 else 0)
            tail_sum[:, :, start - past:start] += dtails[:, :, n] + (dtail_last if n == chunks - 1 else 0)

        # The anchor passes' gradients with respect to points, keys and θ: the part over final coefficients in one
        # pass, each chunk's tail part in PyTorch.
        dh_pull = dh_reversed.flip(2)
        dpoints, dk_pull, _, dtheta = impl.backward(views.kwin.flatten(2, 3), kall, coef, limits.anchors,
                                                    views.win_doc.flatten(1, 2), key_doc, opts.kind, theta,
                                                    dh_pull.flatten(2, 3), False)
        dkall += dk_pull + _unwindow(dpoints.view_as(views.kwin), kall.shape[2], n0 - past, opts)
        dparams[3] += dtheta

        def tail_fn(kall_, theta_):
            kw = windows(kall_, n0 - past, opts, chunks)
            same_doc = (views.win_doc[..., :, None] == views.win_doc[..., None, :past])[:, None]
            kappa = kernel_values(kw @ kw[..., :past, :].transpose(-1, -2), opts.kind, theta_)
            return (kappa * same_doc.to(kappa.dtype)) @ tails

        dk_tail, dtheta_tail = _grads(tail_fn, [kall, theta], [dh_pull])
        dkall += dk_tail
        dparams[3] += dtheta_tail

        # What the chain took from outside it, made for all chunks at once, differentiated at once.
        def persistent_fn(kall_, k0_, a0_, theta_):
            return _anchor_inputs(with_views(kall_, vall, eta, gamma), p._replace(k0=k0_, a0=a0_, theta=theta_), opts)

        dk_persistent, *dpersistent = _grads(persistent_fn, [kall, k0, a0, theta], [dh_pull])
        dkall += dk_persistent
        for index, g in zip((1, 2, 3), dpersistent):
            dparams[index] += g
        deta_last, dgamma_last = _grads(lambda eta_, gamma_: _last_mixing(with_views(kall, vall, eta_, gamma_), layout),
                                        [eta, gamma], [dm_last])
        deta += deta_last
        dgamma += dgamma_last
        dcoef0 = fixed[:, :, :n0] + tail_sum[:, :, :n0] + impl.forward(
            kall[:, :, :n0], points_reversed, dh_reversed.flatten(2, 3), None, key_doc[:, :n0], doc_reversed,
            opts.kind, theta)
        return (None, None, None, None, dq, dkall[:, :, n0:], dvall[:, :, past:], deta, dgamma, *dparams,
                dkall[:, :, :n0], dcoef0, dw1_next, dvall[:, :, :past], None, None)
