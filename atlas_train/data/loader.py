"""The training/eval data loader: batches of packed rows for one data-parallel rank, resumable exactly.

Each rank walks the same global sample sequence (`order.py`) and takes its slice of every global batch. With
DataLoader workers, worker w builds the batches whose index since the iteration began is w modulo the worker
count; DataLoader hands batches back round-robin in worker order, so the stream never depends on worker timing.
The position that `state_dict()` saves advances before a batch is handed out, so a checkpoint taken after a step
resumes with the next batch.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from atlas_train.data.config import DataConfig
from atlas_train.data.order import Position, SampleOrder, global_batches, normalize
from atlas_train.data.shard_reader import decode_row, load_shard, verify_file
from atlas_train.data_prep.shard_format import DataError, Manifest, check_seq_len, read_manifest

STATE_VERSION = 1
ERROR_KEY = "data_error"  # a batch that carries a reader's DataError message instead of data


def _usable_shards(manifest: Manifest, split: str, on_corrupt: str) -> tuple[list, list[str]]:
    """Shards the order may use, and the names of those left out (`skip` checks every checksum up front)."""
    good, skipped = [], []
    for shard in manifest.split(split).shards:
        try:
            verify_file(manifest, shard, checksum=on_corrupt == "skip")
            good.append(shard)
        except DataError as err:
            if on_corrupt == "stop":
                raise
            print(f"warning: {err}; skipping it (data.on_corrupt=skip)", file=sys.stderr)
            skipped.append(shard.name)
    return good, skipped


class _RankBatches(IterableDataset):
    """This rank's batches from a start position; inside a DataLoader worker, only that worker's share."""

    def __init__(self, manifest: Manifest, shards: list, order: SampleOrder, start: Position, rank: int,
                 micro_batch: int, global_batch: int, loop: bool):
        super().__init__()
        self.manifest, self.shards, self.order, self.start = manifest, shards, order, start
        self.rank, self.micro_batch, self.global_batch, self.loop = rank, micro_batch, global_batch, loop

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._batches()
        except DataError as err:  # sent as data: DataLoader would wrap it in a worker traceback
            yield {ERROR_KEY: str(err)}

    def _batches(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cache: dict[int, list[dict]] = {}
        region = None
        batches = global_batches(self.start, self.order.num_samples, self.global_batch, self.loop)
        for count, pos in enumerate(batches):
            if count % workers != worker:
                continue
            first = pos.sample + self.rank * self.micro_batch
            rows = []
            for p in range(first, first + self.micro_batch):
                r = (pos.epoch, self.order.region_of(pos.epoch, p))
                if r != region:  # keep only the shards the new region draws from
                    region = r
                    keep = self.order.shards_of_region(*r)
                    cache = {k: v for k, v in cache.items() if k in keep}
                shard_id, row = self.order.lookup(pos.epoch, p)
                if shard_id not in cache:
                    cache[shard_id] = load_shard(self.manifest, self.shards[shard_id])
                rows.append(decode_row(self.manifest, self.shards[shard_id], cache[shard_id][row]))
            yield {
                "tokens": torch.from_numpy(np.stack([r[0] for r in rows])),
                "doc_start": torch.from_numpy(np.stack([r[1] for r in rows])),
            }


class ShardLoader:
    """Iterable of {"tokens": LongTensor (B, L+1), "doc_start": BoolTensor (B, L+1)} for one dp rank.

    `loop=True` (training) runs epochs forever; `loop=False` (eval) yields one pass per `iter()`.
    """

    def __init__(self, manifest: Manifest, split: str, cfg: DataConfig, *, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, loop: bool):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.manifest, self.split, self.cfg = manifest, split, cfg
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.loop = seed, loop
        self.global_batch = micro_batch_size * dp_size
        self.shards, self.skipped = _usable_shards(manifest, split, cfg.on_corrupt)
        self.order = SampleOrder([s.samples for s in self.shards], seed, shuffle=loop,
                                 shuffle_buffer=cfg.shuffle_buffer)
        if self.order.num_samples < self.global_batch:
            raise DataError(
                f"{manifest.path}: split {split!r} has {self.order.num_samples} rows, fewer than one global batch "
                f"(dp_size {dp_size} x micro_batch_size {micro_batch_size} = {self.global_batch})"
            )
        self.fingerprint = hashlib.sha256(
            "".join(f"{s.name}:{s.sha256};" for s in self.shards).encode()
        ).hexdigest()
        self.position = Position()

    @property
    def batches_per_epoch(self) -> int:
        return self.order.num_samples // self.global_batch

    def __len__(self) -> int:
        if self.loop:
            raise TypeError("a looping loader has no length; see batches_per_epoch")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        start = self.position
        dataset = _RankBatches(self.manifest, self.shards, self.order, start, self.dp_rank, self.micro_batch,
                               self.global_batch, self.loop)
        if self.cfg.num_workers > 0:
            stream = iter(DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                                     pin_memory=torch.cuda.is_available()))
        else:
            stream = iter(dataset)
        plan = global_batches(start, self.order.num_samples, self.global_batch, self.loop)
        for pos, batch in zip(plan, stream):
            if ERROR_KEY in batch:
                raise DataError(batch[ERROR_KEY])
            self.position = normalize(Position(pos.epoch, pos.sample + self.global_batch), self.order.num_samples,
                                      self.global_batch)
            yield batch
        if not self.loop:  # a finished pass: the next iter() starts the pass again
            self.position = Position()

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "epoch": self.position.epoch,
            "sample": self.position.sample,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the same data and seed are required, dp_size may differ."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        if state["split"] != self.split:
            raise DataError(f"data loader state is for split {state['split']!r}, not {self.split!r}")
        if state["seed"] != self.seed:
            raise DataError(f"data position was saved with seed {state['seed']}, this run uses {self.seed}; "
                            "the sample order depends on it")
        if state["fingerprint"] != self.fingerprint:
            raise DataError(f"the shards of split {self.split!r} in {self.manifest.path} differ from those the data "
                            "position was saved with (re-prepared data or other skipped shards); cannot resume exactly")
        self.position = normalize(Position(int(state["epoch"]), int(state["sample"])), self.order.num_samples,
                                  self.global_batch)


def build_loader(data_cfg: DataConfig, split: str, *, seq_len: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, loop: bool | None = None) -> ShardLoader:
    """The loader for `split` of the dataset at `data_cfg.path`; `loop` defaults to True for "train" only."""
    manifest = read_manifest(data_cfg.path)
    check_seq_len(manifest, seq_len)
    return ShardLoader(manifest, split, data_cfg, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                       dp_size=dp_size, seed=seed, loop=split == "train" if loop is None else loop)
