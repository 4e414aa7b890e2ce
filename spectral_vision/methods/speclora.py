"""SpecLoRA (paper 001, sec. 4, eq. 7-8): LoRA plus a learnable spectral modulation mask.

For ``W (out, in)``::

    W' = (Γ ⊙ W) + s · B A,      s = lora_alpha / r

``Γ (out, in)`` is eq. 8's mask: its top-left ``k × k`` block holds ``k`` copies of the learnable
vector ``d (k,)`` as columns (``Γ[i, j] = d_i`` for ``i, j < k``), ones elsewhere. ``d`` starts at
ones, ``A (r, in)`` is Kaiming-uniform and ``B (out, r)`` is zero (PEFT's LoRA init, PEFT's naming:
``lora_A`` acts on the input), so ``W' = W`` at step 0. ``α`` (``cfg.alpha``) scales the whole ΔW.

**Literal reading of eq. 8.** Γ ⊙ W rescales the entries of the *first k rows and first k columns*
of the weight as stored (in our ``(out, in)`` convention: output rows ``0..k-1``, input columns
``0..k-1``; for convolutions the first ``k`` entries of the flattened ``cin·kh·kw`` axis). This is
what the paper implements (eq. 7-8, "avoids direct SVD computation"); it is not the same as
rescaling the first rows of ``U₁:ₖ`` in eq. 4-6. So SpecLoRA needs no singular vectors: it asks
the core for a single triplet (only the base fingerprint uses it), registers no basis and uses no
singular ``columns`` (the ``columns`` buffer is empty; it never overlaps a spectral band).

With ``Wₖ = W[:k, :k]`` (kept as a non-persistent buffer, recomputed from the base at load time)::

    ΔW = α ( pad(diag(d − 1) Wₖ) + s B A )

Exact factorisation of rank ``k + r``: ``B' = α [E diag(d − 1), s B]`` with ``E (out, k)`` the first
``k`` unit vectors, ``A' = [Wₖ 0; A]``. Parameters per layer: ``k + r (in + out)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import SpectralDelta, register_method


@dataclass
class SpecLoRAOptions:
    k: int = 32  # size of the modulated top-left block (paper: 32 for vision, 200 for NLU / LLMs)
    lora_alpha: Optional[float] = None  # LoRA scaling numerator; default r (scaling 1)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"speclora option k must be >= 1, got {self.k}")


@register_method
class SpecLoRA(SpectralDelta):
    name = "speclora"
    Options = SpecLoRAOptions

    @classmethod
    def num_components(cls, cfg, out_features, in_features):
        return 1  # only for the base fingerprint: Γ ⊙ W needs no SVD

    @classmethod
    def default_columns(cls, cfg, out_features, in_features):
        return []  # no singular columns: fuses with any band

    def __init__(self, basis, weight, cfg, columns):
        super().__init__(basis, weight, cfg, columns)
        if self.columns.numel():
            raise ValueError(f"speclora uses no singular columns, got {self.columns.tolist()}")
        r = cfg.rank
        self.k = min(self.opts.k, self.out_features, self.in_features)
        self.scaling = (r if self.opts.lora_alpha is None else self.opts.lora_alpha) / r
        self.register_buffer("W_k", weight[: self.k, : self.k].detach().float().clone(), persistent=False)  # (k, k)
        self.d = nn.Parameter(torch.ones(self.k, device=weight.device))  # (k,)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=weight.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT's LoRA

    def gamma(self) -> torch.Tensor:
        """The mask ``Γ (out, in)`` of eq. 8 (for reference and tests; the forward never builds it)."""
        G = torch.ones(self.out_features, self.in_features, device=self.d.device)
        G[: self.k, : self.k] = self.d[:, None].expand(self.k, self.k)  # Γ[i, j] = d_i, i, j < k
        return G

    def delta_weight(self, scale: float = 1.0) -> torch.Tensor:
        block = (self.d - 1)[:, None] * self.W_k  # (k, k): (Γ − 1) ⊙ W on the top-left block
        pad = (0, self.in_features - self.k, 0, self.out_features - self.k)
        return self.cfg.alpha * scale * (F.pad(block, pad) + self.scaling * self.lora_B @ self.lora_A)

    def forward_linear(self, x):
        """Exact fast path: the mask term touches only ``x[..., :k]`` and output rows ``:k``."""
        a, dt = self.cfg.alpha, x.dtype
        top = F.linear(x[..., : self.k], (a * (self.d - 1)[:, None] * self.W_k).to(dt))  # (..., k)
        lora = F.linear(F.linear(x, self.lora_A.to(dt)), ((a * self.scaling) * self.lora_B).to(dt))  # (..., out)
        return lora + F.pad(top, (0, self.out_features - self.k))

    def factors(self, scale: float = 1.0):
        a = self.cfg.alpha * scale
        E = F.pad(torch.diag(a * (self.d - 1)), (0, 0, 0, self.out_features - self.k))  # (out, k)
        B = torch.cat([E, (a * self.scaling) * self.lora_B], dim=1)  # (out, k + r)
        A = torch.cat([F.pad(self.W_k, (0, self.in_features - self.k)), self.lora_A], dim=0)  # (k + r, in)
        return B, A

    #: columns of :meth:`factors` (the forward-form cost model reads it)
    factor_rank = property(lambda self: self.k + self.lora_A.shape[0])
