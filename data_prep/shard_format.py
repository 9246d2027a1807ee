"""The on-disk dataset format that `atlas-prep` writes and the loader reads: tar shards and `manifest.json`.

A dataset folder holds `manifest.json`, webdataset tar shards `<split>-NNNNN.tar` and, when text was tokenized,
the tokenizer: `tokenizer.model` (sentencepiece) or `tokenizer.json` (Hugging Face tokenizers; the manifest's
tokenizer `kind` says which). Each sample of a shard is one packed row of `seq_len + 1` tokens, as two raw
little-endian members:
- `<key>.tokens`: the token ids, uint16 when the vocabulary fits, else uint32 (the manifest's `token_dtype`);
- `<key>.starts`: uint32 positions in the row where a document begins (the memory resets there).
Raw arrays (shape and dtype live in the manifest) cost nothing to encode or decode, and storing start positions
rather than an (L+1) bool mask keeps the mask from costing as much as the tokens themselves.

The manifest is written last, so a dataset is complete exactly when its manifest exists; it records every shard's
sample count, byte size and sha256, which is what lets the loader compute its sample order without reading data
and name a corrupt shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atlas_train.train.atomic import atomic_write_text

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.model"
FORMAT_NAME = "atlas-train-shards"
FORMAT_VERSION = 1


class DataError(ValueError):
    """A user-facing data problem (missing or corrupt file, mismatched manifest); the message says which file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary of `vocab_size` tokens."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size {vocab_size} overflows uint32 token storage")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


STARTS_DTYPE = np.dtype("<u4")


def encode_sample(tokens: np.ndarray, doc_start: np.ndarray, dtype: np.dtype) -> dict[str, bytes]:
    """One row as {member extension: bytes}."""
    starts = np.flatnonzero(doc_start).astype(STARTS_DTYPE)
    return {"tokens": tokens.astype(dtype.newbyteorder("<")).tobytes(), "starts": starts.tobytes()}


def decode_sample(sample: dict, row_len: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Sample dict of raw bytes -> (tokens int64 (row_len,), doc_start bool (row_len,)); ValueError if malformed."""
    key = sample.get("__key__")
    if "tokens" not in sample or "starts" not in sample:
        raise ValueError(f"sample {key!r} lacks its tokens or starts member")
    raw_tokens, raw_starts = sample["tokens"], sample["starts"]
    if len(raw_tokens) != row_len * dtype.itemsize or len(raw_starts) % STARTS_DTYPE.itemsize:
        raise ValueError(f"sample {key!r}: {len(raw_tokens)} token bytes, expected {row_len} x {dtype}")
    starts = np.frombuffer(raw_starts, dtype=STARTS_DTYPE)
    if starts.size and starts.max() >= row_len:
        raise ValueError(f"sample {key!r}: a document start lies outside the row")
    doc_start = np.zeros(row_len, dtype=bool)
    doc_start[starts] = True
    return np.frombuffer(raw_tokens, dtype=dtype.newbyteorder("<")).astype(np.int64), doc_start


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    samples: int
    tokens: int
    documents: int  # document starts inside the rows
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    """A dataset folder's manifest.json, parsed. `path` is the folder; shard names are relative to it."""

    path: Path
    seq_len: int
    vocab_size: int
    token_dtype: str
    eos_id: int | None
    tokenizer_file: str | None
    tokenizer_sha256: str | None
    splits: dict[str, SplitInfo]
    info: dict = field(default_factory=dict)
    tokenizer_kind: str | None = None  # "sentencepiece" or "tokenizers" when there is a tokenizer

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    @property
    def tokenizer_path(self) -> Path | None:
        return self.path / self.tokenizer_file if self.tokenizer_file else None

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"{self.path / MANIFEST_NAME}: no split {name!r} (has: {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "token_dtype": self.token_dtype,
            "eos_id": self.eos_id,
            "tokenizer": (
                {"file": self.tokenizer_file, "sha256": self.tokenizer_sha256, "kind": self.tokenizer_kind}
                if self.tokenizer_file else None
            ),
            "splits": {
                name: {
                    "samples": s.samples,
                    "tokens": s.tokens,
                    "documents": s.documents,
                    "shards": [vars(sh) for sh in s.shards],
                }
                for name, s in self.splits.items()
            },
            "info": self.info,
        }


def write_manifest(manifest: Manifest) -> Path:
    """Atomically write manifest.json (sorted keys: same dataset, same bytes)."""
    target = manifest.path / MANIFEST_NAME
    atomic_write_text(target, json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n")
    return target


def read_manifest(path: str | Path) -> Manifest:
    """Parse `<path>/manifest.json` (or the manifest file itself); DataError with the file name on any problem."""
    path = Path(path)
    file = path if path.name == MANIFEST_NAME else path / MANIFEST_NAME
    if not file.is_file():
        hint = " (run atlas-prep to create it)" if not path.exists() or path.is_dir() else ""
        raise DataError(f"no dataset manifest at {file}{hint}")
    try:
        raw = json.loads(file.read_text())
        if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
            raise DataError(f"{file}: not an {FORMAT_NAME} v{FORMAT_VERSION} manifest")
        tok = raw.get("tokenizer")
        splits = {
            name: SplitInfo(
                samples=int(s["samples"]),
                tokens=int(s["tokens"]),
                documents=int(s["documents"]),
                shards=tuple(ShardInfo(**sh) for sh in s["shards"]),
            )
            for name, s in raw["splits"].items()
        }
        manifest = Manifest(
            path=file.parent,
            seq_len=int(raw["seq_len"]),
            vocab_size=int(raw["vocab_size"]),
            token_dtype=str(raw["token_dtype"]),
            eos_id=raw.get("eos_id"),
            tokenizer_file=tok["file"] if tok else None,
            tokenizer_sha256=tok["sha256"] if tok else None,
            splits=splits,
            info=raw.get("info") or {},
            tokenizer_kind=tok.get("kind", "sentencepiece") if tok else None,
        )
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{file}: malformed manifest ({err.__class__.__name__}: {err})") from None
    if np.dtype(manifest.token_dtype) != token_dtype(manifest.vocab_size):
        raise DataError(f"{file}: token_dtype {manifest.token_dtype} does not match vocab_size {manifest.vocab_size}")
    return manifest


def check_manifest(manifest: Manifest, vocab_size: int, seq_len: int) -> None:
    """Stop a run whose model cannot take this data: token ids beyond the embedding, or rows of another length."""
    where = manifest.path / MANIFEST_NAME
    if manifest.vocab_size > vocab_size:
        raise DataError(
            f"{where}: the data's vocabulary has {manifest.vocab_size} tokens but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size >= {manifest.vocab_size} (or auto, the data's)"
        )
    check_seq_len(manifest, seq_len)


def check_seq_len(manifest: Manifest, seq_len: int) -> None:
    if manifest.seq_len != seq_len:
        raise DataError(
            f"{manifest.path / MANIFEST_NAME}: shards hold rows of seq_len {manifest.seq_len} but the run uses "
            f"seq_len {seq_len}; "
            f"rerun atlas-prep with --seq-len {seq_len} or set the run's seq_len to {manifest.seq_len}"
        )
