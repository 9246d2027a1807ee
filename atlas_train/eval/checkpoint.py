"""Loading an exported model for evaluation and generation, with user errors turned into one-line messages; the
export's files are verified against its manifest before they are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class UserError(Exception):
    """A mistake on the command line (missing dir, wrong kind of checkpoint): printed as one line, no traceback."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: object  # the run's resolved config as export saved it
    tokenizer_path: Path | None
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_for_eval(path: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The model of an `atlas-train export` dir, on `device` in `dtype`, in eval mode."""
    from atlas_train.config import ConfigError
    from atlas_train.train.export import load_exported
    from atlas_train.train.integrity import IntegrityError

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint dir not found: {path}")
    if not (path / "model.safetensors").is_file():
        if (path / "checkpoints").is_dir():
            raise UserError(
                f"{path} is a training run; export it first: atlas-train export --checkpoint {path} --out DIR"
            )
        raise UserError(f"{path} holds no model.safetensors (make one with atlas-train export)")
    dev = resolve_device(device)
    try:
        model, config, tokenizer_path = load_exported(path)
    except IntegrityError as err:
        raise UserError(f"{err}; export the run again (atlas-train export)") from None
    except (ConfigError, OSError, ValueError, RuntimeError) as err:  # RuntimeError: weights that do not fit
        raise UserError(f"cannot load {path}: {err}") from None
    model = model.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval()
    return LoadedModel(model, config, Path(tokenizer_path) if tokenizer_path else None, dev)


def load_tokenizer(path: Path | None):
    """The tokenizer shipped with a checkpoint: sentencepiece, or a Hugging Face tokenizer.json that the data was
    prepared with (data_prep.tokenizer.JsonTokenizer gives it sentencepiece's calls; told apart by content, so a
    tokenizer.json that an older export saved as tokenizer.model still loads)."""
    import sentencepiece as spm

    from atlas_train.data_prep.tokenizer import TOKENIZERS, JsonTokenizer, tokenizer_kind

    if path is None or not Path(path).is_file():
        raise UserError(f"the checkpoint has no tokenizer (tokenizer.model or tokenizer.json; looked for {path})")
    if tokenizer_kind(path) == TOKENIZERS:
        return JsonTokenizer(Path(path))
    return spm.SentencePieceProcessor(model_file=str(path))
