"""atlas-train: distributed pretraining of ATLAS-family language models."""

__version__ = "0.1.0"

# Hugging Face Auto classes learn the ATLAS model type once a program imports them (atlas_train/hf/__init__.py).
from atlas_train.hf import register_on_import as _register_on_import  # noqa: E402

_register_on_import()
