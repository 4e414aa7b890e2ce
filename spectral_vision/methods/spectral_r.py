"""Spectral Adapter^R (Zhang & Pilanci, 2024): Cayley rotations of the top singular vectors.

With the selected band ``U₁ (out, r)``, ``Σ₁``, ``V₁ (in, r)`` and orthogonal ``R_U, R_V (r, r)``::

    W' = W + U₁ (R_U Σ₁ R_Vᵀ − Σ₁) V₁ᵀ

Each rotation is the Cayley map of a skew matrix ``K`` with ``r(r-1)/2`` free parameters:
``R = (I − αK)⁻¹ (I + αK)``, computed with a linear solve, so it is orthogonal to rounding
error for every ``α`` (the strength knob scales the generator; it never blends ``R`` with ``I``).
``K = 0`` at init gives ``R = I`` exactly, hence ``W' = W``. Rank of ΔW ≤ r:
``ΔW = (U₁ M) V₁ᵀ`` with ``M = R_U Σ₁ R_Vᵀ − Σ₁``.

Fast path (training forward, every form): both rotations come from one batched, sync-free inverse,
``R = 2 (I − αK)⁻¹ − I`` through a Cholesky factor (:func:`cayley_fast`), ~10 small kernels per layer; :func:`cayley` (a solve)
stays the reference that ``delta_weight`` uses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


def skew_basis(r: int, device=None) -> torch.Tensor:
    """``E (r(r-1)/2, r*r)`` with ``(params @ E).view(r, r) = T − Tᵀ``: the skew matrix of :func:`cayley`
    as one matmul (batched over leading dims of ``params``, differentiable, compile-friendly)."""
    iu = torch.triu_indices(r, r, offset=1, device=device)
    E = torch.zeros(iu.shape[1], r * r, device=device)
    idx = torch.arange(iu.shape[1], device=device)
    E[idx, iu[0] * r + iu[1]] = 1.0
    E[idx, iu[1] * r + iu[0]] = -1.0
    return E


def cayley_fast(params: torch.Tensor, E: torch.Tensor, r: int, alpha: float = 1.0) -> torch.Tensor:
    """:func:`cayley` for a batch ``params (..., r(r-1)/2)`` -> ``(..., r, r)`` with no host sync.

    ``(I − αK)⁻¹ (I + αK) = 2 (I − αK)⁻¹ − I`` and ``(I − αK)⁻¹ = (I + αK) M⁻¹`` with the SPD
    ``M = (I − αK)(I + αK) = I − α²K²``, inverted through its Cholesky factor (``cholesky_ex`` and
    ``solve_triangular`` never read an error flag back to the host, unlike ``solve`` / ``lu_solve``).
    """
    eye = torch.eye(r, device=params.device, dtype=params.dtype)
    K = (params @ E).unflatten(-1, (r, r)) * alpha  # (..., r, r) skew
    L = torch.linalg.cholesky_ex(eye - K @ K).L  # M = L Lᵀ
    Y = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)  # L⁻¹, so M⁻¹ = Yᵀ Y
    return (eye + K) @ (Y.mT @ Y) * 2 - eye


@register_method
class SpectralAdapterR(SpectralDelta):
    name = "spectral_r"

    def __init__(self, basis, weight, cfg, columns):
        super().__init__(basis, weight, cfg, columns)
        self.register_basis(basis)
        r = self.columns.numel()
        self.skew_U = nn.Parameter(torch.zeros(r * (r - 1) // 2, device=self.columns.device))
        self.skew_V = nn.Parameter(torch.zeros(r * (r - 1) // 2, device=self.columns.device))
        self.register_buffer("skew_E", skew_basis(r, self.columns.device), persistent=False)  # (r(r-1)/2, r*r)

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

    # ---- fast paths (tested against delta_weight) ----------------------------------------------
    factor_rank = property(lambda self: self.columns.numel())

    def fast_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`factors` with both rotations from one batched :func:`cayley_fast` (no host sync,
        ~12 kernels per layer): ``B = U₁ M (out, r)``, ``A = V₁ᵀ (r, in)``."""
        r = self.columns.numel()
        R = cayley_fast(torch.stack([self.skew_U, self.skew_V]), self.skew_E, r, self.cfg.alpha)  # (2, r, r)
        M = torch.addmm(torch.diag(-self.S), R[0] * self.S, R[1].T)  # R_U Σ₁ R_Vᵀ − Σ₁  (r, r)
        return self.U @ M, self.V.T

    def forward_linear(self, x):
        B, A = self.fast_factors()  # (out, r), (r, in)
        return F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))

    @classmethod
    def concat(cls, deltas, scales):
        """Block-diagonal rotations: the Cayley map of a block-diagonal skew matrix is the block-diagonal
        of the blocks' Cayley maps, so each concept's skew parameters, times ``alphaᵢ·scaleᵢ``, go on
        its diagonal block of a rank-``Σ rᵢ`` adapter with ``alpha = 1``. Exact for any scales."""
        sizes = [d.columns.numel() for d in deltas]
        R, o = sum(sizes), 0
        TU, TV = torch.zeros(R, R, device="cpu"), torch.zeros(R, R, device="cpu")  # upper triangles of the block-diagonal generators
        for d, s, r in zip(deltas, scales, sizes):
            iu = torch.triu_indices(r, r, offset=1, device="cpu")
            TU[o + iu[0], o + iu[1]] = d.cfg.alpha * s * d.skew_U.detach().float().cpu()
            TV[o + iu[0], o + iu[1]] = d.cfg.alpha * s * d.skew_V.detach().float().cpu()
            o += r
        iu = torch.triu_indices(R, R, offset=1, device="cpu")  # the layout cayley() reads
        dev = deltas[0].skew_U.device
        return 1.0, {"skew_U": TU[iu[0], iu[1]].to(dev), "skew_V": TV[iu[0], iu[1]].to(dev)}
