"""Train or load the sentencepiece tokenizer; trained models round-trip any text exactly.

Lossless settings: identity normalisation, whitespace kept as is, byte fallback for characters outside the
vocabulary, no dummy prefix (a document's first word is encoded like a word after a newline), and "\\n" as its
own piece so line breaks don't cost a byte token each. Training uses one thread: sentencepiece's result depends on
the thread count, and atlas-prep must give the same tokenizer for the same inputs whatever --workers says.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from atlas_train.data_prep.errors import PrepError
from atlas_train.train.atomic import atomic_write_bytes

UNK_ID, EOS_ID = 0, 1
MAX_LINE_BYTES = 1 << 14  # longer training lines are skipped by sentencepiece; they are still encoded later


def _training_lines(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-empty lines of the first documents, up to `max_bytes` of text (deterministic: no sampling)."""
    used = 0
    for doc in documents:
        for line in doc.split("\n"):
            if line:
                yield line
                used += len(line) + 1
        if used >= max_bytes:
            return


def train_tokenizer(documents: Iterable[str], out_path: Path, vocab_size: int, model_type: str,
                    max_train_bytes: int) -> Path:
    """Train on (the start of) the documents and write the model to `out_path` atomically."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents, max_train_bytes),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            user_defined_symbols=["\n"],
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995,
            hard_vocab_limit=False,
            max_sentence_length=MAX_LINE_BYTES,
            unk_id=UNK_ID,
            eos_id=EOS_ID,
            bos_id=-1,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise PrepError(f"sentencepiece training failed: {str(err).strip().splitlines()[-1]}") from None
    atomic_write_bytes(out_path, model.getvalue())
    return out_path


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """A sentencepiece model that has an EOS id (documents are separated by it); PrepError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"tokenizer not found: {path}")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise PrepError(f"{path}: not a sentencepiece model ({str(err).strip()})") from None
    if sp.eos_id() < 0:
        raise PrepError(f"{path}: the tokenizer has no EOS id; documents need one to be separated")
    return sp
