"""Shared by the eval tests: a small sentencepiece tokenizer and an export dir of a tiny model (what
`atlas-train export` writes), so the CLIs run end to end without a training run."""

from __future__ import annotations

import lzma
from pathlib import Path

import torch

from repo_paths import REPO


def train_tokenizer(out_dir: Path, vocab_size: int = 1024, dummy_prefix: bool = False) -> Path:
    """A BPE model trained on the first 300 KB of the embedded King James corpus (about a second), with
    atlas-prep's settings (no dummy prefix, digits split) unless `dummy_prefix` asks for sentencepiece's default."""
    import sentencepiece as spm

    text = lzma.decompress((REPO / "data" / "corpus" / "kjv.txt.xz").read_bytes()).decode()[:300_000]
    corpus = out_dir / "corpus.txt"
    corpus.write_text(text)
    prefix = out_dir / "tok"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix,
        split_digits=True,
        eos_id=2,
        bos_id=-1,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    return prefix.with_suffix(".model")


def write_export(out_dir: Path, tokenizer: Path | None, **model_kwargs) -> Path:
    """An export dir (model.safetensors, config.yaml, the tokenizer under its own name, manifest.json) of a freshly
    built tiny model."""
    from safetensors.torch import save_model

    from atlas_train.config import dump_yaml
    from atlas_train.model import build_model
    from atlas_train.model.config import ModelConfig
    from atlas_train.run_config import Config
    from atlas_train.train.integrity import checksums, write_manifest

    model_cfg = ModelConfig(
        **{
            "vocab_size": 1024,
            "d_model": 16,
            "n_layers": 1,
            "n_heads": 2,
            "mlp_hidden": 32,
            "chunk_size": 8,
            "memory_expansion": 2,
            "gate_rank": 4,
            "swa_window": 16,
            "max_seq_len": 64,
            **model_kwargs,
        }
    )
    torch.manual_seed(0)
    model = build_model(model_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out_dir / "model.safetensors"))
    dump_yaml(Config(model=model_cfg), out_dir / "config.yaml")
    names = ["model.safetensors", "config.yaml"]
    if tokenizer is not None:
        names.append("tokenizer.json" if tokenizer.suffix == ".json" else "tokenizer.model")
        (out_dir / names[-1]).write_bytes(tokenizer.read_bytes())
    write_manifest(out_dir, checksums(out_dir, names))  # last, as atlas-train export does
    return out_dir
