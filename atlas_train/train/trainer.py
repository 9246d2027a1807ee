"""The training loop: one code path for one CPU process and for many GPUs (DeepSpeed ZeRO + our ParallelPlan).

`Trainer` holds one run and gives each phase a method (set-up and resume, the step and its parts, validation, saving,
stopping); `train` is the entry point the CLI and tests call. Checkpoints carry everything a bitwise-identical
continuation needs: engine state (weights, AdamW moments) from DeepSpeed, and per rank the data position, the RNG
states and the counters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
import yaml

from atlas_train.cli_errors import describe_os_error
from atlas_train.config import ConfigError
from atlas_train.train.atomic import atomic_write_bytes
from atlas_train.train.checkpoint import CheckpointError, CheckpointManager, newest_intact, step_of, tag_for
from atlas_train.train.deepspeed_config import build_deepspeed_config
from atlas_train.train.distributed import any_rank, device, init_distributed
from atlas_train.train.export import TP_LAYOUT, tp_layout
from atlas_train.train.metrics import MetricsLogger
from atlas_train.train.microbatch import (
    ProbeError,
    batch_layout,
    engine_state_bytes,
    model_step_runner,
    probe_micro_batch,
)
from atlas_train.train.nonfinite import NonFiniteGuard
from atlas_train.train.optim import build_optimizer, build_scheduler, follow_global_grad_norm, move_scheduler_to
from atlas_train.train.phase_timer import PhaseTimer
from atlas_train.train.resize import Layout, prepare_universal, read_resume_client, repairing_universal_load
from atlas_train.train.rng import capture_rng_state, restore_rng_state, seed_everything
from atlas_train.train.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, PreemptionFlag
from atlas_train.train.speed import apply_speed_settings, compile_blocks
from atlas_train.train.step_profiler import StepProfiler
from atlas_train.train.synthetic import SyntheticLoader


@dataclass
class Builders:
    """What a run is assembled from; the defaults are the project's, tests pass tiny stand-ins."""

    model: Callable[[Any], torch.nn.Module]  # model config -> module
    # build_loader(data_cfg, split, *, seq_len, micro_batch_size, dp_rank, dp_size, seed)
    loader: Callable[..., Iterable]
    check_data: Callable[[Any, Any, int], Optional[Path]]  # (data cfg, model cfg, seq_len) -> its tokenizer's path
    parallel: Callable[[Any], Any]  # parallel config -> ParallelPlan


def check_dataset(data_cfg, model_cfg, seq_len: int) -> Optional[Path]:
    """Stop early, with the file named, when the dataset is missing or does not fit the model; its tokenizer path."""
    from atlas_train.data import DataError, check_manifest, read_manifest

    manifest = read_manifest(data_cfg.path)
    check_manifest(manifest, model_cfg.vocab_size, seq_len)
    if manifest.tokenizer_path is not None and not manifest.tokenizer_path.is_file():
        raise DataError(f"{manifest.path / 'manifest.json'} names the tokenizer {manifest.tokenizer_path}, which is "
                        "missing: rerun atlas-prep")
    if model_cfg.vocab_size > manifest.vocab_size and dist.get_rank() == 0:
        print(f"atlas-train: warning: model.vocab_size {model_cfg.vocab_size} is larger than the data's vocabulary "
              f"{manifest.vocab_size} ({manifest.path}): {model_cfg.vocab_size - manifest.vocab_size} embedding rows "
              "are never trained (model.vocab_size=auto takes the data's)", file=sys.stderr)
    return manifest.tokenizer_path


def with_data_vocab(cfg):
    """`cfg` with model.vocab_size `auto` replaced by the dataset's vocabulary (its manifest's vocab_size)."""
    if cfg.model.vocab_size != "auto":
        return cfg
    if cfg.train.synthetic_data:
        raise ConfigError("model.vocab_size: auto takes the dataset's vocabulary, but train.synthetic_data has none; "
                          "set a number")
    from atlas_train.data import read_manifest

    vocab = read_manifest(cfg.data.path).vocab_size
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def default_builders() -> Builders:
    from atlas_train.data import build_loader
    from atlas_train.model import build_model
    from atlas_train.parallel import setup_parallel

    return Builders(model=build_model, loader=build_loader, check_data=check_dataset, parallel=setup_parallel)


def plain(obj) -> dict:
    """A config dataclass as plain YAML/JSON-safe data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def resolve(cfg):
    """The run's config with the model's family defaults filled in: what is saved and compared on resume."""
    return dataclasses.replace(cfg, model=cfg.model.resolved())


VALIDATION_HINT = ("rerun atlas-prep with a larger --val-fraction (or a smaller --seq-len), or set train.eval_every=0 "
                   "to train without validation")


class BatchStream:
    """Endless batches on the device; starts a new pass over the loader when one ends.

    A batch whose rows hold one document each (no document starts after token 0) goes without `doc_start`: that is
    what the model assumes by default, and attention then takes its causal fast path without asking the device. The
    check runs on the loader's CPU tensors, so it costs no sync.
    """

    def __init__(self, loader: Iterable, dev: torch.device):
        self.loader, self.dev = loader, dev
        self._it = None

    def next(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            batch = next(self._it)
        packed = bool(batch["doc_start"][:, 1:-1].any())
        return {k: (v.to(self.dev, non_blocking=True) if k != "doc_start" or packed else None)
                for k, v in batch.items()}


def _tokenizer_bytes(path: Optional[Path]) -> tuple[Optional[bytes], Optional[str]]:
    if path is None:
        return None, None
    data = Path(path).read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _check_resumable(client: dict, resolved_plain: dict, tokenizer_sha: Optional[str], tag_dir: Path) -> None:
    saved = client["config"]["model"]
    now = resolved_plain["model"]
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        key = diff[0]
        raise CheckpointError(
            f"{tag_dir} was trained with model.{key}={saved.get(key)!r}, this run has "
            f"{resolved_plain['model'].get(key)!r} ({len(diff)} model key(s) differ)"
        )
    if client["tokenizer_sha256"] != tokenizer_sha:
        raise CheckpointError(f"{tag_dir} was trained on data with a different tokenizer than this run's data dir")


def _step_metrics(engine, tc, plan, loss: float, lr: float, dt: float, world_size: int,
                  flops_per_token: Optional[float]) -> dict:
    tokens = tc.micro_batch_size * tc.grad_accum * tc.seq_len * plan.dp_size
    values = {"train/loss": loss, "train/lr": lr, "perf/step_time_s": dt, "perf/tokens_per_s": tokens / dt}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        values["train/grad_norm"] = float(norm)
    if flops_per_token is not None:
        values["perf/mfu"] = flops_per_token * tokens / dt / (tc.peak_tflops * 1e12 * world_size)
    if torch.cuda.is_available():
        values["perf/max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    stats = getattr(engine.module, "memory_stats", None)
    if stats is not None:
        values.update({f"memory/{k}": float(torch.as_tensor(v).detach()) for k, v in stats().items()})
    return values


class StepClock:
    """Mean seconds per step since the last restart.

    Between logged steps the host runs ahead of the device unsynced, so only a mean over a span of steps that ends in
    a sync (the logged loss) is a step time. The loop restarts the clock after logging, validation and saving, so
    that those pauses are not counted as step time.
    """

    def __init__(self, step: int):
        self.restart(step)

    def restart(self, step: int) -> None:
        self.start, self.step = time.perf_counter(), step

    def seconds_per_step(self, step: int) -> float:
        return (time.perf_counter() - self.start) / (step - self.step)


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from: its tag, the client state this rank takes, whether the DP size changed."""

    tag: str
    client: dict
    dp_changed: bool

    @property
    def universal(self) -> bool:
        """Whether the engine loads the tag's universal conversion: ZeRO 1-3 partitions must be re-cut for another DP
        size (resize.py); ZeRO 0 files are whole already."""
        return self.dp_changed and self.client["config"]["train"]["zero_stage"] >= 1


class Trainer:
    """One training run, a method per phase: set-up and resume (the constructor), `train_step`, `validate`, `save`,
    `stop`, strung together by `fit`.

    A step is `next_batch`, `forward` and `backward` for each of `grad_accum` micro-batches, then `optimizer_step`;
    a non-finite loss on any rank cancels that step's update everywhere (the schedule and the data still advance).
    """

    def __init__(self, cfg, builders: Optional[Builders] = None):
        """Set-up: the process group, the checked config and data, the model, optimizer and DeepSpeed engine, and,
        when resuming, everything restored from the checkpoint. Refuses a run dir that holds checkpoints unless
        `train.resume=auto`, and a checkpoint of another model or tokenizer."""
        cfg = with_data_vocab(cfg)
        self.cfg, self.tc = cfg, cfg.train
        self.builders = builders or default_builders()
        init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device()
        self.run_dir = Path(self.tc.out_dir)
        self._make_run_dir()
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", self.tc.keep_last, self.rank)
        resume_tag = self._resume_tag()

        self.resolved = resolve(cfg)
        tokenizer_path = None if self.tc.synthetic_data else self.builders.check_data(
            cfg.data, self.resolved.model, self.tc.seq_len)
        tokenizer_bytes, self.tokenizer_sha = _tokenizer_bytes(tokenizer_path)

        seed_everything(self.tc.seed)  # same initial weights on every rank
        self.plan = self.builders.parallel(cfg.parallel)
        self.model, self.flops_per_token = self._build_model()
        self._settle_batch_layout()
        if self.tc.compile:  # after the probe, which runs eagerly at several shapes
            compile_blocks(self.model)
        self.config_plain = plain(self.resolved)
        self.config_yaml = yaml.safe_dump(self.config_plain, sort_keys=False).encode()
        self.optimizer = build_optimizer(self.model, self.tc)
        self.scheduler = build_scheduler(self.optimizer, self.tc)
        resume = self._read_resume_point(resume_tag)
        self.engine = self._build_engine(universal=resume is not None and resume.universal)
        self.loader = self.make_loader("train")
        if self.tc.eval_every:
            self._check_validation_split()
        self.guard = NonFiniteGuard(self.tc.max_nonfinite_in_row)
        self.step = 0
        rng_state = self._resume(resume) if resume is not None else None

        if self.rank == 0:
            atomic_write_bytes(self.run_dir / "config.yaml", self.config_yaml)
        self.files = self._checkpoint_files(tokenizer_path, tokenizer_bytes)
        self.logger = MetricsLogger(self.run_dir, enabled=self.rank == 0, resume_step=self.step)
        from tqdm import tqdm

        self.bar = tqdm(total=self.tc.steps, initial=self.step, disable=not (self.rank == 0 and self.tc.progress),
                        dynamic_ncols=True, desc="train")
        if rng_state is not None:  # last: nothing in set-up draws from the restored streams before the first step
            restore_rng_state(rng_state)
        self.batches = BatchStream(self.loader, self.device)
        self.timer = PhaseTimer(self.tc.phase_timing, cuda=self.device.type == "cuda")
        self.profiler = StepProfiler(self.tc.profile_step, self.run_dir / "profile", self.rank,
                                     cuda=self.device.type == "cuda")
        self.timed_step = self.step
        self.started = time.monotonic()
        self.clock = StepClock(self.step)
        self.first_step = self.step
        self.last_losses: dict[str, float] = {}  # the latest logged train/val loss, for the summary line
        if resume is not None and self.rank == 0:
            self.bar.write(f"resumed from {self.ckpt.dir / resume.tag} at step {self.step}")

    # -- set-up ----------------------------------------------------------------------------------------------------

    def _make_run_dir(self) -> None:
        """Create train.out_dir (rank 0) and check that it takes files, so that an impossible or read-only path
        stops the run in one line before set-up rather than at the first save."""
        problem = None
        if self.rank == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.run_dir).close()
            except OSError as err:
                problem = f"train.out_dir: cannot write to {self.run_dir} ({describe_os_error(err)})"
        (failed,) = any_rank(problem is not None)
        if failed:
            raise ConfigError(problem or f"train.out_dir: rank 0 cannot write to {self.run_dir}")

    def _resume_tag(self) -> Optional[str]:
        """The checkpoint tag to continue from under `train.resume=auto` (the newest intact one, with a line naming
        what was skipped and why), else None."""
        if self.tc.resume != "auto":
            if (self.ckpt.dir / "latest").exists():
                raise CheckpointError(
                    f"{self.run_dir} already holds checkpoints: pass train.resume=auto (or --resume) to continue, "
                    "or choose another train.out_dir"
                )
            return None
        tag, skipped = newest_intact(self.ckpt.dir)
        if tag is None and skipped:
            raise CheckpointError(f"no intact checkpoint to resume in {self.ckpt.dir}: {skipped[0]}")
        if skipped and self.rank == 0:
            more = f" ({len(skipped) - 1} more skipped)" if len(skipped) > 1 else ""
            print(f"atlas-train: warning: {skipped[0]}{more}; resuming from {tag} (step {step_of(tag)}) instead",
                  file=sys.stderr)
        return tag

    def _build_model(self) -> tuple[torch.nn.Module, Optional[float]]:
        """The model as the plan parallelizes it, with the train config's recompute and loss settings, and its FLOPs
        per token (for MFU, on GPU only)."""
        full_model = self.builders.model(self.resolved.model)
        # Counted on the whole model, before TP sharding or ZeRO-3 partitioning hide parameters from it.
        flops_per_token = full_model.flops_per_token(self.tc.seq_len) if torch.cuda.is_available() else None
        model = self.plan.parallelize(full_model)
        self.speed = apply_speed_settings(model, self.tc, tp_size=self.plan.tp_size, cp_size=self.plan.cp_size)
        return model, flops_per_token

    def _settle_batch_layout(self) -> None:
        """Fix micro-batch and accumulation (probing the GPU for `micro_batch_size: auto`) and keep them, with the
        recompute and loss settings that `auto` chose, in the config the run saves: the logs and a resumed run see
        what ran."""
        micro, accum = batch_layout(self.tc, self.plan.dp_size, self._probe_micro_batch)
        self.tc = dataclasses.replace(self.tc, micro_batch_size=micro, grad_accum=accum, global_batch_size=None,
                                      activation_checkpointing=self.speed.activation_checkpointing,
                                      fused_cross_entropy=self.speed.fused_cross_entropy)
        self.cfg = dataclasses.replace(self.cfg, train=self.tc)
        self.resolved = dataclasses.replace(self.resolved, train=self.tc)
        if self.rank == 0:
            print(f"train: micro-batch {micro} x {accum} accumulation x {self.plan.dp_size} data-parallel ranks; "
                  f"{self.speed.describe()}", flush=True)

    def _probe_micro_batch(self, sizes: list[int]) -> int:
        """The largest of `sizes` that fits every data-parallel rank's GPU (one forward + backward each)."""
        if self.device.type != "cuda":
            raise ProbeError("train.micro_batch_size auto probes GPU memory; on CPU give a number")
        if self.plan.tp_size > 1 or self.plan.cp_size > 1:
            raise ProbeError("train.micro_batch_size auto probes one rank alone, which tensor or context "
                             "parallelism forbids (its layers talk to other ranks); give a number")
        dtype = torch.bfloat16 if self.tc.precision == "bf16" else torch.float32
        self.model.to(self.device, dtype)
        n_params = sum(p.numel() for p in self.model.parameters())
        result = probe_micro_batch(
            model_step_runner(self.model, self.tc.seq_len, self.resolved.model.vocab_size, self.device), sizes,
            budget_bytes=0.9 * torch.cuda.get_device_properties(self.device).total_memory,
            engine_bytes=engine_state_bytes(n_params, self.tc.zero_stage, self.plan.dp_size))
        if self.rank == 0:
            print(f"train: {result.describe()}", flush=True)
        micro = torch.tensor(result.micro_batch_size, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(micro, op=dist.ReduceOp.MIN)
        return int(micro)

    def _read_resume_point(self, tag: Optional[str]) -> Optional[ResumePoint]:
        """The checkpoint `tag`, checked against this run's layout, model and tokenizer before the engine is built."""
        if tag is None:
            return None
        client, dp_changed = read_resume_client(self.ckpt, tag, Layout.of_plan(self.plan))
        _check_resumable(client, self.config_plain, self.tokenizer_sha, self.ckpt.dir / tag)
        return ResumePoint(tag, client, dp_changed)

    def _build_engine(self, universal: bool):
        """DeepSpeed's engine over the model and the client optimizer; `universal`: set to load a universal checkpoint
        (a resume under another data-parallel size)."""
        import deepspeed

        config = build_deepspeed_config(self.tc, load_universal=universal)
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=config,
                                               mpu=self.plan.mpu)
        follow_global_grad_norm(self.optimizer, engine)
        return engine

    def _resume(self, point: ResumePoint) -> Optional[dict]:
        """Weights, optimizer moments, data position, NaN counters, schedule and step from `point`; returns the RNG
        state to restore once set-up is done."""
        if point.universal:
            prepare_universal(self.ckpt.dir / point.tag, self.rank)
            with repairing_universal_load(self.optimizer):
                self.ckpt.load_engine(self.engine, point.tag, universal=True)
        else:
            self.ckpt.load_engine(self.engine, point.tag)
        client = point.client
        self.loader.load_state_dict(client["data"])
        self.guard.load_state_dict(client["nonfinite"])
        move_scheduler_to(self.scheduler, client["step"])
        self.step = client["step"]
        if not point.dp_changed:
            return client["rng"]
        # Another DP size has other ranks: their RNG streams start afresh, the same way on every run.
        seed_everything(self.tc.seed + self.step)
        return None

    def _check_validation_split(self) -> None:
        """Stop at set-up, naming the flags to change, when validation is on but the val split gives no batch."""
        from atlas_train.data import DataError

        try:
            self.make_loader("val")
        except DataError as err:
            raise DataError(f"{err}; {VALIDATION_HINT}") from None

    def _checkpoint_files(self, tokenizer_path: Optional[Path], tokenizer_bytes: Optional[bytes]) -> dict[str, bytes]:
        """What rank 0 writes beside every checkpoint, so that a tag alone can be exported and resumed (the tokenizer
        under the name it has in the dataset)."""
        files = {"config.yaml": self.config_yaml}
        if self.plan.tp_size > 1:  # how export joins the TP shards (names and split dims are the same on every TP rank)
            files[TP_LAYOUT] = json.dumps(tp_layout(self.model), indent=1).encode()
        if tokenizer_path is not None:
            files[Path(tokenizer_path).name] = tokenizer_bytes
        return files

    def make_loader(self, split: str) -> Iterable:
        """A fresh loader of `split` ("train" or "val") for this data-parallel rank."""
        tc = self.tc
        if tc.synthetic_data:
            return SyntheticLoader(
                self.resolved.model.vocab_size, seq_len=tc.seq_len, micro_batch_size=tc.micro_batch_size,
                dp_rank=self.plan.dp_rank, seed=tc.seed + (split == "val"),
            )
        return self.builders.loader(
            self.cfg.data, split, seq_len=tc.seq_len, micro_batch_size=tc.micro_batch_size,
            dp_rank=self.plan.dp_rank, dp_size=self.plan.dp_size, seed=tc.seed,
        )

    # -- the step --------------------------------------------------------------------------------------------------

    def next_batch(self) -> dict:
        """The next training micro-batch, on the device."""
        return self.batches.next()

    def forward(self, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch (this rank's shard of it under context parallelism)."""
        part = self.plan.shard_batch(batch)
        return self.engine(part["input_ids"], doc_start=part["doc_start"], labels=part["labels"]).loss

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of one micro-batch's loss, accumulated by DeepSpeed."""
        self.engine.backward(loss)

    def optimizer_step(self, apply: bool) -> None:
        """The update at the accumulation boundary, left out (weights and moments untouched) unless `apply`; the
        schedule advances either way.

        The schedule is stepped here, not by DeepSpeed: DeepSpeed holds its scheduler back on the steps it finds
        non-finite itself (some ZeRO/precision paths only), and a skipped step must cost the same on every path.
        """
        self.optimizer.skip = not apply
        self.engine.step()
        self.optimizer.skip = False
        self.scheduler.step()

    def train_step(self, flags: Callable[[], tuple[bool, ...]] = tuple) -> tuple[torch.Tensor, bool, tuple[bool, ...]]:
        """One optimizer step over `grad_accum` micro-batches; the step count, the schedule and the NaN guard advance
        with it (the guard raises after too many skipped steps in a row).

        Returns (mean loss on this rank, still on the device; whether the step was applied; each of `flags()`, read
        after the last micro-batch's backward, OR-ed over ranks). The step's only device sync is the one the NaN
        policy needs before the update; the run's other per-step agreements (preemption, time limit) ride on the same
        all-reduce.
        """
        losses = []
        for micro in range(self.tc.grad_accum):
            batch = self.next_batch()
            with self.timer.phase("forward"):
                loss = self.forward(batch)
            with self.timer.phase("backward"):
                self.backward(loss)
            losses.append(loss.detach().float())
            if micro < self.tc.grad_accum - 1:
                self.engine.step()  # DeepSpeed counts the micro-batch; the update waits for the last one
        bad, *agreed = any_rank(~torch.isfinite(torch.stack(losses)).all(), *flags())
        with self.timer.phase("optimizer"):
            self.optimizer_step(apply=not bad)
        self.step += 1
        self.guard.record(not bad, self.step)
        return torch.stack(losses).mean(), not bad, tuple(agreed)

    def log_step(self, local_loss: torch.Tensor, lr: float) -> None:
        """Log the step just taken: loss (reduced over ranks, a collective: every rank logs at the same steps), rate,
        throughput, skipped steps and the model's memory statistics."""
        loss = self.plan.loss_for_logging(local_loss)
        dt = self.clock.seconds_per_step(self.step)
        values = _step_metrics(self.engine, self.tc, self.plan, loss, lr, dt, self.world_size, self.flops_per_token)
        values["train/skipped_steps"] = self.guard.total
        values["perf/elapsed_s"] = time.monotonic() - self.started  # wall time, logging and data included
        values.update({f"perf/{name}_s": sec for name, sec in self.timer.collect(self.step - self.timed_step).items()})
        self.timed_step = self.step
        self.logger.log(self.step, values)
        self.last_losses["train"] = loss
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{values['train/lr']:.2e}", refresh=False)
        self.clock.restart(self.step)

    # -- between steps ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the first `eval_batches` validation batches (the same ones every time), averaged over
        ranks; logged at the current step."""
        self.engine.eval()
        total, count = torch.zeros((), device=self.device), 0
        for _, batch in zip(range(self.tc.eval_batches), self.make_loader("val")):
            total += self.forward({k: v.to(self.device) for k, v in batch.items()}).float()
            count += 1
        self.engine.train()
        if count == 0:
            from atlas_train.data import DataError

            raise DataError(f"the validation split of {self.cfg.data.path} gave no batch; {VALIDATION_HINT}")
        val = self.plan.loss_for_logging(total / count)
        self.last_losses["val"] = val
        ppl = math.exp(min(val, 50.0))
        self.logger.log(self.step, {"val/loss": val, "val/ppl": ppl})
        self.bar.write(f"step {self.step}: val loss {val:.4f}  ppl {ppl:.2f}")
        return val

    def save(self) -> None:
        """Checkpoint the current step: the engine's state, and this rank's data position, RNG states, counters,
        config and tokenizer hash; published through `latest` once every rank has written."""
        client = {
            "step": self.step,
            "data": self.loader.state_dict(),
            "rng": capture_rng_state(),
            "nonfinite": self.guard.state_dict(),
            "config": self.config_plain,
            "tokenizer_sha256": self.tokenizer_sha,
        }
        self.ckpt.save(self.engine, self.step, client, self.files)

    def out_of_time(self) -> bool:
        """Whether `train.max_minutes` of wall time have passed since set-up."""
        return self.tc.max_minutes is not None and time.monotonic() - self.started > self.tc.max_minutes * 60

    def stop(self, preempted: bool, out_of_time: bool, interrupted: bool = False) -> Optional[int]:
        """The exit code when the run ends early after this step's checkpoint, else None: EXIT_INTERRUPTED after
        Ctrl-C, EXIT_PREEMPTED after a preemption signal (the launcher requeues it), 0 when `train.max_minutes` ran
        out."""
        if interrupted:
            self.bar.write(f"interrupted: checkpoint {self.ckpt.dir / tag_for(self.step)} saved, exiting with "
                           f"{EXIT_INTERRUPTED} (train.resume=auto continues; a second Ctrl-C stops at once)")
            return EXIT_INTERRUPTED
        if preempted:
            self.bar.write(f"preempted: checkpoint {self.step} saved, exiting with {EXIT_PREEMPTED} for requeue")
            return EXIT_PREEMPTED
        if out_of_time:
            self.bar.write(f"train.max_minutes reached at step {self.step}: checkpoint saved")
            return 0
        return None

    def fit(self) -> int:
        """Step until `train.steps`, a preemption signal or `train.max_minutes`, validating and saving on schedule
        (and before an early stop); returns the process exit code."""
        tc = self.tc
        try:
            # Installed before any DataLoader worker forks: workers inherit the handler, so a scheduler signalling the
            # whole process tree does not kill them under the main process.
            with PreemptionFlag() as preempt:
                if self.step == 0 and tc.eval_every:
                    self.validate()  # the untrained baseline, so the curve shows where it fell from
                self.clock.restart(self.step)
                while self.step < tc.steps:
                    lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
                    # Agreed on in the NaN check's all-reduce, which saves a collective (and a sync) per step.
                    with self.profiler.around(self.step + 1):
                        local_loss, _, (preempted, interrupted, out_of_time) = self.train_step(
                            lambda: (preempt.requested, preempt.interrupted, self.out_of_time()))
                    last = self.step == tc.steps
                    if self.step % tc.log_every == 0 or last:
                        self.log_step(local_loss, lr)
                    self.bar.update(1)
                    if tc.eval_every and (self.step % tc.eval_every == 0 or last or out_of_time):
                        self.validate()
                        self.clock.restart(self.step)
                    if last or preempted or interrupted or out_of_time or (
                            tc.save_every and self.step % tc.save_every == 0):
                        self.save()
                        self.clock.restart(self.step)
                    code = self.stop(preempted, out_of_time, interrupted)
                    if code is not None:
                        return code
        finally:
            self.close()
        self.summarize()
        return 0

    def summarize(self) -> None:
        """One line (rank 0) at the end of a finished run: steps, tokens, the final losses, where the checkpoint is."""
        if self.rank != 0:
            return
        tc = self.tc
        tokens = (self.step - self.first_step) * tc.micro_batch_size * tc.grad_accum * tc.seq_len * self.plan.dp_size
        losses = "".join(f", {name} loss {self.last_losses[name]:.4f}" for name in ("train", "val")
                         if name in self.last_losses)
        self.bar.write(f"done: step {self.step} ({self.step - self.first_step} steps, {tokens:,} tokens this run"
                       f"{losses}); checkpoint {self.ckpt.dir / tag_for(self.step)}; export it with: atlas-train "
                       f"export --checkpoint {self.run_dir} --out {self.run_dir / 'export'}")

    def close(self) -> None:
        """Close the progress bar and the metrics files."""
        self.bar.close()
        self.logger.close()


def train(cfg, builders: Optional[Builders] = None) -> int:
    """Train `cfg` (a run Config with model/data/parallel/train sections); returns the process exit code."""
    return Trainer(cfg, builders).fit()
