"""atlas-prep end to end: every document comes back out of the shards exactly, byte-identical reruns, bad input;
for every input kind (txt/jsonl plain or compressed, parquet, Hugging Face datasets) and both tokenizer kinds."""

import gzip
import json
import lzma
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from atlas_train.data import read_manifest
from atlas_train.data.shard_reader import load_shard
from atlas_train.data_prep.cli import main
from atlas_train.data_prep.encode import is_val
from atlas_train.data_prep.pack import RowPacker
from atlas_train.data_prep.shard_format import decode_sample
from atlas_train.data_prep.tokenizer import load_tokenizer, train_tokenizer
from text_samples import make_docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents spread over every input kind; returns (input folder, documents in sorted file order)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(240, 0)
    (root / "a.txt").write_text(docs[0])
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs[1:80])
    (root / "b.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    pq.write_table(pa.table({"text": docs[80:160], "n": list(range(80))}), root / "c.parquet")
    (root / "d.txt.xz").write_bytes(lzma.compress(("\n\n".join(docs[160:]) + "\n").encode()))
    return root, docs


def prep(corpus_dir, out, *extra):
    vocab = [] if "--tokenizer" in extra else ["--vocab-size", "400"]
    return main(["--input", str(corpus_dir), "--output", str(out), "--seq-len", "16", *vocab,
                 "--val-fraction", "0.2", "--shard-size-mb", "0.02", "--txt-docs", "blank-line", *extra])


def split_documents(manifest, split):
    """Undo the packing: join the rows (they overlap by one token), cut at EOS, decode each document."""
    sp = load_tokenizer(manifest.tokenizer_path)
    stream, starts = [], []
    for shard in manifest.split(split).shards:
        for sample in load_shard(manifest, shard):
            tokens, doc_start = decode_sample(sample, manifest.row_len, np.dtype(manifest.token_dtype))
            skip = 1 if stream else 0
            stream += tokens[skip:].tolist()
            starts += doc_start[skip:].tolist()
    docs, current = [], []
    for tok, start in zip(stream, starts):
        assert start == (not current), "doc_start must mark exactly the first token after each EOS"
        if tok == manifest.eos_id:
            docs.append(sp.decode(current))
            current = []
        else:
            current.append(tok)
    return docs  # the unfinished last document was cut by the row boundary and is not compared


def test_prep_packs_every_document_losslessly(corpus, tmp_path):
    root, docs = corpus
    assert prep(root, tmp_path / "out", "--workers", "2") == 0
    m = read_manifest(tmp_path / "out")
    assert m.seq_len == 16 and m.eos_id == 1 and m.tokenizer_path.is_file() and m.token_dtype == "uint16"
    assert m.info["documents"]["train"] + m.info["documents"]["val"] == len(docs)
    assert len(m.split("train").shards) > 1
    for split, want_val in (("train", False), ("val", True)):
        expected = [d for d in docs if is_val(d, 0.2) == want_val]
        got = split_documents(m, split)
        assert len(expected) - len(got) <= 2 and got == expected[: len(got)]


def test_prep_is_deterministic_whatever_the_worker_count(corpus, tmp_path):
    root, _ = corpus
    assert prep(root, tmp_path / "one", "--workers", "1") == 0
    assert prep(root, tmp_path / "two", "--workers", "2") == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_tokenizer_round_trip_is_lossless(tmp_path):
    path = train_tokenizer(iter(make_docs(200, 1)), tmp_path / "t.model", 350, "unigram", 1 << 20)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    for text in ["  leading", "\nnewline first", "trailing  \n\n", "tab\tand\r\nCRLF", "unseen: ß ∑ 🚀 \u200b",
                 "x" * 50, ""]:
        assert sp.decode(sp.encode(text)) == text
    assert sp.encode("\n") == [sp.piece_to_id("\n")]


def test_packer_matches_a_plain_sliding_window():
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 50, rng.integers(1, 30)) for _ in range(40)]
    packer = RowPacker(seq_len=8, eos_id=1)
    rows = [r for d in docs for r in packer.add(d)]
    stream = np.concatenate([np.append(d, 1) for d in docs])
    first = np.concatenate([np.eye(1, len(d) + 1, dtype=bool)[0] for d in docs])
    n = (len(stream) - 1) // 8
    assert len(rows) == n == packer.rows and packer.dropped_tokens == len(stream) - 1 - 8 * n
    for k, (tokens, starts) in enumerate(rows):
        assert tokens.tolist() == stream[8 * k : 8 * k + 9].tolist()
        assert starts.tolist() == first[8 * k : 8 * k + 9].tolist()


def test_bad_input_is_reported_and_counted(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"text": d}).encode() for d in make_docs(60, 2)]
    lines[3] = b'{"text": broken'
    lines[7] = json.dumps({"body": "no text field"}).encode()
    lines[9] = json.dumps({"text": "bad \xff utf8"}).encode().replace(b"\\u00ff", b"\xff")
    (src / "x.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert prep(src, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "2 malformed JSON lines were skipped" in err and "x.jsonl:4" in err and "x.jsonl:8" in err
    assert "1 invalid UTF-8 bytes were replaced" in err
    assert read_manifest(tmp_path / "out").info["bad_json_lines"] == 2


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "input not found: .*missing"),
        (lambda d: (d / "missing.csv").write_text("a,b"), "missing.csv: unsupported input type"),
        (lambda d: (d / "missing").mkdir(), "no input files of a supported type"),
        (lambda d: (d / "missing.txt").write_text(""), "the inputs hold no documents"),
        (lambda d: (d / "missing.txt.gz").write_bytes(b"not gzip"), r"missing.txt.gz: cannot read \(BadGzipFile"),
        (lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "missing.parquet"),
         r"missing.parquet: no column 'text' \(has: body\)"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, setup, message):
    setup(tmp_path)
    target = next(tmp_path.glob("missing*"), tmp_path / "missing")
    assert prep(target, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("atlas-prep: error: ") and "Traceback" not in err[0]
    assert re.search(message, err[0])
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_given_tokenizer_is_copied_and_checked(corpus, tmp_path, capsys):
    root, _ = corpus
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"junk")
    assert prep(root, tmp_path / "out", "--tokenizer", str(bad)) == 2
    assert "bad.model: not a sentencepiece model" in capsys.readouterr().err
    good = train_tokenizer(iter(make_docs(50, 3)), tmp_path / "good.model", 300, "bpe", 1 << 20)
    assert prep(root, tmp_path / "out", "--tokenizer", str(good)) == 0
    m = read_manifest(tmp_path / "out")
    assert m.tokenizer_path.read_bytes() == good.read_bytes()


def test_a_failed_rerun_leaves_no_manifest_and_no_temp_files(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    assert prep(root, out) == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.txt.xz").write_bytes((root / "d.txt.xz").read_bytes())
    (broken / "z.jsonl.gz").write_bytes(gzip.compress(b'{"text": "fine"}\n')[:-12])  # truncated at the end
    assert prep(broken, out, "--tokenizer", str(out / "tokenizer.model")) == 2
    assert not (out / "manifest.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def hub_corpus(tmp_path_factory):
    """Documents as people keep them: zstd jsonl and txt, parquet and a saved Hugging Face dataset, the text under
    the column "body"; returns (input paths, documents in sorted input order)."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hub_corpus")
    docs = make_docs(200, 4)
    zstd = zstandard.ZstdCompressor()
    jsonl = "".join(json.dumps({"body": d}) + "\n" for d in docs[:60])
    (root / "a.jsonl.zst").write_bytes(zstd.compress(jsonl.encode()))
    datasets.Dataset.from_dict({"body": docs[60:130], "n": list(range(70))}).save_to_disk(str(root / "b_dataset"))
    pq.write_table(pa.table({"id": list(range(40)), "body": docs[130:170]}), root / "c.parquet")
    (root / "d.txt.zst").write_bytes(zstd.compress(("\n\n".join(docs[170:]) + "\n").encode()))
    inputs = [str(root / name) for name in ("a.jsonl.zst", "b_dataset", "c.parquet", "d.txt.zst")]
    return inputs, docs


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer.json (the tokenizers library) whose EOS is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_docs(100, 5), trainer)
    path = tmp_path_factory.mktemp("tokenizer_json") / "tokenizer.json"
    tok.save(str(path))
    return path


def _prep_files(inputs, out, *extra):
    return main(["--input", *inputs, "--output", str(out), "--seq-len", "16", "--val-fraction", "0.2",
                 "--shard-size-mb", "0.02", "--txt-docs", "blank-line", "--text-field", "body", *extra])


@pytest.mark.parametrize("tokenizer", ["sentencepiece", "tokenizers"])
def test_hub_formats_pack_losslessly_and_deterministically(hub_corpus, tokenizer_json, tmp_path, tokenizer):
    inputs, docs = hub_corpus
    given = ["--tokenizer", str(tokenizer_json)] if tokenizer == "tokenizers" else ["--vocab-size", "400"]
    assert _prep_files(inputs, tmp_path / "one", "--workers", "1", *given) == 0
    assert _prep_files(inputs, tmp_path / "two", "--workers", "2", *given) == 0
    m = read_manifest(tmp_path / "two")
    assert m.tokenizer_kind == tokenizer and m.info["inputs"] == inputs
    assert m.tokenizer_path.name == ("tokenizer.json" if tokenizer == "tokenizers" else "tokenizer.model")
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["tokenizer"]["kind"] == tokenizer
    if tokenizer == "tokenizers":
        assert m.eos_id == load_tokenizer(tokenizer_json).eos_id() >= 0
        assert m.tokenizer_path.read_bytes() == tokenizer_json.read_bytes()
    assert m.info["documents"]["train"] + m.info["documents"]["val"] == len(docs)
    for split, want_val in (("train", False), ("val", True)):
        expected = [d for d in docs if is_val(d, 0.2) == want_val]
        got = split_documents(m, split)
        assert len(expected) - len(got) <= 2 and got == expected[: len(got)]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_a_rerun_after_a_failure_gives_the_clean_runs_bytes(hub_corpus, tokenizer_json, tmp_path):
    inputs, _ = hub_corpus
    given = ["--tokenizer", str(tokenizer_json)]
    assert _prep_files(inputs, tmp_path / "clean", *given) == 0
    corrupt = tmp_path / "corrupt.jsonl.zst"
    corrupt.write_bytes(zstandard.ZstdCompressor().compress(b'{"body": "fine"}\n' * 50)[:-9])  # truncated
    assert _prep_files([*inputs, str(corrupt)], tmp_path / "rerun", *given) == 2
    assert not (tmp_path / "rerun" / "manifest.json").exists()
    assert _prep_files(inputs, tmp_path / "rerun", *given) == 0
    for path in (tmp_path / "clean").iterdir():
        assert (tmp_path / "rerun" / path.name).read_bytes() == path.read_bytes(), path.name


def _dataset_dict(d):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["a"]}),
                          "test": datasets.Dataset.from_dict({"body": ["b"]})}).save_to_disk(str(d / "missing"))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: __import__("datasets").Dataset.from_dict({"body": ["x"]}).save_to_disk(str(d / "missing")),
         r"missing: no column 'text' \(has: body\)"),
        (_dataset_dict, r"missing: a Hugging Face DatasetDict \(splits: test, train\); give one split's folder"),
        (lambda d: (d / "missing.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd not zstd"),
         r"missing.jsonl.zst: cannot read \(ZstdError"),
    ],
)
def test_hub_format_errors_are_one_line(tmp_path, capsys, setup, message):
    pytest.importorskip("datasets")

    def quiet_setup(d):  # save_to_disk's progress bar is not atlas-prep's output
        setup(d)
        capsys.readouterr()

    test_user_errors_are_one_line(tmp_path, capsys, quiet_setup, message)


def test_a_bad_tokenizer_json_is_one_line(corpus, tmp_path, capsys):
    root, _ = corpus
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    assert prep(root, tmp_path / "out", "--tokenizer", str(bad)) == 2
    assert "tokenizer.json: not a tokenizer.json" in capsys.readouterr().err
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(bad))  # no EOS token
    assert prep(root, tmp_path / "out", "--tokenizer", str(bad)) == 2
    assert "tokenizer.json: the tokenizer has no EOS id" in capsys.readouterr().err.strip().splitlines()[-1]
