"""The tiny stand-ins of the training-loop tests: a model and a loader that pin the loop, not the model (the loop
tests and the fault tests share them, in-process and under torchrun)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from atlas_train.model.config import ModelConfig
from atlas_train.model.lm import LMOutput
from atlas_train.parallel import ParallelConfig, setup_parallel
from atlas_train.train.config import TrainConfig
from atlas_train.train.synthetic import SyntheticLoader
from atlas_train.train.trainer import Builders

VOCAB = 32


class TinyLM(nn.Module):
    """Embedding -> (norm, linear, dropout) residual -> head. Dropout makes resume depend on the restored RNG."""

    poison_calls: set[int] = set()  # forward calls (counted per process) whose loss is made NaN

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.calls = 0

    def forward(self, input_ids, doc_start=None, labels=None, cache=None, use_cache=False):
        h = self.embed(input_ids)
        h = h + self.drop(torch.tanh(self.proj(self.norm(h))))
        logits = self.head(h)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        if self.training:
            self.calls += 1
            if self.calls in TinyLM.poison_calls:
                loss = loss * float("nan")
        return LMOutput(logits=logits, loss=loss)

    def no_weight_decay_names(self):
        return {"head.weight"}

    def memory_stats(self):
        return {"proj_norm": self.proj.weight.detach().norm()}


class PreemptingLoader(SyntheticLoader):
    """Synthetic batches; sends this process SIGUSR1 when batch number `preempt_at` is handed out."""

    preempt_at: int | None = None

    def __iter__(self):
        for batch in super().__iter__():
            if self.index == PreemptingLoader.preempt_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield batch


@dataclass
class DataCfg:
    path: str = "unused"


@dataclass
class RunCfg:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=VOCAB, d_model=16, n_heads=2))
    data: DataCfg = field(default_factory=DataCfg)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _loader(data_cfg, split, *, seq_len, micro_batch_size, dp_rank, dp_size, seed):
    return PreemptingLoader(VOCAB, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                            seed=seed + (split == "val"))


BUILDERS = Builders(model=TinyLM, loader=_loader, check_data=lambda data_cfg, model_cfg, seq_len: None,
                    parallel=setup_parallel)
