"""A kernel's first-use probe (kernels/dispatch.py) against a kernel gone wrong: one that crashes, or whose output, a
gradient or a NaN disagrees with the float64 PyTorch path, must become a fallback reason; a right one passes."""

import math

from atlas_train.kernels import dispatch

CORRUPTIONS = (None, "output", "gradient", "nan", "crash")


def check_probe_verdict(monkeypatch, corrupt, results_name: str, kernel_name: str, probe, output_index: int,
                        gradient_index: int) -> None:
    """Corrupt the kernel's side of `dispatch.<results_name>` (what the probe compares) as `corrupt` says, run
    `probe()` on a fresh probe cache and check its verdict."""
    real = getattr(dispatch, results_name)

    def results(*args, kernel, **kwargs):
        found = real(*args, kernel=kernel, **kwargs)
        if kernel and corrupt == "crash":
            raise RuntimeError("out of resource: shared memory\nmore")
        if kernel and corrupt is not None:
            index = output_index if corrupt == "output" else gradient_index
            found[index] = found[index] * (math.nan if corrupt == "nan" else 1.05)
        return found

    monkeypatch.setattr(dispatch, results_name, results)
    monkeypatch.setattr(dispatch, "_probed", {})
    reason = probe()
    if corrupt is None:
        assert reason is None
    elif corrupt == "crash":
        assert reason == f"{kernel_name} failed to run: RuntimeError: out of resource: shared memory"
    else:
        assert reason.startswith(f"{kernel_name} disagrees with the PyTorch path"), reason
