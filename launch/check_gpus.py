"""One command to check launch/torchrun.sh on a GPU machine: one process per visible GPU (NCCL), a preemption
(SIGUSR1 to the launcher and every worker, as slurm sends it) that exits 75, and the resumed run's final loss
beside an uninterrupted run's. Prints a short table last.

    python launch/check_gpus.py OUT_DIR [--steps 40] [key=value ...]   (overrides go to every run)

Why: the CPU tests cover gloo; GPU detection, NCCL and bf16 checkpoints are only seen on a GPU machine. The
demo model trains on synthetic tokens so no dataset is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    recs = [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]  # whole lines only
    return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _launch(run_dir: Path, steps: int, overrides: list[str], log, resume: bool = False) -> subprocess.Popen:
    args = ["--config", str(REPO / "configs" / "demo.yaml"), f"train.out_dir={run_dir}", f"train.steps={steps}",
            "train.synthetic_data=true", "train.eval_every=0", "train.save_every=0", "train.progress=false",
            "train.precision=bf16", f"train.resume={'auto' if resume else 'none'}", *overrides]
    return subprocess.Popen([str(REPO / "launch" / "torchrun.sh"), *args], stdout=log, stderr=subprocess.STDOUT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*", help="atlas-train key=value overrides for every run")
    args = parser.parse_intermixed_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(args.out / "check_gpus.log", "w") as log:
        def run(name: str, run_dir: Path, preempt_after: int = 0, resume: bool = False):
            t0 = time.monotonic()
            proc = _launch(run_dir, args.steps, args.overrides, log, resume)
            nproc = 0
            if preempt_after:
                while proc.poll() is None and len(_losses(run_dir)) < preempt_after:
                    time.sleep(0.2)
                workers = _children(proc.pid) if proc.poll() is None else []
                nproc = len(workers)
                for pid in [proc.pid, *workers]:  # what slurm's --signal=USR1@N does
                    os.kill(pid, signal.SIGUSR1)
            rc = proc.wait()
            losses = _losses(run_dir)
            last = max(losses, default=0)
            rows.append((name, nproc or "-", rc, last, losses.get(last, float("nan")), time.monotonic() - t0))
            return losses

        reference = run("uninterrupted", args.out / "a")
        run("preempted (USR1)", args.out / "b", preempt_after=args.steps // 3)
        resumed = run("resumed", args.out / "b", resume=True)
    print(f"full log: {args.out / 'check_gpus.log'}")
    print(f"{'case':<18} {'workers':>7} {'exit':>4} {'step':>5} {'loss':>10} {'wall s':>7}")
    for name, nproc, rc, step, loss, wall in rows:
        print(f"{name:<18} {nproc!s:>7} {rc:>4} {step:>5} {loss:>10.5f} {wall:>7.1f}")
    same = resumed.get(args.steps) is not None and resumed.get(args.steps) == reference.get(args.steps)
    print(f"expected exits 0 / 75 / 0; final loss resumed == uninterrupted: {same} "
          f"(bit-exact is not guaranteed on GPU; compare the two numbers)")
    return 0 if [r[2] for r in rows] == [0, 75, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
