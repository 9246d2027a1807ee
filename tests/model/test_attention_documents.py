"""Document-masked and windowed attention through FlexAttention (atlas_train/model/document_mask.py), checked against
the dense masks of SDPA's path.

Torch's CPU FlexAttention runs forward only, so here: the BlockMask tile for tile against `create_block_mask` of
the dense mask, the mask rule against the dense mask, and the forward of the module's flex path (the compiled CPU
kernel, which skips the rule on full tiles, so a wrong tile shows) against its SDPA path, alone, in a model and in a
compiled block. Gradients, bf16 at production shapes, and compiled blocks with recompute under autograd are checked
on a GPU by benchmarks/bench_attention.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from atlas_train.model import ModelConfig, build_model, document_mask
from atlas_train.model import attention as attention_module
from atlas_train.model.attention import Attention
from atlas_train.model.block import Block
from atlas_train.model.document_mask import BLOCK, block_mask_for, build_block_mask

CPU = torch.device("cpu")


def _layouts(length: int, seed: int = 0) -> torch.Tensor:
    """(3, length) doc_start: one document; documents starting on tile edges and a one-token document; random
    short and long documents."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.zeros(3, length, dtype=torch.bool)
    starts[:, 0] = True
    for t in (5, 6, BLOCK, 2 * BLOCK, 2 * BLOCK + 1):
        if t < length:
            starts[1, t] = True
    starts[2] |= torch.rand(length, generator=gen) < 0.02
    return starts


def _dense_mask(doc_start, length, window):
    """(B, T, T) bool: key not in the future, within the window, in the same document."""
    pos = torch.arange(length)
    lag = pos[:, None] - pos[None, :]
    band = (lag >= 0) & (lag < (window or length + 1))
    if doc_start is None:
        return band[None]
    doc = doc_start.long().cumsum(1)
    return band[None] & (doc[:, :, None] == doc[:, None, :])


@pytest.mark.parametrize("length", [100, 256, 300, 512])
@pytest.mark.parametrize("window", [None, 1, 100, 128, 129, 300])
@pytest.mark.parametrize("docs", [False, True])
def test_block_mask_is_create_block_mask_of_the_dense_mask(length, window, docs):
    """Every tile (none, partial, full) and its transpose for backward, as create_block_mask finds them by
    evaluating the dense mask at every pair."""
    doc_start = _layouts(length) if docs else None
    dense = _dense_mask(doc_start, length, window)
    want = create_block_mask(lambda b, h, q, k: dense[b, q, k], dense.shape[0] if docs else None, None, length,
                             length, device=CPU)
    got = build_block_mask(doc_start, length, window, CPU)
    assert got.seq_lengths == (length, length) and got.BLOCK_SIZE == (BLOCK, BLOCK)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("window", [None, 1, 7, 100])
@pytest.mark.parametrize("docs", [False, True])
def test_mask_rule_is_the_dense_mask(window, docs):
    length = 300
    doc_start = _layouts(length) if docs else None
    block_mask = build_block_mask(doc_start, length, window, CPU)
    got = create_mask(block_mask.mask_mod, 3 if docs else 1, 1, length, length, device=CPU)[:, 0]
    assert torch.equal(got, _dense_mask(doc_start, length, window))


@pytest.mark.parametrize("window", [None, 100])
def test_eager_flex_float64_equals_sdpa_with_the_dense_mask(window):
    length = 300
    doc_start = _layouts(length)
    q, k, v = (torch.randn(3, 2, length, 8, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        got = flex_attention(q, k, v, block_mask=build_block_mask(doc_start, length, window, CPU))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_mask(doc_start, length, window)[:, None])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """Send the module's no-cache masked calls on CPU to FlexAttention and count them (forward only on CPU)."""
    calls = []
    flex_attend = document_mask.flex_attend

    def counted(*args, **kwargs):
        calls.append(1)
        return flex_attend(*args, **kwargs)

    monkeypatch.setattr(attention_module, "flex_attend", counted)
    monkeypatch.setattr(attention_module, "FLEX_DEVICE_TYPES", ("cpu",))
    return calls


@pytest.mark.parametrize("window,docs,length", [(None, True, 384), (100, True, 300), (100, False, 384)])
def test_attention_flex_path_matches_sdpa_path(flex_on_cpu, window, docs, length):
    attn = Attention(ModelConfig(mixer="transformer", d_model=32, n_heads=2), window=window)
    x = torch.randn(3, length, 32)
    doc_start = _layouts(length, seed=1) if docs else None
    with torch.no_grad():
        got, _ = attn(x, doc_start)
    assert len(flex_on_cpu) == 1
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(attention_module, "FLEX_DEVICE_TYPES", ())
        want, _ = attn.double()(x.double(), doc_start)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_attention_document_start_at_token_zero_only_is_causal(flex_on_cpu):
    """doc_start that marks token 0 only takes the flex path on GPUs and gives plain causal attention."""
    attn = Attention(ModelConfig(mixer="transformer", d_model=32, n_heads=2))
    x = torch.randn(3, 384, 32)
    doc_start = torch.zeros(3, 384, dtype=torch.bool)
    doc_start[:, 0] = True
    with torch.no_grad():
        got, _ = attn(x, doc_start)
        assert len(flex_on_cpu) == 1
        want, _ = attn(x, None)
    assert len(flex_on_cpu) == 1  # no documents, no window: SDPA's causal path
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixer", ["transformer", "atlas_mag", "atlas_mal"])
def test_model_builds_one_block_mask_per_forward(flex_on_cpu, mixer, monkeypatch):
    """All layers of a forward share the BlockMask made for its doc_start; the output is the SDPA path's."""
    builds = []
    build = document_mask.build_block_mask
    monkeypatch.setattr(document_mask, "build_block_mask", lambda *a: builds.append(a) or build(*a))
    cfg = ModelConfig(mixer=mixer, vocab_size=64, d_model=32, n_layers=2, n_heads=2, swa_window=100,
                      chunk_size=32, max_seq_len=256)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 64, (3, 256))
    doc_start = _layouts(256, seed=2)
    with torch.no_grad():
        got = model(ids, doc_start).logits
        assert len(builds) == 1 and len(flex_on_cpu) == 2
        model(ids, doc_start.clone())
        assert len(builds) == 2  # a new batch, a new mask
        monkeypatch.setattr(attention_module, "FLEX_DEVICE_TYPES", ())
        want = model.double()(ids, doc_start).logits
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_block_mask_for_reuses_only_the_same_unchanged_tensor():
    doc_start = _layouts(300)
    first = block_mask_for(doc_start, 300, None, CPU)
    assert block_mask_for(doc_start, 300, None, CPU) is first
    assert block_mask_for(doc_start.clone(), 300, None, CPU) is not first
    again = block_mask_for(doc_start, 300, None, CPU)
    assert block_mask_for(doc_start, 300, 100, CPU) is not again
    again = block_mask_for(doc_start, 300, None, CPU)
    doc_start[0, 50] = True  # rewritten in place: the mask must follow
    changed = block_mask_for(doc_start, 300, None, CPU)
    assert changed is not again
    assert torch.equal(changed.to_dense(), build_block_mask(doc_start, 300, None, CPU).to_dense())
    window_only = block_mask_for(None, 300, 100, CPU)
    assert block_mask_for(None, 300, 100, CPU) is window_only


def test_compiled_bf16_block_takes_flex_in_one_graph(flex_on_cpu):
    """A transformer block compiled whole (fullgraph: the BlockMask is built inside the graph, no break) in bf16,
    as DeepSpeed casts it, gives the eager SDPA path's output."""
    cfg = ModelConfig(mixer="transformer", vocab_size=64, d_model=64, n_layers=2, n_heads=4).resolved()
    block = Block(cfg).bfloat16()
    x = torch.randn(3, 384, 64).bfloat16()
    doc_start = _layouts(384, seed=3)
    torch._dynamo.reset()
    with torch.no_grad():
        got, _ = torch.compile(block, fullgraph=True)(x, doc_start)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(attention_module, "FLEX_DEVICE_TYPES", ())
            want, _ = block.double()(x.double(), doc_start)
    assert got.dtype == torch.bfloat16 and len(flex_on_cpu) == 1
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
