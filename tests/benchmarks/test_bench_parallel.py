"""benchmarks/bench_parallel.py ends with its table whatever happens to a job: a real CPU/gloo run of the CP job
where the last rank runs out of memory (injected) while its peer waits for it inside backward, and the bookkeeping
for a job killed at its deadline or failing without an OOM record."""

import json
import signal

import pytest

from benchmark_scripts import load_benchmark

bench_parallel = load_benchmark("bench_parallel")


@pytest.mark.slow
def test_cp_job_reports_the_last_context_before_an_oom(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "rows.json"
    assert bench_parallel.main(["--smoke", "--phases", "cp", "--log-dir", str(tmp_path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    status = {(r["name"], r["T"]): r["status"] for r in result["rows"]}
    assert status == {("CP=1 (DP)", 128): "ok", ("CP=2 at 2T", 256): "ok", ("CP=2 longest", 512): "ok",
                      ("CP=2 longest", 1024): "OOM on rank 1"}
    assert result["longest"].startswith("512 tokens") and "OOM on rank 1 at 1024" in result["longest"]
    assert all(r["step_s"] > 0 for r in result["rows"] if r["status"] == "ok")
    assert capsys.readouterr().out.rstrip().splitlines()[-2].startswith("steps: timed steps")  # table printed last


def row(kind, name, T, **kw):
    return dict(kind=kind, phase="longest", name=name, T=T, cp=2, **kw)


def test_unfinished_rows_are_named_by_how_their_job_ended(tmp_path):
    ok = row("row", "CP=2 longest", 512, status="ok", step_s=1.0, first_s=1.0, peak_gib=3.0)
    records = [row("start", "CP=2 longest", 512), ok, row("start", "CP=2 longest", 1024)]
    killed, _ = bench_parallel.job_rows(records, -15, True, tmp_path / "cp.log")
    assert [r["status"] for r in killed] == ["ok", "killed at the deadline"]
    assert bench_parallel.longest_result(killed, records).startswith("512 tokens (peak 3.0 GiB")
    failed, _ = bench_parallel.job_rows(records, 1, False, tmp_path / "cp.log")
    assert failed[-1]["status"].startswith("failed (exit 1)")
    oom = records + [dict(kind="oom", name="CP=2 longest", T=1024, rank=0), dict(kind="oom", name="CP=2 longest",
                                                                                  T=1024, rank=1)]
    both, _ = bench_parallel.job_rows(oom, 1, False, tmp_path / "cp.log")
    assert both[-1]["status"] == "OOM on rank 0,1"


def test_main_gives_back_the_callers_sigterm_handler(tmp_path, monkeypatch):
    """main exits on SIGTERM while its jobs run; afterwards (and after an early exit) the caller's handler is back, so
    pytest does not turn a later SIGTERM into SystemExit(143) inside another test."""
    before, during = signal.getsignal(signal.SIGTERM), []

    def run_job(cmd, log, deadline):
        during.append(signal.getsignal(signal.SIGTERM))
        return 0, False

    monkeypatch.setattr(bench_parallel, "run_job", run_job)
    assert bench_parallel.main(["--smoke", "--phases", "tp", "--log-dir", str(tmp_path)]) == 0
    assert len(during) == 1 and during[0] != before
    assert signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(SystemExit, match="even number of processes"):
        bench_parallel.main(["--smoke", "--gpus", "3", "--log-dir", str(tmp_path)])
    assert signal.getsignal(signal.SIGTERM) == before
