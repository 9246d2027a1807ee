"""Forcing the Newton–Schulz kernel's variants at tiny sizes, for the tests of the kernels that share its code
(kernels/newton_schulz_kernel.py, kernels/muon_step_kernel.py)."""

import torch

import atlas_train.kernels.newton_schulz_kernel as ns_kernel

NS_VARIANTS = ("registers", "stream", "scratch")


def force_ns_variant(monkeypatch, variant: str, shape) -> None:
    """Make the NS kernel take `variant` for matrices of `shape`, with several column strips and (scratch) several
    row blocks, including partial ones; 'registers' keeps the whole matrix in one tile in the forward while its
    backward streams column strips (as 64 x 256 does on the GPU)."""
    if variant != "registers":
        monkeypatch.setattr(ns_kernel, "SINGLE_TILE_ELEMENTS", 16 * 16)
    monkeypatch.setattr(ns_kernel, "SCRATCH_TILE_ELEMENTS", 16 * 32)
    monkeypatch.setattr(ns_kernel, "REGISTER_GRAM_MAX", 64 if variant == "stream" else 16)
    probe = torch.zeros(shape, dtype=torch.float64)
    assert ns_kernel.launch_layout(probe, "ieee").variant == variant
    backward = ns_kernel.launch_layout(probe, "ieee", backward=True)
    assert backward.block_n < max(shape[-2:]), backward  # several column strips
