"""The training pieces one at a time: config, DeepSpeed dict, parameter groups, schedule, skippable optimizer,
atomic writes, checkpoint publishing, NaN guard, metrics logger, RNG capture and the preemption flag."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from atlas_train.config import ConfigError, load_config
from atlas_train.train.atomic import atomic_write, atomic_write_text
from atlas_train.train.checkpoint import CheckpointError, CheckpointManager, read_latest
from atlas_train.train.config import TrainConfig
from atlas_train.train.deepspeed_config import build_deepspeed_config
from atlas_train.train.integrity import checksums, write_manifest
from atlas_train.train.metrics import MetricsLogger
from atlas_train.train.nonfinite import NonFiniteGuard, NonFiniteLossError
from atlas_train.train.optim import (
    SkippableAdamW,
    build_optimizer,
    build_scheduler,
    follow_global_grad_norm,
    param_groups,
)
from atlas_train.train.rng import capture_rng_state, restore_rng_state
from atlas_train.train.signals import EXIT_PREEMPTED, PreemptionFlag
from repo_paths import REPO


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.zero_stage=4", r"train: zero_stage must be 0, 1, 2 or 3"),
        ("train.zero_stage=0", r"train: precision bf16 needs zero_stage >= 1"),
        ("train.precision=fp16", r"train.precision: 'fp16' is not one of"),
        ("train.lr=-1", r"train: lr must be > 0"),
        ("train.micro_batch_size=0", r"train: micro_batch_size must be positive"),
        ("train.resume=always", r"train.resume: 'always' is not one of"),
        ("train.warmup=3", r"train.warmup: unknown key"),
    ],
)
def test_bad_train_values_are_rejected_with_their_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


@pytest.mark.parametrize("run", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_run_configs_compose_and_validate(run):
    cfg = load_config([REPO / "configs" / run])
    assert cfg.train.seq_len <= cfg.model.max_seq_len
    assert cfg.train.seq_len % cfg.model.chunk_size == 0


def test_deepspeed_config_follows_train_config():
    ds = build_deepspeed_config(TrainConfig(micro_batch_size=3, grad_accum=5, grad_clip=0.5, zero_stage=3,
                                            precision="fp32"))
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"]["enabled"] is False and "train_batch_size" not in ds
    # the optimizer skips non-finite gradients itself (SkippableAdamW), not DeepSpeed per gradient
    assert build_deepspeed_config(TrainConfig(precision="bf16"))["bf16"] == {"enabled": True,
                                                                             "check_grad_overflow": False}


class _Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)  # weight decays, bias does not
        self.norm = nn.LayerNorm(4)  # no decay
        self.init_w = nn.Parameter(torch.zeros(4, 4))  # a matrix the model exempts by name
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    def no_weight_decay_names(self):
        return {"init_w"}


def test_param_groups_exempt_vectors_and_named_matrices():
    model = _Named()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == ["lin.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["init_w", "lin.bias", "norm.bias", "norm.weight"]


def _reference_lr(step, lr, warmup, total, floor):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / (total - warmup))
    return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2)


def test_schedule_is_linear_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(lr=2e-3, warmup_steps=4, steps=20, min_lr_ratio=0.1)
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(25):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    expected = [_reference_lr(s, 2e-3, 4, 20, 0.1) for s in range(25)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[3] == pytest.approx(2e-3) and seen[20] == pytest.approx(2e-4) and seen[24] == pytest.approx(2e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_skipped_optimizer_step_changes_neither_weights_nor_moments(fused):
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    opt = SkippableAdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    opt.skip = True
    opt.step()
    opt.step()  # DeepSpeed calls step once per parameter (sub-)group: the skip holds for all of them
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, opt.state.values()))
    opt.skip = False
    opt.step()
    assert not torch.equal(before[0], model.weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_step_with_non_finite_gradients_changes_neither_weights_nor_moments(bad):
    """A NaN or inf in any gradient leaves the whole step out (all parameters, moments and step counts), decided on
    the device; the next finite step is the one AdamW would take."""
    torch.manual_seed(0)
    model, twin = nn.Linear(3, 3), nn.Linear(3, 3)
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.1))
    ref = torch.optim.AdamW(param_groups(twin, 0.1), lr=0.1, betas=opt.defaults["betas"], eps=opt.defaults["eps"])
    x = torch.randn(2, 3)
    for m, o in ((model, opt), (twin, ref)):
        m(x).sum().backward()
        o.step()
    before = [p.detach().clone() for p in model.parameters()]
    moments = [(s["exp_avg"].clone(), s["step"].clone()) for s in opt.state.values()]
    model.weight.grad[1, 2] = bad
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(m, s["exp_avg"]) and torch.equal(n, s["step"])
               for (m, n), s in zip(moments, opt.state.values()))
    for m, o in ((model, opt), (twin, ref)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stage,precision,grad_clip", [(1, "fp32", 1.0), (2, "fp32", 1.0), (1, "bf16", 1.0),
                                                       (2, "bf16", 1.0), (1, "bf16", 0.0)])
def test_deepspeed_step_with_a_non_finite_gradient_leaves_the_weights(monkeypatch, stage, precision, grad_clip):
    """Under the DeepSpeed engine (ZeRO, two parameter groups) a NaN in one gradient, with a finite loss, leaves every
    weight of both groups as it was, with and without clipping: in bf16 (DeepSpeed's own per-gradient check off,
    deepspeed_config.py) the client optimizer skips on the step's global gradient norm, where DeepSpeed would have
    stepped the other group on zeroed gradients; the next finite step moves them."""
    import deepspeed

    from parallel_worker import free_port
    from process_group import process_state_restored

    with process_state_restored():
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                           "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(key, value)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        cfg = TrainConfig(micro_batch_size=2, grad_accum=1, grad_clip=grad_clip, zero_stage=stage, precision=precision)
        optimizer = build_optimizer(model, cfg)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_deepspeed_config(cfg))
        follow_global_grad_norm(optimizer, engine)  # as the trainer does
        x = torch.randn(2, 4).to(torch.bfloat16 if precision == "bf16" else torch.float32)

        def step(poison: bool):
            handle = model[0].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), float("nan")))
            if not poison:
                handle.remove()
            engine.backward(engine(x).square().sum())
            engine.step()
            handle.remove()
            return [p.detach().clone() for p in model.parameters()]

        before = step(poison=False)
        after = step(poison=True)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert not torch.equal(step(poison=False)[0], after[0])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "old\n")

    def crash(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash, mode="w")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    """Like open(): 0666 less the umask, not the temp file's private 0600."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "manifest.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode) == 0o644


class _FakeEngine:
    """Writes a file per save like DeepSpeed does; can be told to crash mid-save."""

    crash = False

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # `latest` is ours to publish
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "model.pt").write_text(tag)
        if self.crash:
            raise RuntimeError("killed mid-save")


def test_checkpoint_publishing_keeps_last_k_and_survives_a_crash_mid_save(tmp_path):
    engine = _FakeEngine()
    mgr = CheckpointManager(tmp_path, keep_last=2, rank=0)
    for step in (1, 2, 3):
        mgr.save(engine, step, {"step": step}, {"config.yaml": b"x: 1\n"})
    assert read_latest(tmp_path) == "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert mgr.read_client("step_00000003") == {"step": 3}
    assert (tmp_path / "step_00000003" / "config.yaml").read_bytes() == b"x: 1\n"
    engine.crash = True
    with pytest.raises(RuntimeError, match="mid-save"):
        mgr.save(engine, 4, {"step": 4}, {})
    assert read_latest(tmp_path) == "step_00000003"  # the half-written step 4 is never named
    with pytest.raises(CheckpointError, match="client_rank1.pt is missing"):
        CheckpointManager(tmp_path, keep_last=2, rank=1).read_client("step_00000003")


def test_nonfinite_guard_counts_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard(limit=2)
    for finite in (False, True, False, False):
        guard.record(finite, step=1)
    assert guard.state_dict() == {"in_row": 2, "total": 3}
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        guard.record(False, step=5)
    with pytest.raises(NonFiniteLossError, match="1 steps in a row"):
        NonFiniteGuard(limit=0).record(False, step=1)


def test_metrics_logger_writes_jsonl_and_tensorboard_and_truncates_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, enabled=True)
    for step in (1, 2, 3):
        log.log(step, {"train/loss": 1.0 / step, "train/lr": 0.1})
    log.log(3, {"train/grad_norm": float("nan")})
    log.close()
    # TensorBoard reads event files in name order: time in seconds, host, pid, then a per-process counter, which sorts
    # as text (10 before 9). A resumed run is a new process, seconds later; here the second writer waits for the
    # next second so that its file sorts last as a resumed run's would.
    began = int(time.time())
    while int(time.time()) == began:
        time.sleep(0.02)
    log = MetricsLogger(tmp_path, enabled=True, resume_step=2)  # a run resumed from step 2 redoes step 3
    log.log(3, {"train/loss": 0.25})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("train/loss")) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_rng_state_round_trip_covers_python_numpy_and_torch():
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_sets_the_flag_and_handlers_are_restored(sig):
    previous = signal.getsignal(sig)
    with PreemptionFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), sig)
        assert flag.requested
    assert signal.getsignal(sig) is previous
    assert EXIT_PREEMPTED == 75


def test_step_metrics_mfu_and_memory_health():
    from types import SimpleNamespace

    from atlas_train.train.trainer import _step_metrics

    engine = SimpleNamespace(get_global_grad_norm=lambda: torch.tensor(2.0),
                             module=SimpleNamespace(memory_stats=lambda: {"alpha": torch.tensor(0.5)}))
    tc = TrainConfig(micro_batch_size=2, grad_accum=3, seq_len=8, peak_tflops=1.0)
    plan = SimpleNamespace(dp_size=4)  # 2 * 3 * 8 * 4 = 192 tokens per step
    values = _step_metrics(engine, tc, plan, loss=1.5, lr=0.1, dt=0.5, world_size=8, flops_per_token=1e10)
    assert values["perf/tokens_per_s"] == 384.0 and values["train/grad_norm"] == 2.0
    assert values["perf/mfu"] == pytest.approx(1e10 * 384 / (1e12 * 8))
    assert values["memory/alpha"] == 0.5 and values["train/loss"] == 1.5


def test_export_of_a_tensor_parallel_checkpoint_without_its_layout_is_a_clear_error(tmp_path):
    from atlas_train.train.export import export

    tag = tmp_path / "run" / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / "config.yaml").write_text("model:\n  vocab_size: 64\nparallel:\n  tensor_parallel: 2\n")
    write_manifest(tag, checksums(tag, ["config.yaml"]))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000004\n")
    with pytest.raises(CheckpointError, match="tensor_parallel=2 but has no tp_layout.json"):
        export(tmp_path / "run", tmp_path / "out")


def test_merge_tp_shards_joins_split_params_and_takes_replicated_ones_once():
    from atlas_train.train.export import merge_tp_shards

    full = {"col": torch.randn(4, 3), "row": torch.randn(3, 4), "rep": torch.randn(5)}
    layout = {"col": 0, "row": 1, "rep": None}
    shards = [{"col": full["col"].chunk(2, 0)[t], "row": full["row"].chunk(2, 1)[t], "rep": full["rep"]}
              for t in (0, 1)]
    merged = merge_tp_shards(shards, layout)
    assert all(torch.equal(merged[k], full[k]) for k in full)
    shards[1]["rep"] = full["rep"] + 1
    with pytest.raises(CheckpointError, match="replicated parameter rep differs"):
        merge_tp_shards(shards, layout)


def test_any_rank_takes_device_tensors_and_bools_in_one_call():
    from atlas_train.train.distributed import any_rank

    loss = torch.tensor([1.0, float("nan")])
    assert any_rank(~torch.isfinite(loss).all(), False, True) == (True, False, True)
    assert any_rank(~torch.isfinite(loss[:1]).all()) == (False,)


def test_repairing_universal_load_restores_group_settings_and_unshares_the_step():
    from atlas_train.train.resize import repairing_universal_load

    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    with repairing_universal_load(opt):  # what DeepSpeed 0.19.8's ZeRO-3 universal load leaves behind
        shared = torch.tensor(2.0)
        for group in opt.param_groups:
            group["weight_decay"] = 0.1
        opt.state[a], opt.state[b] = {"step": shared}, {"step": shared}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.state[a]["step"] is not opt.state[b]["step"] and float(opt.state[b]["step"]) == 2.0
