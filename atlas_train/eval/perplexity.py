"""Perplexity on held-out rows, overall and by how much of its document the model has seen at each position.

Loss per position bucket answers "does the loss keep falling deeper into long documents?": a model that uses its
context (attention, or a memory that really stores it) keeps improving with the in-document position, one that
forgets flattens out. A predicted token's position is how many tokens of its document the model saw before it:
counted from its document's start, or from the row's start when the document began in an earlier row (the model
never saw that part). Buckets double in width: [0, 64), [64, 128), [128, 256), ... up to the context length (the
one token that sees a full context of L is counted with position L - 1, so every context shares the same buckets).

Longer contexts: consecutive val rows are consecutive stretches of atlas-prep's packed token stream, so `k` of them
joined make one row of k·seq_len tokens; evaluating at 2× and 4× the training length shows whether the model
extrapolates. (Synthetic sets such as MQAR hold independent rows: only their 1× result means something.)
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

FIRST_BUCKET = 64


def ordered_rows(manifest, split: str = "val") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every row of a split in stored order (tokens int64, doc_start bool), each shard checked against the manifest."""
    from atlas_train.data.shard_reader import decode_row, load_shard

    for shard in manifest.split(split).shards:
        for sample in load_shard(manifest, shard):
            yield decode_row(manifest, shard, sample)


def bucket_edges(context_len: int, first: int = FIRST_BUCKET) -> list[int]:
    """[0, first, 2·first, 4·first, ..., context_len]: doubling buckets, the same at every context length.

    Positions run from 0 to context_len; the single last one is counted with context_len - 1 (see `evaluate`).
    """
    edges = [0]
    width = first
    while width < context_len:
        edges.append(width)
        width *= 2
    return edges + [context_len]


def in_document_positions(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, T) bool document starts -> (B, T) tokens of its document before each token (counted from the row start
    when the document began before the row)."""
    steps = torch.arange(doc_start.shape[-1], device=doc_start.device).expand_as(doc_start)
    last_start = torch.where(doc_start, steps, torch.zeros_like(steps)).cummax(dim=-1).values
    return steps - last_start


def joined_rows(rows: Iterable[tuple[np.ndarray, np.ndarray]], factor: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Join every `factor` consecutive rows of L+1 tokens into one row of factor·L + 1 tokens.

    atlas-prep cuts row k as stream[k·L : k·L + L + 1] (consecutive rows share one token), so dropping the last
    token of every row but the group's last gives stream[j·factor·L : (j+1)·factor·L + 1]: a genuine longer stretch.
    """
    group: list[tuple[np.ndarray, np.ndarray]] = []
    for row in rows:
        group.append(row)
        if len(group) == factor:
            tokens = np.concatenate([g[0][:-1] for g in group[:-1]] + [group[-1][0]])
            starts = np.concatenate([g[1][:-1] for g in group[:-1]] + [group[-1][1]])
            yield tokens, starts
            group = []


class BucketMeter:
    """Sums of token NLL and counts per position bucket, plus the total."""

    def __init__(self, edges: list[int]):
        self.edges = edges
        self.nll = [0.0] * (len(edges) - 1)
        self.count = [0] * (len(edges) - 1)

    def add(self, nll: torch.Tensor, positions: torch.Tensor) -> None:
        bucket = torch.bucketize(
            positions.contiguous(), torch.tensor(self.edges[1:-1], device=positions.device), right=True
        )
        sums = torch.zeros(len(self.nll), dtype=torch.float64, device=nll.device).index_add_(
            0, bucket.flatten(), nll.flatten().double()
        )
        counts = torch.bincount(bucket.flatten(), minlength=len(self.count))
        for i in range(len(self.nll)):
            self.nll[i] += float(sums[i])
            self.count[i] += int(counts[i])

    def result(self) -> dict:
        total_count = sum(self.count)
        mean = sum(self.nll) / max(total_count, 1)
        buckets = [
            {
                "positions": f"{lo}-{hi - 1}",
                "tokens": n,
                "loss": s / n if n else None,
                "ppl": math.exp(s / n) if n else None,
            }
            for lo, hi, s, n in zip(self.edges[:-1], self.edges[1:], self.nll, self.count)
        ]
        return {"tokens": total_count, "loss": mean, "ppl": math.exp(mean), "buckets": buckets}


def token_nll(model, tokens: torch.Tensor, doc_start: torch.Tensor, position_chunk: int = 4096) -> torch.Tensor:
    """(B, T) negative log-likelihood of tokens[:, 1:] given the prefix, scored in slices of `position_chunk`
    positions so a long bf16 row never holds its full-vocabulary float32 logits at once."""
    logits = model(tokens[:, :-1], doc_start=doc_start[:, :-1]).logits
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 logits are scored in float32, float64 kept
    labels = tokens[:, 1:]
    parts = [
        F.cross_entropy(
            logits[:, s : s + position_chunk].to(dtype).transpose(1, 2),
            labels[:, s : s + position_chunk],
            reduction="none",
        )
        for s in range(0, labels.shape[1], position_chunk)
    ]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def evaluate(
    model,
    rows: Iterable[tuple[np.ndarray, np.ndarray]],
    context_len: int,
    batch_size: int,
    max_rows: int | None,
    device,
    progress=None,
) -> dict:
    """Perplexity over `rows` (each context_len + 1 tokens), overall and per in-document position bucket."""
    meter = BucketMeter(bucket_edges(context_len))
    batch: list[tuple[np.ndarray, np.ndarray]] = []
    seen = 0

    def flush():
        tokens = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
        starts = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
        positions = in_document_positions(starts)[:, 1:].clamp(max=context_len - 1)
        meter.add(token_nll(model, tokens, starts), positions)
        if progress is not None:
            progress.update(len(batch))

    for row in rows:
        if max_rows is not None and seen == max_rows:
            break
        batch.append(row)
        seen += 1
        if len(batch) == batch_size:
            flush()
            batch = []
    if batch:
        flush()
    return {"context_len": context_len, "rows": seen, **meter.result()}
