"""Training configuration (the `train:` section): optimisation, precision/ZeRO, schedule, logging, checkpoints.

DeepSpeed's own JSON config is not exposed: it is built from these keys (`deepspeed_config.py`) so that a run has one
validated source of truth and a typo is caught with its key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class WandbConfig:
    """Weights & Biases logging beside tensorboard and metrics.jsonl (rank 0; needs `pip install wandb`)."""

    project: Optional[str] = None  # log to this wandb project; None: no wandb
    entity: Optional[str] = None  # team or user (None: wandb's default)
    name: Optional[str] = None  # run name (None: the run dir's name)
    mode: Optional[Literal["online", "offline", "disabled"]] = None  # None: wandb's default (WANDB_MODE)
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    out_dir: str = "runs/demo"  # run dir: config.yaml, metrics.jsonl, tb/, checkpoints/
    seed: int = 1234
    steps: int = 1000  # optimizer steps
    max_minutes: Optional[float] = None  # stop (checkpoint, export-ready) after this wall time; None: no limit
    seq_len: int = 256  # tokens per row fed to the model (the shards hold rows of seq_len + 1)
    # Rows per data-parallel rank per micro-step; "auto": the largest that fits the GPU (a probe at start-up,
    # microbatch.py; needs global_batch_size).
    micro_batch_size: Union[int, Literal["auto"]] = 8
    grad_accum: int = 1  # micro-steps per optimizer step (derived instead when global_batch_size is set)
    global_batch_size: Optional[int] = None  # rows per optimizer step over all data-parallel ranks

    # Speed (speed.py): recompute "auto" = full for models with a memory layer, none for the transformer.
    activation_checkpointing: Literal["auto", "none", "selective", "full"] = "auto"
    compile: bool = False  # torch.compile each attention-only block (train/speed.py)
    fused_cross_entropy: Union[bool, Literal["auto"]] = "auto"  # liger-kernel's fused linear + CE; auto: on GPUs
    phase_timing: bool = False  # log the device time of forward, backward and optimizer (CUDA events)
    profile_step: Optional[int] = None  # profile this step (1-based): trace and kernel table in out_dir/profile/

    # AdamW + warmup/cosine.
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at `steps`
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping

    # DeepSpeed.
    precision: Literal["bf16", "fp32"] = "bf16"
    zero_stage: int = 1

    # Faults.
    max_nonfinite_in_row: int = 5  # a NaN/inf loss skips its step; this many in a row stops the run (0: stop at once)

    # Logging, validation, checkpoints.
    log_every: int = 1
    eval_every: int = 100  # 0 disables periodic validation
    eval_batches: int = 8
    save_every: int = 500  # 0: only at the end (and on preemption)
    keep_last: int = 3
    resume: Literal["none", "auto"] = "none"  # auto: continue from checkpoints/latest when there is one
    progress: bool = True  # tqdm bar on rank 0
    wandb: WandbConfig = field(default_factory=WandbConfig)  # train.wandb.project=NAME turns it on
    peak_tflops: float = 989.0  # the GPU's dense bf16 peak (datasheet TFLOP/s) for MFU; MFU is reported on GPU only
    synthetic_data: bool = False  # random tokens instead of the loader (benchmarks: isolates loader overhead)

    def validate(self) -> None:
        for name in ("steps", "seq_len", "grad_accum", "log_every", "keep_last", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.micro_batch_size != "auto" and self.micro_batch_size <= 0:
            raise ValueError("micro_batch_size must be positive (or auto)")
        if self.global_batch_size is not None:
            if self.global_batch_size <= 0:
                raise ValueError("global_batch_size must be positive")
            if self.grad_accum != 1:
                raise ValueError("set one of grad_accum and global_batch_size (the other is derived)")
        elif self.micro_batch_size == "auto":
            raise ValueError("micro_batch_size auto needs global_batch_size (rows per optimizer step), which "
                             "gradient accumulation then keeps")
        for name in ("warmup_steps", "eval_every", "save_every", "max_nonfinite_in_row", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage == 0 and self.precision == "bf16":
            # DeepSpeed's ZeRO-0 bf16 checkpoints keep the fp32 master weights only inside its optimizer blob, which
            # zero_to_fp32 cannot read: export would lose them. ZeRO-1 costs nothing extra on one device.
            raise ValueError("precision bf16 needs zero_stage >= 1 "
                             "(ZeRO-0 bf16 checkpoints cannot be exported in fp32)")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("lr must be > 0 and min_lr_ratio in [0, 1]")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError("max_minutes must be positive (or null)")
        if self.profile_step is not None and not 1 <= self.profile_step <= self.steps:
            raise ValueError(f"profile_step must be a step of the run (1..{self.steps}), got {self.profile_step}")
        if not self.out_dir:
            raise ValueError("out_dir must be set")
