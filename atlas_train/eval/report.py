"""Evaluation results for people and for programs: a plain-text table, and JSON written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from atlas_train.train.atomic import atomic_write_text


def format_table(headers: list[str], rows: list[list]) -> str:
    """Columns padded to their widest cell; floats with 4 significant digits, None as '-'."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in text)])


def write_json(path: str | Path, results: dict) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    return path
