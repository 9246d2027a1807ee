"""Stops that lose nothing, and faults that end in one line: signals (SIGINT, a second SIGINT, SIGTERM, SIGUSR1), a
full disk while saving, an unusable out_dir, a bug (traceback in the run's log, `--debug` prints it), and the exit
code table across the four CLIs."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
import torch

from atlas_train.train.checkpoint import read_latest
from atlas_train.train.trainer import Trainer
from faults_helpers import (
    final_weights,
    losses,
    run_cli,
    same_weights,
    tiny_builders,
    write_config,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 2, 4 and 6)."""
    from atlas_train.train.cli import main

    root = tmp_path_factory.mktemp("reference")
    with tiny_builders():
        assert main(["--config", str(write_config(root / "run.json", root / "run"))]) == 0
    return root / "run"


def send_during_step(monkeypatch, step: int, *signals: int) -> None:
    """This process gets `signals` while it takes step `step`, before the step reads its stop flags."""
    take_step = Trainer.train_step

    def train_step(self, flags=tuple):
        if self.step == step - 1:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return take_step(self, flags)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def resume_matches(reference: Path, run: Path, cfg: Path, capsys) -> str:
    """Resume the run to the end; it must reach the uninterrupted run's weights and losses. Returns its stdout."""
    with tiny_builders():
        code, out, err = run_cli(capsys, "--config", cfg, "--resume")
    assert code == 0, err
    assert same_weights(final_weights(run), final_weights(reference)) and losses(run) == losses(reference)
    return out


@pytest.mark.parametrize("signals, code, saved, message", [
    ((signal.SIGINT,), 130, "step_00000003", "interrupted: checkpoint"),
    ((signal.SIGINT, signal.SIGINT), 130, "step_00000002", "atlas-train: interrupted: stopped at once"),
    ((signal.SIGTERM,), 75, "step_00000003", "preempted: checkpoint 3 saved"),
    ((signal.SIGUSR1,), 75, "step_00000003", "preempted: checkpoint 3 saved"),
], ids=["sigint", "sigint-twice", "sigterm", "sigusr1"])
def test_signal_stops_then_resume_ends_at_the_same_weights(reference, tmp_path, capsys, monkeypatch, signals, code,
                                                          saved, message):
    cfg = write_config(tmp_path / "run.json", tmp_path / "run")
    send_during_step(monkeypatch, 3, *signals)
    with tiny_builders():
        got, out, err = run_cli(capsys, "--config", cfg)
    assert got == code, err
    assert read_latest(tmp_path / "run" / "checkpoints") == saved
    said = [line for line in (out + err).splitlines() if message in line]
    assert len(said) == 1 and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's own handler is back
    monkeypatch.undo()
    out = resume_matches(reference, tmp_path / "run", cfg, capsys)
    step = int(saved[-1])
    summary = [line for line in out.splitlines() if line.startswith("done:")]
    assert len(summary) == 1 and summary[0].startswith(f"done: step 6 ({6 - step} steps, {(6 - step) * 32:,} tokens")
    assert "train loss" in summary[0] and "val loss" in summary[0] and "step_00000006" in summary[0]


@pytest.mark.parametrize("target, kind", [
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", OSError),  # a DeepSpeed file
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", RuntimeError),  # as torch.save itself reports a full disk
    ("client_rank0.pt", OSError),  # our atomic write
    ("manifest.json", OSError),  # the last file of a save
])
def test_full_disk_while_saving_stops_in_one_line_and_loses_nothing(reference, tmp_path, capsys, monkeypatch,
                                                                    target, kind):
    real_replace = os.replace
    real_save = torch.save

    def full(path) -> None:
        if Path(path).name == target and "step_00000004" in str(path):
            if kind is OSError:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            raise RuntimeError(f"[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0 ({path}): "
                               "file write failed")

    def replace(src, dst, *args, **kwargs):
        full(dst)
        return real_replace(src, dst, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)):
            full(f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(torch, "save", save)
    cfg = write_config(tmp_path / "run.json", tmp_path / "run")
    with tiny_builders():
        code, _, err = run_cli(capsys, "--config", cfg)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "could not write checkpoint" in err and "step_00000004" in err and "intact" in err
    assert ("No space left on device" if kind is OSError else "file write failed") in err
    ckpt = tmp_path / "run" / "checkpoints"
    assert read_latest(ckpt) == "step_00000002" and not (ckpt / "step_00000004").exists()
    monkeypatch.undo()
    resume_matches(reference, tmp_path / "run", cfg, capsys)


def test_unusable_out_dir_is_one_line_before_set_up(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    below_a_file = tmp_path / "file" / "run"
    with tiny_builders():
        code, _, err = run_cli(capsys, "--config", write_config(tmp_path / "a.json", below_a_file))
    assert code == 2 and err.count("\n") == 1 and f"train.out_dir: cannot write to {below_a_file}" in err
    # Read-only: permission bits do not bind root, so the refusal is injected where the probe meets it.
    import tempfile

    read_only = tmp_path / "ro"
    real = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == read_only:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    with tiny_builders():
        code, _, err = run_cli(capsys, "--config", write_config(tmp_path / "b.json", read_only))
    assert code == 2 and err.count("\n") == 1 and "Permission denied" in err and str(read_only) in err


def test_a_bug_is_one_line_with_the_traceback_in_the_runs_log(tmp_path, capsys, monkeypatch):
    def broken(self, flags=tuple):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(Trainer, "train_step", broken)
    cfg = write_config(tmp_path / "run.json", tmp_path / "run")
    log = tmp_path / "run" / "atlas-train.log"
    with tiny_builders():
        code, _, err = run_cli(capsys, "--config", cfg)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"atlas-train: internal error: ZeroDivisionError: boom (traceback in {log}; --debug prints it)" in err
    assert "Traceback (most recent call last)" in log.read_text() and "in broken" in log.read_text()
    with tiny_builders():
        code, _, err = run_cli(capsys, "--config", cfg, "--debug", "train.out_dir=" + str(tmp_path / "run2"))
    assert code == 1 and "Traceback (most recent call last)" in err and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("atlas-train: internal error: ZeroDivisionError: boom")


def _prep(tmp_path):
    from atlas_train.data_prep.cli import main

    return main, "atlas_train.data_prep.cli.run_prep", ["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                                                        "--seq-len", "8"]


def _train(tmp_path):
    from atlas_train.train.cli import main

    (tmp_path / "c.yaml").write_text("{}")
    return main, "atlas_train.config.load_config", ["--config", str(tmp_path / "c.yaml")]


def _eval(tmp_path):
    from atlas_train.eval.cli import main

    return main, "atlas_train.eval.cli.load_for_eval", ["--task", "mqar", "--checkpoint", str(tmp_path)]


def _generate(tmp_path):
    from atlas_train.eval.generate import main

    return main, "atlas_train.eval.checkpoint.load_for_eval", ["--checkpoint", str(tmp_path), "--prompt", "x"]


@pytest.mark.parametrize("fault, code, line", [
    (KeyboardInterrupt(), 130, ": interrupted"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "somewhere/file"), 2,
     ": error: somewhere/file: No space left on device"),
    (RuntimeError("a bug"), 1, ": internal error: RuntimeError: a bug"),
])
@pytest.mark.parametrize("cli", [_prep, _train, _eval, _generate], ids=["prep", "train", "eval", "generate"])
def test_every_cli_follows_the_exit_code_table(tmp_path, capsys, monkeypatch, cli, fault, code, line):
    main, where, argv = cli(tmp_path)

    def fail(*args, **kwargs):
        raise fault

    monkeypatch.setattr(where, fail)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and line in err and "Traceback" not in err, err
