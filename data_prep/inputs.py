"""Find the input files and read documents out of them, counting (not failing on) bad UTF-8 and bad JSON lines.

Formats: `.txt` (one document per file, or per blank-line-separated block with `txt_docs="blank-line"`),
`.jsonl` (one JSON object per line, its `text_field` string is the document), `.parquet` (a `text_field`
column) and a Hugging Face dataset saved with `save_to_disk` (a folder, read with `datasets.load_from_disk`; its
`text_field` column). `.txt` and `.jsonl` may be compressed as `.gz`, `.xz` or `.zst`. Inputs are read in sorted
path order so that the same inputs always give the same document sequence.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import lzma
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import pyarrow.parquet as pq
import zstandard

from atlas_train.data_prep.errors import PrepError
from atlas_train.data_prep.zst_file import ZstFile

SUFFIXES = (".txt", ".txt.gz", ".txt.xz", ".txt.zst", ".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst", ".parquet")
HF_DATASET = "hf-dataset"  # the kind of a folder that `Dataset.save_to_disk` wrote
MAX_REPORTED = 5  # bad JSON lines named in the warning; the rest are only counted


def _kind(path: Path) -> str | None:
    if path.is_dir():
        return HF_DATASET if (path / "state.json").is_file() and (path / "dataset_info.json").is_file() else None
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def find_inputs(specs: list[str]) -> list[Path]:
    """Files named directly, found under folders (recursively) or matched by globs; sorted, without repeats."""
    found: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            if _kind(path) is None:
                raise PrepError(f"{spec}: unsupported input type (expected one of {', '.join(SUFFIXES)})")
            found.add(path)
        elif path.is_dir() and _kind(path) == HF_DATASET:
            found.add(path)
        elif path.is_dir() and (path / "dataset_dict.json").is_file():
            splits = ", ".join(sorted(p.name for p in path.iterdir() if _kind(p) == HF_DATASET))
            raise PrepError(f"{spec}: a Hugging Face DatasetDict (splits: {splits}); give one split's folder, "
                            f"e.g. {path / 'train'}")
        elif path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and _kind(p))
        else:
            matches = [Path(m) for m in glob.glob(spec, recursive=True)]
            if not matches:
                raise PrepError(f"input not found: {spec}")
            found.update(p for p in matches if p.is_file() and _kind(p))
    if not found:
        raise PrepError(f"no input files of a supported type ({', '.join(SUFFIXES)}) in: {' '.join(specs)}")
    return sorted(found)


@dataclass
class InputStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    invalid_utf8_bytes: int = 0
    bad_json_lines: int = 0
    bad_json_where: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        out = []
        if self.invalid_utf8_bytes:
            out.append(f"{self.invalid_utf8_bytes} invalid UTF-8 bytes were replaced by U+FFFD")
        if self.bad_json_lines:
            where = ", ".join(self.bad_json_where) + (" ..." if self.bad_json_lines > MAX_REPORTED else "")
            out.append(f"{self.bad_json_lines} malformed JSON lines were skipped ({where})")
        return out


def _open(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(ZstFile(path), buffer_size=1 << 20)
    return open(path, "rb")


def _decode(raw: bytes, stats: InputStats) -> str:
    stats.bytes += len(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_bytes += len(raw) - len(raw.decode("utf-8", "ignore").encode("utf-8"))
        return raw.decode("utf-8", "replace")


def _txt_documents(f: IO[bytes], txt_docs: str, stats: InputStats) -> Iterator[str]:
    if txt_docs == "file":
        yield _decode(f.read(), stats)
        return
    block: list[str] = []
    for raw in f:
        line = _decode(raw, stats)
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\r\n")
            block = []
    if block:
        yield "".join(block).rstrip("\r\n")


def _jsonl_documents(f: IO[bytes], path: Path, text_field: str, stats: InputStats) -> Iterator[str]:
    for number, raw in enumerate(f, 1):
        line = _decode(raw, stats)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record[text_field] if isinstance(record, dict) else None
        except (json.JSONDecodeError, KeyError):
            text = None
        if not isinstance(text, str):
            stats.bad_json_lines += 1
            if len(stats.bad_json_where) < MAX_REPORTED:
                stats.bad_json_where.append(f"{path}:{number}")
            continue
        yield text


def _parquet_documents(path: Path, text_field: str, stats: InputStats) -> Iterator[str]:
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise PrepError(f"{path}: no column {text_field!r} (has: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                stats.bytes += len(text)
                yield text


def _hf_dataset_documents(path: Path, text_field: str, stats: InputStats) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise PrepError(f"{path}: reading a Hugging Face dataset needs the datasets package "
                        "(pip install 'atlas-train[hf]')") from None
    dataset = datasets.load_from_disk(str(path))
    if text_field not in dataset.column_names:
        raise PrepError(f"{path}: no column {text_field!r} (has: {', '.join(dataset.column_names)})")
    for batch in dataset.select_columns([text_field]).with_format("arrow").iter(batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                stats.bytes += len(text)
                yield text


def iter_documents(files: list[Path], txt_docs: str, text_field: str, stats: InputStats) -> Iterator[str]:
    """Every non-empty document of every file, in order; a file that cannot be read is a PrepError naming it."""
    for path in files:
        stats.files += 1
        kind = _kind(path)
        try:
            with ExitStack() as stack:
                if kind == ".parquet":
                    docs = _parquet_documents(path, text_field, stats)
                elif kind == HF_DATASET:
                    docs = _hf_dataset_documents(path, text_field, stats)
                elif kind.startswith(".txt"):
                    docs = _txt_documents(stack.enter_context(_open(path)), txt_docs, stats)
                else:
                    docs = _jsonl_documents(stack.enter_context(_open(path)), path, text_field, stats)
                for doc in docs:
                    if doc:
                        stats.documents += 1
                        yield doc
        except (OSError, EOFError, lzma.LZMAError, zlib.error, zstandard.ZstdError, ValueError) as err:
            raise PrepError(f"{path}: cannot read ({err.__class__.__name__}: {err})") from None
