"""Tensor- and context-parallel scaling on the GPUs of one host (issue 5): one command that always ends with its table.

    python3 benchmarks/bench_parallel.py --log-dir $OUT/bench_parallel    # 2 GPUs, at most --budget-s + 30 s
    python3 benchmarks/bench_parallel.py --smoke                          # CPU/gloo, demo model, under a minute

It measures, in this order:
  (a) TP=2 strong scaling of --tp-model (the 760M atlas) at context --tp-seq-len: tokens/s per GPU of TP=2 without and
      with sequence parallelism (SP needs CUDA) against TP=1 (data parallel), same global batch; goal >= 80%.
  (b) CP=2 weak scaling of --cp-model (the 340M atlas): CP=1 (data parallel) at T against CP=2 at 2T; goal >= 85%.
  (c) the longest context that trains one full step with CP=2 (--cp-model): T doubles from --longest-from until a
      GPU runs out of memory, --longest-max is reached, or the next step would not fit in the budget.

A step is forward + backward of the bf16 model plus the one flat gradient all-reduce over DP x CP that DeepSpeed
does; rows are timed with a fixed loop (one warm-up step, barrier, N steps, synchronize; the slowest rank counts),
never with do_bench, whose per-rank repeat counts hang collectives.

Why a driver: this process holds no GPU. It starts one torchrun job for (a) and one for (b)+(c). A rank that runs
out of memory cannot tell a peer that already waits for it inside a collective, so it records the OOM and exits at
once; torchrun then ends the peer, and the driver reports the last context that trained. A job that fails, or
overruns and is killed at its deadline, costs only its own remaining rows: the table always prints.

Budget (--budget-s, the whole run): (a) may use up to 45% of it, (b)+(c) the rest. Inside a job a row starts only
if its predicted time (from the rows before it) fits, and times as many steps (up to --steps) as its share allows;
a row without time for a timed step reports its warm-up step, marked *.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from atlas_train.config import ConfigError, load_config
from atlas_train.model import build_model
from atlas_train.parallel import ParallelConfig, setup_parallel
from atlas_train.train.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
OOM_EXIT = 3  # a worker's exit code after it recorded an out-of-memory error
TP_SHARE = 0.45  # of the budget, for (a)
GRACE_S = 30  # a job runs this long past its deadline (a step in flight cannot be cut short) before it is killed
UPDATE_NOTE = (
    "update=chunk (one Muon step per chunk) by default: update=token, the exact per-token step, took 82.7 s per 340M "
    "step at 4K on the PyTorch scan (RESULTS.md); --update token measures it"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, help="processes (default: the visible GPUs, or 2 without GPUs)")
    p.add_argument("--budget-s", type=float, default=400, help="wall time for all measurements (default 400)")
    p.add_argument("--tp-model", default="configs/model/760m.yaml")
    p.add_argument("--cp-model", default="configs/model/340m.yaml")
    p.add_argument("--tp-seq-len", type=int, default=4096, help="context of the TP rows")
    p.add_argument("--cp-seq-len", type=int, default=4096, help="T of the CP=1 row (the CP=2 row runs 2T)")
    p.add_argument("--longest-from", type=int, help="first context of the longest-context search (default 2T)")
    p.add_argument("--longest-max", type=int, default=1 << 21, help="stop the longest-context search here")
    p.add_argument("--global-batch", type=int, help="sequences per step in the TP rows (default: --gpus)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row after the warm-up (fewer if short)")
    p.add_argument("--update", choices=["chunk", "token"], default="chunk", help=UPDATE_NOTE)
    p.add_argument("--model-override", action="append", default=[], help="another model.* key=value for all rows")
    p.add_argument("--phases", default="tp,cp", help="tp: (a); cp: (b)+(c)")
    p.add_argument("--log-dir", default="runs/bench_parallel", help="job logs and their row records")
    p.add_argument("--json", help="also write the rows and results here")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: demo model, tiny contexts, an injected OOM")
    p.add_argument("--inject-oom-at", type=int, help="fault injection: the last rank raises OutOfMemoryError after "
                   "the forward pass of the first step at this context (proves the OOM path without a GPU)")
    p.add_argument("--worker", choices=["tp", "cp"], help=argparse.SUPPRESS)  # set by the driver for its jobs
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # the job's deadline, epoch seconds
    args = p.parse_args(argv)
    if args.smoke:
        args.tp_model = args.cp_model = "configs/model/demo.yaml"
        args.tp_seq_len = args.cp_seq_len = 128
        args.longest_max = min(args.longest_max, 2048)
        args.budget_s = min(args.budget_s, 240)
        args.steps = 1
        if args.inject_oom_at is None:
            args.inject_oom_at = 1024
    if args.longest_from is None:
        args.longest_from = 2 * args.cp_seq_len
    return args


def model_label(path: str) -> str:
    return Path(path).stem


def model_config(path: str, args):
    overrides = [f"model.update={args.update}", *(f"model.{o}" for o in args.model_override)]
    return load_config([ROOT / path], overrides).model


# ---------------------------------------------------------------------------------------------------------------
# Worker: one torchrun job, one process per GPU.


class Records:
    """Append-only JSON lines the driver reads back, written as each event happens so a killed job keeps them."""

    def __init__(self, path: Path):
        self.path = path

    def add(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class Job:
    """What every row of a worker shares: device, records, deadline, arguments."""

    def __init__(self, args):
        self.args = args
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if self.cuda else "gloo", timeout=datetime.timedelta(minutes=10))
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.records = Records(Path(args.log_dir) / f"{args.worker}.jsonl")
        if self.rank == 0:
            props = torch.cuda.get_device_properties(self.device) if self.cuda else None
            self.records.add(kind="env", device=props.name if props else "cpu", world=self.world,
                             capacity_gib=props.total_memory / 2**30 if props else None)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def agreed(self, value: float, op: str = "max") -> float:
        """One number every rank agrees on (all decisions use these, so all ranks take the same branch)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
        return t.item()

    def remaining(self) -> float:
        return self.agreed(self.args.deadline - time.time(), op="min")

    def row(self, phase: str, name: str, model: str, cfg, par, seq_len: int, batch: int, share: float,
            estimate: float | None, timed: bool = True) -> dict | None:
        """Measure one row (None if skipped). share: the part of the time left this row may spend on timed steps.
        estimate: the predicted time of its warm-up step; the row is skipped when that does not fit."""
        base = dict(kind="row", phase=phase, name=name, model=model, update=cfg.update, T=seq_len, batch=batch,
                    tp=par.tensor_parallel, cp=par.context_parallel, sp=par.sequence_parallel)
        left = self.remaining()
        if par.sequence_parallel and not self.cuda:
            return self._skip(base, "skipped: SP needs CUDA")
        if left <= 0:
            return self._skip(base, "skipped: no time left")
        if estimate is not None and estimate > left:
            return self._skip(base, f"skipped: predicted {estimate:.0f} s > {left:.0f} s left")
        if self.rank == 0:
            self.records.add(**{**base, "kind": "start"})
        try:
            result = self._measure(cfg, par, seq_len, batch, share * left, timed)
        except RuntimeError as exc:  # torch.OutOfMemoryError, or cuBLAS/cuDNN failing to allocate
            if not out_of_memory(exc):
                raise
            # No collective is safe now (a peer may be inside one, waiting for us): record and leave at once;
            # torchrun ends the peers.
            self.records.add(kind="oom", name=name, T=seq_len, rank=self.rank, error=str(exc).splitlines()[0][:200])
            os._exit(OOM_EXIT)
        result = {**base, "status": "ok", **result}
        if self.rank == 0:
            self.records.add(**result)
        return result

    def _skip(self, base: dict, status: str) -> None:
        if self.rank == 0:
            self.records.add(**base, status=status)
        return None

    def _measure(self, cfg, par, seq_len: int, batch: int, time_for_steps: float, timed: bool) -> dict:
        plan = setup_parallel(par)
        micro = batch // plan.dp_size
        torch.manual_seed(0)
        cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len))
        with torch.device(self.device):
            model = build_model(cfg)
        model = plan.parallelize(model.to(torch.bfloat16 if self.cuda else torch.float32))
        params = [p for p in model.parameters() if p.requires_grad]
        group = plan.mpu.get_data_parallel_group() if plan.mpu else None
        if group is not None and dist.get_world_size(group) == 1:
            group = None
        gen = torch.Generator().manual_seed(plan.dp_rank)  # one batch per DP replica, the same on its TP/CP ranks
        tokens = torch.randint(0, cfg.vocab_size, (micro, seq_len + 1), generator=gen).to(self.device)
        inputs = plan.shard_batch({"tokens": tokens, "doc_start": torch.zeros_like(tokens, dtype=torch.bool)})
        inject = self.args.inject_oom_at == seq_len and self.rank == self.world - 1

        def step():
            loss = model(inputs["input_ids"], inputs["doc_start"], labels=inputs["labels"]).loss
            if inject:
                raise torch.OutOfMemoryError(f"injected by --inject-oom-at {seq_len}")
            loss.backward()
            if group is not None:  # DeepSpeed's gradient average over DP x CP, as one flat buffer
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat, group=group)
            for p in params:
                p.grad = None

        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        first = self._loop(step, 1)
        steps = min(self.args.steps, int(time_for_steps // first) - 1) if timed else 0
        step_s = self._loop(step, steps) if steps > 0 else first
        peak = self.agreed(torch.cuda.max_memory_allocated() / 2**30 if self.cuda else 0.0)
        step = model = params = inputs = None  # free this length's model and batch before the next one's
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        tok_s_gpu = batch * seq_len / step_s / self.world
        return dict(step_s=step_s, first_s=first, steps=max(steps, 0), tok_s_gpu=tok_s_gpu,
                    peak_gib=peak if self.cuda else None)

    def _loop(self, step, n: int) -> float:
        """Seconds per step of n steps started together on every rank; the slowest rank's time."""
        self.sync()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(n):
            step()
        self.sync()
        return self.agreed((time.perf_counter() - start) / n)


def out_of_memory(exc: RuntimeError) -> bool:
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def tp_job(job: Job) -> None:
    """(a): TP=1 (data parallel), TP=2, TP=2 + SP with the same global batch; the rows share the time equally."""
    args = job.args
    cfg, label = model_config(args.tp_model, args), model_label(args.tp_model)
    batch = args.global_batch or job.world
    layouts = [("TP=1 (DP)", ParallelConfig()), ("TP=2", ParallelConfig(tensor_parallel=2)),
               ("TP=2 + SP", ParallelConfig(tensor_parallel=2, sequence_parallel=True))]
    estimate = None
    for i, (name, par) in enumerate(layouts):
        out = job.row("tp", name, label, cfg, par, args.tp_seq_len, batch, 1 / (len(layouts) - i), estimate)
        if out is not None:
            estimate = 1.2 * out["first_s"]


def cp_job(job: Job) -> None:
    """(b) then (c). The search counts as two rows when (b) shares out the time."""
    args = job.args
    cfg, label = model_config(args.cp_model, args), model_label(args.cp_model)
    T, dp = args.cp_seq_len, job.world
    cp1 = job.row("cp", "CP=1 (DP)", label, cfg, ParallelConfig(), T, dp, 1 / 4, None)
    cp2 = job.row("cp", "CP=2 at 2T", label, cfg, ParallelConfig(context_parallel=2), 2 * T, dp // 2, 1 / 3,
                  None if cp1 is None else 1.2 * cp1["first_s"])
    length = 2 * args.longest_from if cp2 is not None and cp2["T"] == args.longest_from else args.longest_from
    last = cp2 or cp1  # step time scales with the tokens each rank runs (the scan is linear in T)
    while length <= args.longest_max:
        estimate = None if last is None else 1.2 * last["first_s"] * (length / 2) / (last["T"] / last["cp"])
        out = job.row("longest", "CP=2 longest", label, cfg, ParallelConfig(context_parallel=2), length, dp // 2,
                      0.0, estimate, timed=False)
        if out is None:
            return
        last, length = out, 2 * length
    if job.rank == 0:
        job.records.add(kind="stop", reason=f"reached --longest-max {args.longest_max}")


def worker(args) -> None:
    job = Job(args)
    (tp_job if args.worker == "tp" else cp_job)(job)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Driver: starts the jobs, enforces the budget, reads the records back, prints the table.


def run_job(cmd: list[str], log: Path, deadline: float) -> tuple[int, bool]:
    """Run one torchrun job in its own session; stop the whole session GRACE_S after the deadline, or when this
    driver is itself stopped (so no worker is left holding a GPU)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            return proc.wait(timeout=max(deadline - time.time(), 0) + GRACE_S), False
        except subprocess.TimeoutExpired:
            return stop_session(proc), True
        finally:
            if proc.poll() is None:
                stop_session(proc)


def stop_session(proc: subprocess.Popen) -> int:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def job_rows(records: list[dict], code: int, killed: bool, log: Path) -> tuple[list[dict], list[dict]]:
    """The rows of one job in order, a row that never finished named by how its job ended; and the OOM records."""
    rows, ooms = [], [r for r in records if r["kind"] == "oom"]
    for r in records:
        if r["kind"] == "start":
            rows.append({**r, "kind": "row", "status": None})
        elif r["kind"] == "row":
            if rows and rows[-1]["status"] is None and (rows[-1]["name"], rows[-1]["T"]) == (r["name"], r["T"]):
                rows[-1] = r
            else:
                rows.append(r)
    for r in rows:
        if r["status"] is None:
            hit = sorted({o["rank"] for o in ooms if (o["name"], o["T"]) == (r["name"], r["T"])})
            if hit:
                r["status"] = f"OOM on rank {','.join(map(str, hit))}"
            elif killed:
                r["status"] = "killed at the deadline"
            else:
                r["status"] = f"failed (exit {code}), see {log}"
    return rows, ooms


def longest_result(rows: list[dict], records: list[dict]) -> str | None:
    """The longest CP=2 context that trained a step, and why the search stopped."""
    search = [r for r in rows if r["phase"] == "longest"]
    trained = [r for r in rows if r["cp"] == 2 and r["phase"] in ("cp", "longest") and r["status"] == "ok"]
    if not search and not trained:
        return None
    stopped = next((r for r in search if r["status"] != "ok"), None)
    stop = [r["reason"] for r in records if r["kind"] == "stop"]
    why = f"{stopped['status']} at {stopped['T']}" if stopped else (stop[0] if stop else "the job ended")
    if not trained:
        return f"no CP=2 context trained ({why})"
    best = max(trained, key=lambda r: r["T"])
    return f"{best['T']} tokens (peak {fmt(best['peak_gib'], '.1f')} GiB per GPU); the search stopped: {why}"


def efficiency(row: dict, rows: list[dict]) -> str:
    if row["status"] != "ok":
        return ""
    base_name, goal = {"tp": ("TP=1 (DP)", 0.8), "cp": ("CP=1 (DP)", 0.85)}.get(row["phase"], (None, None))
    base = next((r for r in rows if r["name"] == base_name and r["status"] == "ok"), None)
    if base is None:
        return ""
    if base is row:
        return "baseline"
    return f"{row['tok_s_gpu'] / base['tok_s_gpu']:.1%} (goal >= {goal:.0%})"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict], env: dict, longest: str | None, notes: list[str], used_s: float, args) -> str:
    head = (f"bench_parallel: {env.get('world', '?')} x {env.get('device', '?')}, budget {args.budget_s:.0f} s, "
            f"used {used_s:.0f} s, {' '.join(args.model_override) or 'no other model overrides'}")
    lines = [head, f"{'row':<14}{'model':<7}{'update':<7}{'tp':>3}{'cp':>3}{'sp':>3}{'T':>9}{'batch':>6}"
             f"{'steps':>6}{'step s':>9}{'tok/s/GPU':>11}{'peak GiB':>9}  efficiency / status"]
    for r in rows:
        ok = r["status"] == "ok"
        steps = (str(r["steps"]) if r["steps"] else "1*") if ok else "-"
        lines.append(
            f"{r['name']:<14}{r['model']:<7}{r['update']:<7}{r['tp']:>3}{r['cp']:>3}{'y' if r['sp'] else 'n':>3}"
            f"{r['T']:>9}{r['batch']:>6}{steps:>6}{fmt(r.get('step_s'), '.2f'):>9}"
            f"{fmt(r.get('tok_s_gpu'), '.0f'):>11}{fmt(r.get('peak_gib'), '.2f'):>9}  "
            f"{efficiency(r, rows) if ok else r['status']}")
    if longest:
        lines.append(f"longest context that trained one full step with CP=2: {longest}")
    lines.append("steps: timed steps after one warm-up; 1* = the warm-up step alone (the longest-context rows run "
                 "one step each)")
    if any(r["update"] == "chunk" for r in rows):
        lines.append(UPDATE_NOTE)
    return "\n".join(lines + notes)


def driver(args, argv: list[str]) -> int:
    asked = {p for p in args.phases.split(",") if p}
    if not asked or asked - {"tp", "cp"}:
        sys.exit(f"bench_parallel: --phases takes tp and/or cp, got {args.phases!r}")
    phases = [p for p in ("tp", "cp") if p in asked]  # always in the issue's order
    try:
        for phase in phases:
            model_config(args.tp_model if phase == "tp" else args.cp_model, args)
    except ConfigError as err:
        sys.exit(f"bench_parallel: {err}")
    gpus = args.gpus or torch.cuda.device_count() or 2
    if gpus % 2 or (args.global_batch or gpus) % gpus:
        sys.exit(f"bench_parallel: needs an even number of processes ({gpus}) and a global batch that they divide")
    log_dir = Path(args.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    end = start + args.budget_s
    rows, notes, env, ooms, records = [], [], {}, [], []
    for phase in phases:
        deadline = start + TP_SHARE * args.budget_s if phase == "tp" and "cp" in phases else end
        path, log = log_dir / f"{phase}.jsonl", log_dir / f"{phase}.log"
        path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
               str(Path(__file__).resolve()), *argv, "--log-dir", str(log_dir), "--worker", phase,
               "--deadline", str(deadline)]
        print(f"bench_parallel: job {phase} on {gpus} processes, {deadline - time.time():.0f} s, log {log}",
              flush=True)
        code, killed = run_job(cmd, log, deadline)
        records = read_records(path)
        env = next((r for r in records if r["kind"] == "env"), env)
        phase_rows, phase_ooms = job_rows(records, code, killed, log)
        rows += phase_rows
        ooms += phase_ooms
        if killed or (code != 0 and not phase_ooms):
            notes.append(f"job {phase}: {'killed at its deadline' if killed else f'exit {code}'}; log {log}")
    longest = longest_result(rows, records) if "cp" in phases else None
    text = table(rows, env, longest, notes, time.time() - start, args)
    if args.json:
        atomic_write_text(args.json, json.dumps({"env": env, "rows": rows, "oom": ooms, "longest": longest},
                                                indent=1))
    print("\n" + text, flush=True)
    return 0


@contextlib.contextmanager
def exit_on_sigterm():
    """SIGTERM (`timeout` stops us) exits, so run_job stops its job; the caller's handler comes back afterwards, so
    a process that calls main in-process (pytest) is not left exiting on a later SIGTERM."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with exit_on_sigterm():
        return driver(args, argv)


if __name__ == "__main__":
    sys.exit(main())
