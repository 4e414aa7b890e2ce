"""Fisher spectral importance scoring (LoRSA, paper 000 sec. 3.3): which singular triplets to adapt.

For each target layer with top-``k`` SVD ``W = Σ σ_i u_i v_iᵀ`` (the ``(out, in)`` layout of
:mod:`spectral_vision.geometry`)::

    ∂L/∂σ_i = u_iᵀ (∂L/∂W) v_i          I_i = σ_i² · E_x[(∂L/∂σ_i)²]

The expectation is over the calibration samples: each loader batch is split into micro-batches of
``micro_batch`` samples (default 1: the exact per-sample Fisher), with one forward/backward pass
per micro-batch, and the squared σ-gradients are averaged over micro-batches. With
``micro_batch > 1`` each term is the squared gradient of the micro-batch loss, a cheaper estimate
that averages out per-sample noise before squaring (rankings usually agree; values are smaller).
Only the target weights get gradients; nothing else in the model changes.

    scores = score_importance(model, loader, loss_fn, num_samples=256, k=256, target_modules="timm_vit")
    cfg = SpectralConfig(method="lorsa", rank=8, target_modules="timm_vit")
    attach(model, cfg, columns=select_components(scores, cfg.rank))
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .geometry import geometry_for, layer_kind
from .layers import SpectralLayer
from .presets import match_targets
from .svd import decompose

__all__ = ["score_importance", "select_components"]


def _split(batch: Any, size: int) -> list:
    """Split a tensor / tuple / list / dict batch along dim 0 into chunks of ``size``."""
    if torch.is_tensor(batch):
        return list(batch.split(size))
    if isinstance(batch, (tuple, list)):
        parts = [_split(b, size) for b in batch]
        return [type(batch)(p) for p in zip(*parts)]
    if isinstance(batch, dict):
        parts = {k: _split(v, size) for k, v in batch.items()}
        return [dict(zip(parts, p)) for p in zip(*parts.values())]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}: use tensors, tuples, lists or dicts")


def _batch_size(batch: Any) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch
    return _batch_size(next(iter(items)))


def score_importance(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    num_samples: int = 256,
    k: int = 256,
    target_modules="timm_vit",
    exclude_modules=None,
    micro_batch: int = 1,
    svd: str = "auto",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Fisher spectral importance ``I (k_layer,)`` of the top-``k`` triplets of every target layer.

    Args:
        model: the base model (layers already wrapped by :class:`SpectralLayer` are scored on
            their base weight, under the wrapper's name).
        loader: iterable of batches (tensor, tuple/list or dict of tensors, batch along dim 0).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (mean over the batch's samples).
        num_samples: calibration samples to use (stops after that many; fewer if the loader ends).
        k: triplets per layer, capped at ``min(out, in)``; use the same ``k`` as LoRSA's
            ``options["k"]`` so both use the same (cached) decomposition.
        target_modules, exclude_modules: as in :class:`~spectral_vision.SpectralConfig`.
        micro_batch: samples per forward/backward pass (1 = per-sample Fisher).
        svd: decomposition algorithm, as ``SpectralConfig.svd``.

    Returns ``{layer name: I (k_layer,)}`` (float32, CPU), ``I_i = σ_i² E[(u_iᵀ ∂L/∂W v_i)²]``.
    """
    if num_samples < 1 or micro_batch < 1:
        raise ValueError(f"num_samples and micro_batch must be >= 1, got {num_samples}, {micro_batch}")
    names = match_targets(model, target_modules, exclude_modules,
                          lambda m: isinstance(m, SpectralLayer) or layer_kind(m) is not None)
    names = [n for n in names if not n.endswith(".base_layer")]
    layers = {}  # name -> geometry of the base layer (the 2-D layout of its weight and of the weight's gradient)
    for n in names:
        m = model.get_submodule(n)
        layers[n] = geometry_for(m.base_layer if isinstance(m, SpectralLayer) else m)
    bases, sq = {}, {}
    for n, g in layers.items():
        W = g.to_2d()  # (out, in) fp32
        bases[n] = decompose(W, min(k, *W.shape), svd)
        sq[n] = torch.zeros(bases[n].k, device=W.device)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for g in layers.values():
        g.weight.requires_grad_(True)
    seen = steps = 0
    try:
        with tqdm(total=num_samples, desc="importance", disable=not progress) as bar:
            for batch in loader:
                for mb in _split(batch, micro_batch):
                    if seen >= num_samples:
                        break
                    mb = _split(mb, num_samples - seen)[0]  # do not overshoot num_samples
                    for g in layers.values():
                        g.weight.grad = None
                    loss_fn(model, mb).backward()
                    for n, g in layers.items():
                        b = bases[n]
                        G = g.to_2d(g.weight.grad)  # ∂L/∂W (out, in) fp32
                        g_sigma = ((G @ b.V) * b.U).sum(0)  # (k,) u_iᵀ G v_i
                        sq[n] += g_sigma.square()
                    steps += 1
                    seen += _batch_size(mb)
                    bar.update(_batch_size(mb))
                if seen >= num_samples:
                    break
    finally:
        for g in layers.values():
            g.weight.grad = None
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
    if steps == 0:
        raise ValueError("the calibration loader yielded no samples")
    return {n: (bases[n].S.square() * sq[n] / steps).cpu() for n in layers}


def select_components(scores: dict[str, torch.Tensor], n: int) -> dict[str, list[int]]:
    """The ``n`` highest-scoring triplet indices per layer, in ascending index order.

    The result is the ``columns`` argument of :func:`spectral_vision.attach`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = {}
    for name, s in scores.items():
        if s.numel() < n:
            raise ValueError(f"layer {name!r} has only {s.numel()} scored components, cannot select {n}")
        out[name] = sorted(torch.topk(s, n).indices.tolist())
    return out
