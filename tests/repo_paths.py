"""Where the checkout's folders are, for tests that run its scripts or read its configs."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CONFIGS = REPO / "configs"
BENCHMARKS = REPO / "benchmarks"
