"""Datasets of the local lm-eval tasks in this folder, read from the jsonl files beside this file (no hub)."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _split(name: str) -> dict:
    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def choice_dataset(**_task_kwargs) -> dict:
    return _split("atlas_tiny_choice.jsonl")


def answer_dataset(**_task_kwargs) -> dict:
    return _split("atlas_tiny_answer.jsonl")
