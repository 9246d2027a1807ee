"""CPU run of benchmarks/count_step_ops.py: the project's DeepSpeed config dispatches fewer operators per optimizer
step than the same config with DeepSpeed's per-gradient overflow check."""

import subprocess
import sys

from repo_paths import REPO


def test_step_ops_fall_without_the_per_gradient_check():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "count_step_ops.py"), "--layers", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line[:42].strip(): int(line[42:].split()[0]) for line in proc.stdout.splitlines()
            if line.startswith(("DeepSpeed's", "the project's"))}
    baseline, ours = rows["DeepSpeed's per-gradient check (baseline)"], rows["the project's config"]
    assert 0 < ours < 0.6 * baseline, proc.stdout
