"""Random streams of the synthetic tasks (mqar, niah): training shards (train and val) and evaluation draw from
different generators whatever seeds they are given, so an evaluation never replays training data (with one seed
for both, MQAR replayed the training rows row for row and NIAH asked needles the shards had taught). Rows of the
two can still coincide by chance where a setting has few distinct rows.
"""

from __future__ import annotations

import numpy as np

STREAMS = {"train": 1, "eval": 2}  # the first entropy word of each purpose's generator; changing one changes the data


def stream(purpose: str, seed: int) -> np.random.Generator:
    """The generator of `purpose` ('train': training shards; 'eval': evaluation rows) for `seed` >= 0.

    numpy's SeedSequence hashes the whole entropy [purpose word, seed]: the two purposes differ in the first word,
    so no pair of seeds gives them the same generator (short of a 128-bit hash collision).
    """
    return np.random.default_rng([STREAMS[purpose], seed])
