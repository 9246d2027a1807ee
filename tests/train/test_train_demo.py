"""The README's main job, shortened: prepare the shipped corpus, train a few steps, export, print a sample."""

from __future__ import annotations

import json


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from atlas_train import demo

    monkeypatch.chdir(tmp_path)  # demo.main moves into the checkout; this restores the cwd afterwards
    run, data = tmp_path / "run", tmp_path / "shards"
    overrides = [f"train.out_dir={run}", f"data.path={data}", "train.steps=3", "train.eval_every=3",
                 "train.eval_batches=1", "train.progress=false", "data.num_workers=0"]
    assert demo.main(overrides) == 0
    out = capsys.readouterr().out
    assert "[demo] preparing kjv.txt.xz" in out and "[demo] validation loss" in out
    assert "[demo] sample:\nAnd God said" in out
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"model.safetensors", "config.yaml", "tokenizer.model"}
    val = [r["val/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]
    assert len(val) == 2 and all(v == v for v in val)  # step 0 and step 3, finite
    assert any((run / "tb").iterdir())
    # A second call finds the dataset and the finished run and only exports and samples again.
    assert demo.main(overrides) == 0
    assert "[demo] dataset ready" in capsys.readouterr().out
