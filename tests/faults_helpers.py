"""Shared by the fault tests: `atlas-train` runs of the loop tests' tiny model through the real CLI, damaged files,
and what a run leaves behind (its final weights and losses)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from atlas_train.train.checkpoint import read_latest
from atlas_train.train.cli import main
from tiny_training import BUILDERS, VOCAB

STEPS, SAVE_EVERY = 6, 2
def write_config(path: Path, out_dir: Path, **train) -> Path:
    """A run config of the tiny loop-test model: 6 steps, checkpoints every 2, each step 2 micro-batches."""
    settings = dict(out_dir=str(out_dir), steps=STEPS, seq_len=8, micro_batch_size=2, grad_accum=2, warmup_steps=2,
                    eval_every=3, eval_batches=2, save_every=SAVE_EVERY, keep_last=3, progress=False,
                    precision="fp32", zero_stage=1, lr=1e-2, **train)
    path.write_text(json.dumps({"model": {"vocab_size": VOCAB, "d_model": 16, "n_heads": 2}, "train": settings}))
    return path


@contextlib.contextmanager
def tiny_builders():
    """`atlas-train` builds the loop tests' TinyLM and synthetic loader instead of the real model and shards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("atlas_train.train.trainer.default_builders", lambda: BUILDERS)
        yield


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `atlas-train argv...` run in this process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The module weights of the run's published checkpoint."""
    ckpt = run_dir / "checkpoints"
    return torch.load(ckpt / read_latest(ckpt) / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def damage(path: Path, how: str) -> None:
    """`flip`: invert 16 bytes in the middle of the file; `truncate`: cut it to half its length."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))


def stopped_at(reference: Path, dest: Path, step: int) -> Path:
    """A copy of the finished `reference` run as it stood after the checkpoint of `step` (later ones removed)."""
    shutil.copytree(reference, dest)
    ckpt = dest / "checkpoints"
    for tag in ckpt.glob("step_*"):
        if int(tag.name.split("_")[1]) > step:
            shutil.rmtree(tag)
    (ckpt / "latest").write_text(f"step_{step:08d}\n")
    return dest
