"""CPU smoke run of benchmarks/bench_train.py: every column is filled from the real loop, baseline rows included;
--profile leaves each row's kernel table in its log and its trace beside it."""

import json
import subprocess
import sys

import pytest

from repo_paths import REPO


@pytest.mark.slow
def test_bench_train_runs_rows_and_reports_every_phase(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--model", str(REPO / "configs/model/demo.yaml"),
         "--rows", "transformer@32,atlas@32", "--baseline", "transformer@32", "--tokens-per-step", "64",
         "--steps", "1", "--warmup", "1", "--overhead", "transformer", "--override", "train.compile=false",
         "--profile", "--logs", str(tmp_path / "logs"), "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mixer"], bool(r.get("baseline"))) for r in rows] == [
        ("transformer", True), ("transformer", False), ("atlas", False)]
    for row in rows:
        assert row["tokens_s"] > 0 and row["micro_batch"] == 2 and row["grad_accum"] == 1
        assert all(row[k] > 0 for k in ("forward_s", "backward_s", "optimizer_s"))
    assert [r["recompute"] for r in rows] == ["full", "none", "full"]
    assert rows[1]["synthetic_step_s"] > 0 and "synthetic_step_s" not in rows[2]
    assert "transformer before" in proc.stdout  # the table printed as rows finished
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["00_transformer_before_32.log", "00_transformer_before_32.trace.json.gz",
                    "01_transformer_32.log", "01_transformer_32.trace.json.gz",
                    "02_atlas_chunk_32.log", "02_atlas_chunk_32.trace.json.gz"]
    # one step after the memory row's warm-up step and its two timed ones (--memory-steps)
    assert "step 4, sorted by self_cpu_time_total" in (tmp_path / "logs" / "02_atlas_chunk_32.log").read_text()
