"""Random documents of awkward text (accents, CJK, emoji, tabs, non-breaking spaces) for the corpus tests."""

import numpy as np

WORDS = ["the", "memory", "of", "a", "model", "é", "naïve", "日本", "😀", "x\ty", "  ", "42", "3.14", "\u00a0", "Ω"]


def make_docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        # Each line starts with a word, so no line is blank (blank lines separate .txt documents).
        lines = [" ".join([rng.choice(WORDS[:5]), *rng.choice(WORDS, rng.integers(0, 12))])
                 for _ in range(rng.integers(1, 5))]
        docs.append("\n".join(lines))
    return docs
