"""CPU smoke run of benchmarks/bench_attention.py: its checks pass and every timing row is filled."""

import json
import subprocess
import sys

import pytest

from repo_paths import REPO


@pytest.mark.slow
def test_bench_attention_checks_and_times_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--shapes", "2x256,1x384",
         "--check-shape", "2x256", "--heads", "2", "--head-dim", "16", "--mean-doc", "64", "--window", "100",
         "--reps", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "flex docs out vs fp32 math" in proc.stdout and " NO" not in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    names = ["cudnn causal", "sdpa docs", "flex docs", "block mask docs", "sdpa swa", "flex swa", "block mask swa"]
    assert [(r["batch"], r["length"], r["row"]) for r in rows] == (
        [(2, 256, n) for n in names] + [(1, 384, n) for n in names])
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["tflops"] > 0 and r["of_ceiling"] > 0 for r in rows if not r["row"].startswith("block mask"))
    assert all(r["speedup_vs_dense"] > 0 for r in rows if r["row"].startswith("flex"))
