"""NaN/inf policy: a step whose loss is not finite is skipped and counted; too many in a row stop the run."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """Raised after `limit` consecutive non-finite losses: the run has diverged and skipping will not save it."""


class NonFiniteGuard:
    def __init__(self, limit: int):
        self.limit = limit
        self.in_row = 0
        self.total = 0

    def record(self, finite: bool, step: int) -> None:
        """Count one optimizer step's outcome; raise once more than `limit` skipped steps come in a row."""
        if finite:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        if self.in_row > self.limit:
            raise NonFiniteLossError(
                f"loss was NaN/inf for {self.in_row} steps in a row (last at step {step}; "
                f"train.max_nonfinite_in_row={self.limit}): stopping. Lower train.lr or resume from an earlier "
                "checkpoint."
            )

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.total = state["in_row"], state["total"]
