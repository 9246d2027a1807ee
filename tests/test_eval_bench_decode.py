"""The decode benchmark's batch-32 cache is the batch-1 state repeated: check that decoding from it gives, on every
row, what decoding from the batch-1 cache gives (so the benchmark times a real state of the right shape)."""

import importlib.util

import pytest
import torch
from eval_helpers import REPO

spec = importlib.util.spec_from_file_location("bench_decode", REPO / "benchmarks" / "bench_decode.py")
bench_decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_decode)


@pytest.mark.parametrize("mixer", ["atlas", "transformer", "atlas_mag"])
def test_repeated_cache_decodes_like_the_single_row(mixer):
    from atlas_train.model import build_model
    from atlas_train.model.config import ModelConfig

    cfg = ModelConfig(
        mixer=mixer,
        vocab_size=40,
        d_model=16,
        n_layers=2,
        n_heads=2,
        mlp_hidden=32,
        chunk_size=4,
        memory_expansion=2,
        gate_rank=4,
        swa_window=8,
        window=3 if mixer != "transformer" else None,
    )
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    dims = bench_decode.batch_dims(model, 40, 4, "cpu")
    cache = bench_decode.prefill(model, None, 11, 40, segment=4, device="cpu")
    assert all((dims[key] is None) == (t.dim() == 0) for key, t in cache.items())  # only counters are shared
    token = torch.tensor([[7]])
    with torch.no_grad():
        single = model(token, cache=cache, use_cache=True).logits
        repeated = bench_decode.repeat_cache(cache, dims, 3)
        batched = model(token.expand(3, 1), cache=repeated, use_cache=True).logits
    assert torch.allclose(batched, single.expand(3, -1, -1), atol=1e-12)
    assert bench_decode.cache_bytes(repeated) > bench_decode.cache_bytes(cache)
