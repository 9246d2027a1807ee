"""Stopping on a signal: SIGTERM / SIGUSR1 (preemption) and SIGINT (Ctrl-C) ask for a checkpoint at the next step
boundary, then an exit with EXIT_PREEMPTED or EXIT_INTERRUPTED.

The handlers only set flags: saving inside a signal handler could interrupt a collective halfway. Slurm sends
SIGUSR1 (`--signal=USR1@120`) or SIGTERM before killing a job; a distinct exit code lets the launcher requeue. A
second Ctrl-C is the way out of a step or a save that takes too long: it raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import signal

from atlas_train.cli_errors import EXIT_INTERRUPTED, EXIT_PREEMPTED

__all__ = ["EXIT_INTERRUPTED", "EXIT_PREEMPTED", "PREEMPT_SIGNALS", "PreemptionFlag"]

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Installs the handlers on enter, restores the previous ones on exit; `requested` is set by a preemption
    signal, `interrupted` by the first Ctrl-C (the second one raises KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self.interrupted = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested = True

    def _handle_interrupt(self, signum, frame):
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> "PreemptionFlag":
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
