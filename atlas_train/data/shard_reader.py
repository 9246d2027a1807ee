"""Read one tar shard into memory and check it against the manifest; any damage is a DataError naming the shard.

A shard is read whole (they are tens of MB) so its sha256 can be checked before use, then split into samples with
webdataset's tar iterator; rows are decoded only when a batch asks for them.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from webdataset import tariterators

from atlas_train.data_prep.shard_format import DataError, Manifest, ShardInfo, decode_sample


def verify_file(manifest: Manifest, shard: ShardInfo, checksum: bool) -> bytes | None:
    """The shard's bytes if it matches the manifest (size always, sha256 when `checksum`); DataError otherwise."""
    path = manifest.path / shard.name
    try:
        size = path.stat().st_size
    except OSError:
        raise DataError(f"corrupt shard {path}: file missing") from None
    if size != shard.bytes:
        raise DataError(f"corrupt shard {path}: {size} bytes, manifest says {shard.bytes} (truncated or replaced)")
    if not checksum:
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise DataError(f"corrupt shard {path}: sha256 does not match the manifest")
    return data


def load_shard(manifest: Manifest, shard: ShardInfo) -> list[dict]:
    """All samples of a verified shard, in order, as dicts of raw member bytes keyed by extension."""
    data = verify_file(manifest, shard, checksum=True)
    path = manifest.path / shard.name
    try:
        members = tariterators.tar_file_expander([{"url": str(path), "stream": io.BytesIO(data)}])
        samples = list(tariterators.group_by_keys(members))
    except Exception as err:  # tarfile and webdataset raise several types for a damaged archive
        raise DataError(f"corrupt shard {path}: {err.__class__.__name__}: {err}") from None
    if len(samples) != shard.samples:
        raise DataError(f"corrupt shard {path}: {len(samples)} samples, manifest says {shard.samples}")
    return samples


def decode_row(manifest: Manifest, shard: ShardInfo, sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int64, doc_start bool) of one sample of `shard`; a malformed sample is a DataError naming the shard."""
    try:
        return decode_sample(sample, manifest.row_len, np.dtype(manifest.token_dtype))
    except ValueError as err:
        raise DataError(f"corrupt shard {manifest.path / shard.name}: {err}") from None
