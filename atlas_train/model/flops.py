"""Training FLOPs per token (forward + backward) for MFU, counted from the built model's layers.

Conventions: a multiply-add is 2 FLOPs; every layer costs 3× its forward in training (forward, input gradient,
weight gradient), the memory's inner loop included. These are model FLOPs, what MFU counts: recomputation is left
out, whether activation checkpointing's or memory_scan's own (its backward recomputes each chunk's forward from the
chunk's saved fast weights, one more forward of the memory: `executed_flops_per_token` adds it, and a test holds
that figure against torch.utils.flop_counter). Causal attention counts the keys a query really sees (about half of
T on average). The inner loop is counted as the algorithm does it, per token and head (P = number of fast-weight
entries, L = chunk_size, c = window):
- key gradients at the anchor weights: a forward and a backward through the memory MLP (≈ 4P) for each key,
  keys of the previous chunk's window included (× (1 + (c−1)/L));
- update="token": U_t sums c rank-1 gradients per weight matrix (2cP), momentum and decay (4P), Newton–Schulz on
  every weight matrix at every token, and the read f(P_t; zq_t) (2P);
- update="chunk": one weighted rank-1 sum per key (2P), momentum, decay and Newton–Schulz once per chunk (/L), the
  read (2P).
The DeepTransformers (DualMixer, §8) read and write J with attention-like passes, counted with the mixing like
attention: the reads, and the anchor pass over (c − 1 + L)/L points per token, each over the keys written before its
chunk plus the persistent pairs, with value dimension hid. Their window and W1 terms (per window key a forward and a
backward through W1, per token the W1 read and the window's kernel values) are the memory's inner loop, which their
backward recomputes too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from atlas_train.model.atlas_mixer import AtlasMixer
from atlas_train.model.attention import Attention
from atlas_train.model.dual_mixer import DualMixer
from atlas_train.model.feature_maps import FeatureMap


def newton_schulz_flops(rows: int, cols: int, steps: int) -> float:
    """One NS orthogonalisation of a rows×cols matrix (spec 3.7): X Xᵀ, A², (b A + c A²) X per step, on m ≤ n."""
    if steps == 0:
        return 0.0
    m, n = min(rows, cols), max(rows, cols)
    return 3.0 * m * n + steps * (4.0 * m * m * n + 2.0 * m**3 + 2.0 * m * m)


def attended_keys(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to in a causal (optionally windowed) sequence of seq_len tokens."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2.0
    full = window * (window + 1) / 2.0 + (seq_len - window) * window
    return full / seq_len


def memory_forward_flops(mixer: AtlasMixer) -> float:
    """Forward FLOPs per token of one AtlasMixer's memory_scan (all heads)."""
    opts = mixer.scan_options
    shapes = [tuple(p.shape[1:]) for p in mixer.memory.parameters() if p.dim() == 3]
    n_fast = float(sum(r * c for r, c in shapes))
    L, c = opts["chunk_size"], mixer.gates.window
    keys = 4.0 * n_fast * (1.0 + (c - 1) / L)
    ns = sum(newton_schulz_flops(r, cc, opts["ns_steps"]) for r, cc in shapes)
    if opts["update"] == "token":
        per_head = keys + 2.0 * c * n_fast + 4.0 * n_fast + ns + 2.0 * n_fast
    else:
        per_head = keys + 2.0 * n_fast + (4.0 * n_fast + ns) / L + 2.0 * n_fast
    return mixer.n_heads * per_head


def dual_memory_forward_flops(mixer: DualMixer, seq_len: int) -> tuple[float, float]:
    """Forward FLOPs per token of one DualMixer's dual_memory_scan (all heads): (attention passes, window terms)."""
    dh, hid = mixer.memory.W1.shape[-2:]
    size, window = mixer.scan_options["chunk_size"], mixer.gates.window
    rows = size + window - 1  # a chunk's window: its keys and the c - 1 before them
    keys = attended_keys(seq_len, None) + mixer.memory.K0.shape[1]
    attention = 2.0 * (dh + hid) * keys * (1.0 + rows / size)
    window_terms = 4.0 * dh * hid * rows / size + 2.0 * dh * hid * (1.0 + rows / size) + 2.0 * rows * (
        2.0 * dh + 2.0 * hid)
    return mixer.n_heads * attention, mixer.n_heads * window_terms


def feature_map_forward_flops(fmap: FeatureMap, n_heads: int) -> float:
    """φ on q and k, per token."""
    if fmap.kind == "sketch":
        per_head = 2.0 * fmap.sketch.shape[1] * fmap.sketch_dim * fmap.head_dim + fmap.out_dim
    else:
        per_head = 2.0 * fmap.out_dim
    return 2.0 * n_heads * per_head


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token of a whole model, split by where they are spent."""

    dense: float  # every nn.Linear (projections, feed-forward, LM head)
    mixing: float  # attention scores and values (dual_memory_scan's passes too), feature maps, convolutions
    memory: float  # memory_scan's inner loop (dual_memory_scan's window terms)


def forward_flops_per_token(model: nn.Module, seq_len: int) -> ForwardFlops:
    dense = 2.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    mixing = 0.0
    memory = 0.0
    for module in model.modules():
        if isinstance(module, Attention):
            mixing += 4.0 * module.n_heads * module.head_dim * attended_keys(seq_len, module.window)
        elif isinstance(module, DualMixer):
            attention, window_terms = dual_memory_forward_flops(module, seq_len)
            mixing += attention
            memory += window_terms
        elif isinstance(module, AtlasMixer):
            memory += memory_forward_flops(module)
            mixing += feature_map_forward_flops(module.feature_map, module.n_heads)
        if isinstance(module, AtlasMixer):  # DualMixer included
            for conv in (module.q_conv, module.k_conv, module.v_conv):
                mixing += 2.0 * conv.weight.numel()
    return ForwardFlops(dense, mixing, memory)


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Model FLOPs per token of a training step (forward + backward, no recomputation): what MFU divides by."""
    f = forward_flops_per_token(model, seq_len)
    return 3.0 * (f.dense + f.mixing + f.memory)


def executed_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """FLOPs per token the training step executes without activation checkpointing: the model FLOPs plus the
    scan's recomputation of the memory's forward in its backward."""
    f = forward_flops_per_token(model, seq_len)
    return training_flops_per_token(model, seq_len) + f.memory
