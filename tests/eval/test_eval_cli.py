"""`atlas-eval` and `atlas-generate` end to end on an exported tiny model: tables, JSON, synthetic shards, streaming
output, and one-line errors for user mistakes."""

import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

from atlas_train.eval import cli, generate
from eval_helpers import train_tokenizer, write_export


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    return write_export(root / "export", train_tokenizer(root))


def run_eval(capsys, *argv):
    code = cli.main([*argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_mqar_prints_a_table_and_writes_json(export, tmp_path, capsys):
    out_json = tmp_path / "mqar.json"
    code, out, _ = run_eval(
        capsys,
        "--task",
        "mqar",
        "--checkpoint",
        str(export),
        "--pairs",
        "2,4,8",
        "--seq-lens",
        "16,31",
        "--mqar-vocab",
        "11,64",
        "--samples",
        "4",
        "--out",
        str(out_json),
    )
    assert code == 0
    results = json.loads(out_json.read_text())["results"]
    assert [(r["vocab_size"], r["num_pairs"], r["seq_len"]) for r in results] == [
        (11, 2, 16),
        (11, 4, 16),
        (11, 2, 31),
        (11, 4, 31),  # 8 pairs need 17 tokens of vocabulary
        (64, 2, 16),
        (64, 4, 16),
        (64, 2, 31),
        (64, 4, 31),
        (64, 8, 31),
    ]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results)
    assert "pairs" in out and "len 31" in out and str(out_json) in out


def test_ppl_at_longer_contexts(export, tmp_path, capsys):
    from atlas_train.data_prep.writer import write_dataset

    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, 1024, 33), np.arange(33) % 20 == 0) for _ in range(8)]
    write_dataset(tmp_path / "data", {"val": iter(rows)}, seq_len=32, vocab_size=1024)
    code, out, _ = run_eval(
        capsys,
        "--task",
        "ppl",
        "--checkpoint",
        str(export),
        "--data",
        str(tmp_path / "data"),
        "--context-factors",
        "1,2,16",
        "--max-rows",
        "0",
        "--batch-size",
        "4",
    )
    assert code == 0
    contexts = json.loads((export / "eval_ppl.json").read_text())["contexts"]
    assert [(c["context_len"], c["rows"]) for c in contexts] == [(32, 8), (64, 4), (512, 0)]
    assert contexts[0]["tokens"] == contexts[1]["tokens"] == 8 * 32
    assert contexts[2]["skipped"] == "not enough rows"
    assert "ppl @ 64" in out and "all" in out


def test_niah_cells(export, tmp_path, capsys):
    out_json = tmp_path / "niah.json"
    code, out, _ = run_eval(
        capsys,
        "--task",
        "niah",
        "--checkpoint",
        str(export),
        "--contexts",
        "120",
        "--depths",
        "0,1",
        "--kinds",
        "passkey,word",
        "--samples",
        "2",
        "--out",
        str(out_json),
    )
    assert code == 0
    results = json.loads(out_json.read_text())["results"]
    assert [(r["kind"], r["depth"]) for r in results] == [
        ("passkey", 0.0),
        ("passkey", 1.0),
        ("word", 0.0),
        ("word", 1.0),
    ]
    assert "depth 1" in out


@pytest.mark.parametrize("task", ["mqar", "niah"])
def test_write_data_makes_loadable_shards(export, tmp_path, capsys, task):
    from atlas_train.data_prep.shard_format import read_manifest
    from atlas_train.eval.perplexity import ordered_rows

    extra = (
        ["--tokenizer", str(export / "tokenizer.model")] if task == "niah" else ["--pairs", "2,4", "--mqar-vocab", "64"]
    )
    code, out, _ = run_eval(
        capsys,
        "--task",
        task,
        "--write-data",
        str(tmp_path / task),
        "--seq-len",
        "127",
        "--train-rows",
        "5",
        "--val-rows",
        "3",
        *extra,
    )
    assert code == 0 and "wrote 8 rows" in out
    manifest = read_manifest(tmp_path / task)
    assert manifest.info["task"] == task and manifest.seq_len == 127
    assert (manifest.split("train").samples, manifest.split("val").samples) == (5, 3)
    assert all(tokens.shape == (128,) for tokens, _ in ordered_rows(manifest, "train"))
    assert (manifest.tokenizer_path is not None) == (task == "niah")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "mqar", "--checkpoint", "/nonexistent"], "checkpoint dir not found"),
        (["--task", "mqar"], "--checkpoint DIR is required"),
        (["--task", "ppl", "--write-data", "x"], "use it with --task mqar or niah"),
        (["--task", "niah", "--write-data", "x", "--seq-len", "64"], "needs --tokenizer"),
        (["--task", "mqar", "--write-data", "x", "--seq-len", "8", "--pairs", "4"], "no --pairs value fits"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    code, _, err = run_eval(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_ppl_refuses_data_of_another_tokenizer(export, tmp_path, capsys):
    from atlas_train.data_prep.writer import write_dataset

    rows = [(np.arange(33) % 50, np.arange(33) == 0)] * 2
    (tmp_path / "other.model").write_bytes(b"not the checkpoint's tokenizer")
    for name, tok in [("same", export / "tokenizer.model"), ("other", tmp_path / "other.model")]:
        write_dataset(tmp_path / name, {"val": iter(rows)}, seq_len=32, vocab_size=1024, tokenizer_path=tok)
    assert (
        run_eval(
            capsys,
            "--task",
            "ppl",
            "--checkpoint",
            str(export),
            "--data",
            str(tmp_path / "same"),
            "--context-factors",
            "1",
            "--out",
            str(tmp_path / "ppl.json"),
        )[0]
        == 0
    )
    code, _, err = run_eval(capsys, "--task", "ppl", "--checkpoint", str(export), "--data", str(tmp_path / "other"))
    assert code == 2 and "another tokenizer" in err


def test_eval_user_errors_about_the_checkpoint(export, tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, _, err = run_eval(capsys, "--task", "mqar", "--checkpoint", str(tmp_path / "run"))
    assert code == 2 and "export it first" in err
    code, _, err = run_eval(capsys, "--task", "ppl", "--checkpoint", str(export), "--data", str(tmp_path / "none"))
    assert code == 2 and "no dataset manifest" in err and err.count("\n") == 1


def test_generate_cli_streams_the_greedy_continuation(export, capsys):
    from atlas_train.eval.checkpoint import load_for_eval

    code = generate.main(
        ["--checkpoint", str(export), "--prompt", "In the beginning", "--max-new-tokens", "6", "--temperature", "0"]
    )
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("In the beginning")
    sp = spm.SentencePieceProcessor(model_file=str(export / "tokenizer.model"))
    model = load_for_eval(export, device="cpu").model
    ids = generate.generate(model, torch.tensor(sp.encode("In the beginning")), 6, eos_id=sp.eos_id())
    assert out == sp.decode(ids.tolist()) + "\n"


def test_generate_cli_rejects_bad_sampling_arguments(export, capsys):
    code = generate.main(["--checkpoint", str(export), "--prompt", "x", "--top-p", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--top-p" in err and err.count("\n") == 1


@pytest.mark.parametrize("script", ["atlas-eval", "atlas-generate"])
def test_console_scripts_answer_help(script):
    exe = __import__("pathlib").Path(sys.executable).parent / script
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--checkpoint" in done.stdout
