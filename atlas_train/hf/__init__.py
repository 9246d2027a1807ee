"""Hugging Face transformers integration.

- `AtlasConfig` / `AtlasForCausalLM` (configuration.py, modeling.py): the native model behind `from_pretrained`,
  `generate()` with its recurrent cache (cache.py).
- tokenizer.py: the sentencepiece model as a fast tokenizer that `AutoTokenizer` loads.
- convert.py: `atlas-train export --format hf` and the conversion of existing exports.

`import atlas_train` registers the two classes with `AutoConfig` / `AutoModelForCausalLM`, as flash-linear-attention
registers its models, but lazily: importing transformers' model classes takes seconds, so the registration runs when
the program itself imports transformers' Auto classes (at once, if it already has). The training and eval commands
never import transformers and never pay for it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    from transformers import AutoConfig

    from atlas_train.hf.configuration import MODEL_TYPE, AtlasConfig

    AutoConfig.register(MODEL_TYPE, AtlasConfig, exist_ok=True)


def register() -> None:
    """Register AtlasConfig and AtlasForCausalLM with transformers' Auto classes (idempotent)."""
    from transformers import AutoModelForCausalLM

    from atlas_train.hf.configuration import AtlasConfig
    from atlas_train.hf.modeling import AtlasForCausalLM

    register_config()
    AutoModelForCausalLM.register(AtlasConfig, AtlasForCausalLM, exist_ok=True)


class _ThenCall(importlib.abc.Loader):
    """A module's own loader, followed by a callback once the module has run."""

    def __init__(self, loader, callback: Callable[[], None]):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback` right after the module `name` is first imported (a post-import hook)."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; and the real finders must answer the lookup below
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenCall(spec.loader, self.callback)
        return spec


def register_on_import() -> None:
    """Register with the Auto classes when transformers' auto modules get imported (now, if they are)."""
    for name, callback in ((_CONFIG_AUTO, register_config), (_MODEL_AUTO, register)):
        if name in sys.modules:
            callback()
        elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(name, callback))
