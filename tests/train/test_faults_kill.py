"""kill -9 at points of a run of the demo model, inside a checkpoint save too (between files, before and after
`latest` moves): `train.resume=auto` then ends at the weights and losses of an uninterrupted run.

The killed run is a subprocess (tests/fault_runner.py plants the SIGKILL); its resumption and the uninterrupted run
run in this process. One point is drawn at random from every write of a save, with a fixed seed so a failure
reproduces."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from atlas_train.data_prep.writer import write_dataset
from atlas_train.train.checkpoint import verify_checkpoint
from atlas_train.train.cli import main
from faults_helpers import (
    final_weights,
    losses,
    same_weights,
)
from process_group import LAUNCH_VARS
from repo_paths import REPO

SEQ, VOCAB = 32, 64
SAVE_FILES = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "client_rank0.pt",
              "config.yaml", "manifest.json", "latest"]
DRAWN = random.Random(21).choice([f"{when}:{name}@4" for when in ("before", "after") for name in SAVE_FILES])


def write_run_config(root: Path, data: Path, out_dir: Path) -> Path:
    """The demo model (configs/model/demo.yaml) for 6 steps at seq_len 32, checkpoints every 2 steps."""
    cfg = root / f"{out_dir.name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "defaults": [str(REPO / "configs" / "model" / "demo.yaml")],
        "model": {"vocab_size": "auto", "max_seq_len": SEQ},
        "data": {"path": str(data), "shuffle_buffer": 8, "num_workers": 0},
        "train": {"out_dir": str(out_dir), "steps": 6, "seq_len": SEQ, "micro_batch_size": 2, "warmup_steps": 1,
                  "lr": 3e-3, "eval_every": 0, "save_every": 2, "keep_last": 3, "progress": False,
                  "precision": "fp32", "zero_stage": 1},
    }))
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(dataset, the uninterrupted run)."""
    root = tmp_path_factory.mktemp("kill")
    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, VOCAB, SEQ + 1), np.eye(1, SEQ + 1, dtype=bool)[0]) for _ in range(32)]
    write_dataset(root / "data", {"train": rows, "val": rows[:4]}, seq_len=SEQ, vocab_size=VOCAB)
    assert main(["--config", str(write_run_config(root, root / "data", root / "reference"))]) == 0
    return root / "data", root / "reference"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["step:3", "after:mp_rank_00_model_states.pt@4", "before:latest@4",
                                   "after:latest@4", DRAWN])
def test_kill_9_then_resume_ends_at_the_uninterrupted_weights(setup, tmp_path, capsys, point):
    data, reference = setup
    cfg = write_run_config(tmp_path, data, tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}  # its own one-process group
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "fault_runner.py"), point, "--config", str(cfg)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    capsys.readouterr()
    assert main(["--config", str(cfg), "--resume"]) == 0
    # Only a save that got as far as moving `latest` counts; anything earlier resumes from the save before.
    resumed_at = 4 if point.startswith("after:latest") else 2
    assert f"step_{resumed_at:08d} at step {resumed_at}" in capsys.readouterr().out
    run = tmp_path / "run"
    assert same_weights(final_weights(run), final_weights(reference)) and losses(run) == losses(reference)
    assert all(verify_checkpoint(tag) is None for tag in (run / "checkpoints").glob("step_*"))
