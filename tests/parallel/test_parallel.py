"""Single-process checks of the parallel plan: config keys, the no-op plan training always goes through, batch
splitting and its errors. Multi-process equivalence lives in test_parallel_dist.py."""

from __future__ import annotations

import pytest
import torch

from atlas_train.config import ConfigError, load_config
from atlas_train.parallel import ParallelConfig, setup_parallel


def test_config_section_and_validation():
    overrides = ["parallel.tensor_parallel=2", "parallel.context_parallel=4", "parallel.sequence_parallel=true"]
    cfg = load_config([], overrides)
    assert cfg.parallel == ParallelConfig(tensor_parallel=2, context_parallel=4, sequence_parallel=True)
    with pytest.raises(ConfigError, match="parallel.pipeline: unknown key"):
        load_config([], ["parallel.pipeline=2"])
    with pytest.raises(ConfigError, match="sequence_parallel needs tensor_parallel > 1"):
        load_config([], ["parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="context_parallel must be >= 1"):
        load_config([], ["parallel.context_parallel=0"])


def test_single_process_plan_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plan = setup_parallel(ParallelConfig())
    assert (plan.dp_rank, plan.dp_size, plan.tp_size, plan.cp_size, plan.mpu) == (0, 1, 1, 1, None)
    model = torch.nn.Linear(3, 3)
    assert plan.parallelize(model) is model
    tokens = torch.arange(2 * 9).view(2, 9)
    doc_start = tokens % 4 == 0
    batch = plan.shard_batch({"tokens": tokens, "doc_start": doc_start})
    assert torch.equal(batch["input_ids"], tokens[:, :-1])
    assert torch.equal(batch["labels"], tokens[:, 1:])
    assert torch.equal(batch["doc_start"], doc_start[:, :-1])
    assert plan.loss_for_logging(torch.tensor(2.5, requires_grad=True)) == 2.5


def test_context_parallel_segments(monkeypatch):
    # shard_batch's arithmetic without process groups: a plan placed by hand at CP rank 2 of 4.
    plan = setup_parallel(ParallelConfig())
    plan.cp_rank, plan.cp_size, plan.chunk_size = 2, 4, 2
    tokens = torch.arange(2 * 17).view(2, 17)
    batch = plan.shard_batch({"tokens": tokens, "doc_start": tokens % 3 == 0})
    assert torch.equal(batch["input_ids"], tokens[:, 8:12])
    assert torch.equal(batch["labels"], tokens[:, 9:13])
    plan.chunk_size = 3
    with pytest.raises(ConfigError, match="multiple of chunk_size 3"):
        plan.shard_batch({"tokens": tokens, "doc_start": tokens > 0})


def test_world_size_must_split_into_model_parallel_groups(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tensor_parallel 2"):
        setup_parallel(ParallelConfig(tensor_parallel=2))


def test_sequence_parallel_without_cuda_is_a_clear_error(monkeypatch):
    def no_cuda():
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="sequence_parallel needs CUDA"):
        setup_parallel(ParallelConfig(tensor_parallel=2, sequence_parallel=True))
