"""Multi-process harness for the parallel tests: one job per world size runs several scenarios, because process
start-up (torch + megatron imports, group creation) costs more than the tiny models themselves.

Every scenario compares a parallel run with the single-process run of the same model from the same seed, which
each rank computes itself on the full batch (float64, tiny shapes).

On CPU the tests spawn gloo jobs (test_parallel_dist.py). On GPUs the same scenarios run over NCCL with megatron's
real CUDA paths (sequence parallelism included), one command per world size:
    torchrun --nproc_per_node 2 tests/parallel_worker.py      # or 4
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FAMILY = ["atlas", "atlas_pp", "omeganet", "titans", "dla", "transformer", "atlas_mag", "atlas_mal"]

# Per world size: (scenario function in this module, kwargs). DP = world / (tp * cp).
SCENARIOS = {
    2: [
        ("groups", dict(tp=2, cp=1)), ("groups", dict(tp=1, cp=2)), ("groups", dict(tp=1, cp=1)),
        ("equivalence", dict(mixers=FAMILY, tp=1, cp=2, sp=False)),
        ("equivalence", dict(mixers=["atlas"], tp=1, cp=2, sp=False, steps=3)),
        ("equivalence", dict(mixers=["transformer", "atlas", "atlas_mag", "atlas_mal"], tp=2, cp=1, sp=False)),
        ("equivalence", dict(mixers=["atlas_mag", "atlas_mal"], tp=2, cp=1, sp=True, steps=3)),
        ("equivalence", dict(mixers=["atlas", "atlas_mal"], tp=1, cp=2, sp=False, recompute=True)),
        ("equivalence", dict(mixers=["atlas"], tp=1, cp=2, sp=False, masked=True)),
        ("equivalence", dict(mixers=["atlas"], tp=1, cp=2, sp=False, steps=2, recompute=True, static_scan=True)),
    ],
    4: [
        ("groups", dict(tp=2, cp=2)), ("groups", dict(tp=1, cp=4)),
        ("equivalence", dict(mixers=["atlas", "atlas_mal"], tp=1, cp=4, sp=False)),
        ("equivalence", dict(mixers=["atlas_mag"], tp=2, cp=2, sp=False)),
        ("equivalence", dict(mixers=["atlas_mal"], tp=2, cp=2, sp=True, steps=2)),
        ("equivalence", dict(mixers=["atlas_mag"], tp=2, cp=2, sp=True, recompute=True)),
        ("equivalence", dict(mixers=["transformer"], tp=2, cp=2, sp=False, masked=True)),
        ("equivalence", dict(mixers=["atlas", "transformer"], tp=1, cp=2, sp=False, steps=3)),  # DP=2 x CP=2
    ],
}


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def spawn(world_size: int, scenarios: list[tuple[str, dict]]) -> None:
    """Run `scenarios` (name of a function in this module, kwargs) on `world_size` gloo processes."""
    port = free_port()
    mp.spawn(_worker, args=(world_size, port, scenarios), nprocs=world_size, join=True)


def _worker(rank: int, world_size: int, port: int, scenarios) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    _run(rank, world_size, scenarios)


def _run(rank: int, world_size: int, scenarios) -> None:
    from megatron_cpu import apply_megatron_cpu_patches

    apply_megatron_cpu_patches()  # no-op with CUDA
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world_size)
    try:
        for name, kwargs in scenarios:
            try:
                globals()[name](**kwargs)
            except Exception as err:
                trace = traceback.format_exc()
                raise AssertionError(f"rank {rank}: scenario {name}({kwargs}) failed:\n{trace}") from err
            dist.barrier()
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- scenarios
def groups(tp: int, cp: int) -> None:
    """The plan's ranks and sizes, and DeepSpeed's reduction group = every rank holding the same weights (DP×CP)."""
    from atlas_train.parallel import ParallelConfig, setup_parallel

    world = dist.get_world_size()
    plan = setup_parallel(ParallelConfig(tensor_parallel=tp, context_parallel=cp))
    assert (plan.tp_size, plan.cp_size, plan.dp_size) == (tp, cp, world // (tp * cp))
    mpu = plan.mpu
    assert mpu.get_data_parallel_world_size() == plan.dp_size * cp
    assert mpu.get_model_parallel_world_size() == tp
    # Ranks in my gradient-reduction group all have my TP rank; together they cover every (dp, cp) pair once.
    coords = torch.tensor([plan.tp_rank, plan.dp_rank, plan.cp_rank], device=_device())
    gathered = [torch.zeros_like(coords) for _ in range(mpu.get_data_parallel_world_size())]
    dist.all_gather(gathered, coords, group=mpu.get_data_parallel_group())
    assert {int(c[0]) for c in gathered} == {plan.tp_rank}
    assert sorted((int(c[1]), int(c[2])) for c in gathered) == [(d, c) for d in range(plan.dp_size) for c in range(cp)]
    # loss_for_logging averages over DP×CP.
    ranks = mpu.get_data_parallel_group_ranks()
    assert plan.loss_for_logging(torch.tensor(float(dist.get_rank()), device=_device())) == sum(ranks) / len(ranks)


def _tiny_config(mixer: str):
    from atlas_train.model import ModelConfig

    # Segments of 8 tokens = 2 chunks; the Omega window (3), conv (4) and SWA halo (5 keys) all cross segments.
    return ModelConfig(mixer=mixer, vocab_size=32, d_model=16, n_layers=2, n_heads=4, mlp_hidden=32,
                       memory_expansion=2, gate_rank=4, chunk_size=4, window=3, swa_window=6, max_seq_len=64,
                       ns_steps=None if mixer in ("titans", "dla", "omeganet") else 2)


def _reference_slice(plan, param, full: torch.Tensor) -> torch.Tensor:
    """The part of a full-model tensor that this rank's (possibly TP-sharded) parameter holds."""
    if getattr(param, "tensor_model_parallel", False):
        return full.chunk(plan.tp_size, param.partition_dim)[plan.tp_rank]
    return full


def equivalence(mixers: list[str], tp: int, cp: int, sp: bool, steps: int = 1, recompute: bool = False,
                masked: bool = False, static_scan: bool = False) -> None:
    """Parallel loss and gradients (after DeepSpeed's DP×CP averaging) equal the single-process run's, float64;
    with steps > 1, AdamW steps on both sides keep giving the same losses. recompute: activation checkpointing
    (its recomputation must not repeat the CP state exchange or the TP/SP collectives out of order). masked: ignored
    (-100) labels spread unevenly over the CP segments, one segment of one row fully masked. static_scan: the scan's
    chunks of the parallel model on static buffers (the CUDA-graph path without capture), the reference eager."""
    import copy

    from atlas_train.model import build_model
    from atlas_train.model.block import set_activation_checkpointing
    from atlas_train.ops.cuda_graphs import forced_scan_mode
    from atlas_train.parallel import ParallelConfig, setup_parallel

    plan = setup_parallel(ParallelConfig(tensor_parallel=tp, context_parallel=cp, sequence_parallel=sp))
    rows_per_rank = 2
    # megatron-core's vocab-parallel cross-entropy computes in float32 whatever the logits' dtype, so with TP the
    # comparison holds to float32 rounding; everything else runs in float64.
    loss_tol, rtol, atol = (1e-9, 1e-7, 1e-10) if tp == 1 else (1e-6, 1e-5, 1e-7)
    for mixer in mixers:
        torch.manual_seed(0)
        full = build_model(_tiny_config(mixer)).double().to(_device())
        set_activation_checkpointing(full, "full" if recompute else "none")
        reference = copy.deepcopy(full)
        model = plan.parallelize(copy.deepcopy(full))
        gen = torch.Generator().manual_seed(1)
        batch_size, length = rows_per_rank * plan.dp_size, 8 * cp
        tokens = torch.randint(0, 32, (batch_size, length + 1), generator=gen)
        doc_start = torch.rand(batch_size, length + 1, generator=gen) < 0.1
        doc_start[0, 8] = True  # a document starting exactly at a segment boundary
        doc_start[-1, 5 * cp] = True
        tokens, doc_start = tokens.to(_device()), doc_start.to(_device())
        rows = slice(plan.dp_rank * rows_per_rank, (plan.dp_rank + 1) * rows_per_rank)
        mine = plan.shard_batch({"tokens": tokens[rows], "doc_start": doc_start[rows]})
        whole = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "doc_start": doc_start[:, :-1]}
        if masked:
            ignore = torch.rand(whole["labels"].shape, generator=gen) < 0.3
            ignore[0, :8] = True  # row 0's first segment has no valid label at all
            whole["labels"] = whole["labels"].masked_fill(ignore.to(_device()), -100)
            mine = plan.shard_batch({key: value[rows] for key, value in whole.items()})
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        reduce_group = plan.mpu.get_data_parallel_group()
        for step in range(steps):
            with forced_scan_mode("0" if static_scan else None):
                ref_loss = reference(whole["input_ids"], whole["doc_start"], labels=whole["labels"]).loss
                ref_loss.backward()
            with forced_scan_mode("static" if static_scan else None):
                loss = model(mine["input_ids"], mine["doc_start"], labels=mine["labels"]).loss
                loss.backward()
            for param in model.parameters():
                dist.all_reduce(param.grad, group=reduce_group)
                param.grad /= dist.get_world_size(reduce_group)
            logged = plan.loss_for_logging(loss)
            assert abs(logged - ref_loss.item()) < loss_tol, (mixer, step, logged, ref_loss.item())
            if step == 0:
                ref_grads = dict(reference.named_parameters())
                for name, param in model.named_parameters():
                    expected = _reference_slice(plan, param, ref_grads[name].grad)
                    assert param.grad.shape == expected.shape, (mixer, name, param.grad.shape, expected.shape)
                    torch.testing.assert_close(param.grad, expected, rtol=rtol, atol=atol,
                                               msg=lambda m, n=name: f"{mixer} grad {n}: {m}")
            ref_opt.step()
            opt.step()
            ref_opt.zero_grad()
            opt.zero_grad()


if __name__ == "__main__":  # torchrun --nproc_per_node {2,4} tests/parallel_worker.py
    world = int(os.environ["WORLD_SIZE"])
    _run(int(os.environ["RANK"]), world, SCENARIOS[world])
    if int(os.environ["RANK"]) == 0:
        print(f"parallel equivalence on {world} x {_device().type}: all scenarios passed")
