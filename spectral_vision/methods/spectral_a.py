"""Spectral Adapter^A (Zhang & Pilanci, 2024): additive tuning of the top singular vectors.

``W = U Σ Vᵀ``; with ``U₁ (out, r)``, ``Σ₁ (r, r)``, ``V₁ (in, r)`` the selected band::

    W' = W + (U₁ + A_U) Σ₁ (V₁ + A_V)ᵀ − U₁ Σ₁ V₁ᵀ

``A_U (out, r)`` and ``A_V (in, r)`` are trainable and zero-initialised, so ``W' = W`` at step 0
and both receive gradient (``U₁``, ``V₁`` are non-zero). ``alpha`` scales ΔW.
Exact rank-``2r`` factorisation: ``ΔW = [A_U Σ₁, U₁ Σ₁] · [(V₁ + A_V)ᵀ; A_Vᵀ]``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import SpectralDelta, register_method


@register_method
class SpectralAdapterA(SpectralDelta):
    name = "spectral_a"

    def __init__(self, basis, weight, cfg, columns):
        super().__init__(basis, weight, cfg, columns)
        self.register_basis(basis)
        r = self.columns.numel()
        self.A_U = nn.Parameter(torch.zeros(self.out_features, r, device=self.U.device))
        self.A_V = nn.Parameter(torch.zeros(self.in_features, r, device=self.U.device))

    def delta_weight(self, scale: float = 1.0) -> torch.Tensor:
        Up, Vp = self.U + self.A_U, self.V + self.A_V  # (out, r), (in, r)
        return self.cfg.alpha * scale * ((Up * self.S) @ Vp.T - (self.U * self.S) @ self.V.T)

    def factors(self, scale: float = 1.0):
        s = self.cfg.alpha * scale * self.S  # (r,)
        B = torch.cat([self.A_U * s, self.U * s], dim=1)  # (out, 2r)
        A = torch.cat([self.V + self.A_V, self.A_V], dim=1).T  # (2r, in)
        return B, A

    #: columns of :meth:`factors` (the forward-form cost model reads it)
    factor_rank = property(lambda self: 2 * self.columns.numel())

    @classmethod
    def concat(cls, deltas, scales):
        """``A_U``, ``A_V`` side by side: exact when every ``alphaᵢ·scaleᵢ`` is the same (the fused alpha);
        otherwise the quadratic term ``A_U Σ A_Vᵀ`` cannot be rescaled per concept (``None``)."""
        a = {float(d.cfg.alpha * s) for d, s in zip(deltas, scales)}
        if len(a) != 1:
            return None
        return a.pop(), {"A_U": torch.cat([d.A_U.detach() for d in deltas], dim=1),  # (out, Σr)
                         "A_V": torch.cat([d.A_V.detach() for d in deltas], dim=1)}  # (in, Σr)
