"""The README's main job: prepare the shipped corpus, train the demo ATLAS model, export it, print a sample.

`python -m atlas_train.demo` on a fresh CPU machine takes a few minutes on 2 cores; on a GPU machine the same command
trains in bf16 on every GPU (torchrun). Each stage is skipped when its output already exists, so a rerun (or a
resumed, interrupted run) picks up where the last one stopped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_CONFIG = REPO / "configs" / "demo.yaml"
CORPUS = REPO / "data" / "corpus" / "kjv.txt.xz"
PROMPT = "And God said"


def prepare_data(cfg) -> None:
    """Tokenize the shipped corpus into shards at cfg.data.path unless a valid dataset is already there."""
    from atlas_train.data import DataError, read_manifest

    try:
        read_manifest(cfg.data.path)
        print(f"[demo] dataset ready at {cfg.data.path}")
        return
    except DataError:
        pass
    from atlas_train.data_prep.cli import main as prep

    print(f"[demo] preparing {CORPUS.name} -> {cfg.data.path}")
    rc = prep([
        "--input", str(CORPUS), "--txt-docs", "blank-line", "--output", cfg.data.path,
        "--seq-len", str(cfg.train.seq_len), "--vocab-size", str(cfg.model.vocab_size), "--model-type", "bpe",
        "--val-fraction", "0.02",
    ])
    if rc:
        raise SystemExit(rc)


def train(overrides: list[str]) -> None:
    """Train in this process (CPU, one GPU) or under torchrun on every GPU of the machine."""
    import torch

    gpus = torch.cuda.device_count()
    args = ["--config", str(RUN_CONFIG), *overrides]
    if gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "atlas_train.train.cli", *args]
        rc = subprocess.call(cmd)
    else:
        from atlas_train.train.cli import main

        rc = main(args)
    if rc:
        raise SystemExit(rc)


def summarize(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    if val:
        (s0, v0), (s1, v1) = val[0], val[-1]
        print(f"[demo] validation loss {v0:.3f} (step {s0}) -> {v1:.3f} (step {s1}); perplexity {math.exp(v1):.1f}")
    print(f"[demo] tensorboard --logdir {run_dir / 'tb'}")


def sample(export_dir: Path) -> None:
    import torch

    from atlas_train.eval.generate import generate
    from atlas_train.train.export import load_exported

    model, _, tokenizer_path = load_exported(export_dir)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = torch.tensor(sp.encode(PROMPT), dtype=torch.long)
    out = generate(model, ids, max_new_tokens=80, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
    print(f"[demo] sample:\n{sp.decode(out.tolist())}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    from atlas_train.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m atlas_train.demo", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override configs/demo.yaml, e.g. train.steps=50")
    overrides = parser.parse_args(argv).overrides
    if torch.cuda.is_available():
        overrides = ["train.precision=bf16", *overrides]
    try:
        cfg = load_config([RUN_CONFIG], overrides)
    except ConfigError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    os.chdir(REPO)  # the configs' relative paths (runs/demo/...) are relative to the checkout
    prepare_data(cfg)
    train(overrides)
    run_dir = Path(cfg.train.out_dir)
    export_dir = run_dir.parent / "export"
    from atlas_train.train.export import export

    export(run_dir, export_dir)
    print(f"[demo] exported {export_dir} (model.safetensors, config.yaml, tokenizer.model)")
    summarize(run_dir)
    sample(export_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
