"""Needle in a haystack: probes have the exact length, the needle sits at the asked depth, the question ends the
prompt, training rows end with the answer; accuracy is 1 for a model that answers and 0 for one that cannot."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch

from atlas_train.eval import niah
from atlas_train.eval.streams import stream
from eval_helpers import train_tokenizer


@pytest.fixture(scope="module", params=[False, True], ids=["atlas-prep-style", "dummy-prefix"])
def tokenizer(tmp_path_factory, request):
    path = train_tokenizer(tmp_path_factory.mktemp("tok"), dummy_prefix=request.param)
    return spm.SentencePieceProcessor(model_file=str(path))


def find(haystack: list[int], needle: list[int]) -> int:
    return next(i for i in range(len(haystack) - len(needle) + 1) if haystack[i : i + len(needle)] == needle)


@pytest.mark.parametrize("kind", niah.KINDS)
@pytest.mark.parametrize("context", [120, 257])
def test_probe_has_exact_length_needle_at_depth_and_question_last(tokenizer, kind, context):
    builder = niah.HaystackBuilder(tokenizer)
    longest_sentence = max(len(s) for s in builder.sentence_ids)
    where = []
    for depth in (0.0, 0.5, 1.0):
        probe = builder.probe(kind, context, depth, np.random.default_rng(7))  # same needle for every depth
        text = tokenizer.decode(probe.prompt)
        assert len(probe.prompt) == context
        assert text.endswith(" is") and text.count(probe.answer) >= 1
        assert ". What is" in text and ".The" not in text  # pieces join with a space, whatever the tokenizer
        assert probe.answer_ids == builder.encode(probe.answer)
        begin, end = ("The pass key", "is the pass key.") if kind == "passkey" else ("One of", f"{probe.answer}.")
        needle = builder.encode(text[text.index(begin) : text.index(end) + len(end)])
        question_len = len(builder.encode(text[text.index("What is") :]))
        hay_len = context - len(needle) - question_len
        start = find(probe.prompt, needle[:4])
        assert abs(start - depth * hay_len) <= longest_sentence
        where.append(start)
    assert where == sorted(where) and where[0] == 0


def test_haystack_from_text_and_the_errors(tokenizer):
    builder = niah.HaystackBuilder(tokenizer, "In the beginning was the word. And the word was good! Then it rained?")
    assert len(builder.sentence_ids) == 3
    with pytest.raises(ValueError, match="too short"):
        builder.probe("number", 20, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown needle kind"):
        builder.probe("colour", 200, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no sentences"):
        niah.HaystackBuilder(tokenizer, "  \n ")


def test_training_rows_fill_the_row_and_end_with_the_answer(tokenizer):
    builder = niah.HaystackBuilder(tokenizer)
    rows = list(builder.training_rows(seq_len=127, count=6, seed=0))
    assert len(rows) == 6
    for tokens, starts in rows:
        assert tokens.shape == (128,) and starts[0] and not starts[1:].any()
        assert tokens[-1] == tokenizer.eos_id()
        text = tokenizer.decode(tokens[:-1].tolist())
        answer = text.rsplit(" is ", 1)[1].strip()
        assert answer and text.count(answer) >= 2  # once in the needle, once as the answer


def test_is_correct_is_a_case_insensitive_substring_match():
    assert niah.is_correct(" 71432. The", "71432") and niah.is_correct("Bread", "bread")
    assert not niah.is_correct(" 7143", "71432")


class AnswerOracle(torch.nn.Module):
    """Decodes the right answer for known prompts, token by token through its cache (like a model that recalls)."""

    def __init__(self, answers: dict[tuple, list[int]], vocab: int, eos: int, context: int):
        super().__init__()
        self.answers, self.vocab, self.eos, self.context = answers, vocab, eos, context

    def forward(self, input_ids, doc_start=None, labels=None, cache=None, use_cache=False):
        history = input_ids if cache is None else torch.cat([cache["ids"], input_ids], dim=1)
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(history.tolist()):
            answer = self.answers.get(tuple(row[: self.context]), [])
            done = len(row) - self.context
            logits[b, -1, answer[done] if done < len(answer) else self.eos] = 1.0
        return SimpleNamespace(logits=logits, loss=None, cache={"ids": history})


def test_accuracy_separates_recall_from_guessing(tokenizer):
    builder = niah.HaystackBuilder(tokenizer)
    rng = stream("eval", 3)  # accuracy() draws its probes from the same generator
    probes = [builder.probe("word", 120, 0.5, rng) for _ in range(5)]
    vocab, eos = tokenizer.get_piece_size(), tokenizer.eos_id()
    oracle = AnswerOracle({tuple(p.prompt): p.answer_ids for p in probes}, vocab, eos, 120)
    assert niah.accuracy(oracle, builder, "word", 120, 0.5, 5, batch_size=2, seed=3, device="cpu") == 1.0
    ignorant = AnswerOracle({}, vocab, eos, 120)
    assert niah.accuracy(ignorant, builder, "word", 120, 0.5, 5, batch_size=2, seed=3, device="cpu") == 0.0


def test_evaluation_never_asks_a_training_needle(tokenizer):
    """atlas-eval's probes (seed 0 by default) hide none of the needles of the train (seed 0) and val (seed 1) shards
    that `atlas-eval --write-data` writes (with one generator for both, one in nine was a training needle). Number
    needles: a 7-digit value for a two-word key, so a chance repeat is all but impossible."""
    builder = niah.HaystackBuilder(tokenizer)
    needle = re.compile(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.")

    def needles(rows):
        return [needle.search(tokenizer.decode(list(row))).groups() for row in rows]

    taught = set(needles(t for seed in (0, 1) for t, _ in builder.training_rows(127, 300, seed, ["number"])))
    prompts = []

    class Recording(AnswerOracle):
        def forward(self, input_ids, cache=None, **kw):
            if cache is None:
                prompts.extend(input_ids.tolist())
            return super().forward(input_ids, cache=cache, **kw)

    model = Recording({}, tokenizer.get_piece_size(), tokenizer.eos_id(), 120)
    niah.accuracy(model, builder, "number", 120, 0.5, 300, batch_size=100, seed=0, device="cpu")
    asked = needles(prompts)
    assert len(set(asked)) == 300 and not taught & set(asked)
