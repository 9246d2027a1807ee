"""torchrun, except that the launcher's exit code tells a preemption checkpoint (75) from a failure.

Why not plain torchrun: when a worker exits non-zero torchrun raises ChildFailedError and exits 1, so the
"checkpointed after a preemption signal, please requeue" code 75 of atlas-train is lost. This wrapper runs torchrun
itself (`torch.distributed.run.run`) and maps the workers' exit codes:

- every failed worker exited 75 (or was killed by the launcher's SIGTERM after another exited) → 75 (preempted,
  checkpoint written);
- any other failure → the exit code of the earliest such failure (torchrun's failure timestamps, then rank; 128 +
  signal number when a signal killed it), so a bystander killed later (SIGKILL after a rank hung in a collective)
  does not hide the worker that failed first;
- the launcher itself was stopped by a signal → 128 + that signal.

SIGUSR1 is ignored here and in the workers until they install their own handler: slurm's `--signal=USR1@N` and
`scancel --signal=USR1` signal every process of the job step, and torchrun's default reaction (die) would tear the
workers down before they finish their checkpoint.

Usage: exactly torchrun's arguments, e.g. `python launch/elastic_run.py --nproc-per-node 2 train.py ...`.
"""

from __future__ import annotations

import signal
import sys

from atlas_train.train.signals import EXIT_PREEMPTED


def exit_code_for_failures(exit_codes: list[int]) -> int:
    """The launcher's exit code given the failed workers' exit codes (negative = killed by that signal)."""
    # SIGTERM deaths are the launcher stopping the remaining workers after the first one exited: not a cause.
    causes = [c for c in exit_codes if c != -signal.SIGTERM] or [-signal.SIGTERM]
    if all(c == EXIT_PREEMPTED for c in causes):
        return EXIT_PREEMPTED
    first = next(c for c in causes if c != EXIT_PREEMPTED)
    return 128 - first if first < 0 else first


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by the workers across exec until they handle it
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        by_time = sorted(err.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
        codes = [failure.exitcode for _rank, failure in by_time]
        code = exit_code_for_failures(codes)
        if code == EXIT_PREEMPTED:
            print(f"elastic_run: workers stopped after a preemption checkpoint (exit codes {codes})", file=sys.stderr)
        else:
            print(err.format_msg(), file=sys.stderr)
        return code
    except SignalException as err:
        print(f"elastic_run: launcher stopped by {err.sigval.name}", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
