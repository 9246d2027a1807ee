"""End to end under a real one-node slurm (tests/local_slurm.py): the demo training through launch/submit.sh and
launch/slurm.sbatch with 2 gloo processes, finishing; and a job preempted twice (SIGUSR1, then `scontrol requeue`)
that resumes from its checkpoints and logs the same per-step losses as the uninterrupted job.

The cluster is installed (apt-get) and started here and stopped after; no daemon may outlive the module.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import local_slurm
from repo_paths import REPO

pytestmark = pytest.mark.slow

SUBMIT = REPO / "launch" / "submit.sh"
SEQ_LEN, VOCAB, STEPS = 32, 256, 24
# The demo model and training, shrunk so a run is a few seconds on 2 CPU cores.
TINY = [
    "model.n_layers=1", "model.d_model=64", "model.mlp_hidden=128", f"model.vocab_size={VOCAB}",
    f"model.max_seq_len={SEQ_LEN}", f"train.seq_len={SEQ_LEN}", f"train.steps={STEPS}", "train.micro_batch_size=2",
    "train.warmup_steps=2", "train.eval_every=0", "train.save_every=0", "train.progress=false",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="atlas-slurm-"))
    slurm = local_slurm.LocalSlurm(root)
    try:
        slurm.start(cpus=2)
        yield slurm
    finally:
        pids = [int(p.read_text().split()[0]) for p in root.glob("*/*.pid")]
        slurm.stop()
        alive = [pid for pid in pids if local_slurm._alive(pid)]
        shutil.rmtree(root, ignore_errors=True)
        assert not alive, f"daemons still running after stop: {alive}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from atlas_train.data_prep.writer import write_dataset

    rng = np.random.default_rng(0)

    def rows(n):
        for _ in range(n):
            doc_start = np.zeros(SEQ_LEN + 1, dtype=bool)
            doc_start[0] = True
            yield rng.integers(0, 32, SEQ_LEN + 1), doc_start  # few distinct tokens: the loss falls visibly

    out = tmp_path_factory.mktemp("data") / "shards"
    write_dataset(out, {"train": rows(256), "val": rows(16)}, seq_len=SEQ_LEN, vocab_size=VOCAB, shard_size_mb=0.01)
    return out


def _submit(cluster, run_dir: Path, dataset: Path, log_dir: Path) -> int:
    env = dict(cluster.env, NPROC_PER_NODE="2", LOG_DIR=str(log_dir))
    env.pop("ATLAS_ENTRY", None)
    args = ["--config", str(REPO / "configs" / "demo.yaml"), f"data.path={dataset}", f"train.out_dir={run_dir}", *TINY]
    proc = subprocess.run([str(SUBMIT), "--job-name", run_dir.name, "--cpus-per-task", "2", "--", *args],
                          env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


def _job_field(cluster, job: int, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", str(job)], env=cluster.env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def _log(log_dir: Path, job: int) -> str:
    found = list(log_dir.glob(f"*-{job}.log"))
    return found[0].read_text() if found else ""


def _wait(what: str, condition, cluster, job: int, log_dir: Path, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    subprocess.run(["scancel", str(job)], env=cluster.env)
    pytest.fail(f"timed out waiting for {what}; job state {_job_field(cluster, job, 'JobState')}; log:\n"
                f"{_log(log_dir, job)[-4000:]}")


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    # Only whole lines: rank 0 may be appending one right now.
    lines = [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]
    return {rec["step"]: rec["train/loss"] for rec in lines if "train/loss" in rec}


def _first_checkpoint_step(log_dir: Path, job: int) -> int:
    """The step of the first preemption checkpoint (a large number until the log shows it)."""
    found = re.findall(r"preempted: checkpoint (\d+) saved", _log(log_dir, job))
    return int(found[0]) if found else 10**9


def _wait_done(cluster, job: int, log_dir: Path) -> None:
    _wait(f"job {job} to end", lambda: _job_field(cluster, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
          cluster, job, log_dir)


@pytest.fixture(scope="module")
def uninterrupted(cluster, dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("uninterrupted")
    run_dir, log_dir = base / "run", base / "logs"
    job = _submit(cluster, run_dir, dataset, log_dir)
    _wait_done(cluster, job, log_dir)
    return job, run_dir, log_dir


def test_sbatch_runs_the_demo_training_with_two_processes_to_the_end(cluster, uninterrupted):
    job, run_dir, log_dir = uninterrupted
    log = _log(log_dir, job)
    assert _job_field(cluster, job, "JobState") == "COMPLETED", log
    assert _job_field(cluster, job, "ExitCode") == "0:0"
    assert f"job {job} attempt 0: 1 node(s) x 2 process(es)" in log
    assert f"job {job} attempt 0: exit 0 (finished)" in log
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.1, losses
    assert (run_dir / "checkpoints" / "latest").read_text().strip()
    config = (run_dir / "config.yaml").read_text()
    assert "resume: auto" in config


def test_preempted_job_resumes_from_its_checkpoints_to_the_same_losses(cluster, dataset, uninterrupted, tmp_path):
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    job = _submit(cluster, run_dir, dataset, log_dir)

    # 1. SIGUSR1 to the job's steps, as --signal=USR1@N does before the time limit.
    _wait("the first steps", lambda: len(_losses(run_dir)) >= 2, cluster, job, log_dir)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster.env, check=True)
    _wait("the requeued attempt 1 to train", lambda: "attempt 1: 1 node(s)" in _log(log_dir, job)
          and max(_losses(run_dir), default=0) > _first_checkpoint_step(log_dir, job), cluster, job, log_dir)

    # 2. slurm's own requeue (SIGTERM to every process, as preemption does) while attempt 1 trains.
    subprocess.run(["scontrol", "requeue", str(job)], env=cluster.env, check=True)
    _wait_done(cluster, job, log_dir)

    log = _log(log_dir, job)
    assert _job_field(cluster, job, "JobState") == "COMPLETED", log
    assert _job_field(cluster, job, "Restarts") == "2", log
    assert f"job {job} attempt 0: exit 75 (preempted; checkpoint saved; requeued)" in log
    assert f"job {job} attempt 1: stopped by slurm (SIGTERM" in log
    assert f"job {job} attempt 2: exit 0 (finished)" in log
    saved = sorted({int(s) for s in re.findall(r"preempted: checkpoint (\d+) saved", log)})  # one line per rank
    assert len(saved) == 2 and 0 < saved[0] < saved[1] < STEPS, log  # both preemptions checkpointed, in order
    reference = _losses(uninterrupted[1])
    assert _losses(run_dir) == reference  # every step's loss, bit for bit, as without the interruptions



def test_sbatch_outside_the_checkout_fails_with_a_clear_line(cluster, tmp_path):
    # slurm runs a copy of the script: without submit.sh or ATLAS_LAUNCH_DIR it looks for launch/ in the submit dir.
    env = dict(cluster.env)
    env.pop("ATLAS_LAUNCH_DIR", None)
    proc = subprocess.run(["sbatch", "--parsable", str(REPO / "launch" / "slurm.sbatch"), "--config", "x.yaml"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    job = int(proc.stdout.strip())
    _wait_done(cluster, job, tmp_path)
    assert _job_field(cluster, job, "ExitCode") == "2:0"
    assert _log(tmp_path, job).strip() == (
        f"slurm.sbatch: {tmp_path}/launch/torchrun.sh not found: "
        "submit from the repository root or set ATLAS_LAUNCH_DIR"
    )


def test_submit_without_separator_is_a_clear_error():
    proc = subprocess.run([str(SUBMIT), "--nodes", "2"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("submit.sh: expected '--' before the atlas-train arguments")
