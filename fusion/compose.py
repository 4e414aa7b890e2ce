"""Spectral fusion as **one ordinary adapter**: the concatenation of the concepts' bands.

Concepts on disjoint bands compose exactly into a single adapter of the same method whose columns
are the concepts' columns one after the other (per layer), rank ``R = Σ rᵢ``:

* ^R (``spectral_r``): the fused rotation is block-diagonal, ``R_U = diag(R_U¹, R_U², …)``. The Cayley
  map of a block-diagonal skew matrix is the block-diagonal of the blocks' Cayley maps, so the
  fused skew parameters are the concepts' ones placed on the diagonal blocks, each multiplied by
  ``αᵢ·wᵢ`` (the fused adapter has ``alpha = 1``). Exact for any strengths ``wᵢ``.
* ^A (``spectral_a``): ``(U + A_U) Σ (V + A_V)ᵀ − U Σ Vᵀ`` is a sum over columns, so ``A_U``, ``A_V``
  are concatenated; exact when every concept has the same ``αᵢ·wᵢ`` (which becomes the fused
  ``alpha``); other strengths make the delta non-linear in the parameters and are refused (fuse into
  merged weights instead).

The fused adapter is saved with :func:`spectral_vision.save_adapter` and loads anywhere a concept
does. Its basis is recomputed from the base at load time: identical to the concepts' when their
SVD was exact (layers with min(out, in) ≤ 1024 under ``svd="auto"``, or ``svd="exact"``); with
randomized SVD it agrees to that algorithm's accuracy.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

import spectral_vision as sv

__all__ = ["fused_adapter", "COMPOSABLE"]

COMPOSABLE = ("spectral_r", "spectral_a")


def _block_skew(params: Sequence[torch.Tensor], sizes: Sequence[int], scales: Sequence[float]) -> torch.Tensor:
    """Skew parameters ``(R(R-1)/2,)`` of the block-diagonal generator (core's ``cayley`` layout)."""
    R = sum(sizes)
    T = torch.zeros(R, R)
    o = 0
    for p, r, s in zip(params, sizes, scales):
        iu = torch.triu_indices(r, r, offset=1)
        T[o + iu[0], o + iu[1]] = s * p.detach().float()
        o += r
    iu = torch.triu_indices(R, R, offset=1)
    return T[iu[0], iu[1]]


@torch.no_grad()
def fused_adapter(model: nn.Module, names: Sequence[str], weights: Optional[Sequence[float]] = None,
                  adapter_name: str = "fused") -> sv.SpectralConfig:
    """Add adapter ``adapter_name`` to ``model``: the exact composition of concepts ``names``.

    The concepts must be spectral_vision adapters of one method in :data:`COMPOSABLE`, on disjoint
    columns in every layer. Returns the fused adapter's config; save it with ``sv.save_adapter``.
    """
    from .bands import find_overlaps

    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    cfgs = [sv.adapter_config(model, n) for n in names]
    methods = {c.method for c in cfgs}
    if len(methods) != 1 or not methods <= set(COMPOSABLE):
        raise ValueError(f"one adapter can hold concepts of a single method in {COMPOSABLE}; got {sorted(methods)}")
    method = methods.pop()
    scales = [c.alpha * w for c, w in zip(cfgs, weights)]
    if method == "spectral_a" and len(set(scales)) > 1:
        raise ValueError(f"spectral_a concepts with different alpha*weight {scales} are not one adapter: "
                         "fuse them into merged weights (fusion.fuse) instead")
    layers = [(ln, l) for ln, l in sv.spectral_layers(model) if any(n in l.adapters for n in names)]
    cols = {n: {ln: l.adapters[n].columns.tolist() for ln, l in layers if n in l.adapters} for n in names}
    overlap = find_overlaps(cols)
    if not overlap.ok:
        raise ValueError("overlapping concepts cannot be composed into one adapter: " + overlap.explain())
    columns = {ln: [c for n in names if n in l.adapters for c in l.adapters[n].columns.tolist()] for ln, l in layers}
    same = {tuple(c) for c in columns.values()}
    cfg = sv.SpectralConfig(
        method=method, rank=max(len(c) for c in columns.values()), alpha=1.0 if method == "spectral_r" else scales[0],
        columns=list(same.pop()) if len(same) == 1 else None, target_modules=cfgs[0].target_modules,
        svd=cfgs[0].svd, svd_oversample=cfgs[0].svd_oversample, svd_power_iters=cfgs[0].svd_power_iters,
        svd_cache=cfgs[0].svd_cache)
    active = {ln: list(l.active_adapters) for ln, l in layers}
    sv.attach(model, cfg, adapter_name, columns=columns, progress=False)
    for ln, layer in layers:
        here = [(n, s) for n, s in zip(names, scales) if n in layer.adapters]
        ds = [layer.adapters[n] for n, _ in here]
        target = layer.adapters[adapter_name]
        if method == "spectral_r":
            sizes = [d.columns.numel() for d in ds]
            state = {"skew_U": _block_skew([d.skew_U for d in ds], sizes, [s for _, s in here]),
                     "skew_V": _block_skew([d.skew_V for d in ds], sizes, [s for _, s in here])}
        else:
            state = {"A_U": torch.cat([d.A_U for d in ds], dim=1), "A_V": torch.cat([d.A_V for d in ds], dim=1)}
        state["columns"] = target.columns
        target.load_state_dict(state, strict=True)
        layer.active_adapters = active[ln]
    return cfg
