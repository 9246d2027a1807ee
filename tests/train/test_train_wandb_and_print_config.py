"""The optional wandb logger (offline, real wandb; and without wandb installed) and `atlas-train --print-config`."""

from __future__ import annotations

import sys
import time

import pytest
import yaml

from atlas_train.train.cli import main
from atlas_train.train.metrics import WANDB_ID_FILE, MetricsLogger

REPO_CONFIG = "configs/demo.yaml"


def _run_dir(tmp_path, wandb: dict):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"wandb": wandb}, "model": {"mixer": "atlas"}}))
    return run


def _written(record, needle: bytes, timeout: float = 30.0) -> bool:
    """Whether wandb's offline record gets `needle`: its service process may still be writing after finish()."""
    deadline = time.monotonic() + timeout
    while needle not in record.read_bytes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _log_steps(run, steps, resume_step=0):
    logger = MetricsLogger(run, enabled=True, resume_step=resume_step)
    for step in steps:
        logger.log(step, {"loss": 1.0 / step, "lr": 0.5})
    logger.close()


def test_wandb_offline_run_gets_the_metrics_and_resumes_under_its_id(tmp_path, monkeypatch):
    """About 10 s: two offline wandb runs (wandb starts a service process)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    run = _run_dir(tmp_path, {"project": "atlas-tests", "tags": ["ci"]})
    _log_steps(run, [1, 2, 3])
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    (record,) = (tmp_path / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert _written(record, b"0.3333333333333333")  # step 3's loss
    assert b"atlas-tests" in record.read_bytes() and b"loss" in record.read_bytes()
    # A requeued run continues the same wandb run (written to its own folder: two offline runs of one id started
    # within the same second would share one).
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "requeued"))
    (tmp_path / "requeued").mkdir()
    _log_steps(run, [3, 4], resume_step=2)
    assert (run / WANDB_ID_FILE).read_text().strip() == run_id
    (resumed,) = (tmp_path / "requeued" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert _written(resumed, b"0.25")  # step 4's loss
    assert [line for line in (run / "metrics.jsonl").read_text().splitlines()][-1].startswith('{"step": 4')


def test_without_wandb_installed_training_logs_go_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    run = _run_dir(tmp_path, {"project": "atlas-tests"})
    _log_steps(run, [1, 2])
    assert "wandb is not installed" in capsys.readouterr().err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2 and not (run / WANDB_ID_FILE).exists()


def test_no_project_no_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    run = _run_dir(tmp_path, {"project": None})
    _log_steps(run, [1])
    assert not (run / WANDB_ID_FILE).exists()


def test_print_config_prints_the_composed_config_and_exits(capsys):
    from atlas_train.config import load_config, to_dict

    overrides = ["model.mixer=titans", "train.lr=1.0e-3", "train.wandb.project=demo"]
    assert main(["--config", REPO_CONFIG, *overrides, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config([REPO_CONFIG], overrides))
    assert printed["model"]["mixer"] == "titans" and printed["train"]["wandb"]["project"] == "demo"
    assert main(["--print-config", "model.n_layrs=3"]) == 2
    assert "model.n_layrs: unknown key" in capsys.readouterr().err


def test_help_says_where_the_keys_are_documented(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "atlas_train/model/config.py" in out and "atlas_train/train/config.py" in out and "--print-config" in out


def test_a_training_run_logs_to_wandb_offline(tmp_path, monkeypatch):
    """The trainer's own logger, end to end: a two-step run of a tiny ATLAS on synthetic tokens (about 10 s)."""
    pytest.importorskip("wandb")
    import deepspeed.comm.torch  # noqa: F401

    from atlas_train.config import load_config
    from atlas_train.train.trainer import train

    # test-only: skip DeepSpeed's shm op build (the module, not the `torch` its package exports under that name)
    monkeypatch.setattr(sys.modules["deepspeed.comm.torch"], "build_shm_op", lambda: None)
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    overrides = ["model.vocab_size=64", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
                 "model.mlp_hidden=32", "model.max_seq_len=16", "model.chunk_size=8", "model.memory_expansion=2",
                 f"train.out_dir={run}", "train.steps=2", "train.seq_len=16", "train.micro_batch_size=2",
                 "train.warmup_steps=1", "train.eval_every=0", "train.save_every=0", "train.progress=false",
                 "train.precision=fp32", "train.zero_stage=1", "train.synthetic_data=true",
                 "train.wandb.project=atlas-tests"]
    assert train(load_config([], overrides)) == 0
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    (record,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert _written(record, b"train/loss") and b"atlas-tests" in record.read_bytes()
