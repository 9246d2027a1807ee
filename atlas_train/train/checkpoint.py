"""Checkpoints: DeepSpeed's engine state plus our per-rank client state, published by replacing `latest` last.

Layout under `<run>/checkpoints/`: one folder per tag (`step_00000100/`) holding DeepSpeed's files, `client_rank<r>.pt`
(data position, RNG states, counters: they differ per rank) and the run's `config.yaml` and `tokenizer.model`, plus
a `latest` file naming the newest complete tag (DeepSpeed's own format, so its tools read it too). A crash while
saving leaves `latest` on the previous tag; only the last `keep_last` published tags are kept. A tag resumed under
another data-parallel size also holds `universal/`, its DeepSpeed universal conversion (made by resize.py).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from atlas_train.train.atomic import atomic_write, atomic_write_bytes, atomic_write_text

TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL = "universal"  # sub-folder of a tag dir holding its universal conversion


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match this run (reported as one line)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def read_latest(ckpt_dir: str | Path) -> Optional[str]:
    """The tag named by `latest`, or None when no checkpoint has been published."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise CheckpointError(f"{latest} names {tag!r}, but {Path(ckpt_dir) / tag} does not exist")
    return tag


class CheckpointManager:
    def __init__(self, ckpt_dir: str | Path, keep_last: int, rank: int):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank

    def save(self, engine, step: int, client_state: dict, files: dict[str, bytes]) -> str:
        """Save engine + this rank's client state (+ rank 0's `files`, name -> bytes) as tag_for(step); publish it."""
        tag = tag_for(step)
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        tag_dir = self.dir / tag
        atomic_write(tag_dir / f"client_rank{self.rank}.pt", lambda f: torch.save(client_state, f))
        if self.rank == 0:
            for name, data in files.items():
                atomic_write_bytes(tag_dir / name, data)
        _barrier()  # every rank's files are on disk before `latest` may name them
        if self.rank == 0:
            atomic_write_text(self.dir / "latest", tag + "\n")
            self._prune(keep=tag)
        _barrier()
        return tag

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
        published = [t for t in tags if t <= keep]
        for tag in published[: -self.keep_last]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)

    def read_client(self, tag: str, rank: Optional[int] = None) -> dict:
        """Client state of `tag` written by `rank` (default: this rank); read before the engine, to check the run."""
        client_path = self.dir / tag / f"client_rank{self.rank if rank is None else rank}.pt"
        if not client_path.is_file():
            raise CheckpointError(f"{client_path} is missing: the checkpoint is incomplete")
        return torch.load(client_path, weights_only=False)

    def load_engine(self, engine, tag: str, universal: bool = False) -> None:
        """Restore weights and optimizer moments from `tag` (the LR schedule follows from the step).

        `universal`: from the tag's DeepSpeed universal conversion (a resume under another data-parallel size).
        """
        if universal:
            load_dir, load_tag = self.dir / tag, UNIVERSAL
        else:
            load_dir, load_tag = self.dir, tag
        load_path, _ = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {load_dir / load_tag}")
