"""`atlas-eval`: perplexity, MQAR, needle-in-a-haystack and lm-evaluation-harness tasks on an exported model; or
synthetic training shards.

    atlas-eval --checkpoint DIR --task ppl [--data DIR] [--context-factors 1,2,4]
    atlas-eval --checkpoint DIR --task mqar [--pairs 4,8,16,32,64] [--seq-lens 64,128,256,512] [--mqar-vocab 512,8192]
    atlas-eval --checkpoint DIR --task niah [--contexts 256,512,1024] [--depths 0,0.25,0.5,0.75,1]
    atlas-eval --checkpoint DIR --task lm-eval [--tasks lambada_openai,piqa,...] [--include-path DIR] [--limit N]
    atlas-eval --task mqar --write-data DIR --seq-len L [--train-rows N --val-rows M]     # shards, no model
    atlas-eval --task niah --write-data DIR --seq-len L --tokenizer MODEL

Each evaluation prints a table and writes the full results as JSON (default `<checkpoint>/eval_<task>.json`).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from tqdm import tqdm

from atlas_train.eval import harness, mqar, niah, perplexity
from atlas_train.eval.checkpoint import UserError, load_for_eval, load_tokenizer
from atlas_train.eval.report import format_table, write_json


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atlas-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", required=True, choices=["ppl", "mqar", "niah", "lm-eval"])
    p.add_argument("--checkpoint", help="exported model dir (atlas-train export)")
    p.add_argument("--out", help="results JSON (default <checkpoint>/eval_<task>.json)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("ppl")
    g.add_argument("--data", help="dataset dir with manifest.json (default: the run's data.path)")
    g.add_argument("--split", default="val")
    g.add_argument("--context-factors", type=int_list, default=[1, 2, 4], help="contexts as multiples of seq_len")
    g.add_argument("--max-rows", type=int, default=256, help="rows of seq_len per context (0: all)")
    g = p.add_argument_group("mqar")
    g.add_argument("--pairs", type=int_list, default=[4, 8, 16, 32, 64])
    g.add_argument("--seq-lens", type=int_list, default=[64, 128, 256, 512])
    g.add_argument(
        "--mqar-vocab",
        type=int_list,
        help="MQAR vocabularies to evaluate (default: the model's, at most 8192); one value for --write-data",
    )
    g = p.add_argument_group("niah")
    g.add_argument("--contexts", type=int_list, default=[256, 512, 1024, 2048], help="prompt lengths in tokens")
    g.add_argument("--depths", type=float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    g.add_argument("--kinds", default=",".join(niah.KINDS), help=f"needle kinds among {', '.join(niah.KINDS)}")
    g.add_argument("--haystack", help="text file whose sentences make the haystack (default: RULER's noise)")
    g.add_argument("--tokenizer", help="sentencepiece model (for --write-data; evaluation uses the checkpoint's)")
    g = p.add_argument_group("lm-eval (lm-evaluation-harness)")
    g.add_argument("--tasks", default=",".join(harness.PAPER_TASKS),
                   help="comma-separated lm-eval tasks or groups (default: the paper's zero-shot table)")
    g.add_argument("--include-path", metavar="DIR", help="folder of extra task YAMLs (local tasks)")
    g.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    g.add_argument("--limit", type=float, help="documents per task (a fraction if < 1); for quick checks")
    g.add_argument("--log-samples", action="store_true", help="keep every document's requests and answers in the JSON")
    g = p.add_argument_group("evaluation size (mqar, niah)")
    g.add_argument("--samples", type=int, help="samples per setting (default: mqar 256, niah 16)")
    g = p.add_argument_group("synthetic training shards (mqar, niah): no checkpoint needed")
    g.add_argument("--write-data", metavar="DIR", help="write train/val shards in atlas-prep's format to DIR")
    g.add_argument("--seq-len", type=int, help="row length of the written shards (rows hold seq_len + 1 tokens)")
    g.add_argument("--train-rows", type=int, default=20000)
    g.add_argument("--val-rows", type=int, default=1000)
    return p


def progress_bar(args, **kwargs):
    return tqdm(disable=args.no_progress, file=sys.stderr, dynamic_ncols=True, **kwargs)


def check_same_tokenizer(manifest, tokenizer_path: Path | None) -> None:
    """Perplexity means nothing on ids from another tokenizer: compare the data's and the checkpoint's."""
    if manifest.tokenizer_sha256 is None or tokenizer_path is None:
        return
    if hashlib.sha256(tokenizer_path.read_bytes()).hexdigest() != manifest.tokenizer_sha256:
        raise UserError(f"{manifest.path} was tokenized with another tokenizer than the checkpoint's {tokenizer_path}")


def run_ppl(args, loaded) -> tuple[dict, str]:
    from atlas_train.data_prep.shard_format import read_manifest

    manifest = read_manifest(args.data or loaded.config.data.path)
    seq_len = manifest.seq_len
    if manifest.vocab_size > loaded.model.config.vocab_size:
        raise UserError(
            f"{manifest.path}: vocabulary {manifest.vocab_size} exceeds the model's {loaded.model.config.vocab_size}"
        )
    check_same_tokenizer(manifest, loaded.tokenizer_path)
    results = []
    for factor in args.context_factors:
        available = manifest.split(args.split).samples // factor
        total = min(available, args.max_rows // factor) if args.max_rows else available
        if total == 0:
            results.append({"context_len": factor * seq_len, "rows": 0, "skipped": "not enough rows"})
            continue
        rows = perplexity.joined_rows(perplexity.ordered_rows(manifest, args.split), factor)
        with progress_bar(args, total=total, desc=f"ppl @ {factor * seq_len}", unit="row") as bar:
            results.append(
                perplexity.evaluate(
                    loaded.model, rows, factor * seq_len, max(1, args.batch_size // factor), total, loaded.device, bar
                )
            )
    out = {"task": "ppl", "data": str(manifest.path), "split": args.split, "seq_len": seq_len, "contexts": results}
    done = [r for r in results if r.get("rows")]
    labels = []
    for r in done:
        labels += [b["positions"] for b in r["buckets"] if b["positions"] not in labels]
    rows = []
    for label in labels:
        cells = [next((b["ppl"] for b in r["buckets"] if b["positions"] == label), None) for r in done]
        rows.append([label, *cells])
    rows.append(["all", *[r["ppl"] for r in done]])
    table = format_table(["in-doc position", *[f"ppl @ {r['context_len']}" for r in done]], rows)
    return out, table


def run_mqar(args, loaded) -> tuple[dict, str]:
    model_vocab = loaded.model.config.vocab_size
    vocabs = args.mqar_vocab or [min(model_vocab, 8192)]
    if max(vocabs) > model_vocab:
        raise UserError(f"--mqar-vocab {max(vocabs)} exceeds the model's vocabulary {model_vocab}")
    settings = [
        mqar.MQARSetting(n, L, V)
        for V in vocabs
        for L in args.seq_lens
        for n in args.pairs
        if 4 * n <= L + 1 and n <= (V - 1) // 2
    ]
    if not settings:
        raise UserError("no MQAR setting fits: each needs seq_len >= 4 * pairs - 1 and vocab >= 2 * pairs + 1")
    samples = args.samples or 256
    results = []
    for setting in progress_bar(args, iterable=settings, desc="mqar", unit="setting"):
        acc = mqar.accuracy(loaded.model, setting, samples, args.batch_size, args.seed, loaded.device)
        results.append(
            {
                "num_pairs": setting.num_pairs,
                "seq_len": setting.seq_len,
                "vocab_size": setting.vocab_size,
                "accuracy": acc,
            }
        )
    out = {"task": "mqar", "samples_per_setting": samples, "results": results}
    keys = sorted({(r["vocab_size"], r["num_pairs"]) for r in results})
    lens = sorted({r["seq_len"] for r in results})
    acc = {(r["vocab_size"], r["num_pairs"], r["seq_len"]): r["accuracy"] for r in results}
    table = format_table(
        ["vocab", "pairs", *[f"len {L}" for L in lens]], [[V, n, *[acc.get((V, n, L)) for L in lens]] for V, n in keys]
    )
    return out, table


def parse_kinds(text: str) -> list[str]:
    kinds = [k for k in text.split(",") if k]
    unknown = [k for k in kinds if k not in niah.KINDS]
    if unknown or not kinds:
        raise UserError(f"--kinds: unknown needle kind(s) {unknown} (known: {', '.join(niah.KINDS)})")
    return kinds


def read_haystack(path: str | None) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(f"haystack file not found: {path}")
    return Path(path).read_text(errors="replace")


PREFILL_TOKENS = 2048  # NIAH prompts go through the model in segments of about this many tokens (whole chunks)


def run_niah(args, loaded) -> tuple[dict, str]:
    builder = niah.HaystackBuilder(load_tokenizer(loaded.tokenizer_path), read_haystack(args.haystack))
    kinds = parse_kinds(args.kinds)
    samples = args.samples or 16
    cells = [(k, c, d) for k in kinds for c in args.contexts for d in args.depths]
    chunk = loaded.model.config.chunk_size
    prefill_chunk = chunk * max(1, PREFILL_TOKENS // chunk)
    results = []
    for kind, context, depth in progress_bar(args, iterable=cells, desc="niah", unit="cell"):
        acc = niah.accuracy(
            loaded.model,
            builder,
            kind,
            context,
            depth,
            samples,
            args.batch_size,
            args.seed,
            loaded.device,
            prefill_chunk,
        )
        results.append({"kind": kind, "context_len": context, "depth": depth, "accuracy": acc})
    out = {"task": "niah", "samples_per_cell": samples, "results": results}
    acc = {(r["kind"], r["context_len"], r["depth"]): r["accuracy"] for r in results}
    rows = [
        [
            kind,
            context,
            *[acc[(kind, context, d)] for d in args.depths],
            sum(acc[(kind, context, d)] for d in args.depths) / len(args.depths),
        ]
        for kind in kinds
        for context in args.contexts
    ]
    table = format_table(["needle", "context", *[f"depth {d:g}" for d in args.depths], "mean"], rows)
    return out, table


def run_lm_eval(args, loaded) -> tuple[dict, str]:
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise UserError("--tasks names no task")
    results = harness.evaluate(loaded, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                               limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                               log_samples=args.log_samples)
    return {"task": "lm-eval", **results}, harness.table(results)


def write_data(args) -> str:
    from atlas_train.data_prep.writer import write_dataset

    if not args.seq_len or args.seq_len <= 0:
        raise UserError("--write-data needs --seq-len L (a positive row length)")
    seeds = {"train": args.seed, "val": args.seed + 1}
    counts = {"train": args.train_rows, "val": args.val_rows}
    if args.task == "mqar":
        if args.mqar_vocab and len(args.mqar_vocab) > 1:
            raise UserError("--write-data takes one --mqar-vocab value")
        vocab = args.mqar_vocab[0] if args.mqar_vocab else 8192
        pairs = [n for n in args.pairs if 4 * n <= args.seq_len + 1]
        if not pairs:
            raise UserError(f"no --pairs value fits seq_len {args.seq_len} (each needs seq_len >= 4 * pairs - 1)")
        mqar.MQARSetting(max(pairs), args.seq_len, vocab).check()
        splits = {s: mqar.training_rows(args.seq_len, vocab, pairs, counts[s], seeds[s]) for s in counts}
        info = {"task": "mqar", "pairs": pairs, "mqar_vocab": vocab}
        tokenizer_path = eos_id = None
    else:
        if not args.tokenizer:
            raise UserError("--task niah --write-data needs --tokenizer MODEL (a sentencepiece model)")
        tokenizer_path = Path(args.tokenizer)
        if not tokenizer_path.is_file():
            raise UserError(f"tokenizer not found: {tokenizer_path}")
        tokenizer = load_tokenizer(tokenizer_path)
        builder = niah.HaystackBuilder(tokenizer, read_haystack(args.haystack))
        kinds = parse_kinds(args.kinds)
        splits = {s: builder.training_rows(args.seq_len, counts[s], seeds[s], kinds) for s in counts}
        vocab, eos_id = tokenizer.get_piece_size(), (tokenizer.eos_id() if tokenizer.eos_id() >= 0 else None)
        info = {"task": "niah", "kinds": kinds}
    with progress_bar(args, total=sum(counts.values()), desc=f"{args.task} rows", unit="row") as bar:
        counted = {s: _counting(rows, bar) for s, rows in splits.items()}
        manifest = write_dataset(
            args.write_data,
            counted,
            seq_len=args.seq_len,
            vocab_size=vocab,
            tokenizer_path=tokenizer_path,
            eos_id=eos_id,
            info=info,
        )
    return (
        f"wrote {sum(s.samples for s in manifest.splits.values())} rows of {args.seq_len + 1} tokens to {manifest.path}"
    )


def _counting(rows, bar):
    for row in rows:
        bar.update(1)
        yield row


TASKS = {"ppl": run_ppl, "mqar": run_mqar, "niah": run_niah, "lm-eval": run_lm_eval}


def main(argv: list[str] | None = None) -> int:
    from atlas_train.config import ConfigError
    from atlas_train.data_prep.shard_format import DataError

    args = build_parser().parse_args(argv)
    try:
        if args.batch_size <= 0 or (args.samples is not None and args.samples <= 0) or args.max_rows < 0:
            raise UserError("--batch-size and --samples must be positive, --max-rows >= 0")
        if args.write_data:
            if args.task in ("ppl", "lm-eval"):
                raise UserError("--write-data makes synthetic shards: use it with --task mqar or niah")
            print(write_data(args))
            return 0
        if not args.checkpoint:
            raise UserError("--checkpoint DIR is required (or --write-data DIR to make synthetic shards)")
        loaded = load_for_eval(args.checkpoint, device=args.device, dtype=args.dtype)
        results, table = TASKS[args.task](args, loaded)
    except (UserError, DataError, ConfigError, ValueError) as err:
        print(f"atlas-eval: error: {err}", file=sys.stderr)
        return 2
    results["checkpoint"] = str(args.checkpoint)
    out = write_json(args.out or Path(args.checkpoint) / f"eval_{args.task}.json", results)
    print(table)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
