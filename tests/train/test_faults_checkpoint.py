"""Checkpoint integrity: a damaged or incomplete checkpoint is never loaded.

Each file of a checkpoint, flipped or truncated: `resume=auto` falls back to the checkpoint before it in one line
naming the file, and ends at the weights of an uninterrupted run; naming the damaged checkpoint explicitly (export)
stops in one line. Export folders are verified the same way by atlas-eval and atlas-generate. The mutation check
runs the corruption scenario with a loader that skips the checksums, and requires the scenario to fail.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from atlas_train.eval import cli as eval_cli
from atlas_train.eval import generate
from atlas_train.train import checkpoint
from atlas_train.train.checkpoint import read_latest, verify_checkpoint
from atlas_train.train.cli import main
from atlas_train.train.export import export, load_exported
from atlas_train.train.integrity import read_manifest
from eval_helpers import train_tokenizer, write_export
from faults_helpers import (
    damage,
    final_weights,
    losses,
    run_cli,
    same_weights,
    stopped_at,
    tiny_builders,
    write_config,
)
from tiny_training import TinyLM

CHECKPOINT_FILES = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "client_rank0.pt",
                    "config.yaml", "manifest.json"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("reference")
    with tiny_builders():
        assert main(["--config", str(write_config(root / "run.json", root / "run"))]) == 0
    assert sorted(p.name for p in (root / "run" / "checkpoints").glob("step_*")) == [
        "step_00000002", "step_00000004", "step_00000006"]
    return root / "run"


def resume_after_damage(reference: Path, tmp_path: Path, capsys, name: str, how: str) -> None:
    """The run stopped after step 4, `name` of its step-4 checkpoint damaged, resumed with train.resume=auto: one
    line names the file and the checkpoint used instead (step 2; step 4 itself when only `latest` is damaged, as
    then every intact checkpoint is a candidate), and the run ends at the uninterrupted run's weights and losses."""
    run = stopped_at(reference, tmp_path / "run", 4)
    damaged = run / "checkpoints" / ("latest" if name == "latest" else f"step_00000004/{name}")
    damage(damaged, how)
    cfg = write_config(tmp_path / "run.json", run)
    with tiny_builders():
        code, out, err = run_cli(capsys, "--config", cfg, "--resume")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(damaged) in warnings[0], err
    step = 4 if name == "latest" else 2
    assert f"resuming from step_{step:08d} (step {step}) instead" in warnings[0]
    assert "resumed from" in out and f"at step {step}" in out
    assert same_weights(final_weights(run), final_weights(reference))
    assert losses(run) == losses(reference)


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("name", [*CHECKPOINT_FILES, "latest"])
def test_damaged_checkpoint_file_falls_back_and_ends_at_the_same_weights(reference, tmp_path, capsys, name, how):
    resume_after_damage(reference, tmp_path, capsys, name, how)


def test_corruption_test_fails_for_a_loader_without_checksum_verification(reference, tmp_path, capsys, monkeypatch):
    """Mutation check: with verification reduced to reading the manifest, the flipped-bytes scenario must fail."""
    monkeypatch.setattr(checkpoint, "check_files", lambda folder, files: [])
    with pytest.raises(AssertionError):
        resume_after_damage(reference, tmp_path, capsys, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "flip")


def test_every_file_is_covered_and_an_unfinished_save_is_incomplete(reference, tmp_path):
    tag = reference / "checkpoints" / "step_00000006"
    listed = set(read_manifest(tag))
    assert listed == set(CHECKPOINT_FILES) - {"manifest.json"}
    assert verify_checkpoint(tag) is None
    unfinished = tmp_path / "step_00000006"
    shutil.copytree(tag, unfinished)
    (unfinished / "manifest.json").unlink()
    assert "manifest.json is missing: the folder is incomplete" in verify_checkpoint(unfinished)
    shutil.copytree(tag, tmp_path / "lost")
    (tmp_path / "lost" / "client_rank0.pt").unlink()
    assert verify_checkpoint(tmp_path / "lost") == f"{tmp_path / 'lost' / 'client_rank0.pt'} is missing"


def test_no_intact_checkpoint_stops_in_one_line(reference, tmp_path, capsys):
    run = stopped_at(reference, tmp_path / "run", 4)
    for tag in ("step_00000002", "step_00000004"):
        damage(run / "checkpoints" / tag / "client_rank0.pt", "flip")
    with tiny_builders():
        code, _, err = run_cli(capsys, "--config", write_config(tmp_path / "run.json", run), "--resume")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "no intact checkpoint to resume" in err and "step_00000004/client_rank0.pt is damaged" in err


def test_export_verifies_the_checkpoint_it_reads(reference, tmp_path, capsys):
    run = stopped_at(reference, tmp_path / "run", 6)
    damaged = run / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt"
    damage(damaged, "flip")
    # Named explicitly, a damaged checkpoint stops in one line naming the file.
    code, _, err = run_cli(capsys, "export", "--checkpoint", damaged.parent, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and f"{damaged} is damaged" in err
    assert not (tmp_path / "out").exists()
    # A run dir gives its newest intact checkpoint; the line names what was skipped.
    umask = os.umask(0o022)
    try:
        export(run, tmp_path / "out", build_model=TinyLM)
    finally:
        os.umask(umask)
    assert f"{damaged} is damaged" in capsys.readouterr().err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "config.yaml", "manifest.json"], 0o644)
    model, _, _ = load_exported(tmp_path / "out", build_model=TinyLM)
    step4 = reference / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    assert same_weights(model.state_dict(), torch.load(step4, weights_only=False)["module"])


def test_exported_model_is_checksummed_and_verified_by_eval_and_generate(tmp_path, capsys):
    export = write_export(tmp_path / "export", train_tokenizer(tmp_path))
    args = ["--task", "mqar", "--checkpoint", str(export), "--pairs", "2", "--seq-lens", "16", "--samples", "2",
            "--no-progress", "--out", str(tmp_path / "r.json")]
    assert eval_cli.main(args) == 0
    for name, how, message in [("model.safetensors", "flip", "model.safetensors is damaged"),
                               ("config.yaml", "truncate", "config.yaml is damaged"),
                               ("manifest.json", "delete", "manifest.json is missing")]:
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(export, broken)
        if how == "delete":
            (broken / name).unlink()
        else:
            damage(broken / name, how)
        capsys.readouterr()
        assert eval_cli.main([*args[:3], str(broken), *args[4:]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "export the run again" in err, err
        assert generate.main(["--checkpoint", str(broken), "--prompt", "the"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_a_save_after_a_fallback_replaces_the_damaged_checkpoint(reference, tmp_path, capsys):
    """The damaged step-4 folder is rewritten whole when the resumed run saves step 4 again."""
    resume_after_damage(reference, tmp_path, capsys, "client_rank0.pt", "flip")
    ckpt = tmp_path / "run" / "checkpoints"
    assert read_latest(ckpt) == "step_00000006"
    assert verify_checkpoint(ckpt / "step_00000004") is None
