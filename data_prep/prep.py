"""The atlas-prep pipeline: inputs → (trained or given) tokenizer → parallel encoding → packed rows → shards.

The main process reads documents and hands batches of them to a pool of encoder processes, taking the results
back in submission order, so the shards do not depend on the worker count or timing. Each document goes to
val when a hash of its text falls below `val_fraction`: the split is stable under reordering the corpus, and
duplicate documents never straddle train and val. On a corpus too small for that to give every split a row,
splits.py moves documents (or a slice of one) between them, or stops naming the flag to change.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from atlas_train.data_prep.encode import encode_batch, init_encoder
from atlas_train.data_prep.errors import PrepError
from atlas_train.data_prep.inputs import InputStats, find_inputs, iter_documents
from atlas_train.data_prep.shard_format import TOKENIZER_NAME, Manifest
from atlas_train.data_prep.splits import SplitRouter
from atlas_train.data_prep.tokenizer import load_tokenizer, train_tokenizer
from atlas_train.data_prep.writer import SplitWriter, begin_dataset, finish_dataset

BATCH_CHARS = 1 << 20  # text per task sent to an encoder process


@dataclass
class PrepOptions:
    inputs: list[str]
    output: str
    seq_len: int
    tokenizer: str | None = None
    vocab_size: int = 8192
    model_type: str = "bpe"
    tokenizer_train_mb: float = 200.0
    val_fraction: float = 0.01
    shard_size_mb: float = 64.0
    workers: int = 1
    text_field: str = "text"
    txt_docs: str = "file"

    def validate(self) -> None:
        if self.seq_len < 1:
            raise PrepError(f"--seq-len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise PrepError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 1:
            raise PrepError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_size_mb <= 0:
            raise PrepError(f"--shard-size-mb must be positive, got {self.shard_size_mb}")


def _batches(documents: Iterator[str], val_fraction: float) -> Iterator[tuple[list[str], float]]:
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_CHARS:
            yield batch, val_fraction
            batch, size = [], 0
    if batch:
        yield batch, val_fraction


def _encode_in_order(pool, tasks: Iterator, depth: int) -> Iterator[list]:
    """Results of encode_batch in task order, with at most `depth` batches in flight (Pool.imap would read the
    whole corpus into its queue ahead of the encoders)."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(encode_batch, (task,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def run_prep(opts: PrepOptions, log=None) -> Manifest:
    """Prepare the dataset; progress and the summary go to `log` (stderr by default)."""
    log = log or sys.stderr
    opts.validate()
    started = time.perf_counter()
    files = find_inputs(opts.inputs)
    if next(iter_documents(files, opts.txt_docs, opts.text_field, InputStats()), None) is None:
        raise PrepError(f"the inputs hold no documents: {' '.join(opts.inputs)}")
    given = load_tokenizer(opts.tokenizer) if opts.tokenizer else None  # checked before the old dataset is dropped
    out_dir = begin_dataset(opts.output)
    if given:
        tokenizer_path, sp = Path(opts.tokenizer), given
    else:
        print(f"atlas-prep: training a {opts.model_type} tokenizer ({opts.vocab_size} pieces)", file=log)
        sample = iter_documents(files, opts.txt_docs, opts.text_field, InputStats())
        tokenizer_path = train_tokenizer(sample, out_dir / TOKENIZER_NAME, opts.vocab_size, opts.model_type,
                                         int(opts.tokenizer_train_mb * 2**20))
        sp = load_tokenizer(tokenizer_path)
    vocab_size, eos_id = sp.get_piece_size(), sp.eos_id()

    split_names = ["train", "val"] if opts.val_fraction > 0 else ["train"]
    writers = {s: SplitWriter(out_dir, s, opts.seq_len, vocab_size, opts.shard_size_mb) for s in split_names}
    router = SplitRouter(split_names, opts.seq_len, eos_id, opts.val_fraction)
    stats = InputStats()
    tokens_total = 0
    tasks = _batches(iter_documents(files, opts.txt_docs, opts.text_field, stats), opts.val_fraction)
    ctx = mp.get_context("spawn")  # a clean process: no inherited torch threads or open shard buffers
    with ctx.Pool(opts.workers, initializer=init_encoder, initargs=(str(tokenizer_path),)) as pool, tqdm(
        unit="tok", unit_scale=True, desc="atlas-prep", file=log, disable=None
    ) as bar:
        for encoded in _encode_in_order(pool, tasks, depth=2 * opts.workers + 1):
            for tokens, val in encoded:
                for split, row_tokens, row_starts in router.add("val" if val else "train", tokens):
                    writers[split].add(row_tokens, row_starts)
                tokens_total += tokens.size + 1
                bar.update(tokens.size + 1)
    for split, row_tokens, row_starts in router.finish():
        writers[split].add(row_tokens, row_starts)
    splits = {s: w.close() for s, w in writers.items()}
    docs_per_split = router.documents
    if router.note:
        print(f"atlas-prep: {router.note}", file=log)
    for warning in stats.warnings():
        print(f"atlas-prep: warning: {warning}", file=log)
    info = {
        "producer": "atlas-prep",
        "inputs": [str(f) for f in files],
        "txt_docs": opts.txt_docs,
        "text_field": opts.text_field,
        "val_fraction": opts.val_fraction,
        "documents": docs_per_split,
        "dropped_tokens": {s: p.dropped_tokens for s, p in router.packers.items()},
        "invalid_utf8_bytes": stats.invalid_utf8_bytes,
        "bad_json_lines": stats.bad_json_lines,
    }
    manifest = finish_dataset(out_dir, splits, opts.seq_len, vocab_size, tokenizer_path, eos_id, info)
    elapsed = time.perf_counter() - started
    for name, s in splits.items():
        print(f"atlas-prep: {name}: {docs_per_split[name]} documents -> {s.samples} rows of {opts.seq_len + 1} "
              f"tokens in {len(s.shards)} shards", file=log)
    print(f"atlas-prep: {stats.files} files, {stats.bytes / 2**20:.1f} MiB, {tokens_total} tokens in {elapsed:.1f} s "
          f"({tokens_total / max(elapsed, 1e-9):,.0f} tokens/s) -> {out_dir}", file=log)
    return manifest
