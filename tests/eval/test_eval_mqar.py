"""MQAR: rows are well formed, accuracy is 1 for a model that really looks values up and 0 for one that cannot,
and the training rows survive the shard writer and reader unchanged."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from atlas_train.eval import mqar
from atlas_train.eval.perplexity import ordered_rows


@pytest.mark.parametrize("pairs, seq_len, vocab", [(1, 3, 3), (4, 32, 64), (16, 63, 40), (8, 200, 1000)])
def test_rows_hold_each_key_once_then_its_query(pairs, seq_len, vocab):
    setting = mqar.MQARSetting(pairs, seq_len, vocab)
    tokens, positions = mqar.make_row(setting, np.random.default_rng(pairs))
    half = (vocab - 1) // 2
    keys, values = tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2]
    assert tokens.shape == (seq_len + 1,)
    assert len(set(keys.tolist())) == pairs and keys.min() >= 1 and keys.max() <= half
    assert values.min() > half and values.max() <= 2 * half
    lookup = dict(zip(keys.tolist(), values.tolist()))
    assert sorted(tokens[positions].tolist()) == sorted(keys.tolist())  # every key asked exactly once
    assert all(lookup[k] == v for k, v in zip(tokens[positions], tokens[positions + 1]))
    queried = np.zeros(seq_len + 1, dtype=bool)
    queried[positions] = queried[positions + 1] = True
    assert (tokens[2 * pairs :][~queried[2 * pairs :]] == mqar.FILLER).all()


@pytest.mark.parametrize(
    "setting", [mqar.MQARSetting(0, 8, 10), mqar.MQARSetting(5, 18, 100), mqar.MQARSetting(6, 64, 12)]
)
def test_impossible_settings_are_refused(setting):
    with pytest.raises(ValueError, match="MQAR"):
        mqar.make_row(setting, np.random.default_rng(0))


class LookupOracle(torch.nn.Module):
    """Predicts, after a key that appeared earlier followed by a value, that value: perfect recall by construction."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, doc_start=None, labels=None, cache=None, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids.tolist()):
            memory = {}
            for t, tok in enumerate(row):
                if tok in memory:
                    logits[b, t, memory[tok]] = 1.0
                if t + 1 < len(row) and tok != mqar.FILLER and tok not in memory:
                    memory[tok] = row[t + 1]
        return SimpleNamespace(logits=logits, loss=None, cache=None)


def test_accuracy_separates_recall_from_guessing():
    setting = mqar.MQARSetting(6, 40, 30)
    assert mqar.accuracy(LookupOracle(30), setting, num_samples=10, batch_size=4, seed=0, device="cpu") == 1.0
    blind = lambda ids, **kw: SimpleNamespace(logits=torch.zeros(*ids.shape, 30))  # noqa: E731 (argmax: filler)
    assert mqar.accuracy(blind, setting, num_samples=10, batch_size=4, seed=0, device="cpu") == 0.0


def test_training_rows_round_trip_through_shards(tmp_path):
    from atlas_train.data_prep.writer import write_dataset

    rows = list(mqar.training_rows(seq_len=31, vocab_size=50, pair_counts=[2, 4, 8], count=12, seed=3))
    manifest = write_dataset(tmp_path, {"val": iter(rows)}, seq_len=31, vocab_size=50, shard_size_mb=0.005)
    assert len(manifest.split("val").shards) > 1
    back = list(ordered_rows(manifest, "val"))
    assert len(back) == 12
    for (tokens, starts), (tok_back, starts_back) in zip(rows, back):
        assert np.array_equal(tokens, tok_back) and np.array_equal(starts, starts_back)
        assert starts_back[0] and not starts_back[1:].any()
    pair_counts = {len(set(r[0].tolist()) - {mqar.FILLER}) // 2 for r in rows}  # keys and values are distinct
    assert pair_counts == {2, 4, 8}


@pytest.mark.parametrize("eval_seed", [0, 1])
def test_evaluation_never_replays_the_training_shards(eval_seed):
    """atlas-eval's rows (seed 0 by default) are none of the rows of the train (seed 0) and val (seed 1) shards that
    `atlas-eval --write-data` and the recall study write for the same setting."""
    setting = mqar.MQARSetting(4, 64, 64)
    shards = {tokens[:-1].tobytes() for seed in (0, 1) for tokens, _ in mqar.training_rows(64, 64, [4], 300, seed)}
    seen = []

    def recording(ids, **kw):
        seen.extend(row.numpy().tobytes() for row in ids)
        return SimpleNamespace(logits=torch.zeros(*ids.shape, 64))

    mqar.accuracy(recording, setting, num_samples=300, batch_size=100, seed=eval_seed, device="cpu")
    assert len(set(seen)) == 300 and not shards & set(seen)
