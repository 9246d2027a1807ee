"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch

from atlas_train.train.config import TrainConfig


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose updates can be switched off for one optimizer step (a non-finite loss): weights and moments stay.

    DeepSpeed's ZeRO and bf16 wrappers call the client optimizer's `step()` (once per parameter group) and then copy
    its fp32 weights back to the model, so skipping here leaves every copy of the weights unchanged on every ZeRO
    stage. The training loop sets `skip` before each optimizer step.

    A step with a NaN or inf gradient is left out too, on the device: the fused kernel takes a found_inf flag (the
    mechanism of torch's GradScaler), so the check costs two launches and no host sync. It stands in for DeepSpeed's
    own bf16 check (`bf16.check_grad_overflow`, off in deepspeed_config.py), which launches about a dozen kernels per
    parameter tensor in an optimizer phase whose cost is its launches (benchmarks/count_step_ops.py counts them).
    DeepSpeed hands over one group at a time, each with its gradients only just written, and in bf16 it zeroes the
    other groups' gradients when the global norm is not finite (it clips by an infinite norm) rather than skipping:
    so the flag also takes the step's global gradient norm, which DeepSpeed computes before the first group
    (`follow_global_grad_norm`). Built with fused=True on every device (build_optimizer).
    """

    skip: bool = False
    global_grad_norm: Optional[Callable[[], object]] = None  # this step's global gradient norm, where known

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip:
            return None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # the largest |g| of each gradient: NaN and inf survive it, and it cannot overflow
        checks = list(torch._foreach_norm(grads, ord=float("inf"))) if grads else []
        norm = self.global_grad_norm() if self.global_grad_norm is not None else None
        if isinstance(norm, torch.Tensor):
            checks.append(norm.reshape(()).to(checks[0].device if checks else norm.device))
        if checks:
            found_inf = ~torch.isfinite(torch.stack(checks)).all()
            if not self.defaults.get("fused"):  # only the fused kernel takes the flag: ask the host
                return None if found_inf else super().step(closure)
            self.found_inf = found_inf.float()
        return super().step(closure)


def follow_global_grad_norm(optimizer: SkippableAdamW, engine) -> None:
    """Let `optimizer` skip on the global gradient norm that `engine`'s ZeRO optimizer computed for the step (its
    `_global_grad_norm`: infinite when any gradient is not finite; None or a float where it computed none)."""
    optimizer.global_grad_norm = lambda: getattr(engine.optimizer, "_global_grad_norm", None)


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Parameters without weight decay: every vector (norms, gains, biases) plus what the model names itself.

    The model's `no_weight_decay_names()` covers matrices that must not shrink towards zero: the memory's initial
    fast weights and the feature-map coefficients.
    """
    named = set(getattr(model, "no_weight_decay_names", lambda: ())())
    return {name for name, p in model.named_parameters() if p.ndim < 2 or name in named}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> SkippableAdamW:
    """AdamW's fused kernel (one launch for all parameters of a group instead of several per tensor; the only one that
    skips on a device-side flag, see SkippableAdamW)."""
    return SkippableAdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True,
    )


class WarmupCosine:
    """LR multiplier at optimizer step `step` (0-based): linear warmup, then cosine down to min_lr_ratio at `steps`.

    A class, not a closure, so that LambdaLR's state_dict (saved in checkpoints) carries the schedule settings.
    """

    def __init__(self, cfg: TrainConfig):
        self.warmup_steps, self.steps, self.min_lr_ratio = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg))


def move_scheduler_to(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a fresh scheduler at optimizer step `step` (a resumed run), setting the optimizer's rates to match.

    The rate is a function of this run's config and the step only (not restored from the checkpoint), so a resumed
    run may lengthen `steps` or change `lr`; with the same config it is the very value the scheduler would reach.
    """
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
