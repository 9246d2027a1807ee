"""`atlas-prep`: raw text (txt, jsonl, parquet, Hugging Face datasets) into tokenized webdataset shards plus
manifest.json."""

from __future__ import annotations

import argparse
import sys

from atlas_train.data_prep.errors import PrepError
from atlas_train.data_prep.prep import PrepOptions, run_prep
from atlas_train.data_prep.shard_format import DataError


def parse_args(argv: list[str] | None) -> PrepOptions:
    p = argparse.ArgumentParser(
        prog="atlas-prep",
        description="Tokenize text (sentencepiece, or a Hugging Face tokenizer.json) and pack it into webdataset "
                    "shards of seq_len+1 token rows.",
        epilog="Example: atlas-prep --input data/corpus/kjv.txt.xz --txt-docs blank-line --output runs/demo/shards "
               "--seq-len 256 --vocab-size 8192",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, folders (searched recursively) or globs of .txt/.jsonl (optionally .gz/.xz/.zst) "
                        "and .parquet; or the folder of a Hugging Face dataset saved with save_to_disk")
    p.add_argument("--output", required=True, metavar="DIR", help="dataset folder to (re)write")
    p.add_argument("--seq-len", type=int, required=True, help="training context; rows hold seq_len+1 tokens")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="FILE",
                     help="an existing sentencepiece model or Hugging Face tokenizer.json (must have an EOS token; for "
                          "a tokenizer.json, the eos_token of a tokenizer_config.json beside it, else </s> or "
                          "<|endoftext|>); the manifest records which kind")
    tok.add_argument("--vocab-size", type=int, default=8192, help="train a tokenizer of this size (default 8192)")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="trained tokenizer kind")
    p.add_argument("--tokenizer-train-mb", type=float, default=200.0,
                   help="train the tokenizer on the first this many MiB of text (default 200)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--shard-size-mb", type=float, default=64.0, help="target shard size (default 64)")
    p.add_argument("--workers", type=int, default=1, help="encoder processes (default 1)")
    p.add_argument("--text-field", default="text",
                   help="JSON key / parquet or Hugging Face dataset column holding the text (default text)")
    p.add_argument("--txt-docs", choices=["file", "blank-line"], default="file",
                   help=".txt documents: one per file (default) or one per blank-line-separated block")
    a = p.parse_args(argv)
    return PrepOptions(
        inputs=a.input, output=a.output, seq_len=a.seq_len, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
        model_type=a.model_type, tokenizer_train_mb=a.tokenizer_train_mb, val_fraction=a.val_fraction,
        shard_size_mb=a.shard_size_mb, workers=a.workers, text_field=a.text_field, txt_docs=a.txt_docs,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        run_prep(opts)
    except (PrepError, DataError) as err:
        print(f"atlas-prep: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("atlas-prep: interrupted; the output has no manifest until a run completes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
