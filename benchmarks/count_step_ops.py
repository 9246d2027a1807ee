"""Operators one optimizer step of the DeepSpeed engine dispatches (each a kernel launch on a GPU), on CPU.

The optimizer phase of a training step is launch-bound at these sizes: its cost follows the number of parameter
tensors, not their size. This counts the operators of `engine.step()` for a model of the given
depth made narrow (the same tensors as the full width, so the same count, in seconds on a CPU), with the project's
DeepSpeed config in bf16, against the same config with DeepSpeed's per-gradient overflow check switched back on
(the baseline).

    python benchmarks/count_step_ops.py                 # 24 layers (the 340M's depth), ZeRO-1
    python benchmarks/count_step_ops.py --zero-stage 2
"""

from __future__ import annotations

import argparse
import collections
import os
import socket

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Operators by name (views included: they launch nothing but are few here)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def step_ops(layers: int, zero_stage: int, check_grad_overflow: bool) -> tuple[int, int, collections.Counter]:
    """(parameter tensors, operators of the second engine.step(), by name) for a narrow transformer."""
    import deepspeed

    from atlas_train.model import ModelConfig, build_model
    from atlas_train.train.config import TrainConfig
    from atlas_train.train.deepspeed_config import build_deepspeed_config
    from atlas_train.train.optim import build_optimizer, follow_global_grad_norm

    torch.manual_seed(0)
    model = build_model(ModelConfig(mixer="transformer", vocab_size=256, d_model=64, n_layers=layers, n_heads=2,
                                    mlp_hidden=128, max_seq_len=32))
    cfg = TrainConfig(micro_batch_size=2, grad_accum=1, zero_stage=zero_stage, precision="bf16")
    config = build_deepspeed_config(cfg)
    config["bf16"]["check_grad_overflow"] = check_grad_overflow
    optimizer = build_optimizer(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    follow_global_grad_norm(optimizer, engine)  # as the trainer wires them
    ids = torch.randint(0, 256, (2, 33))
    for _ in range(2):  # the second step, once DeepSpeed has made its buffers
        engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]).loss)
        with OpCounter() as counter:
            engine.step()
    deepspeed.comm.destroy_process_group()
    return len(list(model.parameters())), sum(counter.counts.values()), counter.counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--zero-stage", type=int, default=1)
    args = p.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    rows = []
    for label, check in (("DeepSpeed's per-gradient check (baseline)", True), ("the project's config", False)):
        tensors, total, counts = step_ops(args.layers, args.zero_stage, check)
        top = ", ".join(f"{name} {n}" for name, n in counts.most_common(4))
        rows.append(f"{label:<42} {total:>9} {total / tensors:>10.1f}   {top}")
    print(f"engine.step() operators: {args.layers} layers, {tensors} parameter tensors, ZeRO-{args.zero_stage}, bf16")
    print(f"{'config':<42} {'operators':>9} {'per tensor':>10}   most frequent")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
