"""The fast-path registry of atlas_train.ops: ops ask it by name and never import the kernels, which register through
the entry point of the installed distribution."""

import ast
import logging
import subprocess
import sys

import pytest

from atlas_train.ops import registry
from repo_paths import REPO

OPS = REPO / "atlas_train" / "ops"


@pytest.fixture
def empty_registry(monkeypatch):
    """A registry with nothing registered whose plugins count as loaded."""
    monkeypatch.setattr(registry, "_registered", {})
    monkeypatch.setattr(registry, "_plugins_loaded", True)


def test_a_registered_fast_path_answers_and_none_stands_for_declined_or_absent(empty_registry):
    assert registry.fast_path("newton_schulz", "s", 5, False) is None  # nothing registered
    registry.register("newton_schulz", lambda s, steps, half: None if half else (s, steps))
    assert registry.fast_path("newton_schulz", "s", 5, False) == ("s", 5)
    assert registry.fast_path("newton_schulz", "s", 5, True) is None  # declined


def test_an_unknown_name_is_refused(empty_registry):
    with pytest.raises(ValueError, match="unknown fast path 'newton_shulz'; known: newton_schulz, memory_mlp_pass"):
        registry.register("newton_shulz", print)


class _EntryPoint:
    def __init__(self, register):
        self.register = register

    def load(self):
        return self.register


def test_plugins_are_loaded_once_on_the_first_lookup(monkeypatch):
    loads = []
    plugin = _EntryPoint(lambda: loads.append(1) or registry.register("settings", lambda: "plugged"))
    monkeypatch.setattr(registry, "_registered", {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [plugin] if group == registry.ENTRY_POINT_GROUP else [])
    assert loads == []
    assert [registry.fast_path("settings") for _ in range(3)] == ["plugged"] * 3
    assert loads == [1]


def test_without_plugins_the_ops_run_their_own_paths_and_say_so_once(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_registered", {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert registry.fast_path("settings") is None and registry.fast_path("newton_schulz", None, 1, False) is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["no fast paths"]


def test_no_module_of_ops_imports_the_kernels():
    """The layers run one way: kernels import ops, ops name no accelerator (they ask the registry)."""
    for path in sorted(OPS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.startswith(("atlas_train.kernels", "kernels")) for name in names), (path, names)


def _fresh_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_cpu_scan_imports_no_kernels_and_the_installed_entry_point_registers_every_fast_path():
    out = _fresh_python(
        "import sys, torch\n"
        "from atlas_train.ops import memory_scan, registry\n"
        "x = [torch.randn(1, 4, 1, 4) for _ in range(3)] + [torch.full((1, 4, 1), 0.5)] * 3\n"
        "x.append(torch.ones(1, 4, 1, 2))\n"
        "params = {'W1': torch.randn(1, 4, 8), 'W2': torch.randn(1, 8, 4)}\n"
        "_, state = memory_scan(*x, params, chunk_size=2)\n"
        "memory_scan(*(t[:, :1] for t in x), params, chunk_size=2, state=state)\n"
        "print('atlas_train.kernels' in sys.modules)\n"
        "registry.fast_path('settings')\n"
        "print(sorted(registry._registered) == sorted(registry.FAST_PATHS), "
        "registry._registered['newton_schulz'].__module__)\n")
    assert out.split() == ["False", "True", "atlas_train.kernels.dispatch"]
