"""The distribution as pyproject.toml builds it: every package folder in it (kernels/ and data_prep/ under the
atlas_train namespace), and an installed copy, not editable and away from the checkout, that finds its kernels
through the fast-path entry point (as the GPU machines install it: benchmarks/gpu_env.sh)."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from repo_paths import REPO

SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_names_every_package_folder():
    found = set()
    for package, folder in SETUPTOOLS["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((package, *relative)))
    assert sorted(SETUPTOOLS["packages"]) == sorted(found)


@pytest.mark.slow
def test_an_installed_copy_imports_its_kernels_and_registers_them_through_the_entry_point(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    for folder in set(SETUPTOOLS["package-dir"].values()):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
               "--no-compile", "--target", str(site), str(source)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    check = ("import atlas_train, atlas_train.data_prep, atlas_train.kernels\n"
             "from atlas_train.ops import registry\n"
             "registry.fast_path('settings')\n"
             "print(atlas_train.kernels.__file__, atlas_train.data_prep.__file__, "
             "registry._registered['newton_schulz'].__module__)\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels, data_prep, registered = done.stdout.split()
    assert Path(kernels) == site / "atlas_train" / "kernels" / "__init__.py"
    assert Path(data_prep) == site / "atlas_train" / "data_prep" / "__init__.py"
    assert registered == "atlas_train.kernels.dispatch"
