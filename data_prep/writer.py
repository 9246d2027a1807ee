"""Write packed rows as webdataset tar shards plus a manifest; the one writer atlas-prep and the eval datasets share.

Shards are built in memory, then written under a temporary name and renamed; the manifest is removed when writing
starts and written last, so a crash at any point never leaves a manifest that names a half-written shard.
Tar headers are plain ustar with fixed mtime/owner/mode, so the same rows give byte-identical shards (the stdlib's
tarfile is used directly: webdataset's TarWriter always writes pax headers, which doubles the per-row cost).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np

from atlas_train.data_prep.shard_format import (
    MANIFEST_NAME,
    DataError,
    Manifest,
    ShardInfo,
    SplitInfo,
    encode_sample,
    shard_name,
    token_dtype,
    write_manifest,
)
from atlas_train.data_prep.tokenizer import FILE_NAMES as TOKENIZER_FILES
from atlas_train.data_prep.tokenizer import tokenizer_kind
from atlas_train.train.atomic import atomic_write_bytes

TAR_BLOCK = 512


def samples_per_shard(seq_len: int, dtype: np.dtype, shard_size_mb: float) -> int:
    """How many rows make a shard of about `shard_size_mb` MiB (two tar members per row, each header + padding)."""
    payload = (seq_len + 1) * dtype.itemsize
    row_bytes = 3 * TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK  # 2 headers + the starts block
    return max(1, int(shard_size_mb * 2**20) // row_bytes)


class SplitWriter:
    """Streams the rows of one split into shards of a fixed number of rows; `close()` returns the split's summary."""

    def __init__(self, out_dir: Path, split: str, seq_len: int, vocab_size: int, shard_size_mb: float):
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise DataError(f"split name {split!r}: use letters, digits and _ only")
        self.out_dir, self.split, self.seq_len, self.vocab_size = out_dir, split, seq_len, vocab_size
        self.dtype = token_dtype(vocab_size)
        self.rows_per_shard = samples_per_shard(seq_len, self.dtype, shard_size_mb)
        self.shards: list[ShardInfo] = []
        self.samples = 0
        self.documents = 0
        self._buffer: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def add(self, tokens: np.ndarray, doc_start: np.ndarray) -> None:
        tokens, doc_start = np.asarray(tokens), np.asarray(doc_start)
        row_len = self.seq_len + 1
        if tokens.shape != (row_len,) or doc_start.shape != (row_len,):
            raise DataError(
                f"{self.split} row {self.samples}: tokens {tokens.shape} and doc_start {doc_start.shape} "
                f"must both be ({row_len},)"
            )
        if not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{self.split} row {self.samples}: token ids must be integers, got {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise DataError(f"{self.split} row {self.samples}: token ids must lie in [0, {self.vocab_size})")
        if self._tar is None:
            self._buffer = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buffer, mode="w|", format=tarfile.USTAR_FORMAT)
        for ext, data in encode_sample(tokens, doc_start.astype(bool), self.dtype).items():
            member = tarfile.TarInfo(f"{self.samples:010d}.{ext}")
            member.size, member.mode, member.mtime = len(data), 0o444, 0
            self._tar.addfile(member, io.BytesIO(data))
        self.samples += 1
        self.documents += int(np.count_nonzero(doc_start))
        self._in_shard += 1
        if self._in_shard == self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        self._tar.close()
        data = self._buffer.getvalue()
        name = shard_name(self.split, len(self.shards))
        atomic_write_bytes(self.out_dir / name, data)
        self.shards.append(ShardInfo(name, self._in_shard, len(data), hashlib.sha256(data).hexdigest()))
        self._buffer, self._tar, self._in_shard = None, None, 0

    def close(self) -> SplitInfo:
        if self._tar is not None:
            self._flush()
        return SplitInfo(self.samples, self.samples * (self.seq_len + 1), self.documents, tuple(self.shards))


def begin_dataset(out_dir: str | Path) -> Path:
    """Make the folder and drop its manifest, so the old dataset stops being valid before any shard is replaced;
    temp files a killed run left behind (`.<name>.*.tmp`, see atomic_write) go too."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in out_dir.glob(".*.tmp"):
        stale.unlink()
    return out_dir


def finish_dataset(
    out_dir: Path,
    splits: dict[str, SplitInfo],
    seq_len: int,
    vocab_size: int,
    tokenizer_path: str | Path | None = None,
    eos_id: int | None = None,
    info: dict | None = None,
) -> Manifest:
    """Copy the tokenizer in, delete shards a previous run left that this one did not write, write the manifest."""
    tok_file = tok_hash = tok_kind = None
    if tokenizer_path is not None:
        tokenizer_path = Path(tokenizer_path)
        if not tokenizer_path.is_file():
            raise DataError(f"tokenizer not found: {tokenizer_path}")
        data = tokenizer_path.read_bytes()
        tok_kind = tokenizer_kind(tokenizer_path)
        target = out_dir / TOKENIZER_FILES[tok_kind]
        if tokenizer_path.resolve() != target.resolve():
            atomic_write_bytes(target, data)
        for other in set(TOKENIZER_FILES.values()) - {target.name}:  # a previous run's tokenizer of the other kind
            (out_dir / other).unlink(missing_ok=True)
        tok_file, tok_hash = target.name, hashlib.sha256(data).hexdigest()
    written = {sh.name for s in splits.values() for sh in s.shards}
    for old in out_dir.glob("*-[0-9][0-9][0-9][0-9][0-9].tar"):
        if old.name not in written:
            old.unlink()
    manifest = Manifest(
        path=out_dir,
        seq_len=seq_len,
        vocab_size=vocab_size,
        token_dtype=token_dtype(vocab_size).name,
        eos_id=eos_id,
        tokenizer_file=tok_file,
        tokenizer_sha256=tok_hash,
        splits=splits,
        info=info or {},
        tokenizer_kind=tok_kind,
    )
    write_manifest(manifest)
    return manifest


def write_dataset(
    out_dir: str | Path,
    splits: dict[str, Iterable[tuple[np.ndarray, np.ndarray]]],
    seq_len: int,
    vocab_size: int,
    tokenizer_path: str | Path | None = None,
    shard_size_mb: float = 64.0,
    eos_id: int | None = None,
    info: dict | None = None,
) -> Manifest:
    """Write each split's rows `(tokens (seq_len+1,) ints, doc_start (seq_len+1,) bools)` as shards + manifest.

    `info` is free-form JSON kept in the manifest (e.g. the task that generated a synthetic eval set).
    """
    if seq_len <= 0:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    out_dir = begin_dataset(out_dir)
    done = {}
    for split, rows in splits.items():
        writer = SplitWriter(out_dir, split, seq_len, vocab_size, shard_size_mb)
        for tokens, doc_start in rows:
            writer.add(tokens, doc_start)
        done[split] = writer.close()
    return finish_dataset(out_dir, done, seq_len, vocab_size, tokenizer_path, eos_id, info)

