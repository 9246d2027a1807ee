"""What checkpoint integrity costs beside the save itself, for a model size from a config (default the 340M).

    .venv/bin/python benchmarks/bench_checkpoint_verify.py [--model configs/model/340m.yaml] [--dir /tmp]

Writes the two files a one-rank bf16 ZeRO-1 DeepSpeed save of that model holds (bf16 module weights; fp32 master
weights and both Adam moments), as DeepSpeed does (torch.save), then times: the save (and the save plus fsync),
the checksums a save adds to its manifest (the files still in the page cache), and a resume's verification of them
both warm and cold (the files dropped from the page cache first). A bare sha256 pass over the same warm files is the
reference for the choice of CRC-32. Only the file sizes matter, so the tensors are left uninitialised.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch

from atlas_train.config import load_config
from atlas_train.model import build_model
from atlas_train.train.integrity import check_files, checksums

REPO = Path(__file__).resolve().parent.parent


def parameter_shapes(model_yaml: Path) -> dict[str, torch.Size]:
    cfg = load_config([model_yaml]).model
    with torch.device("meta"):
        model = build_model(cfg)
    return {name: p.shape for name, p in model.named_parameters()}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fsync(path: Path, drop: bool = False) -> None:
    """Flush a file to disk; `drop`: then evict it from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "configs" / "model" / "340m.yaml")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the files are written")
    args = p.parse_args()

    shapes = parameter_shapes(args.model)
    numel = sum(s.numel() for s in shapes.values())
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_", dir=args.dir) as tmp:
        tag = Path(tmp)
        names = ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]

        def save() -> None:
            module = {name: torch.empty(shape, dtype=torch.bfloat16) for name, shape in shapes.items()}
            torch.save({"module": module}, tag / names[0])
            del module
            flat = {k: torch.empty(numel, dtype=torch.float32) for k in ("fp32_master", "exp_avg", "exp_avg_sq")}
            torch.save({"optimizer_state_dict": flat}, tag / names[1])

        t_save = timed(save)
        t_fsync = timed(lambda: [fsync(tag / n) for n in names])
        size = sum((tag / n).stat().st_size for n in names)
        entries = {}
        t_sum = timed(lambda: entries.update(checksums(tag, names)))
        t_warm = timed(lambda: check_files(tag, entries))
        t_sha = timed(lambda: [sha256(tag / n) for n in names])
        for n in names:
            fsync(tag / n, drop=True)
        t_cold = timed(lambda: check_files(tag, entries))

    gb = size / 2**30
    print(f"{args.model.name}: {numel / 1e6:.0f}M parameters, checkpoint files {gb:.2f} GiB on {os.cpu_count()} cores")
    print(f"  save (torch.save)                {t_save:7.2f} s")
    print(f"  save + fsync                     {t_save + t_fsync:7.2f} s")
    print(f"  manifest checksums at save (warm){t_sum:7.2f} s  {gb / t_sum:5.2f} GiB/s  "
          f"{100 * t_sum / t_save:5.1f}% of the save")
    print(f"  verify on resume, warm           {t_warm:7.2f} s  {gb / t_warm:5.2f} GiB/s  "
          f"{100 * t_warm / t_save:5.1f}% of the save")
    print(f"  verify on resume, cold           {t_cold:7.2f} s  {gb / t_cold:5.2f} GiB/s  "
          f"{100 * t_cold / (t_save + t_fsync):5.1f}% of the save + fsync")
    print(f"  (sha256 of the same warm files   {t_sha:7.2f} s  {gb / t_sha:5.2f} GiB/s)")


if __name__ == "__main__":
    main()
