"""The training speed settings, applied to a built model from outside (the model itself stays plain).

- Activation checkpointing (`train.activation_checkpointing`): `auto` recomputes whole blocks (`full`) for models
  with a memory layer, whose scan keeps a fast-weight snapshot per chunk and head (tens of GB per step at production
  shapes), and nothing (`none`) for the transformer, whose activations fit; `selective` keeps matrix products and
  attention outputs and recomputes the element-wise work (attention-only models).
- A fused linear + cross-entropy (`train.fused_cross_entropy`, liger-kernel's Triton kernel, CUDA only, one device
  of the vocabulary): the (tokens × vocabulary) logits are never materialised, only a chunk at a time, and the loss
  and the head's gradients come out of the same pass. With tensor or context parallelism the model's own loss
  (vocab-parallel / label-weighted) is kept.
- `torch.compile` per block (`train.compile`): attention-only blocks whole (norms, rotary embedding, SwiGLU and
  the residual adds fuse; SDPA stays a library call). Blocks with a memory layer stay eager: the scan drives its
  own CUDA graphs and Triton kernels, which the compiler cannot trace; with their norms and feed-forward compiled,
  atlas, omeganet and atlas_mag fail at their first GPU step with "CUDA error: misaligned address" (titans does
  not), from a kernel not yet identified. Their step is the scan's, so compiling the rest would buy little.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from atlas_train.model.block import Block, set_activation_checkpointing


@dataclass(frozen=True)
class SpeedSettings:
    """What `apply_speed_settings` chose, for the run's log."""

    activation_checkpointing: str
    compiled: bool
    fused_cross_entropy: bool

    def describe(self) -> str:
        return (f"activation checkpointing {self.activation_checkpointing}, "
                f"compile {'on' if self.compiled else 'off'}, "
                f"fused cross-entropy {'on' if self.fused_cross_entropy else 'off'}")


def blocks_of(model: nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def resolve_recompute(mode: str, model: nn.Module) -> str:
    """`auto` made concrete: `full` for models with a memory layer, `none` for attention-only ones."""
    if mode != "auto":
        return mode
    return "full" if any(block.has_memory for block in blocks_of(model)) else "none"


def fused_linear_cross_entropy():
    """liger-kernel's fused linear + cross-entropy as `(hidden (N, d), weight (V, d), labels (N,)) -> mean loss`."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda hidden, weight, labels: loss(weight, hidden, labels)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each attention-only block in place; blocks with a memory layer stay eager (see the module)."""
    for block in blocks_of(model):
        if not block.has_memory:
            block.compile()


def apply_speed_settings(model: nn.Module, tc, *, tp_size: int = 1, cp_size: int = 1) -> SpeedSettings:
    """Set the train config's recompute mode and loss on `model` (after parallelisation, before the engine wraps
    it). Compilation is left to the caller (`compile_blocks`), after anything that runs the model at other shapes.

    `fused_cross_entropy`: auto = on GPUs without tensor or context parallelism (their losses are the model's own);
    true = wherever the model's loss is its own (on CPU only under Triton's interpreter, for tests).
    """
    recompute = resolve_recompute(tc.activation_checkpointing, model)
    set_activation_checkpointing(model, recompute)
    own_loss = tp_size == 1 and cp_size == 1
    fused = own_loss and (tc.fused_cross_entropy is True
                          or (tc.fused_cross_entropy == "auto" and torch.cuda.is_available()))
    if fused:
        model.fused_loss = fused_linear_cross_entropy()
    return SpeedSettings(recompute, bool(tc.compile), fused)
