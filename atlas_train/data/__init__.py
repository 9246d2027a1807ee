"""Streaming the shards that atlas-prep writes: manifest checks and the resumable per-rank loader."""

from atlas_train.data.config import DataConfig
from atlas_train.data.loader import ShardLoader, build_loader
from atlas_train.data_prep.shard_format import DataError, Manifest, check_manifest, read_manifest

__all__ = ["DataConfig", "DataError", "Manifest", "ShardLoader", "build_loader", "check_manifest", "read_manifest"]
