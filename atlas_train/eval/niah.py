"""Single needle in a haystack (after RULER's S-NIAH, Hsieh et al. 2024): one fact hidden at a chosen depth of a
long filler text, asked for at the end. Accuracy per context length and depth shows how far back the model recalls.

Needle kinds: `passkey` (the classic "The pass key is 71432. Remember it."), `number` (a 7-digit special magic
number for a key), `word` (a special magic word for a key). Keys and words are whole-word pieces of the model's own
tokenizer, so every needle tokenizes cleanly whatever corpus trained it. The haystack is RULER's repeated noise
sentences, or sentences of a text file (`haystack_text`).

Every piece (sentence, needle, question, answer) is tokenized on its own, as if after a space, and the ids are
concatenated: a probe then has exactly the requested number of tokens, so probes of one length batch together, and
training rows fill `seq_len + 1` exactly.

Training shards and evaluation draw from distinct random streams (`streams.stream`): independent draws, not
disjoint sets. With 90,000 pass keys an evaluation value can coincide with one a shard taught (about one probe in
ten after 10,000 pass-key rows); each is taught once among many, so the model learns where to look and what to
copy, not the values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from atlas_train.eval.streams import stream

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KINDS = ("passkey", "number", "word")
MIN_WORDS = 16


@dataclass(frozen=True)
class Probe:
    prompt: list[int]  # haystack with the needle inside, then the question
    answer: str  # what the continuation must contain
    answer_ids: list[int]


class HaystackBuilder:
    """Makes probes and training rows from one tokenizer (sentencepiece) and one haystack text."""

    def __init__(self, tokenizer, haystack_text: str | None = None):
        self.tokenizer = tokenizer
        # atlas-prep's tokenizers add no dummy prefix: there the space between pieces must be encoded explicitly.
        self.space = "" if tokenizer.decode(tokenizer.encode("a") + tokenizer.encode("b")) == "a b" else " "
        sentences = NOISE if haystack_text is None else _split_sentences(haystack_text)
        self.sentence_ids = [ids for ids in (self.encode(s) for s in sentences) if ids]
        if not self.sentence_ids:
            raise ValueError("NIAH: the haystack text holds no sentences")
        self.words = _whole_words(tokenizer)
        if len(self.words) < MIN_WORDS:
            raise ValueError(f"NIAH: the tokenizer has only {len(self.words)} whole-word pieces, need {MIN_WORDS}")

    def encode(self, piece: str) -> list[int]:
        """Token ids of `piece` as it reads after a space (the way pieces join in a probe)."""
        return self.tokenizer.encode(self.space + piece)

    def _needle(self, kind: str, rng: np.random.Generator) -> tuple[str, str, str]:
        """(needle sentence, question, answer) of one kind."""
        if kind == "passkey":
            value = str(rng.integers(10_000, 100_000))
            return (
                f"The pass key is {value}. Remember it. {value} is the pass key.",
                "What is the pass key? The pass key is",
                value,
            )
        words = rng.choice(self.words, 3, replace=False)  # the word needle's value is never part of its key
        key = "-".join(words[:2])
        if kind == "number":
            value, noun = str(rng.integers(1_000_000, 10_000_000)), "number"
        elif kind == "word":
            value, noun = str(words[2]), "word"
        else:
            raise ValueError(f"NIAH: unknown needle kind {kind!r} (known: {', '.join(KINDS)})")
        needle = f"One of the special magic {noun}s for {key} is: {value}."
        asked = f"the special magic {noun} for {key} mentioned in the provided text"
        return needle, f"What is {asked}? {asked[0].upper()}{asked[1:]} is", value

    def _haystack(self, length: int, needle: list[int], depth: float, rng: np.random.Generator) -> list[int]:
        """`length` haystack tokens with `needle` inserted at the sentence boundary nearest `depth` (0 = start).

        Whole sentences are laid down until there are enough, and the surplus is cut from the front, so the text
        before the question ends with a full sentence (the start may begin mid-sentence, like any excerpt).
        """
        if length < 0:
            raise ValueError(f"NIAH: the context is {-length} tokens too short for the needle and the question")
        ids: list[int] = []
        boundaries = []
        i = int(rng.integers(len(self.sentence_ids)))
        while len(ids) < length:
            ids += self.sentence_ids[i % len(self.sentence_ids)]
            boundaries.append(len(ids))
            i += 1
        offset = len(ids) - length
        candidates = [offset] + [b for b in boundaries if b > offset]
        cut = min(candidates, key=lambda b: abs(b - offset - depth * length))
        return ids[offset:cut] + needle + ids[cut:]

    def probe(self, kind: str, context_len: int, depth: float, rng: np.random.Generator) -> Probe:
        """A prompt of exactly `context_len` tokens ending with the question."""
        needle, question, answer = self._needle(kind, rng)
        needle_ids, question_ids = self.encode(needle), self.encode(question)
        hay = self._haystack(context_len - len(needle_ids) - len(question_ids), needle_ids, depth, rng)
        return Probe(hay + question_ids, answer, self.encode(answer))

    def training_rows(
        self, seq_len: int, count: int, seed: int, kinds=KINDS
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows for `write_dataset`: probe + answer + EOS filling seq_len + 1 tokens, needle depth uniform."""
        rng = stream("train", seed)
        doc_start = np.zeros(seq_len + 1, dtype=bool)
        doc_start[0] = True
        eos = [self.tokenizer.eos_id()] if self.tokenizer.eos_id() >= 0 else []
        for _ in range(count):
            kind = str(rng.choice(list(kinds)))
            needle, question, answer = self._needle(kind, rng)
            needle_ids, question_ids = self.encode(needle), self.encode(question)
            tail = question_ids + self.encode(answer) + eos
            hay = self._haystack(seq_len + 1 - len(needle_ids) - len(tail), needle_ids, float(rng.random()), rng)
            yield np.asarray(hay + tail, dtype=np.int64), doc_start


def _split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]


def _whole_words(tokenizer) -> list[str]:
    """Lower-case alphabetic pieces that are whole words ("▁word"), 4+ letters: safe needle keys and values."""
    words = []
    for i in range(tokenizer.get_piece_size()):
        piece = tokenizer.id_to_piece(i)
        word = piece[1:]
        if piece.startswith("\u2581") and len(word) >= 4 and word.isascii() and word.isalpha() and word.islower():
            words.append(word)
    return sorted(set(words))


def is_correct(continuation: str, answer: str) -> bool:
    """RULER's string match: the answer appears in the generated text (case-insensitive)."""
    return answer.lower() in continuation.lower()


def accuracy(
    model,
    builder: HaystackBuilder,
    kind: str,
    context_len: int,
    depth: float,
    num_samples: int,
    batch_size: int,
    seed: int,
    device,
    prefill_chunk: int | None = None,
) -> float:
    """Greedy-decode the answer (recurrent decoding) for `num_samples` probes; fraction that contain it.

    `prefill_chunk` feeds long prompts in segments (see `generate`), bounding the full-vocabulary logits held."""
    from atlas_train.eval.generate import generate

    rng = stream("eval", seed)
    probes = [builder.probe(kind, context_len, depth, rng) for _ in range(num_samples)]
    correct = 0
    for start in range(0, num_samples, batch_size):
        group = probes[start : start + batch_size]
        prompt = torch.tensor([p.prompt for p in group], dtype=torch.long, device=device)
        new_tokens = max(len(p.answer_ids) for p in group) + 2
        out = generate(model, prompt, new_tokens, prefill_chunk=prefill_chunk)[:, context_len:]
        for p, ids in zip(group, out.tolist()):
            correct += is_correct(builder.tokenizer.decode(ids), p.answer)
    return correct / num_samples
