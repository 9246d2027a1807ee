"""The training loop: one code path for one CPU process and for many GPUs (DeepSpeed ZeRO + our ParallelPlan).

Each optimizer step runs `grad_accum` micro-batches through the DeepSpeed engine; a non-finite loss on any rank
cancels that step's update everywhere (the schedule and the data still advance). Checkpoints carry everything a
bitwise-identical continuation needs: engine state (weights, AdamW moments) from DeepSpeed, and per rank
the data position, the RNG states and the counters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
import yaml

from atlas_train.train.atomic import atomic_write_bytes
from atlas_train.train.checkpoint import CheckpointError, CheckpointManager, read_latest
from atlas_train.train.deepspeed_config import build_deepspeed_config
from atlas_train.train.distributed import any_rank, device, init_distributed
from atlas_train.train.export import TP_LAYOUT, tp_layout
from atlas_train.train.metrics import MetricsLogger
from atlas_train.train.nonfinite import NonFiniteGuard
from atlas_train.train.optim import build_optimizer, build_scheduler, move_scheduler_to
from atlas_train.train.resize import Layout, prepare_universal, read_resume_client, repairing_universal_load
from atlas_train.train.rng import capture_rng_state, restore_rng_state, seed_everything
from atlas_train.train.signals import EXIT_PREEMPTED, PreemptionFlag
from atlas_train.train.synthetic import SyntheticLoader


@dataclass
class Builders:
    """What a run is assembled from; the defaults are the project's, tests pass tiny stand-ins."""

    model: Callable[[Any], torch.nn.Module]  # model config -> module
    loader: Callable[..., Iterable]  # build_loader(data_cfg, split, *, seq_len, micro_batch_size, dp_rank, dp_size, seed)
    check_data: Callable[[Any, Any, int], Optional[Path]]  # (data cfg, model cfg, seq_len) -> tokenizer.model path
    parallel: Callable[[Any], Any]  # parallel config -> ParallelPlan


def check_dataset(data_cfg, model_cfg, seq_len: int) -> Optional[Path]:
    """Stop early, with the file named, when the dataset is missing or does not fit the model; its tokenizer path."""
    from atlas_train.data import check_manifest, read_manifest

    manifest = read_manifest(data_cfg.path)
    check_manifest(manifest, model_cfg.vocab_size, seq_len)
    return manifest.tokenizer_path


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


class BatchStream:
    """Endless batches on the device; starts a new pass over the loader when one ends."""

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
        return {k: v.to(self.dev, non_blocking=True) for k, v in batch.items()}


def _forward(engine, plan, batch: dict) -> torch.Tensor:
    part = plan.shard_batch(batch)
    return engine(part["input_ids"], doc_start=part["doc_start"], labels=part["labels"]).loss


def train_step(engine, optimizer, scheduler, batches: BatchStream, plan, grad_accum: int,
               flags: Callable[[], tuple[bool, ...]] = tuple) -> tuple[torch.Tensor, bool, tuple[bool, ...]]:
    """One optimizer step over `grad_accum` micro-batches.

    Returns (mean loss on this rank, still on the device; whether the step was applied; each of `flags()`, read
    after the last micro-batch's backward, OR-ed over ranks). The loop's only device sync in a step is the one the
    NaN policy needs before the update; the run's other per-step agreements (preemption, time limit) ride on the same
    all-reduce. The schedule is stepped here, not by DeepSpeed: DeepSpeed holds its scheduler back on the steps it
    finds non-finite itself (some ZeRO/precision paths only), and a skipped step must cost the same on every path.
    """
    losses = []
    finite, agreed = True, ()
    for micro in range(grad_accum):
        loss = _forward(engine, plan, batches.next())
        engine.backward(loss)
        losses.append(loss.detach().float())
        if micro == grad_accum - 1:
            bad, *agreed = any_rank(~torch.isfinite(torch.stack(losses)).all(), *flags())
            finite = not bad
            optimizer.skip = bad
        engine.step()
    optimizer.skip = False
    scheduler.step()
    return torch.stack(losses).mean(), finite, tuple(agreed)


@torch.no_grad()
def evaluate(engine, plan, loader: Iterable, n_batches: int, dev: torch.device) -> float:
    """Mean loss over the first `n_batches` validation batches (the same ones every time), averaged over ranks."""
    engine.eval()
    total, count = torch.zeros((), device=dev), 0
    for _, batch in zip(range(n_batches), loader):
        total += _forward(engine, plan, {k: v.to(dev) for k, v in batch.items()}).float()
        count += 1
    engine.train()
    if count == 0:
        from atlas_train.data import DataError

        raise DataError("the validation split yielded no batch (train.eval_every=0 turns validation off)")
    return plan.loss_for_logging(total / count)


def _tokenizer_bytes(path: Optional[Path]) -> tuple[Optional[bytes], Optional[str]]:
    if path is None:
        return None, None
    data = Path(path).read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _check_resumable(client: dict, resolved_plain: dict, tokenizer_sha: Optional[str], tag_dir: Path) -> None:
    saved = client["config"]["model"]
    diff = sorted(k for k in set(saved) | set(resolved_plain["model"]) if saved.get(k) != resolved_plain["model"].get(k))
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


def train(cfg, builders: Optional[Builders] = None) -> int:
    """Train `cfg` (a run Config with model/data/parallel/train sections); returns the process exit code."""
    b = builders or default_builders()
    tc = cfg.train
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dev = device()
    run_dir = Path(tc.out_dir)
    ckpt = CheckpointManager(run_dir / "checkpoints", tc.keep_last, rank)
    resume_tag = read_latest(ckpt.dir) if tc.resume == "auto" else None
    if resume_tag is None and (ckpt.dir / "latest").exists():
        raise CheckpointError(
            f"{run_dir} already holds checkpoints: pass train.resume=auto (or --resume) to continue, "
            "or choose another train.out_dir"
        )

    resolved = resolve(cfg)
    resolved_plain = plain(resolved)
    config_yaml = yaml.safe_dump(resolved_plain, sort_keys=False).encode()
    tokenizer_path = None if tc.synthetic_data else b.check_data(cfg.data, resolved.model, tc.seq_len)
    tokenizer_bytes, tokenizer_sha = _tokenizer_bytes(tokenizer_path)

    seed_everything(tc.seed)  # same initial weights on every rank
    plan = b.parallel(cfg.parallel)
    full_model = b.model(resolved.model)
    # Counted on the whole model, before TP sharding or ZeRO-3 partitioning hide parameters from it.
    flops_per_token = full_model.flops_per_token(tc.seq_len) if torch.cuda.is_available() else None
    model = plan.parallelize(full_model)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    client, dp_changed = None, False
    if resume_tag is not None:
        client, dp_changed = read_resume_client(ckpt, resume_tag, Layout.of_plan(plan))
        _check_resumable(client, resolved_plain, tokenizer_sha, ckpt.dir / resume_tag)
    # ZeRO 1-3 partitions must be re-cut for another DP size (resize.py); ZeRO 0 files are whole already.
    universal = dp_changed and client["config"]["train"]["zero_stage"] >= 1
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=build_deepspeed_config(tc, load_universal=universal), mpu=plan.mpu
    )

    def make_loader(split: str):
        if tc.synthetic_data:
            return SyntheticLoader(
                resolved.model.vocab_size, seq_len=tc.seq_len, micro_batch_size=tc.micro_batch_size,
                dp_rank=plan.dp_rank, seed=tc.seed + (split == "val"),
            )
        return b.loader(
            cfg.data, split, seq_len=tc.seq_len, micro_batch_size=tc.micro_batch_size,
            dp_rank=plan.dp_rank, dp_size=plan.dp_size, seed=tc.seed,
        )

    loader = make_loader("train")
    guard = NonFiniteGuard(tc.max_nonfinite_in_row)
    step = 0
    rng_state = None
    if client is not None:
        if universal:
            prepare_universal(ckpt.dir / resume_tag, rank)
            with repairing_universal_load(optimizer):
                ckpt.load_engine(engine, resume_tag, universal=True)
        else:
            ckpt.load_engine(engine, resume_tag)
        loader.load_state_dict(client["data"])
        guard.load_state_dict(client["nonfinite"])
        move_scheduler_to(scheduler, client["step"])
        step = client["step"]
        # Another DP size has other ranks: their RNG streams start afresh, the same way on every run.
        rng_state = None if dp_changed else client["rng"]
        if dp_changed:
            seed_everything(tc.seed + step)
    if rank == 0:
        atomic_write_bytes(run_dir / "config.yaml", config_yaml)

    files = {"config.yaml": config_yaml}
    if plan.tp_size > 1:  # how export joins the TP shards (names and split dims are the same on every TP rank)
        files[TP_LAYOUT] = json.dumps(tp_layout(model), indent=1).encode()
    if tokenizer_bytes is not None:
        files["tokenizer.model"] = tokenizer_bytes

    def save() -> None:
        client = {
            "step": step,
            "data": loader.state_dict(),
            "rng": capture_rng_state(),
            "nonfinite": guard.state_dict(),
            "config": resolved_plain,
            "tokenizer_sha256": tokenizer_sha,
        }
        ckpt.save(engine, step, client, files)

    logger = MetricsLogger(run_dir, enabled=rank == 0, resume_step=step)
    from tqdm import tqdm

    bar = tqdm(total=tc.steps, initial=step, disable=not (rank == 0 and tc.progress), dynamic_ncols=True, desc="train")
    if rng_state is not None:
        restore_rng_state(rng_state)
    batches = BatchStream(loader, dev)
    started = time.monotonic()
    exit_code = 0

    def out_of_time_now() -> bool:
        return tc.max_minutes is not None and time.monotonic() - started > tc.max_minutes * 60

    def validate() -> None:
        val = evaluate(engine, plan, make_loader("val"), tc.eval_batches, dev)
        logger.log(step, {"val/loss": val, "val/ppl": math.exp(min(val, 50.0))})
        bar.write(f"step {step}: val loss {val:.4f}  ppl {math.exp(min(val, 50.0)):.2f}")

    try:
        # Installed before any DataLoader worker forks: workers inherit the handler, so a scheduler signalling the
        # whole process tree does not kill them under the main process.
        with PreemptionFlag() as preempt:
            if step == 0 and tc.eval_every:
                validate()  # the untrained baseline, so the curve shows where it fell from
            # Step time is averaged since the last log: between logs the host runs ahead of the device unsynced.
            timer_start, timer_step = time.perf_counter(), step
            while step < tc.steps:
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                # Agreed on in the NaN check's all-reduce, which saves a collective (and a sync) per step.
                local_loss, applied, (preempted, out_of_time) = train_step(
                    engine, optimizer, scheduler, batches, plan, tc.grad_accum,
                    lambda: (preempt.requested, out_of_time_now()),
                )
                step += 1
                guard.record(applied, step)
                last = step == tc.steps
                if step % tc.log_every == 0 or last:
                    loss = plan.loss_for_logging(local_loss)  # a collective: every rank logs at the same steps
                    now = time.perf_counter()
                    dt = (now - timer_start) / (step - timer_step)
                    values = _step_metrics(engine, tc, plan, loss, lr, dt, world_size, flops_per_token)
                    values["train/skipped_steps"] = guard.total
                    values["perf/elapsed_s"] = time.monotonic() - started  # wall time, logging and data included
                    logger.log(step, values)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{values['train/lr']:.2e}", refresh=False)
                    timer_start, timer_step = time.perf_counter(), step
                bar.update(1)
                if tc.eval_every and (step % tc.eval_every == 0 or last or out_of_time):
                    validate()
                    timer_start, timer_step = time.perf_counter(), step
                if last or preempted or out_of_time or (tc.save_every and step % tc.save_every == 0):
                    save()
                    timer_start, timer_step = time.perf_counter(), step
                if preempted:
                    bar.write(f"preempted: checkpoint {step} saved, exiting with {EXIT_PREEMPTED} for requeue")
                    exit_code = EXIT_PREEMPTED
                    break
                if out_of_time:
                    bar.write(f"train.max_minutes reached at step {step}: checkpoint saved")
                    break
    finally:
        bar.close()
        logger.close()
    return exit_code
