"""Context parallelism: each CP rank runs one contiguous segment of the sequence; per block, the decode cache
(memory state, conv cache, attention keys/values, absolute position) travels from rank r to rank r+1 in forward
and its gradient travels back in backward.

A block's cache is exactly the state its next segment needs (model contract: `block(x, doc_start, cache,
return_cache) -> (y, cache)`, cache a flat dict of tensors that keeps its autograd history), so CP needs nothing
from the model beyond that contract. Forward hooks on every block do the exchange, so parameter names stay those of
the plain model (checkpoints move freely between layouts).

Ranks form a wavefront: rank r runs block l while rank r+1 waits for r's block-l cache (or already runs block l-1),
and sends are non-blocking so a rank goes on with its next block while its cache is on the wire.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

# The block contract's parameters, in order: forward(x, doc_start, cache=None, return_cache=False).
_BLOCK_ARGS = ("x", "doc_start", "cache", "return_cache")

# Tensors on the wire: bool is sent as uint8 (not every backend carries bool).
_WIRE_DTYPE = {torch.bool: torch.uint8}


class _Link:
    """Point-to-point traffic between this rank and its CP neighbours, for one process.

    Each (block, input shape) pair first sends a header (cache keys, shapes, dtypes), then only tensors; both ends
    of a link remember the header, so it crosses the wire once per block and shape.
    """

    def __init__(self):
        ranks = ps.get_context_parallel_global_ranks()
        rank = ps.get_context_parallel_rank()
        self.group = ps.get_context_parallel_group()
        self.prev = ranks[rank - 1] if rank > 0 else None
        self.next = ranks[rank + 1] if rank + 1 < len(ranks) else None
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.sent_headers: set = set()
        self.recv_headers: dict = {}
        self.pending: list = []  # (work, tensor) of non-blocking sends: keep the tensor alive until done

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()

    def isend(self, tensor: torch.Tensor, dst: int) -> None:
        # Drop finished sends first: without a backward (evaluation) nothing else would ever release them.
        self.pending = [(work, kept) for work, kept in self.pending if not work.is_completed()]
        tensor = tensor.contiguous()
        self.pending.append((dist.isend(tensor, dst, group=self.group), tensor))

    def send_header(self, key, header, dst: int) -> None:
        if key not in self.sent_headers:
            dist.send_object_list([header], dst, group=self.group, device=self.device)
            self.sent_headers.add(key)

    def recv_header(self, key, src: int):
        if key not in self.recv_headers:
            box = [None]
            dist.recv_object_list(box, src, group=self.group, device=self.device)
            self.recv_headers[key] = box[0]
        return self.recv_headers[key]

    def recv(self, shape, dtype, src: int, device) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=_WIRE_DTYPE.get(dtype, dtype), device=device)
        dist.recv(buffer, src, group=self.group)
        return buffer.to(dtype) if dtype in _WIRE_DTYPE else buffer


def _differentiable(dtype: torch.dtype) -> bool:
    """Cache entries that carry gradients (fast weights, keys, conv inputs); positions and document ids do not."""
    return dtype.is_floating_point


class _RecvCache(torch.autograd.Function):
    """Forward: receive the previous rank's cache. Backward: send the cache's gradient back to it.

    `anchor` (the block input) only ties the received tensors into this rank's graph so that the backward runs.
    """

    @staticmethod
    def forward(ctx, link, header, anchor):
        ctx.link = link
        ctx.header = header
        ctx.device = anchor.device
        received = []
        for _, shape, dtype in header:
            received.append(link.recv(shape, dtype, link.prev, anchor.device))
        ctx.mark_non_differentiable(*[t for t in received if not _differentiable(t.dtype)])
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads):
        link = ctx.link
        for (_, shape, dtype), grad in zip(ctx.header, grads):
            if _differentiable(dtype):
                if grad is None:
                    grad = torch.zeros(shape, dtype=dtype, device=ctx.device)
                link.isend(grad, link.prev)
        return (None, None, None)


class _SendCache(torch.autograd.Function):
    """Forward: send this block's outgoing cache to the next rank; pass `y` through unchanged.

    Backward: receive the cache's gradient from the next rank. Tying the send to `y` puts it in the loss graph.
    """

    @staticmethod
    def forward(ctx, link, y, *cache_values):
        ctx.link = link
        ctx.specs = [(t.shape, t.dtype, t.device) for t in cache_values]
        for value in cache_values:
            link.isend(value.detach().to(_WIRE_DTYPE.get(value.dtype, value.dtype)), link.next)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        link = ctx.link
        link.wait_sends()
        grads = []
        for shape, dtype, device in ctx.specs:
            if _differentiable(dtype):
                grads.append(link.recv(shape, dtype, link.next, device))
            else:
                grads.append(None)
        return (None, grad_y, *grads)


def _hooks(link: _Link, block_id: int):
    def pre_hook(module, args, kwargs):
        kwargs.update(zip(_BLOCK_ARGS[2:], args[2:]))  # cache / return_cache given by position
        args = args[:2]
        x = args[0] if args else kwargs["x"]
        module._cp_wants_cache = bool(kwargs.get("return_cache", False))
        if kwargs.get("cache") is not None:
            raise RuntimeError("context parallelism runs whole sequences: a block got a cache from its caller")
        kwargs["return_cache"] = True
        if link.prev is not None:
            key = (block_id, tuple(x.shape), x.dtype)
            header = link.recv_header(key, link.prev)
            link.wait_sends()
            values = _RecvCache.apply(link, header, x)
            kwargs["cache"] = {name: value for (name, _, _), value in zip(header, values)}
        return args, kwargs

    def post_hook(module, args, kwargs, output):
        y, cache = output
        if link.next is not None:
            x = args[0] if args else kwargs["x"]
            key = (block_id, tuple(x.shape), x.dtype)
            names = sorted(cache)
            link.send_header(key, [(n, tuple(cache[n].shape), cache[n].dtype) for n in names], link.next)
            y = _SendCache.apply(link, y, *[cache[n] for n in names])
        return y, (cache if module._cp_wants_cache else None)

    return pre_hook, post_hook


def context_parallel_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's blocks, in order: the modules that carry a cache from segment to segment."""
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no `layers`: context parallelism needs the model's block list")
    return list(blocks)


def apply_context_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """Hook every block so that it takes its incoming cache from CP rank r-1 and hands its cache to rank r+1."""
    link = _Link()
    for block_id, block in enumerate(context_parallel_blocks(model)):
        pre_hook, post_hook = _hooks(link, block_id)
        block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        block.register_forward_hook(post_hook, with_kwargs=True)
    model.cross_entropy = _label_weighted(model.cross_entropy, link.group)
    return model


def _label_weighted(mean_loss, group):
    """Wrap a mean-over-valid-labels loss so that the CP ranks' losses, averaged over CP as the gradient reduction
    and the logged loss average them, give the mean over every valid label of the whole sequence, however
    unevenly ignored (-100) labels fall across the segments: rank r returns sum_r · cp / N with N counted over CP."""
    cp = dist.get_world_size(group)

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        count = (labels != -100).sum()
        total = count.detach().clone()
        dist.all_reduce(total, group=group)
        # A segment with no valid label would make the mean 0/0 (NaN, in its gradient too): give it one dummy
        # label and a weight of 0 instead, without a host sync.
        dummy = labels.clone().flatten()
        dummy[0] = 0
        safe = torch.where(count > 0, labels, dummy.view_as(labels))
        return mean_loss(logits, safe) * count * cp / total.clamp(min=1)

    return loss
