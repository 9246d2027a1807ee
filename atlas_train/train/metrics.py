"""Per-step metrics to tensorboard (`tb/`), `metrics.jsonl` (one JSON object per line) and, when the run's config
sets `train.wandb.project`, Weights & Biases; rank 0 only.

On resume the first two are cut back to the checkpoint's step, so a requeued run's curves show each step once; the
wandb run is continued under the id kept in `wandb_run_id` (wandb drops the steps it already has).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from pathlib import Path

import yaml

from atlas_train.train.atomic import atomic_write_text

WANDB_ID_FILE = "wandb_run_id"


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def start_wandb(run_dir: Path, resume_step: int):
    """The wandb run the run's config.yaml asks for (train.wandb), or None: not asked for, or wandb is missing."""
    from atlas_train.config import build_dataclass
    from atlas_train.train.config import WandbConfig

    config_path = run_dir / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    settings = build_dataclass(WandbConfig, (config.get("train") or {}).get("wandb") or {}, "train.wandb")
    if not settings.project:
        return None
    try:
        import wandb
    except ImportError:
        print("atlas-train: warning: train.wandb.project is set but wandb is not installed (pip install wandb); "
              "logging to tensorboard and metrics.jsonl only", file=sys.stderr)
        return None
    id_path = run_dir / WANDB_ID_FILE
    if resume_step and id_path.is_file():
        run_id = id_path.read_text().strip()
    else:
        run_id = secrets.token_hex(6)  # wandb run ids: lowercase letters and digits
        atomic_write_text(id_path, run_id + "\n")
    return wandb.init(project=settings.project, entity=settings.entity, name=settings.name or run_dir.resolve().name,
                      mode=settings.mode, tags=settings.tags or None, config=config, id=run_id, resume="allow",
                      dir=os.environ.get("WANDB_DIR", str(run_dir)))


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step:
            _truncate_jsonl(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
        self._file = self.path.open("a")
        self._wandb = start_wandb(Path(run_dir), resume_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in values.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), step)
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in values.items()}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
