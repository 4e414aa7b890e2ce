"""LoRSA, Low-Rank Spectral Adaptation (paper 000, sec. 3): shifts and rotations of selected triplets.

Over a selected set ``S`` of the top-``k`` singular triplets (``|S| = cfg.rank``; the config's band
by default, or per-layer columns chosen by Fisher importance scoring, see
:mod:`spectral_vision.importance`), with fixed random projections ``P (out, r_p)``, ``Q (in, r_p)``
shared by all components of the layer::

    u_i' = u_i + P p_i,    v_i' = v_i + Q q_i
    W'   = W + Σ_{i∈S} (σ_i + Δσ_i) u_i' v_i'ᵀ − σ_i u_i v_iᵀ

Trainable per component: ``Δσ_i`` (scalar), ``p_i, q_i ∈ R^{r_p}``, all zero-initialised, so
``W' = W`` at step 0 (``p_i`` still gets gradient: ``∂L/∂p_i = σ_i Pᵀ G v_i`` with ``G = ∂L/∂W``).
Parameters per layer: ``|S| (1 + 2 r_p)``. ``α`` (``cfg.alpha``) scales ΔW.

Vectorised (sec. 3.4, no loop over components), with ``p (r_p, |S|)``, ``q (r_p, |S|)``::

    U_S' = U_S + P p,  V_S' = V_S + Q q,   ΔW = α (U_S' diag(σ + Δσ) V_S'ᵀ − U_S diag(σ) V_Sᵀ)

Exact factorisation of rank ``|S| + r_p`` (smaller than the naive ``2|S|``): with
``G = [I; p]``, ``H = [I; q]`` (``(|S|+r_p, |S|)``) and ``E = [I; 0]``,
``ΔW = [U_S, P] · α (G diag(σ+Δσ) Hᵀ − E diag(σ) Eᵀ) · [V_S, Q]ᵀ``.

**P and Q are never saved**: they are regenerated from ``options["seed"]`` (stored in the adapter
config) and the layer's shape, with a CPU ``torch.Generator``, so they are bit-identical after
load on any device. Entries are ``N(0, 1/out)`` and ``N(0, 1/in)`` (columns of unit expected norm,
like ``u_i``, ``v_i``). Layers of the same shape share the same P, Q (each has its own ``p``, ``q``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import SpectralDelta, register_method


@dataclass
class LoRSAOptions:
    k: int = 256  # S is chosen among the top-k triplets (truncated SVD of k; capped at min(out, in))
    proj_rank: int = 4  # r_p: rank of the vector rotations
    seed: int = 0  # seed of the fixed random projections P, Q

    def __post_init__(self):
        if self.k < 1 or self.proj_rank < 1:
            raise ValueError(f"lorsa options k and proj_rank must be >= 1, got k={self.k}, proj_rank={self.proj_rank}")


def projections(seed: int, out_features: int, in_features: int, proj_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed ``P (out, r_p)`` and ``Q (in, r_p)`` of a layer, deterministic in (seed, shape), on CPU."""
    g = torch.Generator(device="cpu").manual_seed(
        (int(seed) * 1_000_003 + out_features * 65_537 + in_features * 257 + proj_rank) % (2**63 - 1))
    P = torch.randn(out_features, proj_rank, generator=g, device="cpu") / out_features**0.5
    Q = torch.randn(in_features, proj_rank, generator=g, device="cpu") / in_features**0.5
    return P, Q


@register_method
class LoRSA(SpectralDelta):
    name = "lorsa"
    Options = LoRSAOptions

    @classmethod
    def num_components(cls, cfg, out_features, in_features):
        # the same truncated SVD as importance scoring (same k -> same algorithm and cache entry)
        return min(cls.parse_options(cfg.options).k, out_features, in_features)

    def __init__(self, basis, weight, cfg, columns):
        super().__init__(basis, weight, cfg, columns)
        k = min(self.opts.k, self.out_features, self.in_features)
        if self.columns.numel() == 0 or int(self.columns.max()) >= k:
            raise ValueError(f"lorsa selects components among the top k={k}; got columns {self.columns.tolist()}"
                             " (raise options['k'] or lower band/rank)")
        self.register_basis(basis)
        n, rp = self.columns.numel(), self.opts.proj_rank
        P, Q = projections(self.opts.seed, self.out_features, self.in_features, rp)
        self.register_buffer("P", P.to(weight.device), persistent=False)  # (out, r_p)
        self.register_buffer("Q", Q.to(weight.device), persistent=False)  # (in, r_p)
        self.delta_sigma = nn.Parameter(torch.zeros(n, device=weight.device))  # Δσ (|S|,)
        self.p = nn.Parameter(torch.zeros(rp, n, device=weight.device))  # columns p_i (r_p, |S|)
        self.q = nn.Parameter(torch.zeros(rp, n, device=weight.device))  # columns q_i (r_p, |S|)

    def rotated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``U_S' = U_S + P p`` of shape ``(out, |S|)`` and ``V_S' = V_S + Q q`` of shape ``(in, |S|)``."""
        return self.U + self.P @ self.p, self.V + self.Q @ self.q

    def delta_weight(self, scale: float = 1.0) -> torch.Tensor:
        Up, Vp = self.rotated()
        return self.cfg.alpha * scale * ((Up * (self.S + self.delta_sigma)) @ Vp.T - (self.U * self.S) @ self.V.T)

    def core(self, scale: float = 1.0) -> torch.Tensor:
        """``M = α (G diag(σ+Δσ) Hᵀ − E diag(σ) Eᵀ)`` of shape ``(|S|+r_p, |S|+r_p)``."""
        n = self.columns.numel()
        eye = torch.eye(n, device=self.S.device)
        G = torch.cat([eye, self.p], dim=0)  # (|S|+r_p, |S|)
        H = torch.cat([eye, self.q], dim=0)  # (|S|+r_p, |S|)
        rp = self.opts.proj_rank
        M = (G * (self.S + self.delta_sigma)) @ H.T  # (|S|+r_p, |S|+r_p)
        return self.cfg.alpha * scale * (M - F.pad(torch.diag(self.S), (0, rp, 0, rp)))  # − E diag(σ) Eᵀ

    def factors(self, scale: float = 1.0):
        B = torch.cat([self.U, self.P], dim=1) @ self.core(scale)  # (out, |S|+r_p)
        A = torch.cat([self.V, self.Q], dim=1).T  # (|S|+r_p, in)
        return B, A

    #: columns of :meth:`factors` (the forward-form cost model reads it)
    factor_rank = property(lambda self: self.columns.numel() + self.opts.proj_rank)
