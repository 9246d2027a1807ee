"""The benchmark scripts as modules, for the tests that call their functions.

benchmarks/ is a folder of scripts, not a package: a script run finds its neighbours because Python puts the script's
folder on the path. Here each is loaded from its file instead (nothing is added to the path), under its own name, so
that what imports it by that name (and pickling, for a script that fans out to processes) finds the same module.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from repo_paths import BENCHMARKS

# The ones other benchmarks import by name, each loaded before its importers (bench_dual_attention imports
# bench_memory_scan, bench_dual_scan imports bench_dual_attention).
SHARED = ("bench_memory_scan", "bench_dual_attention")


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as the module `name`, loaded once (after the SHARED ones before it, which it may
    import)."""
    if name in sys.modules:
        return sys.modules[name]
    for shared in SHARED[: SHARED.index(name) if name in SHARED else len(SHARED)]:
        load_benchmark(shared)
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
