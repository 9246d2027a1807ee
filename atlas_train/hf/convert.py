"""`atlas-train export --format hf`: a checkpoint as a folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load (after `import atlas_train`).

The source is a run dir (its latest checkpoint; tensor-parallel shards merged by export.checkpoint_model, as the
native export merges them) or an existing native export (model.safetensors + config.yaml), which this converts.
The folder holds config.json, generation_config.json, model.safetensors (fp32) and, when the run has a tokenizer,
tokenizer.json + tokenizer_config.json (beside the original tokenizer.model when the run's is sentencepiece).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from atlas_train.train.checkpoint import CheckpointError


def load_source(source: str | Path):
    """(native model in fp32, its tokenizer's path or None) of a run dir or a native export dir."""
    from atlas_train.train.checkpoint import tokenizer_in
    from atlas_train.train.export import checkpoint_model, load_exported

    source = Path(source)
    if (source / "model.safetensors").is_file() and (source / "config.yaml").is_file():
        model, _, tokenizer = load_exported(source)
        return model.float(), tokenizer
    if (source / "checkpoints").is_dir():
        model, _, tag_dir = checkpoint_model(source)
        return model.float(), tokenizer_in(tag_dir)
    raise CheckpointError(f"{source} is neither a run dir (with checkpoints/) nor an export (model.safetensors + "
                          "config.yaml)")


def hf_model_and_tokenizer(model, tokenizer_path: Path | None):
    """(AtlasForCausalLM wrapping `model`, its PreTrainedTokenizerFast or None); the token ids go in the config."""
    from atlas_train.hf.modeling import AtlasForCausalLM
    from atlas_train.hf.tokenizer import hf_tokenizer

    tokenizer = None
    if tokenizer_path is not None:
        try:
            tokenizer = hf_tokenizer(tokenizer_path)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    ids = {}
    if tokenizer is not None:
        ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.bos_token_id}
    return AtlasForCausalLM.from_native(model, **ids), tokenizer


def export_hf(source: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face folder of `source` (run dir or native export) into `out_dir`; returns out_dir."""
    if importlib.util.find_spec("transformers") is None:
        raise CheckpointError("--format hf needs transformers: pip install 'atlas-train[hf]'")
    out_dir = Path(out_dir)
    model, tokenizer_path = load_source(source)
    hf_model, tokenizer = hf_model_and_tokenizer(model, tokenizer_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        if tokenizer_path.name != "tokenizer.json":  # that one save_pretrained has just written
            shutil.copyfile(tokenizer_path, out_dir / tokenizer_path.name)
    return out_dir
