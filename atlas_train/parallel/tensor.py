"""Tensor (and sequence) parallelism applied to a plain AtlasLM from outside (torchtitan style).

Heads are independent, so every per-head projection becomes a megatron-core ColumnParallelLinear (this rank's heads),
the projections back to d_model become RowParallelLinear, and every per-head parameter (conv channels, initial fast
weights, head norms, feature-map sketches, the DeepTransformers' kernel scales) keeps only this rank's heads.
Embedding, LM head and cross-entropy are vocab-parallel. Weights are sliced from the full model, so a TP run starts
exactly where the one-device run starts.

Sequence parallelism keeps the residual stream as this rank's share of the B·T tokens, flattened to (B·T/tp, d):
norms and residual adds are per token, so any split works, and a flat split works for every B and T. Each sub-layer
(mixer, attention, MLP) all-gathers its input and its row-parallel output reduce-scatters back to the share.

Replicated parameters whose gradient is only partial on each rank get a TP all-reduce on their gradient: the
feature-map coefficients (each rank sees its heads only) and, with SP, the RMSNorm gains (each rank sees its tokens).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch import nn

from atlas_train.model.atlas_mixer import AtlasMixer
from atlas_train.model.attention import Attention
from atlas_train.model.block import Block, SwiGLU
from atlas_train.model.norms import HeadRMSNorm, RMSNorm


def _no_init(_weight):
    """Weights are copied from the full model right after construction (megatron builds them on the CPU, so that
    it never needs the CUDA RNG tracker; they then move to the full model's device)."""


def _shard(full: torch.Tensor, dim: int) -> torch.Tensor:
    return full.chunk(ps.get_tensor_model_parallel_world_size(), dim)[ps.get_tensor_model_parallel_rank()]


def _mark_sharded(param: nn.Parameter, dim: int) -> None:
    """Megatron's attributes for a TP-split parameter (DeepSpeed's gradient norm counts such parameters once per
    rank; checkpoint tools read the split dim). megatron sets them only when it initialises weights itself."""
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1


def _shard_parameter(module: nn.Module, name: str, dim: int = 0) -> None:
    """Keep this rank's slice of a per-head parameter (heads major along `dim`)."""
    full = getattr(module, name)
    part = nn.Parameter(_shard(full.data, dim).clone(), requires_grad=full.requires_grad)
    _mark_sharded(part, dim)
    setattr(module, name, part)


def _all_reduce_grad_over_tp(param: nn.Parameter) -> None:
    group = ps.get_tensor_model_parallel_group()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    param.register_hook(hook)


class _ColumnLinear(ColumnParallelLinear):
    """nn.Linear's call signature (tensor in, tensor out) over megatron's column-parallel layer."""

    def forward(self, x):
        return super().forward(x)[0]


class _RowLinear(RowParallelLinear):
    """nn.Linear's call signature over megatron's row-parallel layer. With SP the output is this rank's token share,
    flat (B·T/tp, d); without, the input's shape."""

    def forward(self, x):
        out = super().forward(x.reshape(-1, x.shape[-1]))[0]
        return out if self.sequence_parallel else out.view(*x.shape[:-1], out.shape[-1])


def _column(linear: nn.Linear, config) -> _ColumnLinear:
    layer = _ColumnLinear(linear.in_features, linear.out_features, config=config, init_method=_no_init,
                          bias=linear.bias is not None, gather_output=False, skip_bias_add=False)
    layer.to(linear.weight.device)
    with torch.no_grad():
        layer.weight.copy_(_shard(linear.weight, 0))
        if linear.bias is not None:
            layer.bias.copy_(_shard(linear.bias, 0))
    _mark_sharded(layer.weight, 0)
    if layer.bias is not None:
        _mark_sharded(layer.bias, 0)
    return layer


def _row(linear: nn.Linear, config) -> _RowLinear:
    assert linear.bias is None, "row-parallel projections of this model have no bias"
    layer = _RowLinear(linear.in_features, linear.out_features, config=config, init_method=_no_init, bias=False,
                       input_is_parallel=True, skip_bias_add=False)
    layer.to(linear.weight.device)
    with torch.no_grad():
        layer.weight.copy_(_shard(linear.weight, 1))
    _mark_sharded(layer.weight, 1)
    return layer


class _VocabParallelHead(nn.Module):
    """LM head over this rank's vocabulary slice: logits (B, T, V/tp) for the vocab-parallel cross-entropy."""

    def __init__(self, weight: nn.Parameter, sequence_parallel: bool, shape_of):
        super().__init__()
        self.weight = weight
        self.sequence_parallel = sequence_parallel
        self.shape_of = shape_of  # () -> (B, T) of the current forward

    def forward(self, h):
        if self.sequence_parallel:  # gather the token shares; backward sums the partial-vocab grads and re-splits
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
        else:  # backward all-reduces the partial-vocab grads
            h = copy_to_tensor_model_parallel_region(h)
        return F.linear(h, self.weight).view(*self.shape_of(), -1)


class _SequenceShardEmbedding(VocabParallelEmbedding):
    """Vocab-parallel embedding whose output (with SP) is this rank's flat token share (B·T/tp, d)."""

    def forward(self, input_ids):
        out = super().forward(input_ids.reshape(-1))
        return scatter_to_sequence_parallel_region(out)


def _vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100, from vocab-sharded logits (megatron-core's fused reductions)."""
    valid = labels != -100
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    per_token = vocab_parallel_cross_entropy(logits, labels.clamp(min=0))
    return (per_token * valid).sum() / valid.sum()


def _gather_sub_layer_input(shape_of):
    """Forward pre-hook for a sub-layer under SP: token share (B·T/tp, d) -> full (B, T, d).
    Backward keeps this rank's share of the (already TP-reduced) input gradient."""

    def pre_hook(module, args, kwargs):
        x = gather_from_sequence_parallel_region(args[0], tensor_parallel_output_grad=False)
        return (x.view(*shape_of(), x.shape[-1]), *args[1:]), kwargs

    return pre_hook


def apply_tensor_parallel(model: nn.Module, sequence_parallel: bool) -> nn.Module:
    """Swap the layers of an AtlasLM (built identically on every TP rank) for this TP rank's parallel ones."""
    cfg = model.config
    tp = ps.get_tensor_model_parallel_world_size()
    for what, size in (("n_heads", cfg.n_heads), ("vocab_size", cfg.vocab_size), ("ffn_hidden", cfg.ffn_hidden)):
        if size % tp:
            raise ValueError(f"tensor_parallel {tp} does not divide model {what} {size}")
    dtype = model.embed.weight.dtype
    column_cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                     perform_initialization=False, params_dtype=dtype)
    row_cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                                  use_cpu_initialization=True, perform_initialization=False, params_dtype=dtype)
    current_shape = {}  # (B, T) of the running forward: SP's flat token shares are unflattened with it

    def shape_of() -> tuple[int, int]:
        return current_shape["bt"]

    def record_shape(module, args, kwargs):
        current_shape["bt"] = tuple((args[0] if args else kwargs["input_ids"]).shape)

    model.register_forward_pre_hook(record_shape, with_kwargs=True)

    for module in list(model.modules()):
        if isinstance(module, (AtlasMixer, Attention)):
            for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
                if hasattr(module, name):
                    setattr(module, name, _column(getattr(module, name), column_cfg))
            module.o_proj = _row(module.o_proj, row_cfg)
            module.n_heads //= tp
        if isinstance(module, AtlasMixer):  # and DualMixer, which has no feature map but a kernel scale per head
            for conv in (module.q_conv, module.k_conv, module.v_conv):
                _shard_parameter(conv, "weight")
            for name, _ in list(module.memory.named_parameters()):
                _shard_parameter(module.memory, name)
            feature_map = getattr(module, "feature_map", None)
            if hasattr(feature_map, "sketch"):
                _shard_parameter(feature_map, "sketch")
            if hasattr(feature_map, "coef_raw"):
                _all_reduce_grad_over_tp(feature_map.coef_raw)
            if hasattr(module, "scale_raw"):
                _shard_parameter(module, "scale_raw")
            gates = module.gates
            gates.n_heads //= tp
            for gate in (gates.alpha, gates.eta, gates.theta, gates.gamma):
                if gate is not None:
                    gate.up = _column(gate.up, column_cfg)
        if isinstance(module, HeadRMSNorm):
            _shard_parameter(module, "weight")
            module.n_heads //= tp
        if isinstance(module, SwiGLU):
            module.gate_proj = _column(module.gate_proj, column_cfg)
            module.up_proj = _column(module.up_proj, column_cfg)
            module.down_proj = _row(module.down_proj, row_cfg)
        if sequence_parallel and isinstance(module, RMSNorm):
            _all_reduce_grad_over_tp(module.weight)
        if sequence_parallel and isinstance(module, Block):
            for sub_layer in (module.mixer, module.swa, module.ffn):
                if sub_layer is not None:
                    sub_layer.register_forward_pre_hook(_gather_sub_layer_input(shape_of), with_kwargs=True)

    embed_cls = _SequenceShardEmbedding if sequence_parallel else VocabParallelEmbedding
    embed = embed_cls(cfg.vocab_size, cfg.d_model, init_method=_no_init, config=column_cfg)
    embed.to(model.embed.weight.device)
    with torch.no_grad():
        embed.weight.copy_(_shard(model.embed.weight, 0))
    _mark_sharded(embed.weight, 0)
    head_weight = embed.weight
    if not cfg.tie_embeddings:
        head_weight = nn.Parameter(_shard(model.lm_head.weight.data, 0).clone())
        _mark_sharded(head_weight, 0)
    model.embed = embed
    model.lm_head = _VocabParallelHead(head_weight, sequence_parallel, shape_of)
    model.cross_entropy = _vocab_parallel_loss
    return model
