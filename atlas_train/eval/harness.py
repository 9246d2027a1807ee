"""lm-evaluation-harness on an exported model: `atlas-eval --task lm-eval --tasks ...`.

The native model is wrapped (no copy) as AtlasForCausalLM with its tokenizer as a fast tokenizer, and handed to
lm-eval's own Hugging Face wrapper (HFLM): loglikelihood tasks score with plain forwards, generate_until tasks use
`generate()` with the recurrent cache, so the numbers are what any transformers model gets from the harness.
Tasks come from lm-eval's registry (their datasets need the hub, or its cache) or from YAML files under
`include_path` (see tests/lm_eval_tasks for local ones).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from atlas_train.eval.checkpoint import UserError

# The ATLAS paper's zero-shot commonsense and reasoning table: `--tasks` defaults to it.
PAPER_TASKS = ("lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "social_iqa", "boolq")


def harness_model(loaded, batch_size: int):
    """lm-eval's HFLM around the loaded native model."""
    from lm_eval.models.huggingface import HFLM

    from atlas_train.hf.convert import hf_model_and_tokenizer

    if loaded.tokenizer_path is None:
        raise UserError("lm-eval needs the checkpoint's tokenizer: the export has neither tokenizer.model nor "
                        "tokenizer.json")
    model, tokenizer = hf_model_and_tokenizer(loaded.model, loaded.tokenizer_path)
    return HFLM(pretrained=model.eval(), backend="causal", tokenizer=tokenizer, batch_size=batch_size,
                device=str(loaded.device))


def evaluate(loaded, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
             limit: float | None = None, batch_size: int = 8, seed: int = 0, log_samples: bool = False) -> dict:
    """lm-eval's results for `tasks`: {"results": {task: {metric: value}}, "n-shot", "versions", ["samples"]}."""
    if importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("transformers") is None:
        raise UserError("--task lm-eval needs lm-eval and transformers: pip install 'atlas-train[hf]'")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path} is not a folder")
    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (a local task needs --include-path DIR of "
                        "its YAML)")
    out = simple_evaluate(model=harness_model(loaded, batch_size), tasks=tasks, num_fewshot=num_fewshot,
                          limit=limit, task_manager=manager, log_samples=log_samples, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    keep = ("results", "n-shot", "versions", "higher_is_better") + (("samples",) if log_samples else ())
    # Plain JSON data (numpy scalars and the like made plain by lm-eval's own rule), as its CLI writes it.
    return json.loads(json.dumps({key: out[key] for key in keep if key in out}, default=handle_non_serializable))


def table(results: dict) -> str:
    """lm-eval's own results table (markdown)."""
    from lm_eval.utils import make_table

    return make_table(results)
