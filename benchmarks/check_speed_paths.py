"""GPU checks of the training speed paths against the plain ones, at a real shape, before timing them.

- fused linear + cross-entropy (liger-kernel) against logits + F.cross_entropy in float32: loss and gradients;
- SDPA's cuDNN backend against the flash backend (and both against float32 math), causal, forward and backward;
- torch.compile of a transformer block, and selective / full recompute, against the eager block without recompute.
Errors are the max |difference| over the max |reference|, in bf16 unless noted; the bound column is what each path
must stay within. Exits 1 when one does not.

    python benchmarks/check_speed_paths.py
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def check_fused_cross_entropy(rows: list) -> None:
    from atlas_train.train.speed import fused_linear_cross_entropy

    torch.manual_seed(0)
    n, d, vocab = 8 * 4096, 1024, 32000
    hidden = (torch.randn(n, d, device="cuda") * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, d, device="cuda") * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (n,), device="cuda")
    labels[::17] = -100
    loss = fused_linear_cross_entropy()(hidden, weight, labels)
    loss.backward()
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = F.cross_entropy(h32 @ w32.T, labels, ignore_index=-100)
    ref.backward()
    rows.append(("fused CE loss", rel_error(loss, ref), 1e-2))
    rows.append(("fused CE d hidden", rel_error(hidden.grad, h32.grad), 3e-2))
    rows.append(("fused CE d weight", rel_error(weight.grad, w32.grad), 3e-2))


def _attention(backend, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


def check_attention(rows: list) -> None:
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(8, 16, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    ref = _attention(SDPBackend.MATH, *(t.float() for t in (q, k, v)), grad.float())
    for name, backend in (("cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        got = _attention(backend, q, k, v, grad)
        for part, x, r in zip(("out", "dq", "dk", "dv"), got, ref):
            rows.append((f"SDPA {name} {part}", rel_error(x, r), 2e-2))


def check_block(rows: list) -> None:
    from atlas_train.model import ModelConfig
    from atlas_train.model.block import Block

    cfg = ModelConfig(mixer="transformer", vocab_size=32000, d_model=1024, n_layers=24, n_heads=16,
                      max_seq_len=4096).resolved()
    torch.manual_seed(0)
    eager = Block(cfg).cuda().bfloat16()
    x = torch.randn(4, 4096, 1024, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)

    def run(block):
        inp = x.detach().requires_grad_()
        out, _ = block(inp)
        out.backward(grad)
        return out, inp.grad, block.ffn.up_proj.weight.grad

    ref = run(eager)
    for name, mode, compiled in (("compiled", "none", True), ("selective", "selective", False),
                                 ("full", "full", False)):
        block = Block(cfg).cuda().bfloat16()
        block.load_state_dict(eager.state_dict())
        block.recompute = mode
        if compiled:
            block.compile()
        got = run(block)
        bound = 2e-2 if compiled else 1e-2  # recompute repeats the same kernels; atomics may reorder sums
        for part, a, b in zip(("out", "dx", "dW"), got, ref):
            rows.append((f"block {name} {part}", rel_error(a, b), bound))


def main() -> int:
    rows: list[tuple[str, float, float]] = []
    for check in (check_fused_cross_entropy, check_attention, check_block):
        try:
            check(rows)
        except Exception as err:  # report and go on: the other checks still tell something
            rows.append((f"{check.__name__} raised {type(err).__name__}: {err}"[:100], float("inf"), 0.0))
    print(f"{'check':<34} {'rel error':>10} {'bound':>8}  ok")
    failed = 0
    for name, err, bound in rows:
        ok = err <= bound
        failed += not ok
        print(f"{name:<34} {err:>10.2e} {bound:>8.0e}  {'yes' if ok else 'NO'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
