"""Checkpoints: DeepSpeed's engine state plus our per-rank client state, checksummed, published by replacing `latest`.

Layout under `<run>/checkpoints/`: one folder per tag (`step_00000100/`) holding DeepSpeed's files, `client_rank<r>.pt`
(data position, RNG states, counters: they differ per rank), the run's `config.yaml` and its data's tokenizer, and
`manifest.json` (integrity.py: every file's size and CRC-32, written after all of them), plus a `latest` file naming
the newest published tag (DeepSpeed's own format, so its tools read it too). A save writes its files, then the
manifest, then `latest`; a kill at any point leaves the previous tag published and intact. A tag resumed under
another data-parallel size also holds `universal/`, its DeepSpeed universal conversion (resize.py), outside the
manifest. Only the last `keep_last` published tags are kept.

Loading picks the newest published tag that verifies (`newest_intact`): a damaged or incomplete checkpoint is never
loaded, and the ones skipped are reported by the caller.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from atlas_train.cli_errors import one_line
from atlas_train.train.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from atlas_train.train.distributed import any_rank
from atlas_train.train.integrity import (
    IntegrityError,
    check_files,
    checksums,
    listed_files,
    read_manifest,
    write_manifest,
)

TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL = "universal"  # sub-folder of a tag dir holding its universal conversion
# A tokenizer keeps the name atlas-prep gave it in the dataset, in checkpoints and exports: a sentencepiece model, or
# a Hugging Face tokenizer.json (a JSON file under the other name would mislead any tool that opens it by its name).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def tokenizer_in(folder: Path) -> Optional[Path]:
    """The tokenizer a checkpoint tag or an export holds, or None."""
    return next((folder / name for name in TOKENIZER_FILES if (folder / name).is_file()), None)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, damaged or does not match this run (reported as one line)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj) -> list:
    """`obj` of every rank, in rank order (just [obj] without a process group)."""
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def read_latest(ckpt_dir: str | Path) -> Optional[str]:
    """The tag named by `latest`, or None when no checkpoint has been published."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text(errors="replace").strip()
    if not TAG_RE.match(tag) or not (Path(ckpt_dir) / tag).is_dir():
        raise CheckpointError(f"{latest} names {tag!r}, but {Path(ckpt_dir) / tag} does not exist")
    return tag


def verify_checkpoint(tag_dir: str | Path) -> Optional[str]:
    """Why the checkpoint in `tag_dir` must not be loaded (one line naming the file), or None when it is complete
    and intact. Collective under a process group: each rank checks a share of the files, all get the answer."""
    rank, world = _world()
    try:
        files = read_manifest(tag_dir)
        names = sorted(files)[rank::world]
        mine = check_files(tag_dir, {n: files[n] for n in names})
    except IntegrityError as err:
        mine = [str(err)]
    problems = [p for share in _all_gather(mine) for p in share]
    return problems[0] if problems else None


def newest_intact(ckpt_dir: str | Path) -> tuple[Optional[str], list[str]]:
    """(the newest published tag that verifies, or None; why each newer published tag was skipped).

    Published means named by `latest` or older: a tag beyond it is a save that had not finished. When `latest`
    itself is damaged every tag is a candidate. No `latest` means nothing was published: (None, []).
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "latest").exists():
        return None, []
    tags = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)), reverse=True)
    skipped = []
    try:
        latest = read_latest(ckpt_dir)
        tags = [t for t in tags if t <= latest]
    except CheckpointError as err:
        skipped.append(str(err))
    for tag in tags:
        problem = verify_checkpoint(ckpt_dir / tag)
        if problem is None:
            return tag, skipped
        skipped.append(problem)
    return None, skipped


class CheckpointManager:
    def __init__(self, ckpt_dir: str | Path, keep_last: int, rank: int):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank

    def save(self, engine, step: int, client_state: dict, files: dict[str, bytes]) -> str:
        """Save engine + this rank's client state (+ rank 0's `files`, name -> bytes) as tag_for(step), checksum
        every file into the tag's manifest, then publish it through `latest`.

        A leftover folder of the same tag (an interrupted save, or a damaged checkpoint a resume skipped) is
        removed first. A failed write (a full disk, an unwritable folder) raises CheckpointError on every rank.
        """
        tag = tag_for(step)
        tag_dir = self.dir / tag

        def clear() -> None:
            if self.rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tag_dir, ignore_errors=True)

        def write() -> None:
            engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
            atomic_write(tag_dir / f"client_rank{self.rank}.pt", lambda f: torch.save(client_state, f))
            if self.rank == 0:
                for name, data in files.items():
                    atomic_write_bytes(tag_dir / name, data)

        # Each phase ends in an all-reduce of "did it fail here": a barrier, and every rank stops together.
        for phase in (clear, write, lambda: self._write_manifest(tag_dir)):
            error = None
            try:
                phase()
            except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
                error = err
            if any_rank(error is not None)[0]:
                self._save_failed(tag_dir, error)
        if self.rank == 0:
            atomic_write_text(self.dir / "latest", tag + "\n")
            self._prune(keep=tag)
        _barrier()
        return tag

    def _save_failed(self, tag_dir: Path, error: Optional[BaseException]) -> None:
        """Drop the unfinished tag (it was never published; this frees the space a full disk needs) and raise."""
        _barrier()
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        try:
            free = f" ({shutil.disk_usage(self.dir.parent).free / 2**30:.1f} GiB free there)"
        except OSError:
            free = ""
        reason = one_line(error) if error is not None else "another rank could not write its files"
        raise CheckpointError(f"could not write checkpoint {tag_dir}: {reason}{free}; the checkpoints saved before "
                              "it are intact") from error

    def _write_manifest(self, tag_dir: Path) -> None:
        """Each rank checksums a share of the tag's files; rank 0 writes the manifest of them all."""
        rank, world = _world()
        names = listed_files(tag_dir, skip=frozenset({UNIVERSAL})) if rank == 0 else None
        if world > 1:
            box = [names]
            dist.broadcast_object_list(box, src=0)
            names = box[0]
        shares = _all_gather(checksums(tag_dir, names[rank::world]))
        if rank == 0:
            write_manifest(tag_dir, {name: entry for share in shares for name, entry in share.items()})

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
