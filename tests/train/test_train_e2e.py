"""`atlas-train` with the project's own pieces (shards written by the data writer, the shard loader, a tiny AtlasLM):
train, resume, data errors as one line, export, and generation from the export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atlas_train.data_prep.writer import write_dataset
from atlas_train.train.cli import main

SEQ = 32
VOCAB = 48


def _rows(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        doc_start = np.zeros(SEQ + 1, dtype=bool)
        doc_start[[0, SEQ // 2]] = True
        yield rng.integers(0, VOCAB, SEQ + 1), doc_start


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "a", {"train": _rows(24, 0), "val": _rows(4, 1)}, seq_len=SEQ, vocab_size=VOCAB,
                  shard_size_mb=0.004)
    write_dataset(root / "b", {"train": _rows(24, 2), "val": _rows(4, 3)}, seq_len=SEQ, vocab_size=VOCAB,
                  shard_size_mb=0.004)
    return root


def _config(tmp_path: Path, data: Path) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"""
model: {{mixer: atlas, vocab_size: {VOCAB}, d_model: 16, n_layers: 1, n_heads: 2, mlp_hidden: 32,
        max_seq_len: {SEQ}, chunk_size: 8, memory_expansion: 2, update: chunk}}
data: {{path: {data}, shuffle_buffer: 4, num_workers: 0}}
train: {{out_dir: {tmp_path / 'run'}, steps: 4, seq_len: {SEQ}, micro_batch_size: 2, warmup_steps: 1,
        eval_every: 2, eval_batches: 1, save_every: 2, progress: false, precision: fp32, lr: 1.0e-2}}
"""
    )
    return cfg


def test_train_resume_export_generate(tmp_path, datasets, capsys):
    cfg = _config(tmp_path, datasets / "a")
    assert main(["--config", str(cfg), "train.steps=2"]) == 0
    # Continue the same run to 4 steps: the schedule length changes, the model and data do not.
    assert main(["--config", str(cfg), "--resume"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val/loss" in r] == [0, 2, 4]
    assert all(np.isfinite(r["train/loss"]) and "memory/alpha" in r for r in rows if "train/loss" in r)
    # The resumed part follows the new 4-step schedule (warm-up 1, then cosine from lr 1e-2).
    from atlas_train.config import load_config
    from atlas_train.train.optim import WarmupCosine

    schedule = WarmupCosine(load_config([cfg]).train)
    assert [r["train/lr"] for r in rows if "train/lr" in r][2:] == [1e-2 * schedule(2), 1e-2 * schedule(3)]

    # Resuming on other shards: the data position cannot carry over, and the error says so in one line.
    capsys.readouterr()
    assert main(["--config", str(cfg), "--resume", f"data.path={datasets / 'b'}", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    assert "differ from those the data position was saved with" in err and err.count("\n") == 1

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    from atlas_train.eval.generate import generate
    from atlas_train.train.export import load_exported

    model, run_cfg, tokenizer = load_exported(out)
    assert run_cfg.model.feature_map == "sketch" and tokenizer is None
    assert next(model.parameters()).dtype == torch.float32
    sample = generate(model, torch.tensor([1, 2, 3]), max_new_tokens=5)
    assert sample.shape == (8,) and int(sample.max()) < VOCAB


@pytest.mark.parametrize("data, message", [("missing", "no dataset manifest at"), ("a", "seq_len 32 but the run uses")])
def test_data_errors_are_one_line(tmp_path, datasets, capsys, data, message):
    cfg = _config(tmp_path, datasets / data)
    overrides = ["train.seq_len=16"] if data == "a" else []
    assert main(["--config", str(cfg), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_real_model_and_loader_resume_bitwise(tmp_path, datasets):
    """2N steps straight == N steps, preempted (SIGUSR1 during step N), then resumed: the same losses."""
    import os
    import signal

    from atlas_train.config import load_config
    from atlas_train.data import build_loader
    from atlas_train.model import build_model
    from atlas_train.parallel import setup_parallel
    from atlas_train.train.signals import EXIT_PREEMPTED
    from atlas_train.train.trainer import Builders, check_dataset, train

    handed_out = []

    def preempting_loader(*args, **kwargs):
        loader = build_loader(*args, **kwargs)
        if args[1] != "train":
            return loader

        class Preempting:
            def __iter__(self):
                for batch in loader:
                    handed_out.append(1)
                    if len(handed_out) == stop_at:  # as slurm does: the whole process tree, loader workers too
                        children = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()
                        assert children, "the loader should run in a worker process here"
                        for pid in [os.getpid(), *map(int, children)]:
                            os.kill(pid, signal.SIGUSR1)
                    yield batch

            state_dict, load_state_dict = loader.state_dict, loader.load_state_dict

        return Preempting()

    builders = Builders(model=build_model, loader=preempting_loader, check_data=check_dataset, parallel=setup_parallel)
    cfg_file = _config(tmp_path, datasets / "a")
    runs = {}
    for name, stop_at in (("full", None), ("split", 2)):
        handed_out.clear()
        common = [f"train.out_dir={tmp_path / name}", "train.save_every=0", "train.steps=4", "data.num_workers=1"]
        cfg = load_config([cfg_file], common)
        assert train(cfg, builders) == (0 if stop_at is None else EXIT_PREEMPTED)
        if stop_at is not None:
            stop_at = None
            assert train(load_config([cfg_file], [*common, "train.resume=auto"]), builders) == 0
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in rows]
    assert runs["split"] == runs["full"] and len(runs["full"]) == 7  # 4 train rows + val at steps 0, 2, 4


def test_a_tokenizer_json_keeps_its_name_in_checkpoints_and_exports(tmp_path, capsys):
    """A dataset tokenized with a Hugging Face tokenizer.json: the checkpoint and the export carry it as
    tokenizer.json, and an earlier export's tokenizer.model in the same folder is removed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from atlas_train.eval.checkpoint import load_for_eval, load_tokenizer

    tokenizer = tmp_path / "tokenizer.json"
    json_tokenizer = Tokenizer(models.WordLevel({"t0": 0, "</s>": 1, **{f"t{i}": i for i in range(2, VOCAB)}},
                                                unk_token="t0"))
    json_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    json_tokenizer.save(str(tokenizer))
    data = tmp_path / "data"
    write_dataset(data, {"train": _rows(24, 0), "val": _rows(4, 1)}, seq_len=SEQ, vocab_size=VOCAB,
                  tokenizer_path=tokenizer, shard_size_mb=0.004, eos_id=1)
    assert main(["--config", str(_config(tmp_path, data)), "train.steps=2", "train.eval_every=0"]) == 0
    tag = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert (tag / "tokenizer.json").read_bytes() == tokenizer.read_bytes() and not (tag / "tokenizer.model").exists()
    export = tmp_path / "export"
    export.mkdir()
    (export / "tokenizer.model").write_bytes(b"an older export's")
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(export)]) == 0
    assert {p.name for p in export.iterdir()} == {"model.safetensors", "config.yaml", "tokenizer.json",
                                                  "manifest.json"}
    loaded = load_for_eval(export, device="cpu")
    assert loaded.tokenizer_path == export / "tokenizer.json"
    assert load_tokenizer(loaded.tokenizer_path).encode("t3 t5") == [3, 5]
    capsys.readouterr()
