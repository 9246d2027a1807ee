"""memory_step (the T = 1 decode path of memory_scan) against one full memory_scan call, in float64.

A sequence run token by token through memory_step, threaded through the state, must give the full call's outputs
and final state: document starts at and between chunk boundaries (and at the first stepped token), several grid
chunks, windows wider and narrower than a chunk, both updates, both losses, gated memory, with and without LN."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_memory_scan import make_inputs

from atlas_train.ops import memory_scan
from atlas_train.ops.memory_step import memory_step

scan_module = importlib.import_module("atlas_train.ops.memory_scan")  # the package re-exports the function's name

LENGTH, CHUNK, PREFIX = 13, 4, 2  # three grid boundaries inside the stepped part; stepping starts mid-chunk

# (update, ns_steps, loss, gated, ln, dim > dv, window c)
CASES = [
    ("token", 2, "l2", False, True, False, 3),
    ("token", 1, "dot", True, True, True, 6),  # c > chunk
    ("token", 0, "l2", True, False, True, 1),  # c = 1, no LN
    ("token", 5, "l2", False, False, False, 4),  # c = chunk
    ("chunk", 2, "l2", False, True, False, 3),
    ("chunk", 1, "dot", True, True, True, 6),
    ("chunk", 0, "l2", True, False, True, 1),
    ("chunk", 5, "dot", False, False, False, 4),
]


def doc_layout(batch: int) -> torch.Tensor:
    """Starts at the first stepped token (row 0), at a grid boundary, mid-chunk, and two tokens apart."""
    doc = torch.zeros(batch, LENGTH, dtype=torch.bool)
    doc[0, [PREFIX, 8, 11]] = True
    doc[1, [5, 7]] = True
    return doc


def step_through(x, params, doc, kw, step):
    """Prefix by one memory_scan call, then every further token by `step`; returns (y, final state)."""
    ys, state = [], None
    y, state = memory_scan(**{k: t[:, :PREFIX] for k, t in x.items()}, params=params, doc_start=doc[:, :PREFIX], **kw)
    ys.append(y)
    for t in range(PREFIX, LENGTH):
        y, state = step(**{k: v[:, t:t + 1] for k, v in x.items()}, params=params, doc_start=doc[:, t:t + 1],
                        state=state, **kw)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("update,ns,loss,gated,ln,wide,window", CASES)
def test_steps_equal_one_call(update, ns, loss, gated, ln, wide, window):
    x, params = make_inputs(sum(map(ord, f"{update}{ns}{loss}{gated}{ln}{wide}{window}")), length=LENGTH,
                            dim=6 if wide else 4, window=window, gated=gated, ln=ln)
    x = {k: t.detach() for k, t in x.items()}
    params = {k: t.detach() for k, t in params.items()}
    kw = dict(chunk_size=CHUNK, ns_steps=ns, update=update, loss=loss)
    doc = doc_layout(2)
    y_full, state_full = memory_scan(**x, params=params, doc_start=doc, **kw)
    y_steps, state_steps = step_through(x, params, doc, kw, memory_step)
    torch.testing.assert_close(y_steps, y_full, rtol=1e-10, atol=1e-12)
    assert state_steps.keys() == state_full.keys()
    for key, want in state_full.items():
        got = state_steps[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"state {key}: {m}")


def test_memory_scan_dispatches_single_tokens_without_grad(monkeypatch):
    """T = 1 with a state and nothing to differentiate goes to memory_step; with gradients it stays on the scan."""
    calls = []

    def counting_step(*args, **kwargs):
        calls.append(1)
        return memory_step(*args, **kwargs)

    monkeypatch.setattr(scan_module, "memory_step", counting_step)
    x, params = make_inputs(1, length=LENGTH, window=3, ln=True)
    kw = dict(chunk_size=CHUNK, ns_steps=1)
    doc = doc_layout(2)
    with torch.no_grad():
        y_full, _ = memory_scan(**x, params=params, doc_start=doc, **kw)
        y_steps, _ = step_through(x, params, doc, kw, memory_scan)
    assert len(calls) == LENGTH - PREFIX
    torch.testing.assert_close(y_steps, y_full, rtol=1e-10, atol=1e-12)
    step_through(x, params, doc, kw, memory_scan)  # inputs require grad: the scan path
    assert len(calls) == LENGTH - PREFIX


def test_float32_state_from_bfloat16_inputs_and_clear_state_errors():
    x, params = make_inputs(2, length=LENGTH, window=3, gated=True, ln=True)
    x16 = {k: t.detach().to(torch.bfloat16) for k, t in x.items()}
    p32 = {k: t.detach().float() for k, t in params.items()}
    kw = dict(chunk_size=CHUNK, ns_steps=2, update="token", loss="l2")
    doc = doc_layout(2)
    y, state = step_through(x16, p32, doc, kw, memory_step)
    assert y.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    one = {k: t[:, :1] for k, t in x16.items()}
    with pytest.raises(ValueError, match="state keys"):
        memory_step(**one, params=p32, doc_start=None, state={**state, "count": state["pos"]}, **kw)
    with pytest.raises(ValueError, match="state window has shape"):
        memory_step(**{**one, "gamma": one["gamma"][..., :2]}, params=p32, doc_start=None, state=state, **kw)


@pytest.mark.parametrize("kw", [dict(mixer="atlas"), dict(mixer="atlas", update="chunk"), dict(mixer="atlas_pp"),
                                dict(mixer="dla"), dict(mixer="atlas_mag", omega_gates="token")])
def test_model_decode_steps_equal_the_full_forward(kw):
    """The whole model decoding without gradients (memory_step in every layer) gives the full forward's logits,
    with a document starting while decoding."""
    from atlas_train.model import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, d_model=16, n_heads=2, n_layers=2, mlp_hidden=24, chunk_size=CHUNK,
                      memory_expansion=2, swa_window=5, **({"window": 3} if kw["mixer"] != "dla" else {}), **kw)
    model = build_model(cfg).double().eval()
    ids = torch.randint(0, 37, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    doc = doc_layout(2)
    with torch.no_grad():
        full = model(ids, doc_start=doc).logits
        out = model(ids[:, :PREFIX], doc_start=doc[:, :PREFIX], use_cache=True)
        steps = [out.logits]
        for t in range(PREFIX, LENGTH):
            out = model(ids[:, t:t + 1], doc_start=doc[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-11)
