"""Plain low-rank delta ``ΔW = α B A`` (PEFT's LoRA in this package's frame): the carrier of fused adapters.

For ``W (out, in)``, ``B (out, r)`` zero-initialised and ``A (r, in)`` Kaiming-uniform (PEFT's LoRA
init and naming: ``lora_A`` acts on the input), so ``W' = W`` at step 0. It uses no singular columns
(it fuses with any band) and asks the core for one triplet only (the base fingerprint).

Fusion (:mod:`fusion`) writes every fusion that is not one method's own concatenation into a
``lowrank`` adapter through :meth:`LowRank.set_factors`: the exact factors of the fused delta, so a
fused model is ``merge_and_unload`` of an ordinary adapter that saves and loads like any other.
Parameters per layer: ``r (out + in)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import SpectralDelta, register_method


@register_method
class LowRank(SpectralDelta):
    name = "lowrank"
    rank_is_columns = False  # a factor width (fused concepts side by side), not singular columns

    @classmethod
    def num_components(cls, cfg, out_features, in_features):
        return 1  # only for the base fingerprint

    @classmethod
    def default_columns(cls, cfg, out_features, in_features):
        return []

    def __init__(self, basis, weight, cfg, columns):
        super().__init__(basis, weight, cfg, columns)
        r, dev = cfg.rank, weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))  # (out, r)

    def delta_weight(self, scale: float = 1.0) -> torch.Tensor:
        return (self.cfg.alpha * scale) * self.lora_B @ self.lora_A  # (out, in)

    def factors(self, scale: float = 1.0):
        return (self.cfg.alpha * scale) * self.lora_B, self.lora_A  # (out, r), (r, in)

    @classmethod
    def concat(cls, deltas, scales):
        """``B = [α₁s₁B₁, α₂s₂B₂, …]``, ``A = [A₁; A₂; …]`` with ``alpha = 1``: exact for any scales."""
        return 1.0, {"lora_B": torch.cat([d.cfg.alpha * s * d.lora_B.detach() for d, s in zip(deltas, scales)], 1),
                     "lora_A": torch.cat([d.lora_A.detach() for d in deltas], 0)}

    @torch.no_grad()
    def set_factors(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """Hold ``ΔW = α B A``: ``B (out, R)``, ``A (R, in)`` with ``R <= rank`` (zero-padded to the rank)."""
        R = B.shape[1]
        if A.shape != (R, self.in_features) or B.shape[0] != self.out_features or R > self.lora_A.shape[0]:
            raise ValueError(f"factors {tuple(B.shape)} @ {tuple(A.shape)} do not fit a rank-{self.lora_A.shape[0]} "
                             f"adapter of a {self.out_features}x{self.in_features} layer")
        self.lora_B.zero_()
        self.lora_A.zero_()
        self.lora_B[:, :R] = B.to(self.lora_B)
        self.lora_A[:R] = A.to(self.lora_A)
