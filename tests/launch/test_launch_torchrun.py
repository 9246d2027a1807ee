"""launch/torchrun.sh and launch/elastic_run.py: rendezvous, environment defaults and exit codes, with 2 gloo workers.

The workers are tests/launch_probe.py (all-reduces in a loop, stops like atlas-train); the real training through
the same scripts is tested end to end under slurm in test_launch_slurm.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repo_paths import REPO, TESTS

TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
PROBE = TESTS / "launch_probe.py"


def _load_elastic_run():
    spec = importlib.util.spec_from_file_location("elastic_run", REPO / "launch" / "elastic_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NCCL_DEBUG")}
    env.update({"PYTHON": sys.executable, "ATLAS_ENTRY": f"{sys.executable} {PROBE}", **extra})
    return env


def _launch(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([str(TORCHRUN_SH), *args], env=popen.pop("env", _env()), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "codes, expected",
    [
        ([75, 75], 75),  # every rank checkpointed and asked for a requeue
        ([-signal.SIGTERM, 75], 75),  # one rank was stopped by the launcher after the other exited 75
        ([75, -signal.SIGTERM, 75], 75),
        ([-signal.SIGTERM, 2], 2),  # a real error is reported, not the launcher's clean-up of the other rank
        ([75, 3], 3),  # a crash beside a preemption is still a failure
        ([-signal.SIGSEGV, 75], 128 + signal.SIGSEGV),
        ([-signal.SIGTERM], 128 + signal.SIGTERM),
    ],
)
def test_exit_code_for_failures(codes, expected):
    assert _load_elastic_run().exit_code_for_failures(codes) == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nnodes", "2"], "needs --rdzv-endpoint"),
        (["--rdzv-endpoint", "h:1", "--node-rank", "0", "--master-addr", "h"], "either --rdzv-endpoint"),
        (["--node-rank", "1"], "needs --node-rank and --master-addr"),
        (["--nproc-per-node", "two"], "positive integer"),
        (["--nproc-per-node"], "needs a value"),
    ],
)
def test_bad_launcher_options_give_one_line_error(args, message):
    proc = subprocess.run([str(TORCHRUN_SH), *args], env=_env(), capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_python_without_atlas_train_is_a_clear_error():
    env = _env(PYTHON="/usr/bin/python3", PYTHONPATH="")
    env.pop("ATLAS_ENTRY")
    # Outside the checkout (python puts the working directory on sys.path).
    proc = subprocess.run([str(TORCHRUN_SH), "--config", "x.yaml"], env=env, capture_output=True, text=True, cwd="/")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("torchrun.sh: atlas_train is not importable by /usr/bin/python3")


def test_help_lists_the_options():
    proc = subprocess.run([str(TORCHRUN_SH), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for option in ("--nproc-per-node", "--nnodes", "--rdzv-endpoint", "--node-rank", "OMP_NUM_THREADS", "75"):
        assert option in proc.stdout


def test_two_workers_all_reduce_with_environment_defaults_and_arguments_passed_on(tmp_path):
    rc, out = _finish(_launch(["--nproc-per-node", "2", "--", "--out", str(tmp_path), "--steps", "3", "a.b=1"]))
    assert rc == 0, out
    records = [json.loads((tmp_path / f"done.{r}.json").read_text()) for r in range(2)]
    cpus = len(os.sched_getaffinity(0))
    for rank, rec in enumerate(records):
        assert rec["rank"] == rank and rec["world"] == 2 and rec["nnodes"] == 1
        assert rec["total"] == sum(2 * s + 1 for s in range(3))  # step + rank summed over both ranks
        assert rec["omp_threads"] == str(max(cpus // 2, 1)) and rec["nccl_debug"] == "WARN"
        assert rec["overrides"] == ["a.b=1"]


def test_two_nodes_meet_at_a_c10d_endpoint_and_user_environment_wins(tmp_path):
    endpoint = f"127.0.0.1:{_free_port()}"
    env = _env(OMP_NUM_THREADS="7", NCCL_DEBUG="INFO")
    nodes = [
        _launch(["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--rdzv-id", "t",
                 "--out", str(tmp_path)], env=env)
        for _ in range(2)
    ]
    results = [_finish(node) for node in nodes]
    assert all(rc == 0 for rc, _ in results), results
    records = [json.loads((tmp_path / f"done.{r}.json").read_text()) for r in range(2)]
    assert [(r["world"], r["nnodes"]) for r in records] == [(2, 2), (2, 2)]
    assert all((r["omp_threads"], r["nccl_debug"]) == ("7", "INFO") for r in records)


def _wait_for(path_glob: str, directory: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(directory.glob(path_glob))
        if len(found) >= count:
            return found
        if proc.poll() is not None:
            pytest.fail(f"launcher exited early ({proc.returncode}): {proc.stdout.read()}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {count} {path_glob} in {directory}")


def test_usr1_to_every_process_gives_exit_75_and_the_launcher_survives_it(tmp_path):
    # What slurm's --signal=USR1@N and `scancel --signal=USR1` do: signal the launcher and every worker.
    proc = _launch(["--nproc-per-node", "2", "--out", str(tmp_path), "--steps", "100000", "--step-seconds", "0.05"])
    started = _wait_for("started.*", tmp_path, 2, proc)
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.5)
    assert proc.poll() is None, "the launcher died of SIGUSR1"
    for marker in started:
        os.kill(int(marker.read_text()), signal.SIGUSR1)
    rc, out = _finish(proc)
    assert rc == 75, out
    assert sorted(p.name for p in tmp_path.glob("preempted.*")) == ["preempted.0", "preempted.1"]


def test_a_failing_worker_gives_its_own_exit_code(tmp_path):
    proc = _launch(["--nproc-per-node", "2", "--out", str(tmp_path), "--steps", "1000", "--step-seconds", "0.05",
                    "--fail-rank", "1"])
    rc, out = _finish(proc)
    assert rc == 3, out
