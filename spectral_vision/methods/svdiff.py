"""SVDiff spectral shift (Han et al., 2023): tune every singular value of the frozen weight.

With the full thin SVD ``W = U diag(σ) Vᵀ`` (``n = min(out, in)`` triplets) and a trainable shift
``δ (n,)``, zero-initialised::

    W' = U diag(ReLU(σ + δ)) Vᵀ        ΔW = α · U diag(ReLU(σ + δ) − σ) Vᵀ

(ReLU keeps the singular values non-negative; ``σ ≥ 0`` so ``δ = 0`` gives ``ΔW = 0`` exactly.)
``α`` (``cfg.alpha``) scales ΔW. ``rank`` and ``band`` are not used: SVDiff always adapts all
``n`` singular values (``columns = 0..n-1``). Parameters per layer: ``n``.
Exact factorisation of rank ``n``: ``B = U · diag(α(ReLU(σ+δ) − σ))``, ``A = Vᵀ``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import SpectralDelta, register_method


@register_method
class SVDiff(SpectralDelta):
    name = "svdiff"
    rank_is_columns = False  # every singular value is shifted, whatever the rank

    @classmethod
    def num_components(cls, cfg, out_features, in_features):
        return min(out_features, in_features)

    @classmethod
    def default_columns(cls, cfg, out_features, in_features):
        return list(range(min(out_features, in_features)))

    def __init__(self, basis, weight, cfg, columns):
        super().__init__(basis, weight, cfg, columns)
        self.register_basis(basis)
        self.delta = nn.Parameter(torch.zeros(self.columns.numel(), device=self.columns.device))  # δ (n,)

    def shift(self, scale: float = 1.0) -> torch.Tensor:
        """``α·scale (ReLU(σ + δ) − σ)`` of shape ``(n,)``: the change of each singular value."""
        return self.cfg.alpha * scale * (torch.relu(self.S + self.delta) - self.S)

    def delta_weight(self, scale: float = 1.0) -> torch.Tensor:
        return (self.U * self.shift(scale)) @ self.V.T  # (out, n) @ (n, in)

    def factors(self, scale: float = 1.0):
        return self.U * self.shift(scale), self.V.T  # (out, n), (n, in)

    #: columns of :meth:`factors` (the forward-form cost model reads it)
    factor_rank = property(lambda self: self.columns.numel())
