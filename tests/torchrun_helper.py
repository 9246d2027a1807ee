"""Running a test file's own worker code under torchrun, the way the multi-process tests do."""

from __future__ import annotations

import os
import subprocess
import sys

from repo_paths import TESTS


def run_under_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> None:
    """Run `script args` on `nproc` local gloo processes; fail the test with the tail of stderr if any rank fails.
    The workers find the tests' helpers (tests/*.py) on PYTHONPATH, as pytest's own process does."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
