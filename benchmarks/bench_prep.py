"""atlas-prep throughput beside a bare sentencepiece encode loop over the same text, in one run.

    .venv/bin/python benchmarks/bench_prep.py [--mb 16] [--seq-len 2048] [--workers 1 2]

The text is the shipped corpus repeated to --mb MiB, one document per chapter. The tokenizer is trained once
and given to atlas-prep, so only reading, encoding, packing and writing are timed. The last lines are a table;
"vs bare" is atlas-prep's tokens/s per worker over the bare single-process encode rate (target >= 0.8).
"cpu s" adds the CPU time of atlas-prep's main and encoder processes: on a shared machine, where wall time
depends on the load, "cpu vs bare" (bare encode CPU / atlas-prep CPU) still shows what packing and writing cost.
"""

from __future__ import annotations

import argparse
import io
import lzma
import resource
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from atlas_train.data_prep.prep import PrepOptions, run_prep
from atlas_train.data_prep.tokenizer import train_tokenizer

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "kjv.txt.xz"


def children_cpu() -> float:
    """CPU seconds of finished child processes (atlas-prep's encoder pool, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=16.0, help="MiB of text to prepare")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()

    chapters = lzma.decompress(CORPUS.read_bytes()).decode().split("\n\n")
    docs: list[str] = []
    while sum(map(len, docs)) < args.mb * 2**20:
        docs += chapters
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "text.txt").write_text("\n\n".join(docs) + "\n")
        model = train_tokenizer(iter(chapters), tmp / "tok.model", args.vocab_size, "bpe", 1 << 30)
        sp = spm.SentencePieceProcessor(model_file=str(model))

        t0, c0 = time.perf_counter(), time.process_time()
        tokens = sum(len(sp.encode(doc)) + 1 for doc in docs)  # + EOS, as atlas-prep counts
        bare, bare_cpu = tokens / (time.perf_counter() - t0), time.process_time() - c0
        rows = [("bare sp.encode loop", 1, tokens / bare, bare, 1.0, bare_cpu, 1.0)]

        for workers in args.workers:
            opts = PrepOptions(inputs=[str(tmp / "text.txt")], output=str(tmp / f"out{workers}"),
                               seq_len=args.seq_len, tokenizer=str(model), txt_docs="blank-line",
                               val_fraction=0.01, workers=workers)
            t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
            run_prep(opts, log=io.StringIO())
            seconds = time.perf_counter() - t0
            cpu = time.process_time() - c0 + children_cpu() - k0
            rows.append((f"atlas-prep --workers {workers}", workers, seconds, tokens / seconds,
                         tokens / seconds / workers / bare, cpu, bare_cpu / cpu))

    print(f"\n{args.mb:g} MiB of text, {tokens:,} tokens, seq_len {args.seq_len}, vocab {args.vocab_size}")
    print(f"{'what':<26}{'workers':>8}{'seconds':>10}{'tokens/s':>14}{'vs bare':>9}{'cpu s':>8}{'cpu vs bare':>13}")
    for name, workers, seconds, rate, ratio, cpu, cpu_ratio in rows:
        print(f"{name:<26}{workers:>8}{seconds:>10.2f}{rate:>14,.0f}{ratio:>9.2f}{cpu:>8.2f}{cpu_ratio:>13.2f}")


if __name__ == "__main__":
    main()
