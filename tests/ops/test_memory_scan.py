"""memory_scan (docs/math.md §3) against the literal reference (ops/naive.py) in float64, and its state,
autograd and memory contracts. Every case compares outputs and the gradients of every input on random inputs."""

from __future__ import annotations

import doctest
import importlib
import itertools

import pytest
import torch

from atlas_train.ops import cuda_graphs, memory_scan, memory_scan_naive, newton_schulz, scan_chunks
from atlas_train.ops.naive import newton_schulz_per_head

F64 = torch.float64


def make_inputs(seed, *, batch=2, length=11, heads=2, dim=4, dv=4, hid=6, window=3, gated=False, ln=False,
                dtype=F64):
    """Random inputs with gates in (0, 1), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype).requires_grad_()

    def rand(*shape):
        return (0.02 + 0.96 * torch.rand(*shape, generator=gen, dtype=F64)).to(dtype).requires_grad_()

    x = {"zq": randn(batch, length, heads, dim), "zk": randn(batch, length, heads, dim),
         "v": randn(batch, length, heads, dv), "alpha": rand(batch, length, heads), "eta": rand(batch, length, heads),
         "theta": rand(batch, length, heads), "gamma": rand(batch, length, heads, window)}
    params = {"W1": randn(heads, dv, hid, scale=0.5), "W2": randn(heads, hid, dim, scale=0.5)}
    if gated:
        params["W3"] = randn(heads, hid, dim, scale=0.5)
    if ln:
        params["ln_weight"] = (1 + randn(heads, dv, scale=0.2)).detach().requires_grad_()
        params["ln_bias"] = randn(heads, dv, scale=0.2)
    return x, params


def doc_starts(pattern, batch, length, chunk):
    """Named document-start layouts (token 0 is always a start of a fresh call)."""
    d = torch.zeros(batch, length, dtype=torch.bool)
    if pattern == "mid_chunk":
        d[:, chunk + 1] = True
    elif pattern == "chunk_start":
        d[:, chunk] = True
    elif pattern == "several_per_row":  # different per row, several in one row, one two tokens apart
        d[0, [2, chunk + 1, chunk + 3]] = True
        d[1, [chunk - 1, 2 * chunk]] = True
    return None if pattern == "none" else d


def leaves(x, params):
    return {**x, **{f"p.{k}": t for k, t in params.items()}}


def grads_of(out, inputs, seed=123):
    """Gradients of a fixed random projection of `out` (a tensor or list of tensors) w.r.t. `inputs` (dict)."""
    outs = out if isinstance(out, (list, tuple)) else [out]
    gen = torch.Generator().manual_seed(seed)
    total = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in outs)
    names = list(inputs)
    found = torch.autograd.grad(total, [inputs[n] for n in names], allow_unused=True)
    return dict(zip(names, found))


def assert_close_grads(got, want, rtol=1e-7, atol=1e-9):
    assert set(got) == set(want)
    for name in want:
        assert got[name] is not None and want[name] is not None, name
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")


def float_state(state):
    return [t for k, t in sorted(state.items()) if t.is_floating_point()]


# (update, ns_steps, loss, gated, ln, dim>dv, window, doc pattern, length, chunk)
CASES = [
    ("token", 5, "l2", False, True, False, 3, "none", 11, 4),
    ("token", 0, "l2", False, False, False, 1, "none", 9, 4),
    ("token", 1, "dot", True, True, True, 2, "mid_chunk", 11, 4),
    ("token", 5, "l2", True, False, True, 6, "several_per_row", 13, 4),  # c > chunk
    ("token", 0, "dot", False, True, False, 3, "chunk_start", 10, 4),
    ("token", 1, "l2", False, True, True, 1, "several_per_row", 13, 4),
    ("token", 5, "dot", True, True, False, 4, "several_per_row", 12, 4),  # c == chunk
    ("token", 0, "l2", True, True, True, 9, "mid_chunk", 14, 3),
    ("chunk", 5, "l2", False, True, False, 3, "none", 11, 4),
    ("chunk", 0, "l2", False, False, False, 1, "none", 9, 4),
    ("chunk", 1, "dot", True, True, True, 2, "mid_chunk", 11, 4),
    ("chunk", 5, "l2", True, False, True, 6, "several_per_row", 13, 4),
    ("chunk", 0, "dot", False, True, False, 3, "chunk_start", 10, 4),
    ("chunk", 1, "l2", False, True, True, 1, "several_per_row", 13, 4),
    ("chunk", 5, "dot", True, True, False, 4, "several_per_row", 12, 4),
    ("chunk", 0, "l2", True, True, True, 9, "mid_chunk", 14, 3),
]


# Every combination of the options, with the document layout and D > dv cycled through so each grid point also
# varies those; T = 13 is not a multiple of chunk 4, and c = 6 is larger than the chunk.
DOC_CYCLE = ("several_per_row", "mid_chunk", "none", "chunk_start")
GRID = [(u, ns, loss, gated, ln, i % 2 == 0, c, DOC_CYCLE[i % 4], 13, 4)
        for i, (u, ns, loss, gated, ln, c) in enumerate(itertools.product(
            ("token", "chunk"), (0, 1, 5), ("l2", "dot"), (False, True), (False, True), (1, 2, 6)))]


@pytest.mark.parametrize("update,ns,loss,gated,ln,wide,window,docs,length,chunk", CASES + GRID)
def test_matches_reference(update, ns, loss, gated, ln, wide, window, docs, length, chunk):
    seed = sum(map(ord, f"{update}{ns}{loss}{gated}{ln}{wide}{window}{docs}{length}"))
    x, params = make_inputs(seed, length=length, dim=6 if wide else 4,
                            window=window, gated=gated, ln=ln)
    kwargs = dict(params=params, doc_start=doc_starts(docs, 2, length, chunk), chunk_size=chunk, ns_steps=ns,
                  update=update, loss=loss)
    y, _ = memory_scan(**x, **kwargs)
    y_ref = memory_scan_naive(**x, **kwargs)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    inputs = leaves(x, params)
    assert_close_grads(grads_of(y, inputs), grads_of(y_ref, inputs))


def test_newton_schulz_matches_literal_steps():
    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((3, 7), (7, 3), (4, 4)):
        s = torch.randn(2, 3, rows, cols, generator=gen, dtype=F64)
        for steps in (0, 1, 5):
            want = newton_schulz_per_head(s.reshape(-1, rows, cols), steps).reshape(s.shape)
            torch.testing.assert_close(newton_schulz(s, steps), want, rtol=1e-12, atol=1e-12)
    ortho = newton_schulz(torch.randn(5, 12, generator=gen, dtype=F64), 5)
    singular_values = torch.linalg.svdvals(ortho)
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3  # NS-5 lands near an orthogonal matrix


def _full_and_split(update, split, length, docs, window, chunk=4):
    x, params = make_inputs(7, length=length, window=window, gated=True, ln=True)
    doc = doc_starts(docs, 2, length, chunk)
    kw = dict(params=params, chunk_size=chunk, ns_steps=2, update=update)
    y_full, state_full = memory_scan(**x, doc_start=doc, **kw)
    first = {k: t[:, :split] for k, t in x.items()}
    second = {k: t[:, split:] for k, t in x.items()}
    y1, state = memory_scan(**first, doc_start=None if doc is None else doc[:, :split], **kw)
    y2, state_split = memory_scan(**second, doc_start=None if doc is None else doc[:, split:], state=state, **kw)
    return x, params, (y_full, state_full), (torch.cat([y1, y2], dim=1), state_split)


@pytest.mark.parametrize("update,split,docs,window", [
    ("token", 8, "several_per_row", 3), ("token", 6, "mid_chunk", 6), ("token", 5, "none", 1),
    ("chunk", 8, "several_per_row", 3), ("chunk", 6, "mid_chunk", 6), ("chunk", 5, "none", 1),
])
def test_two_calls_with_state_equal_one_call(update, split, docs, window):
    """Split at a chunk boundary (8) or inside a chunk (5, 6): same y, same final state, same gradients."""
    x, params, (y_full, s_full), (y_split, s_split) = _full_and_split(update, split, 13, docs, window)
    torch.testing.assert_close(y_split, y_full, rtol=1e-10, atol=1e-12)
    assert set(s_split) == set(s_full)
    for k in s_full:
        torch.testing.assert_close(s_split[k], s_full[k], rtol=1e-10, atol=1e-12)
    inputs = leaves(x, params)
    out_full = [y_full] + float_state(s_full)
    out_split = [y_split] + float_state(s_split)
    assert_close_grads(grads_of(out_split, inputs), grads_of(out_full, inputs), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("update", ["token", "chunk"])
def test_token_by_token_calls_equal_one_call(update):
    """The recurrent decoding path: T=1 calls threaded through the state reproduce the full call, grads included."""
    length, chunk = 9, 4
    x, params = make_inputs(3, length=length, window=3, gated=False, ln=True)
    doc = doc_starts("mid_chunk", 2, length, chunk)
    doc[1, 3] = True
    kw = dict(params=params, chunk_size=chunk, ns_steps=1, update=update)
    y_full, state_full = memory_scan(**x, doc_start=doc, **kw)
    state, ys = None, []
    for t in range(length):
        y_t, state = memory_scan(**{k: v[:, t:t + 1] for k, v in x.items()}, doc_start=doc[:, t:t + 1],
                                 state=state, **kw)
        ys.append(y_t)
    y_steps = torch.cat(ys, dim=1)
    torch.testing.assert_close(y_steps, y_full, rtol=1e-10, atol=1e-12)
    assert int(state["pos"]) == length
    inputs = leaves(x, params)
    assert_close_grads(grads_of([y_steps] + float_state(state), inputs),
                       grads_of([y_full] + float_state(state_full), inputs), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("update", ["token", "chunk"])
@pytest.mark.parametrize("second_start", [8, 6])
def test_packed_row_equals_separate_documents(update, second_start):
    """Doc A then doc B in one row == A alone and B alone on the same chunk grid (B after an unrelated prefix
    carried in a state when it starts mid-chunk)."""
    length, chunk = 13, 4
    x, params = make_inputs(11, batch=1, length=length, window=3, gated=True, ln=True)
    kw = dict(params=params, chunk_size=chunk, ns_steps=2, update=update)
    doc = torch.zeros(1, length, dtype=torch.bool)
    doc[0, second_start] = True
    y_packed, _ = memory_scan(**x, doc_start=doc, **kw)
    y_a, _ = memory_scan(**{k: t[:, :second_start] for k, t in x.items()}, **kw)
    prefix, _ = make_inputs(99, batch=1, length=second_start, window=3, gated=True, ln=True)
    _, state = memory_scan(**prefix, **kw)
    b_only = {k: t[:, second_start:] for k, t in x.items()}
    y_b, _ = memory_scan(**b_only, doc_start=doc[:, second_start:], state=state, **kw)
    torch.testing.assert_close(y_packed, torch.cat([y_a, y_b], dim=1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("update", ["token", "chunk"])
def test_gradcheck_including_state(update):
    """Finite differences on a tiny case, through an incoming state (every float state tensor is an input)."""
    x, params = make_inputs(5, batch=1, length=6, heads=1, dim=3, dv=2, hid=3, window=2, gated=True, ln=True)
    kw = dict(chunk_size=3, ns_steps=1, update=update)
    doc = torch.zeros(1, 4, dtype=torch.bool)
    doc[0, 3] = True
    _, state = memory_scan(**{k: t[:, :2] for k, t in x.items()}, params=params, **kw)
    state = {k: (t.detach().requires_grad_() if t.is_floating_point() else t) for k, t in state.items()}
    names = list(x) + list(params)
    state_names = [k for k in sorted(state) if state[k].is_floating_point()]

    def fn(*tensors):
        inputs = dict(zip(names + state_names, tensors))
        call_state = {**state, **{k: inputs[k] for k in state_names}}
        y, out = memory_scan(**{k: inputs[k][:, 2:] for k in x}, params={k: inputs[k] for k in params},
                             doc_start=doc, state=call_state, **kw)
        return (y, *float_state(out))

    tensors = [x[k] for k in x] + [params[k] for k in params] + [state[k] for k in state_names]
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("update", ["token", "chunk"])
def test_bfloat16_inputs_keep_float32_state(update):
    x64, params = make_inputs(2, length=10, window=3, gated=True, ln=True)
    x16 = {k: t.detach().to(torch.bfloat16).requires_grad_() for k, t in x64.items()}
    p32 = {k: t.detach().float().requires_grad_() for k, t in params.items()}
    doc = doc_starts("mid_chunk", 2, 10, 4)
    kw = dict(doc_start=doc, chunk_size=4, ns_steps=5, update=update)
    y16, state = memory_scan(**x16, params=p32, **kw)
    assert y16.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in float_state(state))
    y64, _ = memory_scan(**{k: t.detach().to(torch.bfloat16).double() for k, t in x64.items()},
                         params={k: t.detach() for k, t in params.items()}, **kw)
    torch.testing.assert_close(y16.double(), y64, rtol=0.03, atol=0.03)
    (y16.float().square().sum() + sum(t.sum() for t in float_state(state))).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in list(x16.values()) + list(p32.values()))


def _saved_bytes_beyond_inputs(length, chunk, update):
    """Bytes autograd keeps between forward and backward for one memory_scan call, minus the inputs' own bytes
    (the inputs are saved for the recomputation; they are O(T) but not fast-weight sized)."""
    x, params = make_inputs(4, batch=1, length=length, heads=1, dim=4, dv=4, hid=8, window=2, gated=False, ln=False)
    store = []

    def pack(t):
        store.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        memory_scan(**x, params=params, chunk_size=chunk, ns_steps=5, update=update)
    inputs = sum(t.numel() * t.element_size() for t in [*x.values(), *params.values()]) + length  # + doc starts
    return sum(store) - inputs


@pytest.mark.parametrize("update", ["token", "chunk"])
def test_saved_activations_grow_with_chunks_not_tokens(update):
    """Each extra chunk adds one carry (fast weights, momentum, anchor, window) and the chunk's carry-free terms
    (chunk_update_sums, token_update_coefficients: kept as the scan's inputs, their intermediates recomputed), not
    chunk_size fast-weight sets."""
    chunk, keys = 16, 16 + 1  # window 2: c − 1 + L keys
    weights = 8 * (4 * 8 + 8 * 4)  # bytes of W1 + W2, float64, one head
    terms = 8 * (keys + 3 if update == "chunk" else chunk * keys + 3 * chunk + chunk * chunk)
    for n_chunks in (2, 4):
        extra = _saved_bytes_beyond_inputs(2 * n_chunks * chunk, chunk, update) - _saved_bytes_beyond_inputs(
            n_chunks * chunk, chunk, update)
        assert 2 * weights < extra / n_chunks - terms < 4 * weights, (n_chunks, extra)


@pytest.mark.parametrize("change,message", [
    (dict(update="muon"), "update must be one of"),
    (dict(loss="l1"), "loss must be one of"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(ns_steps=-1), "ns_steps"),
    (dict(v=torch.zeros(2, 11, 2, 5, dtype=F64)), "v's last dim"),
    (dict(alpha=torch.zeros(2, 11, 3, dtype=F64)), "alpha has shape"),
    (dict(gamma=torch.zeros(2, 11, 2, dtype=F64)), "gamma has shape"),
    (dict(eta=torch.zeros(2, 11, 2, dtype=torch.float32)), "eta has dtype"),
    (dict(zq=torch.zeros(2, 11, 2, 4, dtype=torch.long)), "zq must be a floating-point tensor"),
    (dict(doc_start=torch.zeros(2, 11)), "doc_start must be a bool tensor"),
    (dict(params={"W1": torch.zeros(2, 4, 6)}), "params must be a dict with 'W1' and 'W2'"),
    (dict(params={"W1": torch.zeros(2, 4, 6), "W2": torch.zeros(2, 6, 4), "W4": torch.zeros(1)}), "unknown params"),
    (dict(params={"W1": torch.zeros(2, 4, 6), "W2": torch.zeros(2, 5, 4)}), r"params\['W2'\] has shape"),
    (dict(params={"W1": torch.zeros(2, 4, 6), "W2": torch.zeros(2, 6, 4), "ln_weight": torch.ones(2, 4)}),
     "both 'ln_weight' and 'ln_bias'"),
    (dict(state={"pos": torch.tensor(0)}), "state keys"),
])
def test_bad_inputs_raise_clear_value_errors(change, message):
    x, params = make_inputs(0)
    args = {**x, "params": params, **change}
    with pytest.raises(ValueError, match=message):
        memory_scan(**args)


def test_the_reference_takes_the_same_arguments_and_refuses_a_state():
    x, params = make_inputs(0)
    with pytest.raises(ValueError, match="update must be one of"):
        memory_scan_naive(**x, params=params, update="muon")
    with pytest.raises(ValueError, match="fresh sequence only: state must be None"):
        memory_scan_naive(**x, params=params, state={})


def test_the_example_in_memory_scans_docstring_runs_as_written():
    module = importlib.import_module("atlas_train.ops.memory_scan")  # the module, not the function
    failed, attempted = doctest.testmod(module)
    assert attempted > 0 and failed == 0


@pytest.mark.parametrize("update", ["token", "chunk"])
def test_static_buffer_path_equals_eager(update, monkeypatch):
    """The chunk loop on static buffers (the CUDA-graph path without capture) gives the eager results (to rounding:
    the buffers are contiguous copies of strided slices, so matmuls may sum in another order).

    Two scans of different data share the cached calls (same shapes), with document starts in some chunks only
    and a split mid-chunk, so stale buffers, a skipped copy or a missed gradient would show."""
    def run(seed):
        x, params = make_inputs(seed, length=13, window=3, gated=True, ln=True)
        doc = doc_starts("several_per_row", 2, 13, 4)
        kw = dict(params=params, chunk_size=4, ns_steps=2, update=update)
        y1, state = memory_scan(**{k: t[:, :6] for k, t in x.items()}, doc_start=doc[:, :6], **kw)
        y2, state = memory_scan(**{k: t[:, 6:] for k, t in x.items()}, doc_start=doc[:, 6:], state=state, **kw)
        outs = [torch.cat([y1, y2], dim=1)] + float_state(state)
        return outs, grads_of(outs, leaves(x, params))

    eager = [run(seed) for seed in (1, 2)]
    cuda_graphs.clear_scan_graphs()
    monkeypatch.setenv("ATLAS_SCAN_CUDA_GRAPHS", "static")
    static = [run(seed) for seed in (1, 2)]
    calls = cuda_graphs._SCAN_CALLS
    assert len(calls) >= 4  # forward and backward, with and without a document start
    assert all(call.calls > 0 for call in calls.values())  # every captured backward was found and replayed
    cuda_graphs.clear_scan_graphs()
    with torch.no_grad():  # inference builds forward calls only
        run_forward_only = make_inputs(3, length=13, window=3, gated=True, ln=True)
        memory_scan(**run_forward_only[0], params=run_forward_only[1], chunk_size=4, ns_steps=2, update=update)
    assert len(calls) > 0 and all(key[0] == "forward" for key in calls._calls)
    cuda_graphs.clear_scan_graphs()
    for (outs_e, grads_e), (outs_s, grads_s) in zip(eager, static):
        for a, b in zip(outs_s, outs_e):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert_close_grads(grads_s, grads_e, rtol=1e-11, atol=1e-11)


def test_static_calls_are_not_replayed_under_other_fast_path_settings(monkeypatch):
    """A captured graph holds the Newton–Schulz path chosen at capture (kernel or cuBLAS, operand precision): after a
    change of those settings the scan must build new calls, not replay the old choice (the benchmark's per-precision
    check once compared three precisions that all replayed the first one's graphs)."""
    from atlas_train.kernels import set_kernels_enabled, set_ns_precision
    from atlas_train.kernels.dispatch import settings

    cuda_graphs.clear_scan_graphs()
    monkeypatch.setenv("ATLAS_SCAN_CUDA_GRAPHS", "static")
    x, params = make_inputs(4, length=8, window=3)
    kw = dict(params=params, chunk_size=4, ns_steps=2, update="chunk")
    counts, setting = [], settings()[1]
    try:
        for change in (lambda: None, lambda: set_ns_precision("bf16"), lambda: set_kernels_enabled(False)):
            change()
            memory_scan(**x, **kw)
            counts.append(len(cuda_graphs._SCAN_CALLS))
    finally:
        set_ns_precision(setting)
        set_kernels_enabled(True)
        cuda_graphs.clear_scan_graphs()
    assert counts[0] > 0 and counts == [counts[0], 2 * counts[0], 3 * counts[0]]


@pytest.mark.parametrize("update", ["token", "chunk"])
def test_the_callers_autocast_does_not_reach_the_scan(update):
    """The scan's math stays float32 under a caller's bf16 autocast (so its recompute in backward, which runs outside
    that autocast, repeats the forward): the same outputs and gradients as without autocast."""
    x, params = make_inputs(5, length=9, window=3, ln=True, dtype=torch.float32)
    kw = dict(params=params, chunk_size=4, ns_steps=2, update=update)
    y, _ = memory_scan(**x, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_autocast, _ = memory_scan(**x, **kw)
    assert y_autocast.dtype == torch.float32
    torch.testing.assert_close(y_autocast, y, rtol=0, atol=0)
    inputs = leaves(x, params)
    assert_close_grads(grads_of(y_autocast, inputs), grads_of(y, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("update", ["token", "chunk"])
def test_single_token_call_passes_the_gradient_of_its_state(update):
    """A T=1 call whose inputs need no gradient but whose state does (a context-parallel hand-off): gradients reach
    the earlier tokens through the state exactly as through one longer call."""
    x, params = make_inputs(8, length=6, window=3, ln=True)
    kw = dict(params={k: t.detach() for k, t in params.items()}, chunk_size=4, ns_steps=2, update=update)
    first = {k: t[:, :5] for k, t in x.items()}
    last = {k: t[:, 5:].detach() for k, t in x.items()}
    _, state = memory_scan(**first, **kw)
    y, _ = memory_scan(**last, state=state, **kw)
    y_ref, _ = memory_scan(**{k: torch.cat([a, b], dim=1) for (k, a), b in zip(first.items(), last.values())}, **kw)
    assert y.requires_grad
    assert_close_grads(grads_of(y, first), grads_of(y_ref[:, 5:], first), rtol=1e-8, atol=1e-10)


def _pieces_one_by_one(reset, valid, offset, length, chunk):
    """(piece index, begin, end, the piece's place in its grid chunk, token_doc, key_doc) of each piece, with the
    document ids and window validity one chunk step computes (`_document_ids`, `_window_keys`)."""
    pieces, begin, index = [], 0, 0
    while begin < length:
        end = min(length, begin + chunk - (offset + begin) % chunk)
        token_doc = torch.cumsum(reset[:, begin:end].long(), dim=-1)
        key_doc = torch.cat([torch.where(valid, 0, -1), token_doc], dim=-1)
        pieces.append((index, begin, end, offset if index == 0 else 0, token_doc, key_doc))
        valid = key_doc[:, -valid.shape[1]:] == token_doc[:, -1:]
        begin, index = end, index + 1
    return pieces


def _random_call_terms(offset, length, c=3):
    torch.manual_seed(offset + length)
    batch, heads = 2, 3
    gamma, alpha, eta, theta = (torch.rand(batch, heads, length, *shape, dtype=torch.float64, requires_grad=True)
                                for shape in ((c,), (), (), ()))
    return gamma, alpha, eta, theta, torch.rand(batch, length) < 0.25, torch.rand(batch, c - 1) < 0.7


def _assert_same_values_and_gradients(got, want, leaves_):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    upstream = [torch.randn_like(t) for t in want]
    for g, w in zip(torch.autograd.grad(got, leaves_, upstream), torch.autograd.grad(want, leaves_, upstream)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


CALLS = [(0, 12), (0, 10), (3, 12), (2, 3)]  # (first token's place in its grid chunk of 4, tokens)


@pytest.mark.parametrize("offset,length", CALLS)
def test_chunk_update_sums_match_each_chunks_window_weights(offset, length):
    """The carry-free sums of update="chunk", made for a whole call at once, equal what one chunk at a time gives:
    its window weights (`window_weights`, document ids of the chunk and the window carried in) summed over the
    tokens of the chunk's last document, and those tokens' gates; gradients of gamma and the gates included."""
    gamma, alpha, eta, theta, reset, valid = _random_call_terms(offset, length)
    gates = torch.stack([alpha, theta, eta], dim=-1)
    key_coef, gate_sums = scan_chunks.chunk_update_sums(gamma, gates, reset, valid, offset, 4)
    got, want = [], []
    for index, begin, end, first, token_doc, key_doc in _pieces_one_by_one(reset, valid, offset, length, 4):
        in_last = (token_doc == token_doc[:, -1:]).double()[:, None, :, None]
        weights = scan_chunks.window_weights(gamma[:, :, begin:end], key_doc, token_doc)
        got += [key_coef[:, :, index, first: first + 2 + end - begin], gate_sums[:, :, index]]
        want += [(in_last * weights).sum(-2), (in_last * gates[:, :, begin:end]).sum(-2)]
    _assert_same_values_and_gradients(got, want, [gamma, alpha, eta, theta])


@pytest.mark.parametrize("offset,length", CALLS)
def test_token_update_coefficients_match_each_chunks_gate_products(offset, length):
    """The token update's gate algebra, made for a whole call at once on the chunk grid, equals one chunk at a time:
    Cθ and Cα (`gate_products` with the gates zeroed at document starts), the reset weight κ, mix = Cθ·G and
    Cα·η; values and gradients of every gate."""
    gamma, alpha, eta, theta, reset, valid = _random_call_terms(offset, length)
    terms = scan_chunks.token_update_coefficients(gamma, alpha, eta, theta, reset, valid, offset, 4)
    got, want = [], []
    for index, begin, end, first, token_doc, key_doc in _pieces_one_by_one(reset, valid, offset, length, 4):
        rows, keys = slice(first, first + end - begin), slice(first, first + 2 + end - begin)
        mix, momentum_scale, decay_start, reset_weight, decay_in = (t[:, :, index] for t in terms)
        got += [mix[..., rows, keys], momentum_scale[..., rows], decay_start[..., rows], reset_weight[..., rows],
                decay_in[..., rows, rows]]
        keep = 1.0 - reset[:, begin:end].double()[:, None, :]
        c_theta = scan_chunks.gate_products(theta[:, :, begin:end] * keep)
        c_alpha = scan_chunks.gate_products(alpha[:, :, begin:end] * keep)
        weights = scan_chunks.window_weights(gamma[:, :, begin:end], key_doc, token_doc)
        want += [c_theta[..., 1:] @ weights, c_theta[..., 0], c_alpha[..., 0],
                 (c_alpha[..., 1:] * ((1.0 - keep) * alpha[:, :, begin:end])[..., None, :]).sum(-1),
                 c_alpha[..., 1:] * eta[:, :, begin:end][..., None, :]]
    _assert_same_values_and_gradients(got, want, [gamma, alpha, eta, theta])


@pytest.mark.parametrize("update", ["token", "chunk"])
def test_shape_constants_first_made_in_inference_mode_serve_training(update):
    """The scan caches the index and mask tensors of a chunk shape; the first call may run under
    torch.inference_mode (generation), and a later training call saves them for backward, which inference tensors
    do not allow. Same outputs as with a fresh cache."""
    for constants in (scan_chunks._window_lags, scan_chunks._gate_product_masks, scan_chunks._call_indices):
        constants.cache_clear()
    x, params = make_inputs(6, length=9, window=3, ln=True, dtype=torch.float32)
    kw = dict(params=params, chunk_size=4, ns_steps=2, update=update)
    with torch.inference_mode():
        y_inference, _ = memory_scan(**x, **kw)
    y, _ = memory_scan(**x, **kw)
    torch.testing.assert_close(y.detach(), y_inference, rtol=0, atol=0)
    assert all(g is not None for g in grads_of(y, leaves(x, params)))


def test_shape_constants_are_not_cached_while_a_cuda_graph_is_captured(monkeypatch):
    """A tensor made during capture is filled only when the graph replays: caching it would hand garbage to every
    later eager call. (No GPU here: the capture state is what the cache consults, so it is stood in for.)"""
    scan_chunks._window_lags.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    lag, in_span = scan_chunks._window_lags(4, 3, torch.device("cpu"))
    assert scan_chunks._window_lags.cache_info().currsize == 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cached = scan_chunks._window_lags(4, 3, torch.device("cpu"))
    assert scan_chunks._window_lags(4, 3, torch.device("cpu"))[0] is cached[0]
    assert scan_chunks._window_lags.cache_info().currsize == 1
    assert torch.equal(lag, cached[0]) and torch.equal(in_span, cached[1])


@pytest.mark.parametrize("update", ["token", "chunk"])
def test_newton_schulz_learns_whether_the_model_runs_in_half_precision(update, monkeypatch):
    """The scan and its one-token step tell Newton–Schulz whether the model's dtype is bf16/fp16: the GPU fast path's
    default operand precision follows it (kernels.dispatch.ns_precision). The math stays float32."""
    from atlas_train.ops import memory_step, muon_step

    seen, real = [], scan_chunks.newton_schulz

    def recording(s, steps, half_inputs=False):
        seen.append((half_inputs, s.dtype))
        return real(s, steps, half_inputs)

    monkeypatch.setattr(scan_chunks, "newton_schulz", recording)
    monkeypatch.setattr(memory_step, "newton_schulz", recording)
    monkeypatch.setattr(muon_step, "newton_schulz", recording)
    for dtype, half in ((torch.float32, False), (torch.bfloat16, True)):
        x, params = make_inputs(5, length=8, dtype=dtype)
        _, state = memory_scan(**x, params=params, chunk_size=4, ns_steps=2, update=update)
        memory_scan(**{k: t[:, :1] for k, t in x.items()}, params=params, chunk_size=4, ns_steps=2, update=update,
                    state=state)  # one token: memory_step (chunk update: NS only where a chunk closes)
        assert seen and set(seen) == {(half, torch.float32)}, (dtype, seen)
        seen.clear()
