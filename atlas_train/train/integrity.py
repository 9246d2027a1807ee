"""File checksums in a manifest written last: what makes a checkpoint or an export folder complete and intact.

A folder is complete exactly when its `manifest.json` exists (it is written after every file it names) and intact
when each named file has the recorded size and CRC-32. Readers verify before they load, so flipped or missing bytes
stop a load with the file named, instead of training on damaged weights or failing deep inside a deserializer.
CRC-32 rather than a cryptographic hash: the threat is damage (a torn write, a bad disk, a truncated copy), not
tampering, and it reads several times faster, which keeps verifying a multi-GB checkpoint short against saving it.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

from atlas_train.train.atomic import atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "atlas-train-checksums"
VERSION = 1
_BLOCK = 16 << 20  # read size; zlib releases the GIL on large buffers, so files hash in parallel threads


class IntegrityError(ValueError):
    """A folder that is incomplete (no manifest) or damaged (a file missing, of the wrong size or checksum); the
    message names the file."""


def file_checksum(path: str | Path) -> dict:
    """{"bytes": size, "crc32": 8 hex digits} of a file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def _threads(n: int) -> int:
    return max(1, min(n, os.cpu_count() or 1, 8))


def checksums(folder: str | Path, names: Iterable[str]) -> dict[str, dict]:
    """{name: file_checksum} for the files `names` (relative to `folder`), hashed in parallel."""
    names = list(names)
    with ThreadPoolExecutor(_threads(len(names))) as pool:
        return dict(zip(names, pool.map(lambda n: file_checksum(Path(folder) / n), names)))


def listed_files(folder: str | Path, skip: frozenset[str] = frozenset()) -> list[str]:
    """Every file under `folder` (relative, sorted) a manifest covers: not the manifest, hidden temp files, or the
    top-level entries named in `skip`."""
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (rel == Path(".") and d in skip)]
        out += [str(rel / f) if rel != Path(".") else f for f in files
                if not f.startswith(".") and not (rel == Path(".") and f in skip | {MANIFEST})]
    return sorted(out)


def write_manifest(folder: str | Path, files: dict[str, dict]) -> Path:
    """Write `<folder>/manifest.json` listing `files` ({name: file_checksum}); call it after they are all written."""
    target = Path(folder) / MANIFEST
    atomic_write_text(target, json.dumps({"format": FORMAT, "version": VERSION, "files": files}, indent=1,
                                         sort_keys=True) + "\n")
    return target


def read_manifest(folder: str | Path) -> dict[str, dict]:
    """The {name: checksum} a folder's manifest records; IntegrityError when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{path} is missing: the folder is incomplete (its save or copy did not finish)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT or raw.get("version") != VERSION:
            raise ValueError(f"not an {FORMAT} v{VERSION} manifest")
        files = {str(k): {"bytes": int(v["bytes"]), "crc32": str(v["crc32"])} for k, v in raw["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path} is damaged ({err.__class__.__name__}: {err})") from None
    return files


def check_file(folder: str | Path, name: str, expected: dict) -> Optional[str]:
    """Why `<folder>/<name>` does not match its manifest entry (one line naming the file), or None if it does."""
    path = Path(folder) / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path} is damaged: {size} bytes, the manifest records {expected['bytes']}"
    if file_checksum(path)["crc32"] != expected["crc32"]:
        return f"{path} is damaged: its CRC-32 does not match the manifest"
    return None


def check_files(folder: str | Path, files: dict[str, dict]) -> list[str]:
    """Problems of the manifest entries `files` (checked in parallel), in name order; empty when all match."""
    names = sorted(files)
    with ThreadPoolExecutor(_threads(len(names))) as pool:
        return [p for p in pool.map(lambda n: check_file(folder, n, files[n]), names) if p is not None]


def verify(folder: str | Path) -> None:
    """Raise IntegrityError naming the first incomplete or damaged file of `folder`."""
    problems = check_files(folder, read_manifest(folder))
    if problems:
        raise IntegrityError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
