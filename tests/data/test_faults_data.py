"""Data and model agree: model.vocab_size `auto` takes the data's, a too small one stops, a larger one warns; every
split atlas-prep writes holds a row (or prep stops naming the flag); a run whose validation split gives no batch
stops at set-up naming the flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from atlas_train.data_prep.cli import main as prep
from atlas_train.data_prep.errors import PrepError
from atlas_train.data_prep.pack import RowPacker
from atlas_train.data_prep.shard_format import read_manifest
from atlas_train.data_prep.splits import SplitRouter
from atlas_train.data_prep.tokenizer import train_tokenizer
from atlas_train.data_prep.writer import write_dataset
from atlas_train.train.cli import main as train_cli
from text_samples import make_docs

SEQ, VOCAB = 32, 48


def _rows(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, VOCAB, SEQ + 1), np.eye(1, SEQ + 1, dtype=bool)[0]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "ok", {"train": _rows(16, 0), "val": _rows(4, 1)}, seq_len=SEQ, vocab_size=VOCAB)
    write_dataset(root / "no_val", {"train": _rows(16, 0), "val": _rows(0, 1)}, seq_len=SEQ, vocab_size=VOCAB)
    return root


def _config(tmp_path, data, vocab) -> str:
    tmp_path.mkdir(exist_ok=True)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"mixer": "atlas", "vocab_size": vocab, "d_model": 16, "n_layers": 1, "n_heads": 2, "mlp_hidden": 32,
                  "max_seq_len": SEQ, "chunk_size": 8, "memory_expansion": 2, "update": "chunk"},
        "data": {"path": str(data), "shuffle_buffer": 4, "num_workers": 0},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 1, "seq_len": SEQ, "micro_batch_size": 2,
                  "warmup_steps": 0, "eval_every": 1, "eval_batches": 1, "progress": False, "precision": "fp32"},
    }))
    return str(cfg)


def test_model_vocab_size_auto_too_small_and_larger(datasets, tmp_path, capsys):
    assert train_cli(["--config", _config(tmp_path / "auto", datasets / "ok", "auto")]) == 0
    saved = yaml.safe_load((tmp_path / "auto" / "run" / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == VOCAB
    capsys.readouterr()
    assert train_cli(["--config", _config(tmp_path / "small", datasets / "ok", VOCAB - 8)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"set model.vocab_size >= {VOCAB}" in err
    assert train_cli(["--config", _config(tmp_path / "large", datasets / "ok", VOCAB + 16)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"model.vocab_size {VOCAB + 16} is larger than the data's vocabulary" in warnings[0]


def test_a_validation_split_without_a_batch_stops_at_set_up(datasets, tmp_path, capsys):
    capsys.readouterr()
    assert train_cli(["--config", _config(tmp_path, datasets / "no_val", "auto")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "split 'val' has 0 rows" in err
    assert "--val-fraction" in err and "train.eval_every=0" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before the model ever ran


def test_a_missing_tokenizer_is_one_line(tokenizer, tmp_path, capsys):
    write_dataset(tmp_path / "data", {"train": _rows(16, 0), "val": _rows(4, 1)}, seq_len=SEQ, vocab_size=VOCAB,
                  tokenizer_path=tokenizer)
    (tmp_path / "data" / "tokenizer.model").unlink()
    capsys.readouterr()
    assert train_cli(["--config", _config(tmp_path, tmp_path / "data", "auto")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.model, which is missing: rerun atlas-prep" in err


# -- atlas-prep's splits ---------------------------------------------------------------------------------------------

class RecordingPacker(RowPacker):
    """A RowPacker that keeps the documents it was given."""

    def __init__(self, *args):
        super().__init__(*args)
        self.docs: list[list[int]] = []

    def add(self, doc_tokens):
        self.docs.append(np.asarray(doc_tokens).tolist())
        return super().add(doc_tokens)


def route(docs: list[tuple[np.ndarray, bool]], seq_len: int, val_fraction: float, splits=("train", "val")):
    """Rows per split and documents per split as the router packs them."""
    router = SplitRouter(list(splits), seq_len, 1, val_fraction)
    router.packers = {s: RecordingPacker(seq_len, 1) for s in splits}
    rows = {s: [] for s in splits}
    for tokens, val in docs:
        for split, row, starts in router.add("val" if val else "train", tokens):
            rows[split].append((row.tolist(), starts.tolist()))
    for split, row, starts in router.finish():
        rows[split].append((row.tolist(), starts.tolist()))
    return rows, {s: p.docs for s, p in router.packers.items()}, router


def random_docs(n: int, seed: int, val_share: float) -> list[tuple[np.ndarray, bool]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(2, 50, rng.integers(1, 30)), bool(rng.random() < val_share)) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_router_packs_exactly_like_plain_packers_when_every_split_has_rows(seed):
    docs = random_docs(200, seed, 0.2)
    rows, _, router = route(docs, 16, 0.2)
    assert router.note is None
    for split, want_val in (("train", False), ("val", True)):
        packer, expected = RowPacker(16, 1), []
        for tokens, val in docs:
            if val == want_val:
                expected += [(r.tolist(), s.tolist()) for r, s in packer.add(tokens)]
        assert rows[split] == expected and expected


@pytest.mark.parametrize("seed", range(5))
def test_a_split_without_rows_takes_whole_documents_from_the_other(seed):
    docs = random_docs(60, seed, 0.0)  # every document hashed to train
    rows, packed, router = route(docs, 16, 0.01)
    assert rows["train"] and rows["val"] and "document(s)" in router.note
    # Nothing is lost or cut: val holds the newest train documents, whole, and train the others, in order.
    originals = [d.tolist() for d, _ in docs]
    k = len(packed["val"])
    assert packed["train"] == originals[:-k] and sorted(packed["val"]) == sorted(originals[-k:])
    assert router.documents == {"train": len(docs) - k, "val": k}


def test_one_document_is_sliced_into_both_splits():
    doc = np.arange(2, 202)
    rows, packed, router = route([(doc, False)], 16, 0.1)
    assert rows["train"] and rows["val"] and "the last" in router.note
    head, tail = packed["train"][0], packed["val"][0]
    assert head + tail == doc.tolist() and len(tail) >= 16
    assert router.documents == {"train": 1, "val": 1}


@pytest.mark.parametrize("splits, message", [
    (("train", "val"), r"lower --seq-len, or pass --val-fraction 0"),
    (("train",), r"lower --seq-len$"),
])
def test_a_corpus_too_small_for_every_split_names_the_flag(splits, message):
    with pytest.raises(PrepError, match=message):
        route([(np.arange(2, 12), False)], 16, 0.1, splits)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(iter(make_docs(200, 5)), tmp_path_factory.mktemp("tok") / "t.model", 300, "bpe", 1 << 20)


def test_prep_with_the_default_val_fraction_on_49_documents_keeps_a_val_row(tokenizer, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(49, 7)))
    capsys.readouterr()
    assert prep(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--seq-len", "16",
                 "--tokenizer", str(tokenizer)]) == 0
    m = read_manifest(tmp_path / "out")
    assert m.split("val").samples >= 1 and m.split("train").samples >= 1
    assert m.info["documents"]["val"] >= 1 and sum(m.info["documents"].values()) == 49
    assert "the val split had no row of its own: it takes" in capsys.readouterr().err
    # Too small for both splits: one line naming the flags, exit 2.
    assert prep(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "big"), "--seq-len", "4000",
                 "--tokenizer", str(tokenizer)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lower --seq-len, or pass --val-fraction 0" in err
