"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary, then exit with EXIT_PREEMPTED.

The handler only sets a flag: saving inside a signal handler could interrupt a collective halfway. Slurm sends
SIGUSR1 (`--signal=USR1@120`) or SIGTERM before killing a job; a distinct exit code lets the launcher requeue.
"""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Installs the handlers on enter, restores the previous ones on exit; `requested` is set by a signal."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self) -> "PreemptionFlag":
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
