"""dual_memory_scan (docs/math.md §8) against the literal float64 reference and against memory_scan (the
finite-kernel check that pins the dual form), and its document, state and decoding contracts. Every comparison
covers outputs and the gradients of every input on random inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atlas_train.ops import dual_memory_scan, memory_scan
from atlas_train.ops.dual_naive import reference_dual_memory_scan

F64 = torch.float64
INPUTS = ("q", "k", "v", "eta", "gamma")


def make_inputs(seed, *, batch=2, length=9, heads=2, dh=4, hid=6, persistent=3, window=3, ln=True, kernel="exp"):
    """Random float64 leaves: unit q and k, gates in (0, 1), scale around sqrt(dh)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=F64)

    def rand(*shape):
        return 0.05 + 0.9 * torch.rand(*shape, generator=gen, dtype=F64)

    x = {"q": F.normalize(randn(batch, length, heads, dh), dim=-1), "k": F.normalize(randn(batch, length, heads, dh),
                                                                                    dim=-1),
         "v": randn(batch, length, heads, dh), "eta": rand(batch, length, heads),
         "gamma": rand(batch, length, heads, window)}
    params = {"W1": randn(heads, dh, hid, scale=1 / math.sqrt(hid)), "K0": randn(heads, persistent, dh),
              "A0": randn(heads, persistent, hid)}
    if kernel == "exp":
        params["scale"] = 1.0 + rand(heads)
    if ln:
        params.update(ln_weight=1 + randn(heads, dh, scale=0.2), ln_bias=randn(heads, dh, scale=0.2))
    return ({n: t.requires_grad_() for n, t in x.items()}, {n: t.requires_grad_() for n, t in params.items()})


def gradients(y, leaves: dict, seed=7) -> dict:
    """Gradients of a fixed random projection of y with respect to every leaf."""
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    found = torch.autograd.grad((y * upstream).sum(), list(leaves.values()))
    return dict(zip(leaves, found))


def assert_all_close(got: dict, want: dict, rtol=1e-9, atol=1e-11):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def run(x, params, **kw):
    return dual_memory_scan(*(x[n] for n in INPUTS), params, **kw)


def doc_starts(batch, length, *positions):
    """(row, token) document starts."""
    d = torch.zeros(batch, length, dtype=torch.bool)
    for row, token in positions:
        d[row, token] = True
    return d


@pytest.mark.parametrize("loss,window,ln,chunk,docs", [
    ("dot", 1, True, 3, ()),  # deep_transformer: c = 1
    ("dot", 3, False, 3, ((1, 4),)),  # swdt, a document starting mid-chunk in one row
    ("l2", 3, True, 4, ((0, 4), (1, 2), (1, 6))),  # dot (Deep Omega): starts on and off the grid, two in a row
    ("l2", 6, True, 2, ((0, 5),)),  # a window longer than a chunk reaches back two chunks
])
def test_chunk_path_matches_the_reference(loss, window, ln, chunk, docs):
    x, params = make_inputs(0, window=window, ln=ln)
    doc_start = doc_starts(2, 9, *docs) if docs else None
    y, _ = run(x, params, doc_start=doc_start, chunk_size=chunk, loss=loss)
    want = reference_dual_memory_scan(*(x[n] for n in INPUTS), params, doc_start=doc_start, chunk_size=chunk, loss=loss)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    leaves = {**x, **params}
    assert_all_close(gradients(y, leaves), gradients(want, leaves))


def test_gradcheck_of_the_chunk_path():
    """Finite differences of every input through the chunk path's own backward (a document start inside a chunk,
    a window reaching into the previous chunk)."""
    x, params = make_inputs(1, batch=1, length=5, heads=1, dh=2, hid=3, persistent=2, window=2)
    names = list(x) + list(params)
    doc_start = doc_starts(1, 5, (0, 3))

    def fn(*tensors):
        inputs = dict(zip(names, tensors))
        return run({n: inputs[n] for n in INPUTS}, {n: inputs[n] for n in params}, doc_start=doc_start, chunk_size=2,
                   loss="l2")[0]

    assert torch.autograd.gradcheck(fn, [*x.values(), *params.values()], eps=1e-6, atol=1e-6)


def _phi_exact(x: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """φ(x) = (x, √a2·ψ2(x)) with ψ2 the monomials x_i x_j (i ≤ j, off-diagonal ones times √2), for x (..., H, dh)."""
    rows, cols = torch.triu_indices(x.shape[-1], x.shape[-1])
    pairs = x[..., rows] * x[..., cols] * torch.where(rows == cols, 1.0, 2.0).to(x.dtype).sqrt()
    return torch.cat([x, a2.sqrt().view(-1, 1) * pairs], dim=-1)


@pytest.mark.parametrize("loss,window", [("dot", 1), ("l2", 3)])
def test_finite_kernel_equals_memory_scan_with_the_matching_initial_w2(loss, window):
    """κ = x·y + a2 (x·y)² is φ(x)·φ(y) for the exact feature map (a1 = 1), so the dual path must be memory_scan
    with feature_map exact, theta 0, ns_steps 0, alpha 1 and W2 = Σ_p A0_p φ(K0_p)ᵀ: outputs and all gradients."""
    x, params = make_inputs(2, window=window, kernel="poly2")
    a2 = torch.tensor([0.5, 0.8], dtype=F64, requires_grad=True)
    doc_start = doc_starts(2, 9, (1, 5))
    y, _ = run(x, params, doc_start=doc_start, chunk_size=3, loss=loss, kernel="poly2", a2=a2)
    k0 = F.normalize(params["K0"], dim=-1, eps=1e-6)
    w2 = torch.einsum("hpk,phd->hkd", params["A0"], _phi_exact(k0.transpose(0, 1), a2))
    ones = torch.ones_like(x["eta"])
    want, _ = memory_scan(_phi_exact(x["q"], a2), _phi_exact(x["k"], a2), x["v"], ones, x["eta"], ones * 0,
                          x["gamma"], {"W1": params["W1"], "W2": w2, "ln_weight": params["ln_weight"],
                                       "ln_bias": params["ln_bias"]},
                          doc_start=doc_start, chunk_size=3, ns_steps=0, update="token", loss=loss)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    leaves = {**x, **params, "a2": a2}
    assert_all_close(gradients(y, leaves), gradients(want, leaves))


def test_packed_documents_equal_separate_documents():
    """A row packing documents that start on the chunk grid gives each document what a call on it alone gives."""
    x, params = make_inputs(3, batch=1, length=10, window=3)
    bounds = [(0, 4), (4, 8), (8, 10)]
    packed, _ = run(x, params, doc_start=doc_starts(1, 10, (0, 4), (0, 8)), chunk_size=2)
    alone = torch.cat([run({n: t[:, a:b] for n, t in x.items()}, params, chunk_size=2)[0] for a, b in bounds], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-13)
    leaves = {**x, **params}
    assert_all_close(gradients(packed, leaves), gradients(alone, leaves))


def _split(x, params, cuts, **kw):
    """One sequence through consecutive calls split at `cuts`, passing the state: (y, final state)."""
    state, ys = None, []
    length = x["q"].shape[1]
    for a, b in zip([0, *cuts], [*cuts, length]):
        doc_start = kw.get("doc_start")
        y, state = run({n: t[:, a:b] for n, t in x.items()}, params,
                       **{**kw, "doc_start": None if doc_start is None else doc_start[:, a:b]}, state=state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("cuts", [[4], [2, 7], [5], list(range(1, 9))])  # on the grid, off it, token by token
def test_split_calls_with_state_equal_one_call(cuts):
    x, params = make_inputs(4, window=3)
    kw = dict(doc_start=doc_starts(2, 9, (1, 3), (0, 6)), chunk_size=2, loss="l2")
    y, state = run(x, params, **kw)
    y_split, state_split = _split(x, params, cuts, **kw)
    torch.testing.assert_close(y_split, y, rtol=1e-10, atol=1e-12)
    assert set(state) == set(state_split)
    for key in state:
        torch.testing.assert_close(state_split[key], state[key], rtol=1e-10, atol=1e-12)
    leaves = {**x, **params}
    total = y + sum(t.sum() for t in state.values() if t.is_floating_point())
    total_split = y_split + sum(t.sum() for t in state_split.values() if t.is_floating_point())
    assert_all_close(gradients(total_split, leaves), gradients(total, leaves))


@pytest.mark.parametrize("ln", [True, False])
def test_chunk_steps_on_static_buffers_equal_eager(monkeypatch, ln):
    """The chunk terms through cuda_graphs' static buffers (what a GPU replays as graphs; ATLAS_SCAN_CUDA_GRAPHS=static
    runs the same plumbing on CPU) give eager's outputs, state and gradients, over chunks with and without a document
    start and a call split mid-chunk, so stale buffers, a skipped copy or a missed gradient would show."""
    from atlas_train.ops import cuda_graphs

    def split_run(seed):
        x, params = make_inputs(seed, length=11, window=3, ln=ln)
        y, state = _split(x, params, [5], doc_start=doc_starts(2, 11, (1, 3), (0, 8)), chunk_size=2, loss="l2")
        total = y.sum() + sum(t.sum() for t in state.values() if t.is_floating_point())
        return [y, *state.values()], gradients(y + total, {**x, **params})

    eager = [split_run(seed) for seed in (1, 2)]
    cuda_graphs.clear_scan_graphs()
    monkeypatch.setenv("ATLAS_SCAN_CUDA_GRAPHS", "static")
    try:
        static = [split_run(seed) for seed in (1, 2)]
        calls = cuda_graphs._SCAN_CALLS
        assert len(calls) >= 4  # forward and backward, with and without a document start
        assert all(call.calls > 0 for call in calls.values())  # every captured backward was found and replayed
    finally:
        cuda_graphs.clear_scan_graphs()
    for (outs_e, grads_e), (outs_s, grads_s) in zip(eager, static):
        for a, b in zip(outs_s, outs_e):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert_all_close(grads_s, grads_e, rtol=1e-11, atol=1e-12)


def test_compiled_chunk_terms_match_the_reference(monkeypatch):
    """The chunk terms under torch.compile (ATLAS_DUAL_COMPILED_TERMS=1) on static buffers, as a GPU runs them:
    outputs and every gradient equal the float64 reference's, over chunks with and without a document start."""
    from atlas_train.ops import cuda_graphs, dual_chunks

    x, params = make_inputs(3, length=9, window=3)
    doc_start = doc_starts(2, 9, (1, 4))
    want = reference_dual_memory_scan(*(x[n] for n in INPUTS), params, doc_start=doc_start, chunk_size=3, loss="l2")
    cuda_graphs.clear_scan_graphs()
    monkeypatch.setenv("ATLAS_SCAN_CUDA_GRAPHS", "static")
    monkeypatch.setenv("ATLAS_DUAL_COMPILED_TERMS", "1")
    try:
        y, _ = run(x, params, doc_start=doc_start, chunk_size=3, loss="l2")
        assert all(key[1].compiled for key in cuda_graphs._SCAN_CALLS._calls)
        leaves = {**x, **params}
        got = gradients(y, leaves)
    finally:
        cuda_graphs.clear_scan_graphs()
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    assert_all_close(got, gradients(want, leaves))
    assert dual_chunks._compiled_local_step.cache_info().currsize == 1


def test_compiled_terms_setting_is_checked(monkeypatch):
    from atlas_train.ops.dual_chunks import compiled_terms

    monkeypatch.setenv("ATLAS_DUAL_COMPILED_TERMS", "yes")
    with pytest.raises(ValueError, match="ATLAS_DUAL_COMPILED_TERMS='yes'"):
        compiled_terms()
    monkeypatch.delenv("ATLAS_DUAL_COMPILED_TERMS")
    assert not compiled_terms()


def test_recurrent_decoding_equals_the_full_forward():
    """A prompt, then one token per call without autograd (the decode path), as in generation."""
    x, params = make_inputs(5, window=3)
    with torch.no_grad():
        y, _ = run(x, params, chunk_size=4)
        decoded, state = run({n: t[:, :3] for n, t in x.items()}, params, chunk_size=4)
        steps = [decoded]
        for t in range(3, 9):
            y_t, state = run({n: u[:, t:t + 1] for n, u in x.items()}, params, chunk_size=4, state=state)
            steps.append(y_t)
    torch.testing.assert_close(torch.cat(steps, dim=1), y, rtol=1e-10, atol=1e-12)


def test_float32_inputs_keep_their_dtype_and_a_float32_state():
    x, params = make_inputs(6)
    x = {n: t.detach().float() for n, t in x.items()}
    y, state = run(x, {n: t.detach().float() for n, t in params.items()}, chunk_size=4)
    assert y.dtype == torch.float32 and state["coef"].dtype == torch.float32 and state["valid"].dtype == torch.bool


@pytest.mark.parametrize("change,message", [
    (dict(loss="l3"), "loss must be one of"),
    (dict(kernel="rbf"), "kernel must be one of"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(a2=0.5), "kernel 'exp' takes none"),
    (dict(kernel="poly2"), "params\\['scale'\\] is required with kernel 'exp'"),
    (dict(doc_start=torch.zeros(2, 9)), "doc_start must be a bool tensor"),
    (dict(state={"keys": torch.zeros(1)}), "state must be the dict dual_memory_scan returned"),
])
def test_bad_arguments_are_one_line_errors(change, message):
    x, params = make_inputs(7)
    with pytest.raises(ValueError, match=message) as err:
        run(x, params, **change)
    assert "\n" not in str(err.value)


def test_bad_shapes_are_one_line_errors():
    x, params = make_inputs(8)
    with pytest.raises(ValueError, match=r"params\['A0'\] has shape \(2, 3, 5\), expected \(2, 3, 6\)"):
        run(x, {**params, "A0": params["A0"][..., :5]})
    with pytest.raises(ValueError, match="gamma has shape"):
        run({**x, "gamma": x["gamma"][:, :4]}, params)
    _, state = run(x, params)
    with pytest.raises(ValueError, match=r"state\['window_v'\] has shape"):
        run({**x, "gamma": x["gamma"][..., :2]}, params, state=state)


def test_autocast_leaves_the_scan_in_float32():
    """Under a caller's bf16 autocast the scan still computes in float32: same y and gradients as without it."""
    x, params = make_inputs(9)
    x = {n: t.detach().float().requires_grad_() for n, t in x.items()}
    params = {n: t.detach().float().requires_grad_() for n, t in params.items()}
    y, _ = run(x, params, chunk_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto, _ = run(x, params, chunk_size=4)
    assert y_auto.dtype == torch.float32
    torch.testing.assert_close(y_auto, y, rtol=0, atol=0)
    leaves = {**x, **params}
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    want = torch.autograd.grad((y * upstream).sum(), list(leaves.values()))
    got = torch.autograd.grad((y_auto * upstream).sum(), list(leaves.values()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_bf16_inputs_ask_for_the_fast_pass_with_float32_points(monkeypatch):
    """The fast path is chosen for the points the passes get: in float32 (the compute dtype) and laid out (B, H, T, dh),
    with the bf16 model flagged. Asked with the raw bf16 queries, the Triton kernel refuses them and every bf16 run
    takes the PyTorch pass."""
    from atlas_train.ops import dual_attention

    asked = []
    real = dual_attention.implementation

    def spy(x, width, kind, half_inputs):
        asked.append((x.dtype, tuple(x.shape), half_inputs))
        return real(x, width, kind, half_inputs)

    monkeypatch.setattr(dual_attention, "implementation", spy)
    x, params = make_inputs(10)
    run({n: t.detach().bfloat16() for n, t in x.items()}, {n: t.detach().float() for n, t in params.items()},
        chunk_size=4)
    assert asked == [(torch.float32, (2, 2, 9, 4), True)]
