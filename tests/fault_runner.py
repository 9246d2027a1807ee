"""`atlas-train` with a SIGKILL planted at one point of the run (test_faults_kill.py runs it as a subprocess).

    python tests/fault_runner.py POINT atlas-train-arguments...

POINT is `step:N` (right after the update of step N) or `before:FILE@N` / `after:FILE@N` (around writing FILE, a
checkpoint file's name or `latest`, in the save of step N). DeepSpeed writes its files with torch.save and ours are
renamed into place with os.replace; both are watched.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from atlas_train.train.cli import main
from atlas_train.train.trainer import Trainer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(step: int) -> None:
    take_step = Trainer.train_step

    def train_step(self, flags=tuple):
        result = take_step(self, flags)
        if self.step == step:
            die()
        return result

    Trainer.train_step = train_step


def kill_around_write(when: str, name: str, step: int) -> None:
    saving = []  # the step being saved, while a save runs
    save, replace, torch_save = Trainer.save, os.replace, torch.save

    def watch(path, moment: str) -> None:
        if saving == [step] and moment == when and Path(path).name == name:
            die()

    def traced_save(self):
        saving.append(self.step)
        try:
            save(self)
        finally:
            saving.pop()

    def watched_replace(src, dst, *args, **kwargs):
        watch(dst, "before")
        replace(src, dst, *args, **kwargs)
        watch(dst, "after")

    def watched_torch_save(obj, f, *args, **kwargs):
        named = isinstance(f, (str, os.PathLike))
        if named:
            watch(f, "before")
        torch_save(obj, f, *args, **kwargs)
        if named:
            watch(f, "after")

    Trainer.save, os.replace, torch.save = traced_save, watched_replace, watched_torch_save


if __name__ == "__main__":
    point, argv = sys.argv[1], sys.argv[2:]
    if point.startswith("step:"):
        kill_after_step(int(point.removeprefix("step:")))
    else:
        when, target = point.split(":", 1)
        name, step = target.rsplit("@", 1)
        kill_around_write(when, name, int(step))
    sys.exit(main(argv))
