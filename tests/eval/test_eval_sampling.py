"""Next-token choice: the top-k / top-p filters against a slow per-row reference, and the sampler's distribution."""

import math

import pytest
import torch

from atlas_train.eval.sampling import filter_logits, sample_next


def reference_keep(row: list[float], top_k: int, top_p: float) -> set[int]:
    """Indices a plain reading of top-k then top-p keeps, one row, in Python floats."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if top_k > 0:
        order = order[:top_k]
    kept_logits = [row[i] for i in order]
    m = max(kept_logits)
    weights = [math.exp(x - m) for x in kept_logits]
    total = sum(weights)
    keep, mass = set(), 0.0
    for i, w in zip(order, weights):
        if mass >= top_p:
            break
        keep.add(i)
        mass += w / total
    return keep


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8), (3, 0.01)])
def test_filter_matches_reference(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 20, dtype=torch.float64) * 2
    out = filter_logits(logits, top_k, top_p)
    for b in range(logits.shape[0]):
        kept = {i for i in range(20) if out[b, i] != float("-inf")}
        assert kept == reference_keep(logits[b].tolist(), top_k, top_p)
        assert torch.equal(out[b][list(kept)], logits[b][list(kept)])  # kept logits are untouched


def test_greedy_and_degenerate_filters_pick_the_argmax():
    torch.manual_seed(1)
    logits = torch.randn(8, 50)
    best = logits.argmax(-1)
    assert torch.equal(sample_next(logits), best)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=gen), best)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=gen), best)


def test_sampled_frequencies_follow_the_filtered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    temperature, top_k = 0.7, 3
    expected = torch.zeros(5)
    expected[:3] = (logits[0, :3] / temperature).softmax(-1)
    gen = torch.Generator().manual_seed(123)
    n = 20000
    draws = sample_next(logits.expand(n, 5), temperature, top_k, generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / n
    assert freq[3:].sum() == 0
    assert torch.allclose(freq, expected, atol=0.015)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 3), temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(torch.zeros(1, 3), top_p=0.0)
