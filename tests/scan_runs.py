"""A small memory_scan run for the tests that stand a kernel in for a PyTorch step of the scan: the results to compare
with and without the kernel."""

import torch

from atlas_train.ops import memory_scan


def two_call_scan(update: str, *, length: int, reset_at: int, ns_steps: int = 2, gated: bool = False,
                  forward_done=lambda: None) -> list:
    """y, the final state's float tensors and the gradients of every input and parameter of two scan calls (float64,
    chunk 4, window 3, split at token 6, so mid-chunk; a document starting at `reset_at` in the second row), under a
    fixed random upstream gradient plus the sum of the final state; `forward_done()` is called between the forward
    calls and the backward."""
    gen = torch.Generator().manual_seed(5)
    batch, heads, dim, dv, hid, window = 2, 2, 6, 4, 9, 3

    def rand(*shape, low=None, high=None):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) if low is None else (
            low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64))
        return t.requires_grad_()

    params = {"W1": rand(heads, dv, hid) * 0.3, "W2": rand(heads, hid, dim) * 0.3}
    if gated:
        params["W3"] = rand(heads, hid, dim) * 0.3
    tensors = dict(zq=rand(batch, length, heads, dim), zk=rand(batch, length, heads, dim),
                   v=rand(batch, length, heads, dv), alpha=rand(batch, length, heads, low=0.8, high=1.0),
                   eta=rand(batch, length, heads, low=0.0, high=0.2),
                   theta=rand(batch, length, heads, low=0.0, high=0.9),
                   gamma=rand(batch, length, heads, window, low=0.0, high=1.0))
    doc_start = torch.zeros(batch, length, dtype=torch.bool)
    doc_start[1, reset_at] = True
    split, options = 6, dict(chunk_size=4, ns_steps=ns_steps, update=update)
    y1, state = memory_scan(**{k: t[:, :split] for k, t in tensors.items()}, params=params,
                            doc_start=doc_start[:, :split], **options)
    y2, state = memory_scan(**{k: t[:, split:] for k, t in tensors.items()}, params=params,
                            doc_start=doc_start[:, split:], state=state, **options)
    forward_done()
    y = torch.cat([y1, y2], dim=1)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(11), dtype=y.dtype)
    carried = sum(t.sum() for t in state.values() if t.is_floating_point())
    leaves = list(tensors.values()) + list(params.values())
    grads = torch.autograd.grad((y * upstream).sum() + carried, leaves)
    return [y.detach(), *(t.detach() for t in state.values() if t.is_floating_point()), *grads]
