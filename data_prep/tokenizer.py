"""Train or load the tokenizer: sentencepiece (trained here, or given), or a given Hugging Face `tokenizer.json`.

Both kinds are used through the part of sentencepiece's interface atlas-prep needs (encode, get_piece_size, eos_id);
a tokenizer file's kind is told by its content (a tokenizer.json is JSON).

Lossless settings: identity normalisation, whitespace kept as is, byte fallback for characters outside the
vocabulary, no dummy prefix (a document's first word is encoded like a word after a newline), and "\\n" as its
own piece so line breaks don't cost a byte token each. Training uses one thread: sentencepiece's result depends on
the thread count, and atlas-prep must give the same tokenizer for the same inputs whatever --workers says.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from atlas_train.data_prep.errors import PrepError
from atlas_train.data_prep.shard_format import TOKENIZER_NAME
from atlas_train.train.atomic import atomic_write_bytes

UNK_ID, EOS_ID = 0, 1
SENTENCEPIECE, TOKENIZERS = "sentencepiece", "tokenizers"  # the manifest's tokenizer kinds
FILE_NAMES = {SENTENCEPIECE: TOKENIZER_NAME, TOKENIZERS: "tokenizer.json"}  # their names in a dataset folder
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")  # tried when no config names EOS
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


def tokenizer_kind(path: str | Path) -> str:
    """SENTENCEPIECE or TOKENIZERS, from the file's first byte (a sentencepiece model is a protobuf, never JSON)."""
    with open(path, "rb") as f:
        return TOKENIZERS if f.read(64).lstrip()[:1] == b"{" else SENTENCEPIECE


class JsonTokenizer:
    """A Hugging Face `tokenizer.json` behind sentencepiece's encode / decode / get_piece_size / id_to_piece / eos_id.

    Text is encoded without the special tokens a post-processor would add (atlas-prep separates documents with
    EOS itself). EOS is the `eos_token` of a tokenizer_config.json beside the file, else the first special token
    named like one of EOS_NAMES.
    """

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self._eos = self._find_eos(path)

    def _find_eos(self, path: Path) -> int:
        config = path.parent / "tokenizer_config.json"
        names: tuple = EOS_NAMES
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            names = ((eos.get("content") if isinstance(eos, dict) else eos),) if eos else names
        for name in names:
            token_id = self._tokenizer.token_to_id(name) if name else None
            if token_id is not None:
                return token_id
        return -1

    def encode(self, text: str | list[str], num_threads: int | None = None) -> list:
        if isinstance(text, str):
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        return [enc.ids for enc in self._tokenizer.encode_batch(text, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def get_piece_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id)

    def eos_id(self) -> int:
        return self._eos


def load_tokenizer(path: str | Path):
    """A sentencepiece model or tokenizer.json (JsonTokenizer) that has an EOS id (documents are separated by it);
    PrepError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"tokenizer not found: {path}")
    kind = tokenizer_kind(path)
    try:
        tokenizer = JsonTokenizer(path) if kind == TOKENIZERS else spm.SentencePieceProcessor(model_file=str(path))
    except Exception as err:  # noqa: BLE001 - both libraries raise their own errors (RuntimeError, OSError, ...)
        what = "a tokenizer.json" if kind == TOKENIZERS else "a sentencepiece model"
        raise PrepError(f"{path}: not {what} ({str(err).strip().splitlines()[0]})") from None
    if tokenizer.eos_id() < 0:
        raise PrepError(f"{path}: the tokenizer has no EOS id; documents need one to be separated")
    return tokenizer
