"""The small recall study: which members of the family can look values up by key, and how far?

Trains the members in configs/recall/ (atlas, atlas_mag, omeganet, titans, transformer, and the DeepTransformers
deep_transformer, swdt and dot: equal width and depth) on the same MQAR shards with `atlas-train`, exports each, and
scores MQAR accuracy (`atlas-eval --task mqar`) on a grid of (key-value pairs, sequence length) that reaches beyond the
training mix (longer rows, more pairs). One command:

    python benchmarks/recall_study.py --out $OUT/recall --budget-minutes 8.5   # everything, scoring included
    python benchmarks/recall_study.py --smoke                                  # CPU: tiny sizes, proves the whole path

All at once: every member trains, exports and is scored in its own chain of processes, all chains running together,
pinned round-robin to the visible GPUs (CUDA_VISIBLE_DEVICES). At d 128 a step is bound by kernel launches, not by
the GPU, so members sharing a GPU slow each other far less than taking turns would: each gets nearly the whole budget
instead of a fifth of it.

Fair budget, equal wall time: every member has the same training cap (train.max_minutes): what the budget leaves
after a timing probe, less a reserve for start-up, export and scoring. The probe runs what the study will run, on
random tokens: every member (and the transformer a second time) at once, placed as in the study, each training for
the same --probe-seconds; a member's step time is the median over the second half of its probe, when the others are
past their start-up too, so sharing a GPU is in the numbers (a first probe, 40 steps of each member, which mostly did
not overlap, planned 1.6-2.2x the steps that the members then completed in the cap). Each member trains the steps
that fill 85% of the cap at its own step time, so that it completes its whole warm-up + cosine schedule (the cap
still stops one that runs slower than probed; the tables show steps done/planned). Members with slower kernels
therefore train fewer steps: that cost is part of what the study reports. For the comparison at equal steps, the
transformer trains a second time for as many steps as the slowest member planned (`transformer@N`).
--steps N skips the probe: every member trains N steps. A chain still running at the end of the budget is killed and
reported as such, so the tables are always printed, last.

writes into --out: `recall.json` (each member's training summary and accuracy grid), `recall.md` (the tables),
`recall.png` when matplotlib is installed; each member's logs (training, export, scoring) go to
<work>/<member>/train.log. Afterwards, where matplotlib is installed (`pip install -e .[bench]`):

    python benchmarks/recall_study.py --render OUT/recall [OUT2/recall ...]

redraws the plot as benchmarks/recall_study.png and puts the tables into benchmarks/RESULTS.md between the
`recall-study` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Placed round-robin over the GPUs in this order: on two GPUs the slow and the fast members alternate.
MEMBERS = ["atlas", "atlas_mag", "omeganet", "titans", "transformer", "deep_transformer", "swdt", "dot"]
REFERENCE = "transformer"  # trained again at the slowest member's steps: the comparison at equal steps
MAX_TRAIN_ROWS = 50_000  # distinct MQAR training rows (Zoology uses 100K); longer runs repeat them as epochs
BEGIN, END = "<!-- recall-study:begin -->", "<!-- recall-study:end -->"
FILL = 0.85  # the planned steps fill this share of the cap at the probed step time
RESERVE_S = 75  # per chain, outside the cap: start-up, export and scoring (about 40 s on an H200 shared by 6 runs)
KILLED = "killed at the end of the budget"
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
    p.add_argument("--budget-minutes", type=float, default=8.5, help="wall time of the whole study")
    p.add_argument("--steps", type=int, help="every member trains this many steps (default: from the probe)")
    p.add_argument("--train-pairs", default="4,8,16", help="pair counts mixed in the training rows")
    p.add_argument("--eval-pairs", default="4,8,16")
    p.add_argument("--eval-seq-lens", default="64,128,256,512")
    p.add_argument("--samples", type=int, default=256, help="MQAR rows per evaluation setting")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="cpu: leave the GPUs alone")
    p.add_argument("--probe-seconds", type=float, default=40, help="training time of the probe that picks the steps")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny model, rows and grid")
    p.add_argument(
        "--render", nargs="+", metavar="DIR", help="only draw the plot and update RESULTS.md from DIR/recall.json"
    )
    p.add_argument("overrides", nargs="*", help="extra atlas-train overrides for every member (key=value)")
    args = p.parse_args(argv)
    if args.smoke:
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
        args.device = "cpu"
        args.train_pairs, args.eval_pairs, args.eval_seq_lens, args.samples = "2,4,8", "2,4,8", "32,64", 16
        if args.work == "runs/recall":
            args.work, args.out = "runs/recall_smoke", "runs/recall_smoke/results"
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def make_data(work: Path, cfg, train_pairs: list[int], rows: int) -> Path:
    """MQAR shards for the run's seq_len and vocabulary; reused when an identical set is already there. 50K rows take
    about 5 s (the probe runs meanwhile)."""
    from atlas_train.data_prep.shard_format import DataError, read_manifest
    from atlas_train.data_prep.writer import write_dataset
    from atlas_train.eval import mqar
    from atlas_train.eval.streams import STREAMS

    data = work / "data"
    # the stream's word is part of the identity: shards drawn from another generator are not reused
    info = {"task": "mqar", "pairs": train_pairs, "mqar_vocab": cfg.model.vocab_size, "rows": rows,
            "stream": STREAMS["train"]}
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


class Chains:
    """Runs chains of commands (each stops at its first failure) all at once, one thread each, chain i pinned to GPU
    i mod n (none on CPU); a command still running at `deadline` (time.monotonic()) is killed."""

    def __init__(self, gpus: list[str], deadline: float):
        self.gpus, self.deadline = gpus, deadline

    def gpu(self, i: int) -> str:
        """The CUDA_VISIBLE_DEVICES of chain i ("": none)."""
        return self.gpus[i % len(self.gpus)] if self.gpus else ""

    def run_all(self, chains: list[tuple[list[list[str]], Path]]) -> list[list]:
        """chains: (commands, log) pairs -> per chain [exit code (or KILLED), seconds] of each command run."""
        threads = str(max(1, (os.cpu_count() or 1) // len(chains)))  # the CPU cores shared out, not oversubscribed
        envs = [{**os.environ, "OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": self.gpu(i), "MASTER_PORT": port}
                for i, port in enumerate(free_ports(len(chains)))]
        with ThreadPoolExecutor(len(chains)) as pool:
            return list(pool.map(self._run, chains, envs))

    def _run(self, chain: tuple[list[list[str]], Path], env: dict) -> list:
        commands, log_path = chain
        done = []
        with open(log_path, "a") as log:
            for cmd in commands:
                t0 = time.monotonic()
                # Started beside the log, not in the repository: `python -m` puts the working directory first on
                # the path, and the repository's atlas_train/ lacks the packages an installed one maps in from the
                # top level (kernels/, data_prep/).
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent, env=env)
                try:
                    code = proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()  # its data-loader worker notices and exits
                    proc.wait()
                    code = KILLED
                done.append([code, round(time.monotonic() - t0, 1)])
                if code != 0:
                    break
        return done


def free_ports(n: int) -> list[str]:
    """n different free TCP ports. A one-process atlas-train otherwise picks its own torch.distributed port, and
    processes started together have picked the same one (EADDRINUSE)."""
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:  # all held at once, so the ports differ
        sock.bind(("127.0.0.1", 0))
    ports = [str(sock.getsockname()[1]) for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def visible_gpus(device: str) -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries of the GPUs this process sees ([] on CPU)."""
    import torch

    count = torch.cuda.device_count() if device == "auto" else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (listed.split(",") if listed else [str(i) for i in range(count)])[:count]


def train_cmd(member: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "atlas_train.train.cli", "--config", str(REPO / "configs/recall" / f"{member}.yaml"),
            *overrides]


def probe(members: list[str], work: Path, chains: Chains, args) -> dict[str, float]:
    """Each member's step time in seconds while all runs of the study train at once (see the module docstring)."""
    names = members + [REFERENCE] * (REFERENCE in members and len(members) > 1)  # the equal-steps run, placed last
    todo = []
    for i, name in enumerate(names):
        run = fresh_run_dir(work / "probe" / f"{i}-{name}")
        overrides = [*args.overrides, f"train.out_dir={run}", "train.resume=none", "train.progress=false",
                     "train.synthetic_data=true", f"train.max_minutes={args.probe_seconds / 60}", "train.eval_every=0"]
        todo.append(([train_cmd(name, overrides)], run / "train.log"))
    times = {}
    for name, (_, log), done in zip(names, todo, chains.run_all(todo)):
        path = log.parent / "metrics.jsonl"
        logged = [json.loads(line)["perf/step_time_s"] for line in path.read_text().splitlines()] if path.is_file() \
            else []
        if done[0][0] != 0 or not logged:
            sys.exit(f"recall_study: the timing probe of {name} failed (exit {done[0][0]}); see {log}")
        times.setdefault(name, statistics.median(logged[len(logged) // 2 :]))  # past compiles and graph captures
    return times


def train_chain(label: str, member: str, steps: int, data: Path, cap_minutes: float, work: Path, args, cfg):
    """The commands of one run (train, export, score) and its log. Warm-up: 10% of the steps, at most the config's."""
    run = fresh_run_dir(work / label)
    overrides = [*args.overrides, f"data.path={data}", f"train.out_dir={run}", "train.resume=none",
                 "train.progress=false", f"train.steps={steps}", f"train.max_minutes={cap_minutes:.3f}",
                 f"train.warmup_steps={min(cfg.train.warmup_steps, max(1, steps // 10))}"]
    export = [sys.executable, "-m", "atlas_train.train.cli", "export", "--checkpoint", str(run), "--out",
              str(run / "export")]
    score = [sys.executable, "-m", "atlas_train.eval.cli", "--task", "mqar", "--checkpoint", str(run / "export"),
             "--out", str(run / "mqar.json"), "--pairs", args.eval_pairs, "--seq-lens", args.eval_seq_lens,
             "--samples", str(args.samples), "--batch-size", "64", "--seed", "0", "--no-progress"]
    return [train_cmd(member, overrides), export, score], run / "train.log"


def summarize(label: str, member: str, steps: int, gpu, done: list, run: Path, note: dict) -> dict:
    """A run's JSON record: training summary, model facts from its export, and its MQAR grid."""
    stage = ["training", "export", "scoring"][len(done) - 1]
    code = done[-1][0]
    summary = {"member": label, "config": member, "gpu": gpu, "exit": code, "failed_at": None if code == 0 else stage,
               "train_seconds": done[0][1], "planned_steps": steps, **note, **last_metrics(run)}
    if code != 0:
        last = ([line for line in (run / "train.log").read_text(errors="replace").splitlines() if line.strip()]
                or ["(empty log)"])[-1]
        print(f"{label}: {stage} failed (exit {code}): {last.strip()} (log: {run / 'train.log'})", flush=True)
        return summary
    from atlas_train.model.config import DUAL_MIXERS
    from atlas_train.train.export import load_exported

    model, cfg, _ = load_exported(run / "export")
    params = sum(p.numel() for p in model.parameters())
    summary.update(
        update=None if cfg.model.mixer == "transformer" else "token" if cfg.model.mixer in DUAL_MIXERS
        else cfg.model.update,
        chunk_size=cfg.model.chunk_size,
        params=params,
        params_non_embedding=params - model.embed.weight.numel(),
        eval_seconds=done[2][1],
        mqar=json.loads((run / "mqar.json").read_text())["results"],
    )
    return summary


def budget_note(r: dict) -> str:
    """How the runs of a study shared its budget (from a run's record)."""
    where = f"{r['concurrent_runs']} runs at once on {r['gpus'] or 'no'} GPU(s), each training at most " \
        f"{r['cap_minutes']} min"
    if r["steps_from"] == "--steps":
        return f"Equal steps: {where}; every member planned {r['planned_steps']} steps."
    note = (f"Equal wall time: {where}; each member planned the steps that fill {FILL:.0%} of that at its step time "
            "in a probe of all runs at once.")
    if r.get("equal_steps_run"):
        note += f" {r['equal_steps_run']}: the {REFERENCE} again, for the fewest steps planned (equal steps)."
    return note


def tables(results: list[dict]) -> str:
    """Markdown: accuracy per (seq_len, pairs) for every member, then how the budget was shared and the training
    summaries."""
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
    lines += [budget_note(results[0]), ""]
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
    """Plot and RESULTS.md section from the studies' recall.json files (several GPU runs may each have produced some
    of the members; a later folder's member replaces an earlier one's)."""
    from atlas_train.train.atomic import atomic_write_text

    results = {}
    for file in (folder / "recall.json" for folder in folders):
        if not file.is_file():
            sys.exit(f"recall_study: no {file}")
        results.update((r["member"], r) for r in json.loads(file.read_text())["members"])
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
    started = time.monotonic()
    args = parse_args(argv)
    if args.render:
        render([Path(f) for f in args.render])
        return 0
    from atlas_train.config import ConfigError, load_config

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
    train_pairs = [n for n in ints(args.train_pairs) if 4 * n <= cfg.train.seq_len + 1]
    if not train_pairs:
        sys.exit(f"recall_study: no --train-pairs value fits seq_len {cfg.train.seq_len} (needs 4 * pairs - 1)")
    gpus = visible_gpus(args.device)
    chains = Chains(gpus, started + 60 * args.budget_minutes - 15)  # 15 s left to write the results
    rows = min(MAX_TRAIN_ROWS, cfg.train.steps * cfg.train.micro_batch_size * cfg.train.grad_accum)
    with ThreadPoolExecutor(1) as pool:  # the probe runs while the shards are written
        probing = None if args.steps else pool.submit(probe, members, work, chains, args)
        data = make_data(work, cfg, train_pairs, rows)
        times = probing.result() if probing else None
    cap_s = chains.deadline - time.monotonic() - RESERVE_S
    if cap_s < 30:
        sys.exit(f"recall_study: --budget-minutes {args.budget_minutes} leaves {cap_s:.0f} s of training; raise it")
    if times:
        steps = {m: max(1, min(cfg.train.steps, int(FILL * cap_s / t))) for m, t in times.items()}
        for m, t in times.items():
            print(f"probe: {m} takes {1000 * t:.0f} ms per step; trains {steps[m]} steps", flush=True)
    else:
        steps = {m: args.steps for m in members}
    runs = [(m, m, steps[m]) for m in members]
    fewest, reference = min(steps.values()), None
    if REFERENCE in steps and steps[REFERENCE] > fewest:
        reference = f"{REFERENCE}@{fewest}"
        runs.append((reference, REFERENCE, fewest))
    note = {"cap_minutes": round(cap_s / 60, 2), "steps_from": "--steps" if args.steps else "probe",
            "concurrent_runs": len(runs), "gpus": len(gpus), "equal_steps_run": reference}
    print(f"training {len(runs)} runs at once on {len(gpus) or 'no'} GPU(s), at most {cap_s / 60:.1f} minutes each",
          flush=True)
    todo = [train_chain(label, member, n, data, cap_s / 60, work, args, cfg) for label, member, n in runs]
    results = []
    for i, ((label, member, n), (_, log), done) in enumerate(zip(runs, todo, chains.run_all(todo))):
        summary = summarize(label, member, n, chains.gpu(i), done, log.parent, note)
        results.append(summary)
        print(f"{label}: {summary.get('steps', 0)} steps in {summary['train_seconds']}s", flush=True)
    print(write_outputs(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
