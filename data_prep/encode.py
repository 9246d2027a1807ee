"""Work done in atlas-prep's encoder processes: tokenize a batch of documents and pick each one's split.

Kept apart from the pipeline so a spawned process imports only sentencepiece and numpy, not webdataset/torch.
"""

from __future__ import annotations

import hashlib

import numpy as np

from atlas_train.data_prep.tokenizer import load_tokenizer

_encoder = None  # each pool process loads the tokenizer once


def is_val(text: str, val_fraction: float) -> bool:
    """True for about `val_fraction` of documents, decided by the text alone (duplicates land together)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


def init_encoder(path: str) -> None:
    global _encoder
    _encoder = load_tokenizer(path)


def encode_batch(task: tuple[list[str], float]) -> list[tuple[np.ndarray, bool]]:
    """[(token ids, goes to val)] for each document, in order; ids travel back as uint16 when they fit.

    One encoding thread per process: --workers is the parallelism, and sentencepiece's own threads would fight it.
    """
    docs, val_fraction = task
    dtype = np.uint16 if _encoder.get_piece_size() <= 1 << 16 else np.uint32
    encoded = _encoder.encode(docs, num_threads=1)
    return [(np.asarray(ids, dtype=dtype), is_val(doc, val_fraction)) for doc, ids in zip(docs, encoded)]
