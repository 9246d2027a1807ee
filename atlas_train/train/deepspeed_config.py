"""The DeepSpeed config dict, built from TrainConfig so that DeepSpeed never sees a key we did not validate."""

from __future__ import annotations

from atlas_train.train.config import TrainConfig


def build_deepspeed_config(cfg: TrainConfig, load_universal: bool = False) -> dict:
    """ZeRO stage, precision, micro-batch, accumulation and clipping; optimizer and schedule are ours (client objects).

    `train_batch_size` is left out: DeepSpeed derives it from the micro-batch, accumulation and the data-parallel size
    it reads from the mpu, which is the only place that size is known. `load_universal`: the run resumes from a
    universal checkpoint (another data-parallel size, see resize.py).
    """
    return {
        "checkpoint": {"load_universal": load_universal},
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # The optimizer skips a step with non-finite gradients itself, in two launches (optim.SkippableAdamW)
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # our client torch AdamW (DeepSpeed's "AdamW" would JIT FusedAdam)
        "steps_per_print": 10**9,  # we log; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
