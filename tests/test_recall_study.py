"""benchmarks/recall_study.py: the smoke study (every member trained, exported and scored, all at once, on CPU) ends
with its tables; a chain still running at the budget's end is killed, and a chain stops at its first failure."""

import importlib.util
import json
import sys
import time

import pytest
from eval_helpers import REPO

spec = importlib.util.spec_from_file_location("recall_study", REPO / "benchmarks" / "recall_study.py")
recall_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recall_study)


@pytest.mark.slow
def test_smoke_study_trains_scores_and_prints_the_tables_last(tmp_path, capsys):
    out = tmp_path / "out"
    assert recall_study.main(["--smoke", "--work", str(tmp_path), "--out", str(out)]) == 0
    members = json.loads((out / "recall.json").read_text())["members"]
    assert [m["member"] for m in members] == recall_study.MEMBERS  # equal steps here: no transformer@N
    for m in members:
        assert m["exit"] == 0 and m["steps"] == m["planned_steps"] == 8 and m["steps_from"] == "probe"
        assert m["mqar"] and all(0 <= g["accuracy"] <= 1 for g in m["mqar"])
    assert (out / "recall.md").read_text() in capsys.readouterr().out
    assert "Equal wall time: 5 runs at once on no GPU(s)" in (out / "recall.md").read_text()


def test_chain_is_killed_at_the_deadline_and_stops_at_a_failure(tmp_path):
    python = [sys.executable, "-c"]
    chains = recall_study.Chains([], time.monotonic() + 2)
    started = time.monotonic()
    killed, failed = chains.run_all([
        ([[*python, "import time; time.sleep(60)"], [*python, "pass"]], tmp_path / "killed.log"),
        ([[*python, "raise SystemExit(3)"], [*python, "pass"]], tmp_path / "failed.log"),
    ])
    assert time.monotonic() - started < 30
    assert [code for code, _ in killed] == [recall_study.KILLED]
    assert [code for code, _ in failed] == [3]
