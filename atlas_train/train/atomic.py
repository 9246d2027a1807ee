"""Atomic file writes: write a temp file beside the target, fsync, then os.replace, so readers never see half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_via(path: str | Path, write_file: Callable[[Path], None]) -> None:
    """Let `write_file(temp path)` fill a temp file in path's folder (for writers that only take a file name), then
    give it the usual mode, fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_file(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide shards and results from the rest of a team
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call `write(fileobj)` on a temp file in path's folder, then rename it over `path`."""

    def fill(tmp: Path) -> None:
        with open(tmp, mode) as f:
            write(f)

    atomic_write_via(path, fill)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))
