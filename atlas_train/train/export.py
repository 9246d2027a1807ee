"""Export: a run's checkpoint as one fp32 `model.safetensors` + `config.yaml` + `tokenizer.model`, DeepSpeed-free.

ZeRO 1-3 checkpoints hold the fp32 master weights partitioned over ranks; DeepSpeed's zero_to_fp32 gathers them
offline (no process group needed). ZeRO 0 keeps whole weights in the model-states file. A tensor-parallel run writes
one such set per TP rank (`mp_rank_<t>` in the file names) plus `tp_layout.json`, the split dim of every parameter
taken from megatron's `partition_dim` attributes at save time: column-parallel weights, per-head parameters and the
vocab-parallel embedding/head are joined on dim 0, row-parallel weights on dim 1, replicated ones are taken once
(and must agree). megatron's vocab-parallel layers here need tensor_parallel to divide the vocabulary, so there is
no padding to drop. The exported weights are loaded into a freshly built model with strict key checking before they
are written, so an export that would not load is never produced.

Integrity both ways: the checkpoint is verified against its manifest before it is read (a run dir gives its newest
intact checkpoint, a named checkpoint folder must be intact), and the export folder gets a manifest of its own,
written last, that `load_exported` verifies.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from atlas_train.config import load_config
from atlas_train.train.atomic import atomic_write_bytes, atomic_write_via
from atlas_train.train.checkpoint import (
    TAG_RE,
    TOKENIZER_FILES,
    CheckpointError,
    newest_intact,
    tokenizer_in,
    verify_checkpoint,
)
from atlas_train.train.integrity import MANIFEST, checksums, verify, write_manifest


def consolidated_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of checkpoint `tag`, whatever ZeRO stage wrote it."""
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # its progress chatter; errors still raise
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        states = ckpt_dir / tag / "mp_rank_00_model_states.pt"
        state = torch.load(states, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


TP_LAYOUT = "tp_layout.json"  # {parameter name: split dim, or null when replicated}, written by TP>1 runs


def tp_layout(model: torch.nn.Module) -> dict[str, Optional[int]]:
    """Split dim of each parameter of a TP rank's model, from megatron's attributes (None: replicated); tied
    parameters are listed under each of their names, as state dicts list them."""
    return {
        name: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
        for name, p in model.named_parameters(remove_duplicate=False)
    }


def _tp_rank_state_dict(ckpt_dir: Path, tag: str, zero_stage: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's full fp32 state dict: its files seen, through links, as a checkpoint of a TP=1 run."""
    with tempfile.TemporaryDirectory(prefix="atlas_export_") as tmp:
        view = Path(tmp) / tag
        view.mkdir()
        own = f"mp_rank_{tp_rank:02d}"
        for path in (ckpt_dir / tag).glob(f"*{own}*"):
            (view / path.name.replace(own, "mp_rank_00")).symlink_to(path.resolve())
        return consolidated_state_dict(Path(tmp), tag, zero_stage)


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], layout: dict[str, Optional[int]]) -> dict[str, torch.Tensor]:
    """The full model's state dict from the TP ranks' state dicts (rank order), joined along each split dim.

    Only names every rank holds are merged: DeepSpeed lists a tied parameter's second name on some ranks only
    (`tie_aliases` restores it from the model).
    """
    merged = {}
    common = set.intersection(*(set(shard) for shard in shards))
    for name, first in shards[0].items():
        if name not in common:
            continue
        dim = layout.get(name)
        if dim is not None:
            merged[name] = torch.cat([shard[name] for shard in shards], dim)
            continue
        if not all(torch.equal(shard[name], first) for shard in shards[1:]):
            raise CheckpointError(f"replicated parameter {name} differs between tensor-parallel ranks")
        merged[name] = first
    return merged


def tie_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{second name of a tied parameter: its first name}, e.g. lm_head.weight -> embed.weight."""
    first_name, aliases = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.update({name: first_name[id(param)]} if id(param) in first_name else {})
        first_name.setdefault(id(param), name)
    return aliases


def _default_build_model(model_cfg):
    from atlas_train.model import build_model

    return build_model(model_cfg)


def find_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) that `path` names: a run dir gives its newest intact checkpoint (a line on stderr
    names any newer one skipped), one checkpoint's folder (`<run>/checkpoints/step_N`) must be intact itself."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"run dir not found: {path}")
    if TAG_RE.match(path.name):
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"{problem}; export the run dir {path.parent.parent} to take its newest intact "
                                  "checkpoint")
        return path.parent, path.name
    ckpt_dir = path / "checkpoints"
    tag, skipped = newest_intact(ckpt_dir)
    if tag is None:
        if skipped:
            raise CheckpointError(f"no intact checkpoint in {ckpt_dir}: {skipped[0]}")
        raise CheckpointError(f"{path} has no checkpoint ({ckpt_dir / 'latest'} does not exist)")
    if skipped:
        print(f"atlas-train export: warning: {skipped[0]}; exporting {ckpt_dir / tag} instead", file=sys.stderr)
    return ckpt_dir, tag


def checkpoint_model(run_dir: str | Path, *, build_model: Optional[Callable] = None, config_cls=None):
    """(model with the full fp32 weights of the checkpoint `run_dir` names (find_checkpoint), TP shards merged; the
    run's config; the checkpoint dir). The weights are loaded with strict key checking, so a model that would not
    load is refused."""
    ckpt_dir, tag = find_checkpoint(run_dir)
    tag_dir = ckpt_dir / tag
    cfg = load_config([tag_dir / "config.yaml"], cls=config_cls)
    tp = getattr(getattr(cfg, "parallel", None), "tensor_parallel", 1)
    model = (build_model or _default_build_model)(cfg.model)
    if tp > 1:
        if not (tag_dir / TP_LAYOUT).is_file():
            raise CheckpointError(f"{tag_dir} was written with parallel.tensor_parallel={tp} but has no {TP_LAYOUT}")
        layout = json.loads((tag_dir / TP_LAYOUT).read_text())
        shards = [_tp_rank_state_dict(ckpt_dir, tag, cfg.train.zero_stage, t) for t in range(tp)]
        state = merge_tp_shards(shards, layout)
        for alias, name in tie_aliases(model).items():
            state.setdefault(alias, state[name])
    else:
        state = consolidated_state_dict(ckpt_dir, tag, cfg.train.zero_stage)
    model.load_state_dict(state, strict=True)
    return model, cfg, tag_dir


def export(run_dir: str | Path, out_dir: str | Path, *, build_model: Optional[Callable] = None,
           config_cls=None) -> Path:
    """Write the checkpoint `run_dir` names (find_checkpoint) into `out_dir`; returns out_dir."""
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    model, _, tag_dir = checkpoint_model(run_dir, build_model=build_model, config_cls=config_cls)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the folder counts as incomplete until the new one is written
    # save_model handles tied weights (one stored copy); each file is replaced whole.
    atomic_write_via(out_dir / "model.safetensors", lambda tmp: save_model(model.float(), str(tmp)))
    atomic_write_bytes(out_dir / "config.yaml", (tag_dir / "config.yaml").read_bytes())
    written = ["model.safetensors", "config.yaml"]
    tokenizer = tokenizer_in(tag_dir)
    if tokenizer is not None:
        atomic_write_bytes(out_dir / tokenizer.name, tokenizer.read_bytes())
        written.append(tokenizer.name)
    for name in set(TOKENIZER_FILES) - set(written):
        (out_dir / name).unlink(missing_ok=True)  # an older export's, not this checkpoint's
    write_manifest(out_dir, checksums(out_dir, written))
    return out_dir


def load_exported(path: str | Path, *, build_model: Optional[Callable] = None, config_cls=None):
    """(model in eval mode, fp32; the run's resolved config; its tokenizer's path or None) of an export dir, whose
    files are verified against its manifest first (IntegrityError names a damaged or missing one)."""
    from safetensors.torch import load_model

    path = Path(path)
    verify(path)
    cfg = load_config([path / "config.yaml"], cls=config_cls)
    model = (build_model or _default_build_model)(cfg.model)
    load_model(model, str(path / "model.safetensors"), strict=True)
    return model.eval(), cfg, tokenizer_in(path)
