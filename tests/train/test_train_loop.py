"""The training loop end to end on a tiny model (one process, gloo): exact resume, preemption, NaN policy,
checkpoint errors and export. The model and loader are tiny stand-ins so these tests pin the loop, not the model."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from atlas_train.config import load_config
from atlas_train.train.checkpoint import CheckpointError, read_latest
from atlas_train.train.config import TrainConfig
from atlas_train.train.distributed import shutdown_distributed
from atlas_train.train.export import export, load_exported
from atlas_train.train.nonfinite import NonFiniteLossError
from atlas_train.train.signals import EXIT_PREEMPTED
from atlas_train.train.trainer import Trainer, train
from tiny_training import BUILDERS, PreemptingLoader, RunCfg, TinyLM
from torchrun_helper import run_under_torchrun


@pytest.fixture(autouse=True)
def _reset_hooks():
    PreemptingLoader.preempt_at = None
    TinyLM.poison_calls = set()
    yield


def make_cfg(out_dir: Path, **train) -> RunCfg:
    defaults = dict(out_dir=str(out_dir), steps=6, seq_len=8, micro_batch_size=2, grad_accum=2, warmup_steps=2,
                    eval_every=3, eval_batches=2, save_every=0, keep_last=2, progress=False, precision="fp32",
                    zero_stage=1, lr=1e-2)
    return RunCfg(train=TrainConfig(**{**defaults, **train}))


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = run_dir / "export"
    export(run_dir, out, build_model=TinyLM, config_cls=RunCfg)
    model, _, _ = load_exported(out, build_model=TinyLM, config_cls=RunCfg)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("precision, zero_stage", [("fp32", 1), ("bf16", 2)])
def test_preempted_and_resumed_run_matches_uninterrupted_run_bitwise(tmp_path, precision, zero_stage):
    full = make_cfg(tmp_path / "full", precision=precision, zero_stage=zero_stage)
    assert train(full, BUILDERS) == 0

    split = make_cfg(tmp_path / "split", precision=precision, zero_stage=zero_stage)
    PreemptingLoader.preempt_at = 6  # handed out during step 3 (2 micro-batches a step) -> checkpoint at step 3
    assert train(split, BUILDERS) == EXIT_PREEMPTED
    assert read_latest(tmp_path / "split" / "checkpoints") == "step_00000003"
    assert max(losses(tmp_path / "split")) == 3
    PreemptingLoader.preempt_at = None
    assert train(dataclasses.replace(split, train=dataclasses.replace(split.train, resume="auto")), BUILDERS) == 0

    expected, got = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(got) == list(range(1, 7))
    assert got == expected  # bitwise: same floats, every step
    w_full, w_split = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(w_full[k], w_split[k]) for k in w_full)


def test_checkpoints_keep_last_k_and_latest_names_the_newest(tmp_path):
    assert train(make_cfg(tmp_path, save_every=2, steps=7, keep_last=2), BUILDERS) == 0
    ckpt = tmp_path / "checkpoints"
    assert read_latest(ckpt) == "step_00000007"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000006", "step_00000007"]
    assert (ckpt / "step_00000007" / "config.yaml").is_file() and (tmp_path / "config.yaml").is_file()
    # The saved config is the resolved one and loads back as a run config.
    saved = load_config([tmp_path / "config.yaml"], cls=RunCfg)
    assert saved.model.feature_map == "sketch" and saved.train.steps == 7


@pytest.mark.parametrize("precision, zero_stage", [("fp32", 0), ("fp32", 2), ("bf16", 3)])
def test_nonfinite_loss_skips_the_step_without_touching_weights(tmp_path, precision, zero_stage):
    run = dict(eval_every=0, warmup_steps=0, min_lr_ratio=1.0, precision=precision, zero_stage=zero_stage)
    TinyLM.poison_calls = {6}  # the second micro-batch of step 3
    assert train(make_cfg(tmp_path / "b", steps=3, **run), BUILDERS) == 0
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/loss"] == "nan" and rows[-1]["train/skipped_steps"] == 1
    assert all(isinstance(r["train/loss"], float) for r in rows[:-1])
    # The weights after the skipped step 3 are those after step 2 (the same run stopped at step 2).
    TinyLM.poison_calls = set()
    assert train(make_cfg(tmp_path / "c", steps=2, **run), BUILDERS) == 0
    wb, wc = weights(tmp_path / "b"), weights(tmp_path / "c")
    assert all(torch.equal(wb[k], wc[k]) for k in wb)


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_message(tmp_path):
    TinyLM.poison_calls = set(range(3, 100))  # every step from step 2 on
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf for 3 steps in a row .*max_nonfinite_in_row=2"):
        train(make_cfg(tmp_path, max_nonfinite_in_row=2, eval_every=0), BUILDERS)


def test_checkpoint_errors_are_clear(tmp_path, capsys):
    cfg = make_cfg(tmp_path, steps=2, eval_every=0)
    assert train(cfg, BUILDERS) == 0
    with pytest.raises(CheckpointError, match="already holds checkpoints: pass train.resume=auto"):
        train(cfg, BUILDERS)
    other_model = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=24),
                                      train=dataclasses.replace(cfg.train, resume="auto"))
    with pytest.raises(CheckpointError, match=r"trained with model.d_model=16, this run has 24"):
        train(other_model, BUILDERS)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099\n")  # damaged: falls back in one line
    capsys.readouterr()
    assert train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto")), BUILDERS) == 0
    err = capsys.readouterr().err
    assert "names 'step_00000099', but" in err and "resuming from step_00000002 (step 2) instead" in err
    with pytest.raises(CheckpointError, match="run dir not found"):
        export(tmp_path / "nowhere", tmp_path / "out", build_model=TinyLM, config_cls=RunCfg)
    (tmp_path / "fresh").mkdir()
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        export(tmp_path / "fresh", tmp_path / "out", build_model=TinyLM, config_cls=RunCfg)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "{cfg}", "train.zero_stage=5"], "error: train: zero_stage must be 0, 1, 2 or 3, got 5"),
        (["--config", "{cfg}", "train.stepz=5"], "error: train.stepz: unknown key"),
        (["--config", "{tmp}/missing.yaml"], "error: config file not found"),
        (["export", "--checkpoint", "{tmp}/nowhere", "--out", "{tmp}/o"], "error: run dir not found"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, capsys, argv, message):
    from atlas_train.train.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"train:\n  out_dir: {tmp_path / 'run'}\n")
    assert main([a.format(cfg=cfg, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_export_of_zero3_equals_export_of_zero1(tmp_path):
    assert train(make_cfg(tmp_path / "z1", zero_stage=1, steps=3, eval_every=0), BUILDERS) == 0
    assert train(make_cfg(tmp_path / "z3", zero_stage=3, steps=3, eval_every=0), BUILDERS) == 0
    w1, w3 = weights(tmp_path / "z1"), weights(tmp_path / "z3")
    assert set(w1) == set(w3)
    for k in w1:
        assert w3[k].dtype == torch.float32
        torch.testing.assert_close(w3[k], w1[k], rtol=1e-5, atol=1e-6)


def test_only_logging_steps_reduce_and_read_the_loss(tmp_path, monkeypatch):
    """The loss all-reduce and its host read (a device sync) happen on logged steps only."""
    from atlas_train.parallel.plan import ParallelPlan

    calls = []
    reduce = ParallelPlan.loss_for_logging
    monkeypatch.setattr(ParallelPlan, "loss_for_logging", lambda self, loss: calls.append(1) or reduce(self, loss))
    assert train(make_cfg(tmp_path, steps=6, log_every=3, eval_every=0), BUILDERS) == 0
    assert len(calls) == 2 and sorted(losses(tmp_path)) == [3, 6]


def test_trainer_phases_called_by_hand_reproduce_fit(tmp_path):
    """The phases work on their own (what a probe or a per-phase timer builds on): steps taken with `train_step`,
    and a `save` afterwards, give fit's losses and a checkpoint that resumes."""
    assert train(make_cfg(tmp_path / "fit", steps=4, eval_every=0), BUILDERS) == 0
    trainer = Trainer(make_cfg(tmp_path / "hand", steps=4, eval_every=0), BUILDERS)
    try:
        got = {}
        for _ in range(3):
            local_loss, applied, flags = trainer.train_step()
            assert applied and flags == ()
            got[trainer.step] = trainer.plan.loss_for_logging(local_loss)
        trainer.save()
    finally:
        trainer.close()
    assert got == {step: loss for step, loss in losses(tmp_path / "fit").items() if step <= 3}
    assert read_latest(tmp_path / "hand" / "checkpoints") == "step_00000003"
    resumed = Trainer(make_cfg(tmp_path / "hand", steps=4, eval_every=0, resume="auto"), BUILDERS)
    assert resumed.step == 3
    assert resumed.fit() == 0 and sorted(losses(tmp_path / "hand")) == [4]


def _dist_worker(root: str) -> None:
    """One rank of a 2-process gloo job (torchrun, test below): a full run, then a preempted one and its resumption.

    Writes the three exit codes of this rank to a file; all runs share the process group, so the job starts once.
    """
    import deepspeed.comm.torch as ds_comm_torch

    ds_comm_torch.build_shm_op = lambda: None  # test-only: skip the ~20 s JIT build of DeepSpeed's CPU shm op
    codes = []
    for name, preempt_at, resume in (("full", None, "none"), ("split", 4, "none"), ("split", None, "auto")):
        PreemptingLoader.preempt_at = preempt_at  # batch 4 of each rank is handed out in step 2
        codes.append(train(make_cfg(Path(root) / name, steps=4, zero_stage=2, eval_every=2, resume=resume), BUILDERS))
    Path(root, f"rc_rank{os.environ['RANK']}").write_text(json.dumps(codes))


@pytest.mark.slow
def test_two_rank_data_parallel_run_resumes_bitwise(tmp_path):
    run_under_torchrun(__file__, str(tmp_path))
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rc_rank{rank}").read_text()) == [0, EXIT_PREEMPTED, 0]
    step2 = tmp_path / "split" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in step2.glob("client_rank*")) == ["client_rank0.pt", "client_rank1.pt"]
    assert losses(tmp_path / "split") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 4
    w_full, w_split = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(w_full[k], w_split[k]) for k in w_full)


if __name__ == "__main__":
    import sys

    _dist_worker(sys.argv[1])
    shutdown_distributed()
