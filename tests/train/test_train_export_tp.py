"""Export of a tensor-parallel run: a TP=2 gloo training run of a tiny AtlasLM, exported to one model whose logits
(single process) equal the TP model's own logits (gathered over the vocabulary shards) after training."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from atlas_train.train.distributed import shutdown_distributed
from torchrun_helper import run_under_torchrun

VOCAB, SEQ = 32, 16


def _overrides(root: Path, tie: bool) -> list[str]:
    return [
        "model.mixer=atlas", f"model.vocab_size={VOCAB}", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
        "model.mlp_hidden=32", f"model.max_seq_len={SEQ}", "model.chunk_size=8", "model.memory_expansion=2",
        f"model.tie_embeddings={str(tie).lower()}", "parallel.tensor_parallel=2",
        f"train.out_dir={root / f'run_tie{int(tie)}'}", "train.steps=2", f"train.seq_len={SEQ}",
        "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_every=0", "train.save_every=0",
        "train.progress=false", "train.precision=fp32", "train.zero_stage=1", "train.lr=1.0e-2",
        "train.synthetic_data=true",
    ]


def _probe_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def _tp_worker(root: str) -> None:
    """Rank r of the TP=2 job: train, then write the trained TP model's full-vocabulary logits (rank 0)."""
    import deepspeed.comm.torch as ds_comm_torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from atlas_train.config import load_config
    from atlas_train.train.trainer import default_builders, train
    from megatron_cpu import apply_megatron_cpu_patches

    ds_comm_torch.build_shm_op = lambda: None  # test-only: skip the ~20 s JIT build of DeepSpeed's CPU shm op
    apply_megatron_cpu_patches()
    for tie in (False, True):
        built = []
        builders = default_builders()
        model_builder = builders.model
        builders.model = lambda cfg: built.append(model_builder(cfg)) or built[-1]
        assert train(load_config([], _overrides(Path(root), tie)), builders) == 0
        model = built[-1].eval()  # parallelized in place; the engine trained these very parameters
        with torch.no_grad():
            part = model(_probe_ids()).logits.contiguous()
        parts = [torch.empty_like(part) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, part, group=ps.get_tensor_model_parallel_group())
        if dist.get_rank() == 0:
            torch.save(torch.cat(parts, -1), Path(root) / f"tp_logits_tie{int(tie)}.pt")
    Path(root, f"done_rank{os.environ['RANK']}").write_text(json.dumps(True))


@pytest.mark.slow
def test_export_of_a_tensor_parallel_run_gives_the_tp_models_logits(tmp_path):
    from atlas_train.train.export import export, load_exported

    run_under_torchrun(__file__, str(tmp_path))
    for tie in (False, True):
        run = tmp_path / f"run_tie{int(tie)}"
        layout = json.loads((run / "checkpoints" / "step_00000002" / "tp_layout.json").read_text())
        assert layout["embed.weight"] == 0 and any(dim == 1 for dim in layout.values())  # vocab and row splits seen
        model, cfg, _ = load_exported(export(run, tmp_path / f"export_tie{int(tie)}"))
        assert cfg.parallel.tensor_parallel == 2 and cfg.model.tie_embeddings == tie
        with torch.no_grad():
            logits = model(_probe_ids()).logits
        expected = torch.load(tmp_path / f"tp_logits_tie{int(tie)}.pt")
        assert logits.shape == (2, SEQ, VOCAB)
        # Same weights, same inputs; only the order of the row-parallel sums differs (fp32 rounding).
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        # The Hugging Face export merges the shards the same way.
        from transformers import AutoModelForCausalLM

        from atlas_train.hf.convert import export_hf

        hf_model = AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / f"hf_tie{int(tie)}"))
        with torch.no_grad():
            assert torch.equal(hf_model(_probe_ids()).logits, logits)


if __name__ == "__main__":
    _tp_worker(sys.argv[1])
    shutdown_distributed()
