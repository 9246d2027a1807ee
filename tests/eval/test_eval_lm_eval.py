"""atlas-eval --task lm-eval: a real lm-evaluation-harness run on local task YAMLs (tests/lm_eval_tasks, no hub),
checked against the native model: every loglikelihood lm-eval reports, the accuracy it derives, and every greedy
answer it generates (batched, so left-padded) must be what the model itself gives."""

from __future__ import annotations

import json

import pytest
import torch

from atlas_train.eval.cli import main
from atlas_train.eval.generate import generate
from atlas_train.train.export import load_exported
from eval_helpers import train_tokenizer, write_export
from repo_paths import REPO

pytest.importorskip("lm_eval")
TASKS = REPO / "tests" / "lm_eval_tasks"


@pytest.mark.slow
def test_lm_eval_scores_and_answers_are_the_native_models(tmp_path, capsys):
    """About 40 s: lm-eval and transformers imports, 16 loglikelihood and 5 generation requests."""
    from atlas_train.hf.tokenizer import hf_tokenizer

    export = write_export(tmp_path / "export", train_tokenizer(tmp_path), mixer="atlas_mag", init_std=0.3)
    argv = ["--task", "lm-eval", "--checkpoint", str(export), "--tasks", "atlas_tiny_choice,atlas_tiny_answer",
            "--include-path", str(TASKS), "--batch-size", "4", "--log-samples", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    assert "atlas_tiny_choice" in capsys.readouterr().out
    out = json.loads((export / "eval_lm-eval.json").read_text())
    assert out["task"] == "lm-eval" and set(out["results"]) == {"atlas_tiny_choice", "atlas_tiny_answer"}

    model, _, tokenizer_path = load_exported(export)
    tok = hf_tokenizer(tokenizer_path)
    choice = out["samples"]["atlas_tiny_choice"]
    correct = []
    for sample in choice:
        scores = []
        for (context, continuation), ((reported, _),) in zip(sample["arguments"], sample["resps"]):
            whole, ctx = tok.encode(context + continuation), tok.encode(context)
            assert whole[: len(ctx)] == ctx  # no merge across the boundary in this data: a plain split
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            ll = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            assert ll == pytest.approx(reported, abs=1e-4)
            scores.append(ll)
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["label"]))
    assert out["results"]["atlas_tiny_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    for sample in out["samples"]["atlas_tiny_answer"]:
        prompt = tok.encode(sample["arguments"][0][0])
        ids = generate(model, torch.tensor(prompt), 6)[len(prompt):].tolist()
        assert sample["resps"][0][0] == tok.decode(ids).split("\n")[0], sample["doc"]


def test_unknown_tasks_and_missing_include_path_are_one_line_errors(tmp_path, capsys):
    export = write_export(tmp_path / "export", train_tokenizer(tmp_path))
    base = ["--task", "lm-eval", "--checkpoint", str(export), "--no-progress", "--device", "cpu"]
    assert main(base + ["--tasks", "no_such_task", "--include-path", str(TASKS)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atlas-eval: error: unknown lm-eval task(s): no_such_task") and "\n" not in err
    assert main(base + ["--tasks", "atlas_tiny_choice", "--include-path", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
