"""The small recall study: which members of the family can look values up by key, and how far?

Trains the members in configs/recall/ (atlas, omeganet, titans, transformer, atlas_mag: equal width and depth) on
the same MQAR shards with `atlas-train`, exports each, and scores MQAR accuracy on a grid of (key-value pairs,
sequence length) that reaches beyond the training mix (longer rows, more pairs). One command on one GPU:

    python benchmarks/recall_study.py --out $OUT/recall          # about 8 minutes on an H100
    python benchmarks/recall_study.py --smoke                     # CPU: tiny sizes, proves the whole path

Fair, equal budget: every member trains the same number of steps on the same rows with the same schedule. Unless
--steps is given, a short probe of the slowest member (atlas_mag, on random tokens) measures its step time first, and
the study picks the steps that member completes in 80% of the per-member cap (--max-minutes, default the config's);
the cap still stops any member that runs slower, and the table shows the steps each one completed. The warm-up is
10% of the steps (at most the config's).

writes into --out: `<member>.json` (training summary + accuracy grid), `recall.json` (all members), `recall.md`
(the tables), `recall.png` when matplotlib is installed; logs go to <work>/<member>/train.log. The table is printed
last. Afterwards, where matplotlib is installed (`pip install -e .[bench]`):

    python benchmarks/recall_study.py --render OUT/recall [OUT2/recall ...]

redraws the plot as benchmarks/recall_study.png and puts the tables into benchmarks/RESULTS.md between the
`recall-study` markers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEMBERS = ["atlas", "omeganet", "titans", "transformer", "atlas_mag"]
MAX_TRAIN_ROWS = 50_000  # distinct MQAR training rows (Zoology uses 100K); longer runs repeat them as epochs
BEGIN, END = "<!-- recall-study:begin -->", "<!-- recall-study:end -->"
PROBE_MEMBER = "atlas_mag"  # the slowest member: the ATLAS memory and sliding-window attention
SMOKE_OVERRIDES = [  # every member the same tiny size, so the smoke run takes a few CPU minutes
    "model.d_model=32", "model.vocab_size=64", "model.max_seq_len=128", "model.chunk_size=16", "model.swa_window=16",
    "model.mlp_hidden=64", "model.gate_rank=8", "train.seq_len=32", "train.micro_batch_size=8",
    "train.warmup_steps=2", "train.eval_every=0", "train.steps=8", "data.shuffle_buffer=16",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/recall/results", help="results folder (JSON, markdown, PNG)")
    p.add_argument("--work", default="runs/recall", help="data, runs and logs")
    p.add_argument("--models", default=",".join(MEMBERS))
    p.add_argument("--steps", type=int, help="training steps (default: configs/recall/common.yaml)")
    p.add_argument("--max-minutes", type=float, help="wall-time cap per member (default: the config's)")
    p.add_argument("--train-pairs", default="4,8,16,32,64", help="pair counts mixed in the training rows")
    p.add_argument("--eval-pairs", default="4,8,16,32,64,128")
    p.add_argument("--eval-seq-lens", default="128,256,512")
    p.add_argument("--samples", type=int, default=256, help="MQAR rows per evaluation setting")
    p.add_argument("--device", default="auto")
    p.add_argument("--probe-steps", type=int, default=30, help="steps of the timing probe that picks --steps")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny model, rows and grid")
    p.add_argument(
        "--render", nargs="+", metavar="DIR", help="only draw the plot and update RESULTS.md from DIR/*.json"
    )
    p.add_argument("overrides", nargs="*", help="extra atlas-train overrides for every member (key=value)")
    args = p.parse_args(argv)
    if args.smoke:
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
        args.probe_steps = min(args.probe_steps, 4)
        args.train_pairs, args.eval_pairs, args.eval_seq_lens, args.samples = "2,4,8", "2,4,8", "32,64", 16
        if args.work == "runs/recall":
            args.work, args.out = "runs/recall_smoke", "runs/recall_smoke/results"
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def make_data(work: Path, cfg, train_pairs: list[int], rows: int) -> Path:
    """MQAR shards for the run's seq_len and vocabulary; reused when an identical set is already there."""
    from atlas_train.data_prep.shard_format import DataError, read_manifest
    from atlas_train.data_prep.writer import write_dataset

    from atlas_train.eval import mqar

    data = work / "data"
    train_pairs = [n for n in train_pairs if 4 * n <= cfg.train.seq_len + 1]
    if not train_pairs:
        sys.exit(f"recall_study: no --train-pairs value fits seq_len {cfg.train.seq_len} (needs 4 * pairs - 1)")
    info = {"task": "mqar", "pairs": train_pairs, "mqar_vocab": cfg.model.vocab_size, "rows": rows}
    try:
        manifest = read_manifest(data)
        if manifest.info == info and manifest.seq_len == cfg.train.seq_len:
            return data
    except DataError:
        pass
    seq_len, vocab = cfg.train.seq_len, cfg.model.vocab_size
    t0 = time.time()
    write_dataset(
        data,
        {
            "train": mqar.training_rows(seq_len, vocab, train_pairs, rows, seed=0),
            "val": mqar.training_rows(seq_len, vocab, train_pairs, max(256, rows // 100), seed=1),
        },
        seq_len=seq_len,
        vocab_size=vocab,
        info=info,
    )
    print(f"wrote {rows} MQAR rows to {data} in {time.time() - t0:.0f}s", flush=True)
    return data


def last_metrics(run: Path) -> dict:
    """The last logged step, training loss and step time of a run (metrics.jsonl)."""
    out: dict = {}
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        out["steps"] = record["step"]
        for key in ("train/loss", "perf/step_time_s", "val/loss"):
            if key in record:
                out[key] = record[key]
    return out


def fresh_run_dir(run: Path) -> Path:
    """An empty run folder: every study run trains from scratch (a folder left by an earlier run is this script's)."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    return run


def run_member(name: str, overrides: list[str], log) -> int:
    """One `atlas-train` process for a member's config, its output appended to `log`."""
    cmd = [sys.executable, "-m", "atlas_train.train.cli", "--config", str(REPO / "configs/recall" / f"{name}.yaml"),
           *overrides]
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode


def probe_steps(work: Path, cap_minutes: float, max_steps: int, args) -> int:
    """The steps the slowest member completes in 80% of the per-member cap (the rest absorbs its first steps' compiles
    and the data loader), timed on random tokens."""
    run = fresh_run_dir(work / "probe")
    overrides = [*args.overrides, f"train.out_dir={run}", "train.resume=none", "train.progress=false",
                 "train.synthetic_data=true", f"train.steps={args.probe_steps}", f"train.max_minutes={cap_minutes}",
                 "train.eval_every=0"]  # the study's own keys last: they win over the user's
    with open(work / "probe.log", "w") as log:
        code = run_member(PROBE_MEMBER, overrides, log)
    path = run / "metrics.jsonl"
    times = [json.loads(line)["perf/step_time_s"] for line in path.read_text().splitlines()] if path.is_file() else []
    if code != 0 or not times:
        sys.exit(f"recall_study: the timing probe failed (exit {code}); see {work / 'probe.log'}")
    step_s = statistics.median(times[len(times) // 2 :])  # past the first steps' compilation and allocation
    steps = max(1, min(max_steps, int(0.8 * cap_minutes * 60 / step_s)))
    print(f"probe: {PROBE_MEMBER} takes {1000 * step_s:.0f} ms per step; every member trains {steps} steps", flush=True)
    return steps


def train_and_export(name: str, data: Path, work: Path, steps: int, schedule: list[str], args) -> dict:
    """atlas-train then atlas-train export for one member, as subprocesses logging to <work>/<name>/train.log.
    schedule: the study's train.* keys, the same for every member."""
    run = fresh_run_dir(work / name)
    overrides = [*args.overrides, f"data.path={data}", f"train.out_dir={run}", "train.resume=none",
                 "train.progress=false", *schedule]
    t0 = time.time()
    with open(run / "train.log", "w") as log:
        code = run_member(name, overrides, log)
        seconds = time.time() - t0
        if code == 0:
            export = [sys.executable, "-m", "atlas_train.train.cli", "export", "--checkpoint", str(run), "--out",
                      str(run / "export")]
            code = subprocess.run(export, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    summary = {"member": name, "train_exit_code": code, "train_seconds": round(seconds, 1), "planned_steps": steps,
               **last_metrics(run)}
    if code != 0:
        tail = "\n".join((run / "train.log").read_text(errors="replace").splitlines()[-10:])
        print(f"{name}: training or export failed (exit {code}); {run / 'train.log'} ends:\n{tail}", flush=True)
    return summary


def score(name: str, work: Path, args) -> dict:
    """MQAR accuracy of the exported member over the evaluation grid."""
    from atlas_train.eval import mqar
    from atlas_train.eval.checkpoint import load_for_eval

    loaded = load_for_eval(work / name / "export", device=args.device)
    vocab = loaded.model.config.vocab_size
    grid = []
    t0 = time.time()
    for seq_len in ints(args.eval_seq_lens):
        for pairs in ints(args.eval_pairs):
            if 4 * pairs > seq_len + 1:
                continue
            acc = mqar.accuracy(
                loaded.model, mqar.MQARSetting(pairs, seq_len, vocab), args.samples, 64, 0, loaded.device
            )
            grid.append({"num_pairs": pairs, "seq_len": seq_len, "accuracy": acc})
    params = sum(p.numel() for p in loaded.model.parameters())
    embedding = loaded.model.embed.weight.numel()
    return {
        "update": None if loaded.model.config.mixer == "transformer" else loaded.model.config.update,
        "chunk_size": loaded.model.config.chunk_size,
        "params": params,
        "params_non_embedding": params - embedding,
        "eval_seconds": round(time.time() - t0, 1),
        "mqar": grid,
    }


def tables(results: list[dict]) -> str:
    """Markdown: accuracy per (seq_len, pairs) for every member, then the training summaries."""
    lines = []
    settings = sorted({(g["seq_len"], g["num_pairs"]) for r in results for g in r.get("mqar", [])})
    if settings:
        lines.append("| member | " + " | ".join(f"L{L} N{n}" for L, n in settings) + " |")
        lines.append("|---|" + "---:|" * len(settings))
        for r in results:
            acc = {(g["seq_len"], g["num_pairs"]): g["accuracy"] for g in r.get("mqar", [])}
            cells = [f"{acc[s]:.3f}" if s in acc else "-" for s in settings]
            lines.append(f"| {r['member']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "| member | memory update | params (non-emb.) | steps done/planned | train s | step ms | final train loss | "
        "val loss |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        step_ms = r.get("perf/step_time_s")
        update = {None: "-", "token": "per token"}.get(r.get("update"), f"per {r.get('chunk_size')}-token chunk")
        lines.append(
            f"| {r['member']} | {update} | "
            f"{r.get('params', '-')} ({r.get('params_non_embedding', '-')}) | "
            f"{r.get('steps', '-')}/{r.get('planned_steps', '-')} | {r.get('train_seconds', '-')} | "
            f"{'-' if step_ms is None else f'{1000 * step_ms:.0f}'} | "
            f"{_fmt(r.get('train/loss'))} | {_fmt(r.get('val/loss'))} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(results: list[dict], path: Path) -> bool:
    """Accuracy vs number of pairs, one panel per sequence length, one line per member; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lens = sorted({g["seq_len"] for r in results for g in r.get("mqar", [])})
    if not lens:
        return False
    fig, axes = plt.subplots(1, len(lens), figsize=(4 * len(lens), 3.6), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, seq_len in zip(axes[0], lens):
        for i, r in enumerate(results):  # one colour per member in every panel
            points = sorted((g["num_pairs"], g["accuracy"]) for g in r.get("mqar", []) if g["seq_len"] == seq_len)
            if points:
                ax.plot(*zip(*points), marker="o", color=colors[i % len(colors)], label=r["member"])
        ax.set_xscale("log", base=2)
        ax.set_title(f"MQAR, sequence length {seq_len}")
        ax.set_xlabel("key-value pairs")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].set_ylim(-0.02, 1.02)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_outputs(results: list[dict], out: Path) -> str:
    from atlas_train.eval.report import write_json
    from atlas_train.train.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recall.json", {"members": results})
    text = tables(results)
    atomic_write_text(out / "recall.md", text)
    plot(results, out / "recall.png")
    return text


def render(folders: list[Path]) -> None:
    """Plot and RESULTS.md section from member JSON files (several GPU runs may each have produced some)."""
    from atlas_train.train.atomic import atomic_write_text

    results = {}
    for file in sorted(f for folder in folders for f in folder.glob("*.json")):
        data = json.loads(file.read_text())
        for r in data.get("members", [data]):
            if "member" in r:
                results[r["member"]] = r
    ordered = [results[m] for m in MEMBERS if m in results] + [r for m, r in results.items() if m not in MEMBERS]
    if not ordered:
        sys.exit(f"recall_study: no member results in {', '.join(map(str, folders))}")
    if not plot(ordered, REPO / "benchmarks" / "recall_study.png"):
        sys.exit("recall_study: matplotlib is needed to draw the plot (pip install -e .[bench])")
    caption = (
        "Members of equal width and depth (configs/recall/common.yaml) trained on the same MQAR shards; accuracy of "
        "the value predicted after each repeated key, for L tokens holding N key-value pairs (`benchmarks/"
        "recall_study.py`; training stops at `train.steps` or `train.max_minutes`, whichever comes first)."
    )
    section = f"{BEGIN}\n{caption}\n\n![MQAR accuracy](recall_study.png)\n\n{tables(ordered)}{END}"
    results_md = REPO / "benchmarks" / "RESULTS.md"
    text = results_md.read_text() if results_md.is_file() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## Recall study (MQAR)\n\n" + section + "\n"
    atomic_write_text(results_md, text)
    print(tables(ordered))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        render([Path(f) for f in args.render])
        return 0
    from atlas_train.config import ConfigError, load_config
    from atlas_train.eval.report import write_json

    members = [m for m in args.models.split(",") if m]
    unknown = [m for m in members if not (REPO / "configs/recall" / f"{m}.yaml").is_file()]
    if unknown:
        sys.exit(f"recall_study: no config for {unknown} in configs/recall/")
    try:
        cfg = load_config([REPO / "configs/recall/common.yaml"], args.overrides)
    except ConfigError as err:
        sys.exit(f"recall_study: {err}")
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cap = args.max_minutes or cfg.train.max_minutes
    if cap is None:
        sys.exit("recall_study: give a per-member wall-time cap (--max-minutes or train.max_minutes)")
    steps = args.steps or probe_steps(work, cap, cfg.train.steps, args)
    rows = min(MAX_TRAIN_ROWS, steps * cfg.train.micro_batch_size * cfg.train.grad_accum)
    data = make_data(work, cfg, ints(args.train_pairs), rows)
    warmup = min(cfg.train.warmup_steps, max(1, steps // 10))  # a short run still spends most steps at full rate
    schedule = [f"train.steps={steps}", f"train.max_minutes={cap}", f"train.warmup_steps={warmup}"]
    results = []
    for name in members:
        summary = train_and_export(name, data, work, steps, schedule, args)
        if summary["train_exit_code"] == 0:
            summary.update(score(name, work, args))
        write_json(out / f"{name}.json", summary)
        results.append(summary)
        print(f"{name}: done ({summary.get('steps', 0)} steps, {summary['train_seconds']}s)", flush=True)
    print(write_outputs(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
