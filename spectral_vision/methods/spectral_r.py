"""Spectral Adapter^R (Zhang & Pilanci, 2024): Cayley rotations of the top singular vectors.

With the selected band ``U₁ (out, r)``, ``Σ₁``, ``V₁ (in, r)`` and orthogonal ``R_U, R_V (r, r)``::

    W' = W + U₁ (R_U Σ₁ R_Vᵀ − Σ₁) V₁ᵀ

Each rotation is the Cayley map of a skew matrix ``K`` with ``r(r-1)/2`` free parameters:
``R = (I − αK)⁻¹ (I + αK)``, computed with a linear solve, so it is orthogonal to rounding
error for every ``α`` (the strength knob scales the generator; it never blends ``R`` with ``I``).
``K = 0`` at init gives ``R = I`` exactly, hence ``W' = W``. Rank of ΔW ≤ r:
``ΔW = (U₁ M) V₁ᵀ`` with ``M = R_U Σ₁ R_Vᵀ − Σ₁``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import SpectralDelta, register_method


def cayley(params: torch.Tensor, r: int, alpha: float = 1.0) -> torch.Tensor:
    """Orthogonal ``(r, r)`` matrix from ``r(r-1)/2`` parameters: ``(I − αK)⁻¹ (I + αK)``, ``K`` skew."""
    iu = torch.triu_indices(r, r, offset=1, device=params.device)
    T = params.new_zeros(r, r)
    T = T.index_put((iu[0], iu[1]), params)
    K = alpha * (T - T.T)  # (r, r) skew-symmetric
    eye = torch.eye(r, device=params.device, dtype=params.dtype)
    return torch.linalg.solve(eye - K, eye + K)


@register_method
class SpectralAdapterR(SpectralDelta):
    name = "spectral_r"

    def __init__(self, basis, weight, cfg, columns):
        super().__init__(basis, weight, cfg, columns)
        self.register_basis(basis)
        r = self.columns.numel()
        self.skew_U = nn.Parameter(torch.zeros(r * (r - 1) // 2, device=self.columns.device))
        self.skew_V = nn.Parameter(torch.zeros(r * (r - 1) // 2, device=self.columns.device))

    def rotations(self, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R_U, R_V)``, each ``(r, r)`` orthogonal (generator scaled by ``alpha * scale``)."""
        r, a = self.columns.numel(), self.cfg.alpha * scale
        return cayley(self.skew_U, r, a), cayley(self.skew_V, r, a)

    def core(self, scale: float = 1.0) -> torch.Tensor:
        """``M = R_U Σ₁ R_Vᵀ − Σ₁`` of shape ``(r, r)``."""
        R_U, R_V = self.rotations(scale)
        return (R_U * self.S) @ R_V.T - torch.diag(self.S)

    def delta_weight(self, scale: float = 1.0) -> torch.Tensor:
        R_U, R_V = self.rotations(scale)
        return (self.U @ R_U * self.S) @ (self.V @ R_V).T - (self.U * self.S) @ self.V.T

    def factors(self, scale: float = 1.0):
        return self.U @ self.core(scale), self.V.T  # (out, r), (r, in)

    @classmethod
    def concat(cls, deltas, scales):
        """Block-diagonal rotations: the Cayley map of a block-diagonal skew matrix is the block-diagonal
        of the blocks' Cayley maps, so each concept's skew parameters, times ``alphaᵢ·scaleᵢ``, go on
        its diagonal block of a rank-``Σ rᵢ`` adapter with ``alpha = 1``. Exact for any scales."""
        sizes = [d.columns.numel() for d in deltas]
        R, o = sum(sizes), 0
        TU, TV = torch.zeros(R, R), torch.zeros(R, R)  # upper triangles of the block-diagonal generators
        for d, s, r in zip(deltas, scales, sizes):
            iu = torch.triu_indices(r, r, offset=1)
            TU[o + iu[0], o + iu[1]] = d.cfg.alpha * s * d.skew_U.detach().float().cpu()
            TV[o + iu[0], o + iu[1]] = d.cfg.alpha * s * d.skew_V.detach().float().cpu()
            o += r
        iu = torch.triu_indices(R, R, offset=1)  # the layout cayley() reads
        dev = deltas[0].skew_U.device
        return 1.0, {"skew_U": TU[iu[0], iu[1]].to(dev), "skew_V": TV[iu[0], iu[1]].to(dev)}
