"""The decode benchmark times real decode steps from caches of the right structure: the batch-32 cache repeated from
a batch-1 prefill decodes like the single row, the synthetic cache of a context T has exactly the entries, shapes and
dtypes of a real prefill of T tokens, and the static (CUDA-graph-ready) decode step equals plain decoding."""

import json

import pytest
import torch

from atlas_train.eval.static_decode import GrowingCacheError, StaticDecodeStep
from atlas_train.model import build_model
from atlas_train.model.config import ModelConfig
from benchmark_scripts import load_benchmark

bench_decode = load_benchmark("bench_decode")

TINY = dict(vocab_size=40, d_model=16, n_layers=2, n_heads=2, mlp_hidden=32, chunk_size=4, memory_expansion=2,
            gate_rank=4, swa_window=8)


def tiny_model(mixer, **kw):
    cfg = ModelConfig(mixer=mixer, **TINY, window=3 if mixer != "transformer" else None, **kw)
    torch.manual_seed(0)
    return build_model(cfg).double().eval()


@pytest.mark.parametrize("mixer", ["atlas", "transformer", "atlas_mag"])
def test_repeated_cache_decodes_like_the_single_row(mixer):
    model = tiny_model(mixer)
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


@pytest.mark.parametrize("mixer,kw,context", [("atlas", {}, 11), ("atlas", dict(update="chunk"), 10),
                                               ("transformer", {}, 11), ("atlas_mag", {}, 13), ("atlas_mal", {}, 5)])
def test_synthetic_cache_has_the_structure_of_a_real_prefill(mixer, kw, context):
    model = tiny_model(mixer, **kw)
    real = bench_decode.prefill(model, None, context, 40, segment=4, device="cpu")
    fake = bench_decode.synthetic_cache(model, 3, context, "cpu")
    assert fake.keys() == real.keys()
    for key, want in real.items():
        got = fake[key]
        assert got.dtype == want.dtype, key
        assert got.shape == (want.shape if want.dim() == 0 else (3, *want.shape[1:])), key
        if not got.is_floating_point():  # positions, document ids, window validity, open-chunk count
            assert torch.equal(got, want.expand_as(got)), key
    with torch.no_grad():
        out = model(torch.tensor([[5], [6], [7]]), cache=fake, use_cache=True)
    assert torch.isfinite(out.logits).all()


def test_static_decode_step_equals_plain_decoding():
    model = tiny_model("atlas")
    cache = bench_decode.prefill(model, None, 6, 40, segment=4, device="cpu")
    given = {key: t.clone() for key, t in cache.items()}
    static = StaticDecodeStep(model, cache)
    token, original = torch.tensor([3]), cache
    with torch.no_grad():
        for _ in range(5):  # crosses the chunk boundary at 8
            want = model(token[:, None], cache=cache, use_cache=True)
            got = static.step(token)
            torch.testing.assert_close(got, want.logits[:, -1], rtol=0, atol=0)
            cache, token = want.cache, got.argmax(-1)
    assert all(torch.equal(static.cache[key], t) for key, t in cache.items())
    assert all(torch.equal(original[key], t) for key, t in given.items())  # the caller's cache is left as it was


def test_a_dropped_static_decode_step_is_freed_at_once():
    """No reference cycle: on a GPU the step holds a captured graph, which a cycle would free only when the garbage
    collector runs, and a collection that lands inside another graph's capture invalidates that capture."""
    import gc
    import weakref

    model = tiny_model("atlas")
    cache = bench_decode.prefill(model, None, 6, 40, segment=4, device="cpu")
    gc.collect()
    gc.disable()
    try:
        static = StaticDecodeStep(model, cache)
        static.step(torch.tensor([3]))
        freed = weakref.ref(static._call)
        del static
        assert freed() is None
    finally:
        gc.enable()


def test_static_decode_step_refuses_a_growing_cache():
    model = tiny_model("transformer")
    cache = bench_decode.prefill(model, None, 3, 40, segment=4, device="cpu")
    with pytest.raises(GrowingCacheError, match="cannot live in a static buffer"):
        StaticDecodeStep(model, cache).step(torch.tensor([3]))


def test_main_prints_the_table_last_and_writes_json(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in TINY.items()))
    out = tmp_path / "decode.json"
    assert bench_decode.main(["--config", str(config), "--contexts", "16,8", "--batches", "1,2", "--steps", "2",
                              "--warmup", "1", "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-10].split() == ["model", "context", "batch", "ms/step", "tokens/s", "cache", "GiB", "vs",
                                  "shortest", "mode", "note"]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mixer"], r["context"], r["batch"]) for r in rows] == [
        (m, c, b) for m in ("atlas", "transformer") for c in (8, 16) for b in (1, 2)]
    assert all(r["ms_per_step"] > 0 and r["context_build"] == "synthetic" for r in rows)
    assert lines[-1].split()[:3] == ["transformer", "16", "2"]


def held_bytes(*caches: dict) -> int:
    """Memory the caches' per-sequence entries hold: each storage once, whole (a decode buffer's spare room too)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for cache in caches for t in cache.values() if t.dim() > 0}
    return sum(storages.values())


@pytest.mark.parametrize("mixer", ["atlas", "transformer"])
def test_peak_estimate_covers_what_a_timed_decode_holds(mixer):
    """Like time_decode: the given cache stays referenced while each step builds its cache beside the previous one
    (attention: one copy into a buffer of twice the length, then in place). About 3x the given cache for both."""
    model = tiny_model(mixer)
    given = bench_decode.synthetic_cache(model, 2, 64, "cpu")
    visible = bench_decode.cache_bytes({key: t for key, t in given.items() if t.dim() > 0})
    peak, cache = 0, given
    with torch.no_grad():
        for _ in range(4):
            new = model(torch.zeros(2, 1, dtype=torch.long), cache=cache, use_cache=True).cache
            peak, cache = max(peak, held_bytes(given, cache, new)), new
    assert 2.9 * visible < peak <= bench_decode.peak_bytes(visible, "eager")
    assert bench_decode.peak_bytes(visible, "graph") > bench_decode.peak_bytes(visible, "eager")
