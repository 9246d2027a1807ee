"""Test-only patches that let megatron-core's CUDA-bound pieces run on CPU/gloo.

megatron-core's sequence-parallel mappings allocate scratch buffers on `torch.cuda.current_device()`, and its RNG
tracker saves/restores the CUDA generator. On a machine without CUDA both are redirected to the CPU. Never imported
by the package itself; applied only when CUDA is absent.
"""

from __future__ import annotations

import torch


def apply_megatron_cpu_patches() -> None:
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as megatron_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None
