"""Per-layer composition of the closed-form modes, as exact low-rank factors.

``weights`` have **one meaning** in every mode: ``wᵢ`` is concept ``i``'s strength, so each concept
enters as its delta at that strength, ``ΔWᵢ(wᵢ) = delta(name, scale=wᵢ)`` (``alpha·wᵢ``: a multiple
of ΔW for linear methods and PEFT LoRA; ^R scales its Cayley generator). The modes then differ only
in how they combine these deltas (``N`` concepts):

==================  ======================================  =======================================
mode                fused ``W``                             notes
==================  ======================================  =======================================
``spectral``        ``W₀ + Σᵢ ΔWᵢ(wᵢ)``                     bands must be disjoint (checked); ^R:
                                                            every singular value of ``W₀`` is kept
``lora_sum``        ``W₀ + Σᵢ ΔWᵢ(wᵢ)``                     no band check; PEFT LoRA concepts too
``mean``            ``W₀ + (1/N) Σᵢ ΔWᵢ(wᵢ)``               official Spectral Adapter average
``weighted``        ``W₀ + Σᵢ ΔWᵢ(wᵢ) / Σⱼ wⱼ``             official weighted average (linear methods)
``least_squares``   see :mod:`fusion.record`                targets ``W₀ + ΔWᵢ(wᵢ)``
==================  ======================================  =======================================

Each closed-form mode is ``W₀ + B A`` with ``B = [c·B₁, c·B₂, …]``, ``A = [A₁; A₂; …]`` (the concepts'
exact factors at their strengths, ``c`` the mode's coefficient), so the fused adapter is exact.
In spectral mode a method that can hold the sum itself (:meth:`spectral_vision.SpectralDelta.concat`:
^R's block-diagonal rotations, ^A's side-by-side vectors) keeps its own parameterisation.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

import spectral_vision as sv

__all__ = ["CLOSED_FORM", "coefficient", "check_weights", "layer_factors", "dense_factors", "method_concat"]

CLOSED_FORM = ("spectral", "lora_sum", "mean", "weighted")


def check_weights(weights: Optional[Sequence[float]], n: int) -> list[float]:
    """Per-concept strengths (default 1 each): ``n`` finite numbers, else ``ValueError``."""
    if weights is None:
        return [1.0] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be numbers, got {list(weights)!r}") from None
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} concepts")
    bad = [x for x in w if not math.isfinite(x)]
    if bad:
        raise ValueError(f"weights must be finite numbers, got {w}")
    return w


def coefficient(mode: str, weights: Sequence[float]) -> float:
    """The factor ``c`` of the summed deltas in a closed-form mode (see the table above)."""
    if mode in ("spectral", "lora_sum"):
        return 1.0
    if mode == "mean":
        return 1.0 / len(weights)
    if mode == "weighted":
        total = float(sum(weights))
        if total == 0:
            raise ValueError("weighted mode needs weights with a non-zero sum")
        return 1.0 / total
    raise ValueError(f"mode {mode!r} has no closed form")


@torch.no_grad()
def layer_factors(handle, present: Sequence[str], strength: dict[str, float], c: float):
    """``(B (out, R), A (R, in))`` of ``c · Σᵢ ΔWᵢ(wᵢ)`` over the concepts ``present`` on one layer."""
    Bs, As = [], []
    for n in present:
        B, A = handle.factors(n, strength[n])
        Bs.append(c * B.float())
        As.append(A.float())
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def dense_factors(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a dense ``D (out, in)``: ``(I, D)`` or ``(D, I)``, rank ``min(out, in)``."""
    out_f, in_f = D.shape
    if out_f <= in_f:
        return torch.eye(out_f, dtype=D.dtype, device=D.device), D
    return D, torch.eye(in_f, dtype=D.dtype, device=D.device)


def method_concat(layers: Sequence[tuple], strength: dict[str, float]):
    """The spectral-mode fusion as one adapter of the concepts' own method, or ``None``.

    ``layers``: ``(spectral handle, concepts present)``. Returns ``(cfg, columns, states)`` for
    :meth:`fusion.backends.SpectralBackend.write_method` when every concept is an adapter of one
    method whose :meth:`~spectral_vision.SpectralDelta.concat` holds the sum on every layer with one alpha.
    """
    classes = {type(h.adapter(n)) for h, present in layers for n in present}
    if len(classes) != 1:
        return None
    cls = classes.pop()
    alphas, columns, states = set(), {}, {}
    for h, present in layers:
        got = cls.concat([h.adapter(n) for n in present], [strength[n] for n in present])
        if got is None:
            return None
        alphas.add(got[0])
        columns[h.name] = [c for n in present for c in h.columns(n)]
        states[h.name] = got[1]
    if len(alphas) != 1:
        return None
    c0 = layers[0][0].adapter(layers[0][1][0]).cfg
    same = {tuple(c) for c in columns.values()}
    cfg = sv.SpectralConfig(method=cls.name, rank=max(max(len(c) for c in columns.values()), 1), alpha=alphas.pop(),
                            columns=list(same.pop()) if len(same) == 1 else None, target_modules=c0.target_modules, options=dict(c0.options), svd=c0.svd,
                            svd_oversample=c0.svd_oversample, svd_power_iters=c0.svd_power_iters,
                            svd_cache=c0.svd_cache)
    return cfg, columns, states
