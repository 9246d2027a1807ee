"""Perplexity: in-document positions, doubling buckets and the batched evaluation against a per-token reference."""

import math

import numpy as np
import torch

from atlas_train.eval import perplexity


def reference_positions(starts: list[bool]) -> list[int]:
    out, last = [], 0
    for t, s in enumerate(starts):
        if s:
            last = t
        out.append(t - last)
    return out


def test_positions_count_from_the_latest_document_start():
    g = torch.Generator().manual_seed(0)
    starts = torch.rand(5, 37, generator=g) < 0.1
    starts[1] = False
    got = perplexity.in_document_positions(starts)
    for row, s in zip(got.tolist(), starts.tolist()):
        assert row == reference_positions(s)


def test_bucket_edges_double_and_cover_every_position():
    assert perplexity.bucket_edges(256) == [0, 64, 128, 256]
    assert perplexity.bucket_edges(300) == [0, 64, 128, 256, 300]
    assert perplexity.bucket_edges(40) == [0, 40]


def random_rows(n: int, seq_len: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        starts = rng.random(seq_len + 1) < 0.01
        rows.append((rng.integers(0, vocab, seq_len + 1), starts))
    return rows


def test_evaluate_matches_a_per_token_reference():
    from atlas_train.model import build_model
    from atlas_train.model.config import ModelConfig

    torch.manual_seed(0)
    model = (
        build_model(
            ModelConfig(
                vocab_size=50,
                d_model=16,
                n_layers=1,
                n_heads=2,
                mlp_hidden=32,
                chunk_size=8,
                memory_expansion=2,
                gate_rank=4,
            )
        )
        .double()
        .eval()
    )
    seq_len, first = 150, 64
    rows = random_rows(7, seq_len, 50, seed=1)
    got = perplexity.evaluate(model, iter(rows), seq_len, batch_size=3, max_rows=6, device="cpu")

    edges = perplexity.bucket_edges(seq_len, first)
    sums, counts = [0.0] * (len(edges) - 1), [0] * (len(edges) - 1)
    losses = []
    with torch.no_grad():
        for tokens, starts in rows[:6]:
            tokens, starts = torch.from_numpy(tokens)[None], torch.from_numpy(starts)[None]
            out = model(tokens[:, :-1], doc_start=starts[:, :-1], labels=tokens[:, 1:])
            losses.append(float(out.loss))
            logp = out.logits[0].log_softmax(-1)
            positions = reference_positions(starts[0].tolist())
            for t in range(seq_len):
                pos = min(positions[t + 1], seq_len - 1)
                b = next(i for i in range(len(edges) - 1) if edges[i] <= pos < edges[i + 1])
                sums[b] += -float(logp[t, tokens[0, t + 1]])
                counts[b] += 1
    assert got["rows"] == 6 and got["tokens"] == 6 * seq_len
    assert math.isclose(got["loss"], sum(losses) / 6, rel_tol=1e-9)
    for bucket, s, n in zip(got["buckets"], sums, counts):
        assert bucket["tokens"] == n
        assert math.isclose(bucket["loss"], s / n, rel_tol=1e-9)
        assert math.isclose(bucket["ppl"], math.exp(s / n), rel_tol=1e-9)
    assert [b["positions"] for b in got["buckets"]] == ["0-63", "64-127", "128-149"]


def test_joined_rows_are_longer_stretches_of_the_stream():
    from atlas_train.data_prep.pack import RowPacker

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 50, n) for n in (23, 37, 5, 60, 41)]
    packer = RowPacker(seq_len=9, eos_id=2)
    rows = [row for doc in docs for row in packer.add(doc)]
    stream = np.concatenate([np.append(d, 2) for d in docs])
    starts = np.concatenate([np.arange(len(d) + 1) == 0 for d in docs])
    assert all(np.array_equal(t, stream[9 * k : 9 * k + 10]) for k, (t, _) in enumerate(rows))  # atlas-prep's cut
    joined = list(perplexity.joined_rows(iter(rows), 3))
    assert len(joined) == len(rows) // 3
    for j, (tokens, s) in enumerate(joined):
        assert np.array_equal(tokens, stream[27 * j : 27 * j + 28]) and np.array_equal(s, starts[27 * j : 27 * j + 28])
