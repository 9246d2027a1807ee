"""benchmarks/recall_study.py: the smoke study (every member trained, exported and scored, all at once, on CPU) ends
with its tables; a chain still running at the budget's end is killed, and a chain stops at its first failure."""

import json
import sys
import time

import pytest

from benchmark_scripts import load_benchmark

recall_study = load_benchmark("recall_study")


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
    assert f"Equal wall time: {len(recall_study.MEMBERS)} runs at once on no GPU(s)" in (out / "recall.md").read_text()


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


def test_render_puts_the_tables_between_the_markers(tmp_path, monkeypatch):
    """--render reads each folder's recall.json (a later folder's member replaces an earlier one's) and rewrites only
    the marked section of RESULTS.md; the plot is redrawn beside it. The plot itself is matplotlib's (an optional
    extra CI does not install), so a stand-in records what it is asked to draw."""
    monkeypatch.setattr(recall_study, "REPO", tmp_path)
    drawn = []

    def plot(results, path):
        drawn.append(([r["member"] for r in results], path))
        return True

    monkeypatch.setattr(recall_study, "plot", plot)
    (tmp_path / "benchmarks").mkdir()
    results = tmp_path / "benchmarks" / "RESULTS.md"
    results.write_text(f"# head\n\n{recall_study.BEGIN}\nSTALE TABLE\n{recall_study.END}\n\n# tail\n")

    def record(member, accuracy):
        return {"member": member, "planned_steps": 5, "steps": 5, "steps_from": "probe", "concurrent_runs": 2,
                "gpus": 0, "cap_minutes": 1.0, "equal_steps_run": None,
                "mqar": [{"seq_len": 64, "num_pairs": 4, "accuracy": accuracy}]}

    for folder, members in (("a", [record("atlas", 0.1), record("titans", 0.2)]), ("b", [record("atlas", 0.9)])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "recall.json").write_text(json.dumps({"members": members}))
    recall_study.render([tmp_path / "a", tmp_path / "b"])
    text = results.read_text()
    assert text.startswith("# head\n") and text.endswith("# tail\n") and "STALE TABLE" not in text
    assert "| atlas | 0.900 |" in text and "| titans | 0.200 |" in text
    assert drawn == [(["atlas", "titans"], tmp_path / "benchmarks" / "recall_study.png")]
    with pytest.raises(SystemExit, match="no .*recall.json"):
        recall_study.render([tmp_path / "missing"])
