"""One training step under torch.profiler: where its device time goes, kernel by kernel.

`train.profile_step: N` records the whole of step N (its micro-batches and the optimizer update) and writes into the
run dir's `profile/` folder, per rank: a Chrome/Perfetto trace (`trace.rank{r}.json.gz`, open it in
https://ui.perfetto.dev) and `kernels.rank{r}.txt`, the operators and kernels of the step by self device time (CPU
time on a CPU). Pick a step after warm-up: compilation and CUDA-graph capture land in the first steps. The phase
timer (`train.phase_timing`) says how long each phase took; this says what ran inside it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from torch.profiler import ProfilerActivity, profile

TOP_ROWS = 60


class StepProfiler:
    """Profiles the one step numbered `step` (1-based, as the trainer counts them); any other step runs untouched."""

    def __init__(self, step: Optional[int], out_dir: Path, rank: int, cuda: bool):
        self.step, self.out_dir, self.rank, self.cuda = step, Path(out_dir), rank, cuda

    @contextlib.contextmanager
    def around(self, step: int):
        """Wrap the code of step `step`; records it and writes the files when it is the profiled one."""
        if step != self.step:
            yield
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:  # leaving the profiler waits for the step's device work
            yield
        self.write(prof)

    def write(self, prof) -> Path:
        """The trace and the table of the profiled step; returns the table's path."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / f"trace.rank{self.rank}.json.gz"))
        sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=TOP_ROWS, max_name_column_width=90)
        path = self.out_dir / f"kernels.rank{self.rank}.txt"
        path.write_text(f"step {self.step}, sorted by {sort_by}\n{table}\n")
        return path
