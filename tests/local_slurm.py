#!/usr/bin/env python3
"""A real one-node slurm cluster on this machine, for tests/launch/test_launch_slurm.py and for trying
launch/slurm.sbatch by hand.

Why a private cluster: the tests must exercise the same sbatch/srun/requeue path users hit, without touching a
system-wide slurm or munge. Everything (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in
one directory, on ports chosen free at start, so two clusters never collide and `stop` leaves nothing running.

    python tests/local_slurm.py start /tmp/atlas-slurm   # installs slurm+munge (apt) if missing; prints SLURM_CONF
    SLURM_CONF=/tmp/atlas-slurm/slurm.conf sbatch ...
    python tests/local_slurm.py stop /tmp/atlas-slurm    # cancels jobs, stops the daemons by their pid files

Needs root (it starts munged as the `munge` user and the slurm daemons as root), as on the CI machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel", "munged", "mungekey")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order: compute node, controller, then the auth daemon


class SlurmSetupError(RuntimeError):
    """The cluster could not be installed or started; the message says which step and where its log is."""


def ensure_installed() -> None:
    """Install slurm and munge from Debian packages when any program is missing (the tests need a real slurm)."""
    if all(shutil.which(p) or Path("/usr/sbin", p).exists() for p in PROGRAMS):
        return
    if os.geteuid() != 0:
        raise SlurmSetupError("slurm is not installed and installing it needs root: "
                              f"apt-get install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    for cmd in (["apt-get", "update", "-qq"], install):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SlurmSetupError(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path, node: str, cpus: int, munge_socket: Path) -> str:
    ctld_port, slurmd_port = _free_port(), _free_port()
    return "\n".join([
        "ClusterName=atlas-local",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # A requeued job may start again only after the credential lifetime (default 120 s); 10 s keeps the
        # preemption tests short.
        f"AuthInfo=socket={munge_socket},cred_expire=5",
        "SlurmUser=root",
        "SlurmdUser=root",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "KillWait=30",
        # Schedule every second (defaults: 60 s main loop, 30 s backfill) so a requeued job starts again promptly.
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


class LocalSlurm:
    """One controller + one compute node (this machine) + a private munged, all rooted at `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment slurm client commands (sbatch, squeue, ...) need to talk to this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _pid_file(self, daemon: str) -> Path:
        return self.root / ("munge" if daemon == "munged" else "run") / f"{daemon}.pid"

    def _run(self, cmd: list[str], what: str, log: Path | None = None) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            where = f" (log: {log})" if log else ""
            raise SlurmSetupError(f"{what} failed: {(proc.stderr or proc.stdout).strip()}{where}")

    def start(self, cpus: int | None = None, timeout: float = 60.0) -> "LocalSlurm":
        """Install if needed, start munged, slurmctld and slurmd, and wait for the node to be idle."""
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmSetupError("starting a local slurm needs root (munged runs as `munge`, slurmd as root)")
        try:
            self._start_daemons(cpus or len(os.sched_getaffinity(0)))
            self._wait_idle(timeout)
        except SlurmSetupError:
            self.stop()  # a half-started cluster must not leave daemons behind
            raise
        return self

    def _start_daemons(self, cpus: int) -> None:
        node = socket.gethostname().split(".")[0]
        # munged refuses sockets/keys in directories others can write to, and runs as `munge`: it needs every
        # parent traversable, so the root is 0755 and the munge directory is owned by munge, writable by it alone.
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for sub in ("state", "spool", "run", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        munge_dir = self.root / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)
        shutil.chown(munge_dir, "munge", "munge")
        key, munge_socket = munge_dir / "munge.key", munge_dir / "munge.socket"
        if not key.exists():
            self._run(["runuser", "-u", "munge", "--", "mungekey", "--create", f"--keyfile={key}"], "mungekey")
        self._run(
            ["runuser", "-u", "munge", "--", "munged", f"--socket={munge_socket}", f"--key-file={key}",
             f"--pid-file={self._pid_file('munged')}", f"--log-file={munge_dir / 'munged.log'}",
             f"--seed-file={munge_dir / 'munged.seed'}"],
            "munged", munge_dir / "munged.log")
        self.conf.write_text(_slurm_conf(self.root, node, cpus, munge_socket))
        self._run(["slurmctld"], "slurmctld", self.root / "log/slurmctld.log")
        self._run(["slurmd"], "slurmd", self.root / "log/slurmd.log")

    def _wait_idle(self, timeout: float) -> None:
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            state = proc.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise SlurmSetupError(f"node not idle after {timeout:.0f}s (state {state!r}; logs in {self.root / 'log'})")

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job, then stop the daemons by their pid files (SIGTERM, SIGKILL after `timeout`)."""
        if self.conf.exists() and self._pid_file("slurmctld").exists():
            subprocess.run(["scancel", "--full", "--partition", "debug"], env=self.env, capture_output=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                out = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True).stdout
                if not out.strip():
                    break
                time.sleep(0.5)
        for daemon in DAEMONS:
            pid_file = self._pid_file(daemon)
            if not pid_file.exists():
                continue
            pid = int(pid_file.read_text().split()[0])
            _terminate(pid, timeout)
            pid_file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as stopped.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _terminate(pid: int, timeout: float) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("root", help="directory for the cluster's config, state, logs and pid files")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs the node offers (default: this process's)")
    args = parser.parse_args(argv)
    cluster = LocalSlurm(args.root)
    try:
        if args.action == "start":
            cluster.start(cpus=args.cpus)
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            cluster.stop()
    except SlurmSetupError as err:
        print(f"local_slurm: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
