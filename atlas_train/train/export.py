"""Export: a run's checkpoint as one fp32 `model.safetensors` + `config.yaml` + `tokenizer.model`, DeepSpeed-free.

ZeRO 1-3 checkpoints hold the fp32 master weights partitioned over ranks; DeepSpeed's zero_to_fp32 gathers them
offline (no process group needed). ZeRO 0 keeps whole weights in the model-states file. The exported weights are
loaded into a freshly built model with strict key checking before they are written, so an export that would not
load is never produced.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from atlas_train.config import load_config
from atlas_train.train.atomic import atomic_write_bytes
from atlas_train.train.checkpoint import CheckpointError, read_latest


def consolidated_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of checkpoint `tag`, whatever ZeRO stage wrote it."""
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # its progress chatter; errors still raise
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def _default_build_model(model_cfg):
    from atlas_train.model import build_model

    return build_model(model_cfg)


def export(run_dir: str | Path, out_dir: str | Path, *, build_model: Optional[Callable] = None, config_cls=None) -> Path:
    """Write the latest checkpoint of `run_dir` into `out_dir`; returns out_dir."""
    from safetensors.torch import save_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir not found: {run_dir}")
    tag = read_latest(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"{run_dir} has no checkpoint ({ckpt_dir / 'latest'} does not exist)")
    tag_dir = ckpt_dir / tag
    cfg = load_config([tag_dir / "config.yaml"], cls=config_cls)
    tp = getattr(getattr(cfg, "parallel", None), "tensor_parallel", 1)
    if tp > 1:  # each TP rank's files hold its shard of the heads and vocabulary; merging them is not written yet
        raise CheckpointError(
            f"{tag_dir} was written with parallel.tensor_parallel={tp}: export of tensor-parallel checkpoints is "
            "not supported yet (train with tensor_parallel=1, or with context/data parallelism only, to export)"
        )
    model = (build_model or _default_build_model)(cfg.model)
    state = consolidated_state_dict(ckpt_dir, tag, cfg.train.zero_stage)
    model.load_state_dict(state, strict=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".model.safetensors.{os.getpid()}.tmp"
    save_model(model.float(), str(tmp))  # handles tied weights (one stored copy)
    os.replace(tmp, out_dir / "model.safetensors")  # atomic: a reader sees the old file or the whole new one
    atomic_write_bytes(out_dir / "config.yaml", (tag_dir / "config.yaml").read_bytes())
    if (tag_dir / "tokenizer.model").is_file():
        atomic_write_bytes(out_dir / "tokenizer.model", (tag_dir / "tokenizer.model").read_bytes())
    return out_dir


def load_exported(path: str | Path, *, build_model: Optional[Callable] = None, config_cls=None):
    """(model in eval mode, fp32; the run's resolved config; tokenizer.model path or None) of an export dir."""
    from safetensors.torch import load_model

    path = Path(path)
    cfg = load_config([path / "config.yaml"], cls=config_cls)
    model = (build_model or _default_build_model)(cfg.model)
    load_model(model, str(path / "model.safetensors"), strict=True)
    tokenizer = path / "tokenizer.model"
    return model.eval(), cfg, tokenizer if tokenizer.is_file() else None
