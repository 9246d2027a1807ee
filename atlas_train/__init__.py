"""atlas-train: distributed pretraining of ATLAS-family language models."""

from pathlib import Path as _Path

# In a source checkout (PYTHONPATH=<repo>, as on the GPU machines) `kernels/` and `data_prep/` sit beside this
# package; installed, setuptools maps them to atlas_train.kernels / atlas_train.data_prep (pyproject.toml). Adding
# the checkout root to this package's search path makes both layouts import the same names.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "kernels" / "__init__.py").is_file() and str(_checkout) not in __path__:
    __path__.append(str(_checkout))

__version__ = "0.1.0"

# Hugging Face Auto classes learn the ATLAS model type once a program imports them (atlas_train/hf/__init__.py).
from atlas_train.hf import register_on_import as _register_on_import  # noqa: E402

_register_on_import()
