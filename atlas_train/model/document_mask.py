"""Document-masked (and sliding-window) causal attention through PyTorch's FlexAttention, for GPUs.

A query at position q sees key k when k <= q, both lie in the same document and, with a window w, q - k < w
(docs/math.md §1). SDPA's fused kernels take no such mask: a dense (B, T, T) one sends it to the memory-efficient
or math backend. FlexAttention takes the rule as a `mask_mod` plus a BlockMask, the (query block, key block) tiles
of BLOCK x BLOCK tokens that hold any allowed pair, split into "full" tiles (every pair allowed: the kernel skips
the mask) and "partial" ones (the kernel applies `mask_mod`); tiles with no allowed pair are never visited.

The BlockMask is derived from each block's first and last document index in O(B · (T/BLOCK)^2) integer work,
instead of `create_block_mask`'s evaluation of the rule at all B · T^2 pairs (a gigapair per layer at T = 32K).
It is made once per forward and shared by every layer: blocks all receive the same `doc_start` tensor object, and
`block_mask_for` remembers the last one it saw. Under torch.compile (a compiled transformer block) it is built inside
each block's graph instead, where the work is a few fused integer kernels: reading a cache there would either break
the graph or make the compiler guard on (and recompile for) every new batch.

FlexAttention is only fast compiled (`flex_attend` compiles it; inside an already compiled block it is simply
traced). Torch's CPU FlexAttention runs forward only (no backward), so CPU training keeps SDPA's dense mask.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # tile side in tokens (FlexAttention's default sparse block size)

_compiled_flex_attention = torch.compile(flex_attention)


def document_index(doc_start: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T) bool document starts -> (B, ceil(T/BLOCK)·BLOCK) int32 document index of every token.

    Padded past T with the last token's index, so the kernel's reads of a last, incomplete tile stay in bounds.
    """
    doc = doc_start.to(torch.int32).cumsum(1, dtype=torch.int32)
    pad = -length % BLOCK
    return torch.cat((doc, doc[:, -1:].expand(-1, pad)), 1) if pad else doc


def _mask_rule(doc: Optional[torch.Tensor], window: Optional[int]):
    """FlexAttention's mask_mod: causal, same document (when `doc` is given), inside the window (when given)."""

    def allowed(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if doc is not None:
            keep = keep & (doc[b, q_idx] == doc[b, kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    return allowed


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, nq, nk) bool tiles -> per query block the count of True tiles and their key-block indices first."""
    tiles = tiles.to(torch.int32)
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


def build_block_mask(doc_start: Optional[torch.Tensor], length: int, window: Optional[int],
                     device: torch.device) -> BlockMask:
    """The BlockMask of causal attention over `length` tokens, within documents (doc_start (B, T) bool, or None for
    one document per row) and within `window` tokens (or None for all of the past)."""
    n = -(-length // BLOCK)
    blocks = torch.arange(n, device=device)
    q_block, k_block = blocks[:, None], blocks[None, :]
    below = k_block < q_block
    # Token lags between the two tiles, nearest and farthest pair: (i - j - 1)·BLOCK + 1 and (i - j + 1)·BLOCK - 1.
    some_in_window = full_in_window = torch.ones((), dtype=torch.bool, device=device)
    if window is not None:
        some_in_window = (q_block - k_block - 1) * BLOCK + 1 < window
        full_in_window = (q_block - k_block + 1) * BLOCK - 1 < window
    complete = ((blocks + 1) * BLOCK <= length)[:, None]  # a last, incomplete query tile is never full
    if doc_start is None:
        doc = None
        shared = torch.ones((1, 1, 1), dtype=torch.bool, device=device)
        one_document = shared
    else:
        doc = document_index(doc_start, length)
        first, last = doc[:, ::BLOCK], doc[:, BLOCK - 1::BLOCK]  # (B, n) per tile
        # Positions rise with the document index, so a key tile before the query tile shares a document with it
        # exactly when its last document is the query tile's first, and every pair does when both tiles lie in one.
        shared = last[:, None, :] == first[:, :, None]
        one_document = first[:, None, :] == last[:, :, None]
    diagonal = q_block == k_block
    full = below & full_in_window & complete & one_document
    partial = (diagonal | (below & some_in_window & shared)) & ~full
    kv_num, kv_indices = _ordered(partial[:, None])
    full_num, full_indices = _ordered(full[:, None])
    return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=BLOCK,
                                    mask_mod=_mask_rule(doc, window), seq_lengths=(length, length))


class _LastMask:
    """The BlockMask of the last (doc_start, length, window, device) asked for outside compiled code.

    `doc_start` is held weakly and with its version counter, so a freed or rewritten tensor never matches.
    """

    def __init__(self):
        self.doc_start, self.version, self.rest, self.mask = None, None, None, None

    def get(self, doc_start, length, window, device) -> BlockMask:
        version = None if doc_start is None else doc_start._version
        rest = (doc_start is None, length, window, device)
        held = None if self.doc_start is None else self.doc_start()
        if self.mask is None or rest != self.rest or held is not doc_start or version != self.version:
            self.mask = build_block_mask(doc_start, length, window, device)
            self.doc_start = None if doc_start is None else weakref.ref(doc_start)
            self.version, self.rest = version, rest
        return self.mask


_last_mask = _LastMask()


def block_mask_for(doc_start: Optional[torch.Tensor], length: int, window: Optional[int],
                   device: torch.device) -> BlockMask:
    """`build_block_mask`, made once per `doc_start` tensor (and length, window, device) and shared by the layers
    that receive it; built afresh inside compiled graphs (see the module docstring)."""
    if torch.compiler.is_compiling():
        return build_block_mask(doc_start, length, window, device)
    return _last_mask.get(doc_start, length, window, device)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """Compiled FlexAttention over (B, H, T, dh) q, k, v with `block_mask`; softmax scale 1/sqrt(dh) as SDPA's."""
    return _compiled_flex_attention(q, k, v, block_mask=block_mask)
