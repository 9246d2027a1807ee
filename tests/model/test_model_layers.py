"""Model building blocks against slow, obviously-right references (float64, tiny shapes): feature maps, gates,
the document-aware conv, attention (full / sliding window / documents / cache), and the model config."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atlas_train.config import ConfigError, load_config
from atlas_train.model import build_model
from atlas_train.model.attention import Attention
from atlas_train.model.config import ModelConfig
from atlas_train.model.conv import CausalDepthwiseConv
from atlas_train.model.feature_maps import FeatureMap
from atlas_train.model.gates import MemoryGates
from atlas_train.model.rope import RotaryTable, apply_rope, rope_cos_sin
from repo_paths import CONFIGS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _perturb_coefficients(fmap: FeatureMap) -> None:
    with torch.no_grad():
        fmap.coef_raw.add_(torch.randn_like(fmap.coef_raw))


# ---------------------------------------------------------------- feature maps

def test_exact_feature_map_is_truncated_exp_kernel():
    fmap = FeatureMap("exact", n_heads=2, head_dim=5).double()
    _perturb_coefficients(fmap)
    q, k = torch.randn(2, 3, 2, 5, dtype=torch.float64), torch.randn(2, 3, 2, 5, dtype=torch.float64)
    a1, a2 = fmap.coefficients()
    dot = (q * k).sum(-1)
    assert fmap(q).shape[-1] == fmap.out_dim == 5 + 15
    torch.testing.assert_close((fmap(q) * fmap(k)).sum(-1), a1 * dot + a2 * dot**2)


def test_coefficients_start_at_taylor_values():
    fmap = FeatureMap("elementwise", n_heads=1, head_dim=4, degree=3)
    torch.testing.assert_close(fmap.coefficients(), torch.tensor([1.0, 0.5, 1 / 6]))


def test_elementwise_feature_map_blocks():
    fmap = FeatureMap("elementwise", n_heads=2, head_dim=4, degree=3).double()
    _perturb_coefficients(fmap)
    x = torch.randn(1, 2, 2, 4, dtype=torch.float64)
    a = fmap.coefficients()
    expected = torch.cat([a[0].sqrt() * x, a[1].sqrt() * x**2, a[2].sqrt() * x**3], dim=-1)
    torch.testing.assert_close(fmap(x), expected)


def test_sketch_feature_map_approximates_polynomial_kernel():
    """With many sketch rows, ψ2(q)·ψ2(k) concentrates on (q·k)²: the Gaussian sketch is unbiased."""
    fmap = FeatureMap("sketch", n_heads=1, head_dim=4, sketch_dim=20000).double()
    q = F.normalize(torch.randn(1, 1, 1, 4, dtype=torch.float64), dim=-1)
    k = F.normalize(q + 0.3 * torch.randn(1, 1, 1, 4, dtype=torch.float64), dim=-1)
    zq, zk = fmap(q), fmap(k)
    a1, a2 = fmap.coefficients()
    dot = (q * k).sum(-1)
    assert zq.shape[-1] == 4 + 20000
    torch.testing.assert_close(zq[..., :4], a1.sqrt() * q)  # the memory's residual reads the first dh features
    torch.testing.assert_close((zq * zk).sum(-1), a1 * dot + a2 * dot**2, atol=0.05, rtol=0)


def test_identity_feature_map_is_identity():
    x = torch.randn(1, 2, 2, 4)
    fmap = FeatureMap("identity", n_heads=2, head_dim=4)
    assert fmap(x) is x and fmap.out_dim == 4 and not list(fmap.parameters())


# ---------------------------------------------------------------- gates

def _gate_cfg(**kw):
    base = dict(d_model=16, n_heads=2, window=3, gate_rank=4, use_momentum=True)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("mode", ["slot", "token", "none"])
def test_gates_land_at_init_values(mode):
    cfg = _gate_cfg(omega_gates=mode, alpha_init=0.999, theta_init=0.9, eta_init=0.02, eta_max=0.5, gamma_init=0.3)
    gates = MemoryGates(cfg).double()
    alpha, eta, theta, gamma, _ = gates(torch.zeros(2, 5, 16, dtype=torch.float64))
    assert alpha.shape == eta.shape == theta.shape == (2, 5, 2) and gamma.shape == (2, 5, 2, 3)
    torch.testing.assert_close(alpha, torch.full_like(alpha, 0.999))
    torch.testing.assert_close(theta, torch.full_like(theta, 0.9))
    torch.testing.assert_close(eta, torch.full_like(eta, 0.02))
    readable = torch.arange(5)[:, None] >= torch.arange(3)[None, :]  # slot j of token t exists when t - j >= 0
    expected = torch.full_like(gamma[0, :, 0][readable], 1.0 if mode == "none" else 0.3)
    torch.testing.assert_close(gamma.permute(0, 2, 1, 3)[:, :, readable], expected.expand(2, 2, -1))


def test_momentum_off_pins_theta_to_zero():
    gates = MemoryGates(_gate_cfg(use_momentum=False))
    _, _, theta, _, _ = gates(torch.randn(1, 4, 16))
    assert gates.theta is None and torch.equal(theta, torch.zeros(1, 4, 2))


def test_token_gamma_slots_read_earlier_tokens_across_segments():
    gates = MemoryGates(_gate_cfg(omega_gates="token")).double()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    _, _, _, gamma, _ = gates(x)
    per_token = gates.gamma(x)  # (B, T, H)
    for t in range(7):
        for j in range(min(3, t + 1)):
            torch.testing.assert_close(gamma[0, t, :, j], per_token[0, t - j])
    _, _, _, first, tail = gates(x[:, :4])
    _, _, _, second, _ = gates(x[:, 4:], tail)
    torch.testing.assert_close(torch.cat((first, second), 1)[:, 2:], gamma[:, 2:])


# ---------------------------------------------------------------- conv

def _conv_reference(conv, x, doc_start):
    """Each document on its own, zero-padded on the left: y[t] = Σ_i w[:, i] x[t-K+1+i] within the document."""
    B, T, C = x.shape
    K = conv.kernel_size
    y = torch.zeros_like(x)
    for b in range(B):
        starts = [t for t in range(T) if t == 0 or doc_start[b, t]] + [T]
        for s, e in zip(starts[:-1], starts[1:]):
            doc = torch.cat((x.new_zeros(K - 1, C), x[b, s:e]))
            for t in range(e - s):
                y[b, s + t] = (doc[t : t + K] * conv.weight.T).sum(0)
    return y


def test_conv_never_reads_across_doc_starts():
    conv = CausalDepthwiseConv(3, 4).double()
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    doc_start = torch.zeros(2, 9, dtype=torch.bool)
    doc_start[0, 4] = doc_start[1, 1] = doc_start[1, 2] = doc_start[1, 7] = True
    y, _ = conv(x, doc_start)
    torch.testing.assert_close(y, _conv_reference(conv, x, doc_start))
    (grad,) = torch.autograd.grad(y[0, 4:].sum(), x)  # the second document's outputs ...
    assert grad[0, :4].abs().sum() == 0 and grad[0, 4:].abs().sum() > 0  # ... never see the first document


def test_conv_cache_splits_anywhere():
    conv = CausalDepthwiseConv(3, 4).double()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    doc_start = torch.zeros(2, 9, dtype=torch.bool)
    doc_start[0, 3] = doc_start[1, 6] = True
    full, _ = conv(x, doc_start)
    for split in (1, 3, 4, 7):
        a, cache = conv(x[:, :split], doc_start[:, :split])
        b, _ = conv(x[:, split:], doc_start[:, split:], cache)
        torch.testing.assert_close(torch.cat((a, b), 1), full)


# ---------------------------------------------------------------- attention

def _attn_cfg():
    return ModelConfig(mixer="transformer", d_model=16, n_heads=2, rope_theta=100.0)


def _attention_reference(attn, x, doc_start, window):
    """softmax(q kᵀ/√dh + mask) v with an explicit band (and document) mask, no SDPA."""
    B, T, _ = x.shape
    pos = torch.arange(T)
    def split(t):
        return t.view(B, T, attn.n_heads, attn.head_dim)
    cos, sin = rope_cos_sin(pos, attn.head_dim // 2, attn.rope_theta, x.dtype)
    q = apply_rope(split(attn.q_proj(x)), cos, sin).transpose(1, 2)
    k = apply_rope(split(attn.k_proj(x)), cos, sin).transpose(1, 2)
    v = split(attn.v_proj(x)).transpose(1, 2)
    lag = pos[:, None] - pos[None, :]
    band = (lag >= 0) & (lag < (window or T + 1))
    doc = doc_start.long().cumsum(1)
    mask = band[None] & (doc[:, :, None] == doc[:, None, :])
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("window", [None, 1, 3, 20])
@pytest.mark.parametrize("with_docs", [False, True])
def test_attention_matches_band_mask_reference(window, with_docs):
    attn = Attention(_attn_cfg(), window=window).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    doc_start = torch.zeros(2, 10, dtype=torch.bool)
    doc_start[:, 0] = True
    if with_docs:
        doc_start[0, 4] = doc_start[1, 7] = True
    y, _ = attn(x, doc_start if with_docs else None)
    torch.testing.assert_close(y, _attention_reference(attn, x, doc_start, window))


@pytest.mark.parametrize("window", [None, 3])
def test_attention_cache_splits_anywhere(window):
    attn = Attention(_attn_cfg(), window=window).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    doc_start = torch.zeros(2, 10, dtype=torch.bool)
    doc_start[0, 4] = doc_start[1, 8] = True
    full, _ = attn(x, doc_start)
    for split in (1, 5, 9):
        a, cache = attn(x[:, :split], doc_start[:, :split], return_cache=True)
        assert cache["k"].shape[2] == (split if window is None else min(split, window - 1))
        steps = [a]
        for t in range(split, 10):  # then one token at a time, like decoding
            y, cache = attn(x[:, t : t + 1], doc_start[:, t : t + 1], cache, return_cache=True)
            steps.append(y)
        assert int(cache["pos"]) == 10
        torch.testing.assert_close(torch.cat(steps, 1), full)


def _decode(attn, x, doc_start, prompt):
    """Outputs of a prompt pass then one-token steps, and the data pointer of the key cache after each step."""
    y, cache = attn(x[:, :prompt], doc_start[:, :prompt], return_cache=True)
    steps, pointers = [y], []
    for t in range(prompt, x.shape[1]):
        y, cache = attn(x[:, t : t + 1], doc_start[:, t : t + 1], cache, return_cache=True)
        steps.append(y)
        pointers.append(cache["k"].data_ptr())
    return torch.cat(steps, 1), pointers


@pytest.mark.parametrize("window", [None, 1, 3])
def test_attention_decode_fills_its_cache_in_place(window):
    """Without autograd a decode step writes its key/value into spare room of the cache's buffer (the buffer
    doubles when full) instead of copying the whole cache, and gives exactly what the autograd path (a cat)
    gives."""
    attn = Attention(_attn_cfg(), window=window).double()
    x = torch.randn(2, 44, 16, dtype=torch.float64)
    doc_start = torch.zeros(2, 44, dtype=torch.bool)
    doc_start[0, 20] = doc_start[1, 30] = True
    catted, _ = _decode(attn, x, doc_start, 4)
    with torch.no_grad():
        in_place, pointers = _decode(attn, x, doc_start, 4)
    torch.testing.assert_close(in_place, catted, rtol=0, atol=0)
    torch.testing.assert_close(catted, _attention_reference(attn, x, doc_start, window))
    if window is None:  # 40 steps in 3 buffers of 10, 22 and 46 keys (a cat moves the cache at every step)
        assert sum(a != b for a, b in zip(pointers, pointers[1:])) == 2


def test_attention_cache_used_twice_stays_valid():
    """Two continuations of one decode cache (the second finds the first's key written after it) both decode
    right, and so do their own next steps."""
    attn = Attention(_attn_cfg()).double()
    a = torch.randn(1, 8, 16, dtype=torch.float64)
    b = torch.cat((a[:, :6], torch.randn(1, 2, 16, dtype=torch.float64)), 1)
    with torch.no_grad():
        want_a, _ = attn(a)
        want_b, _ = attn(b)
        _, cache = attn(a[:, :5], return_cache=True)
        _, cache = attn(a[:, 5:6], cache=cache, return_cache=True)
        ya, cache_a = attn(a[:, 6:7], cache=cache, return_cache=True)
        yb, cache_b = attn(b[:, 6:7], cache=cache, return_cache=True)
        ya2, _ = attn(a[:, 7:8], cache=cache_a, return_cache=True)
        yb2, _ = attn(b[:, 7:8], cache=cache_b, return_cache=True)
    torch.testing.assert_close(torch.cat((ya, ya2), 1), want_a[:, 6:])
    torch.testing.assert_close(torch.cat((yb, yb2), 1), want_b[:, 6:])


# ---------------------------------------------------------------- config

def test_model_configs_load_and_build_sizes():
    for name in ("demo", "170m", "340m", "760m", "1_3b"):
        cfg = load_config([CONFIGS / "model" / f"{name}.yaml"]).model
        assert cfg.mixer == "atlas" and cfg.resolved().window == 64
    sizes = {n: load_config([CONFIGS / "model" / f"{n}.yaml"]).model for n in ("170m", "340m", "760m", "1_3b")}
    assert [(c.n_layers, c.d_model, c.n_heads) for c in sizes.values()] == [
        (12, 768, 16), (24, 1024, 16), (24, 1536, 16), (18, 2048, 8)]
    assert all(c.vocab_size == 32000 and c.max_seq_len == 4096 for c in sizes.values())


@pytest.mark.parametrize("override, message", [
    ("model.omega_gates=some", r"model\.omega_gates: 'some' is not one of"),
    ("model.feature_map=rbf", r"model\.feature_map: 'rbf' is not one of"),
    ("model.eta_init=2.0", r"eta_init must be in"),
    ("model.alpha_init=1.0", r"alpha_init must be in"),
    ("model.swa_window=0", r"swa_window must be positive"),
    ("model.gate_rank=0", r"gate_rank must be positive"),
    ("model.windw=3", r"model\.windw: unknown key"),
])
def test_config_rejects_bad_model_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([CONFIGS / "model" / "demo.yaml"], [override])


def test_rotary_table_holds_exact_angles_in_every_dtype_the_model_takes():
    """The table training reads holds the on-the-fly values of positions 0..length-1, bit for bit: in float32 as
    built and after a cast to bf16 (computed again, not rounded), in float64 after `.double()`; lengths beyond it and
    inputs of another dtype get nothing from it."""
    table = RotaryTable(12, 4, 100.0)
    for cast, dtype in ((lambda m: m, torch.float32), (nn.Module.bfloat16, torch.float32),
                        (nn.Module.double, torch.float64), (nn.Module.float, torch.float32)):
        cast(table)
        assert table.cos.dtype == dtype
        want = rope_cos_sin(torch.arange(12), 4, 100.0, dtype)
        got = table.lookup(12, torch.bfloat16 if dtype == torch.float32 else torch.float64)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert table.lookup(13, torch.float32) is None and table.lookup(12, torch.float64) is None
    assert table.state_dict() == {}  # not saved: checkpoints and exports are unchanged


def test_attention_layers_of_a_model_share_one_rotary_table():
    """One table per model, not per layer, and it still moves and casts with the model."""
    model = build_model(ModelConfig(mixer="transformer", vocab_size=32, d_model=16, n_layers=3, n_heads=2,
                                    max_seq_len=64))
    tables = {id(m.rope) for m in model.modules() if isinstance(m, Attention)}
    assert len(tables) == 1 and sum(isinstance(m, RotaryTable) for m in model.modules()) == 1
    model.double()
    assert all(m.rope.cos.dtype == torch.float64 for m in model.modules() if isinstance(m, Attention))
