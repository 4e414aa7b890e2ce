"""Layer-input statistics and Mix-of-Show-style least-squares fusion.

Mix-of-Show's "gradient fusion" finds, per layer, the weight that reproduces every concept's
single-concept outputs on that concept's own layer inputs ``Xᵢ (in, nᵢ)``::

    min_W  Σᵢ wᵢ ‖W Xᵢ − (W₀ + ΔWᵢ) Xᵢ‖²_F  +  λ ‖W − W₀‖²_F

(they run gradient steps; it is a linear least-squares problem, solved here exactly). Only the Gram
matrices ``Gᵢ = Xᵢ Xᵢᵀ (in, in)`` are needed, accumulated by forward hooks while concept ``i`` alone
is active on its own inputs (its prompts): the normal equations are
``W (Σᵢ wᵢGᵢ + λI) = Σᵢ wᵢ (W₀ + ΔWᵢ) Gᵢ + λ W₀``. The ridge pulls directions that no concept's
inputs visit back to the base weight; ``λ = ridge · tr(Σᵢ wᵢGᵢ) / in``. Concept weights ``wᵢ`` weight
each concept's term in the objective (a single weight of 0 drops it).

Convolutions use the im2col view: ``Xᵢ`` are the ``(cin·kh·kw)`` input patches (``F.unfold``), in
the core's reshape convention, so ``in`` can be large (a 3×3 conv with 1280 channels has in=11520
and a 530 MB Gram per concept): prefer attention-only targets for least_squares.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import spectral_vision as sv
from spectral_vision.layers import SpectralLayer

__all__ = ["record_grams", "least_squares_weights", "ls_objective", "default_run"]


def default_run(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for dicts, ``model(*batch)`` for tuples/lists, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as rows ``(n, in)`` in the core's ``W (out, in)`` convention."""
    base = layer.base_layer if isinstance(layer, SpectralLayer) else layer.get_base_layer()
    if isinstance(base, nn.Conv2d):
        cols = F.unfold(x, base.kernel_size, base.dilation, base.padding, base.stride)  # (B, cin*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B*L, cin*kh*kw)
    return x.reshape(-1, x.shape[-1])  # (..., in) -> (n, in)


def _activate(model: nn.Module, name: str) -> None:
    """Make concept ``name`` the only active adapter (spectral and PEFT layers)."""
    if name in sv.adapter_names(model):
        sv.set_adapter(model, name)
    else:
        for _, layer in sv.spectral_layers(model):
            layer.unmerge()
            layer.active_adapters = []
    from .fuse import _peft_layers

    for _, layer in _peft_layers(model):
        if name in layer.lora_A:
            layer.set_adapter(name)
            layer._disable_adapters = False
        else:
            layer._disable_adapters = True


@torch.no_grad()
def record_grams(
    model: nn.Module,
    names: Sequence[str],
    inputs: dict[str, Iterable],
    run_fn: Optional[Callable[[nn.Module, Any], Any]],
    layers: Sequence[nn.Module],
    progress: bool = True,
) -> dict[int, dict[str, torch.Tensor]]:
    """``{id(layer): {concept: G (in, in) fp32}}``: input Grams of ``layers`` with each concept alone active.

    Concept ``i`` runs ``inputs[i]`` (its own prompts/batches) through ``run_fn`` (default
    :func:`default_run`). The active adapters are restored afterwards.
    """
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"no inputs for concepts {missing}: pass inputs={{concept: batches}} for every concept")
    run_fn = run_fn or default_run
    saved = {id(l): list(l.active_adapters) for _, l in sv.spectral_layers(model)}
    grams: dict[int, dict[str, torch.Tensor]] = {id(l): {} for l in layers}
    current = {"name": None}

    def hook(layer, args):
        X = _patches(layer, args[0].detach()).float()  # (n, in)
        g = grams[id(layer)]
        c = current["name"]
        g[c] = g[c] + X.T @ X if c in g else X.T @ X  # (in, in)

    handles = [l.register_forward_pre_hook(hook) for l in layers]
    was_training = model.training
    model.eval()
    try:
        batches = [(n, b) for n in names for b in inputs[n]]
        for n, batch in tqdm(batches, desc="record layer inputs", disable=not progress):
            if current["name"] != n:
                _activate(model, n)
                current["name"] = n
            run_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
        for _, l in sv.spectral_layers(model):
            l.active_adapters = saved.get(id(l), l.active_adapters)
        model.train(was_training)
    return grams


def ls_objective(W: torch.Tensor, targets: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                 weights: Sequence[float]) -> float:
    """``Σᵢ wᵢ ‖(W − Wᵢ) Xᵢ‖²_F = Σᵢ wᵢ tr((W − Wᵢ) Gᵢ (W − Wᵢ)ᵀ)``."""
    total = 0.0
    for Wi, G, w in zip(targets, grams, weights):
        D = (W - Wi).double()  # (out, in)
        total += float(w) * float(((D @ G.double()) * D).sum())
    return total


@torch.no_grad()
def least_squares_weights(model, names, weights, grams, ridge, layers, progress=True):
    """Closed-form least-squares fusion of every layer in ``layers`` (from :func:`fuse.adapted_layers`).

    Returns ``(fused {layer: W (out, in) fp32}, info)`` with the summed objective of the fused and of
    the naive ``W₀ + Σ ΔWᵢ`` weights (``info["objective"]``, ``info["objective_naive_sum"]``).
    """
    from .fuse import _base_2d, concept_delta

    fused, obj, obj_sum = {}, 0.0, 0.0
    for lname, layer, present in tqdm(layers, desc="least-squares fusion", disable=not progress):
        W0 = _base_2d(layer)
        g = grams[id(layer)]
        terms = [(n, w) for n, w in zip(names, weights) if n in g and w != 0]
        if not terms:
            fused[lname] = W0
            continue
        deltas = {n: concept_delta(layer, n) if n in present else torch.zeros_like(W0) for n, _ in terms}
        targets = [W0 + deltas[n] for n, _ in terms]
        G = [g[n] for n, _ in terms]
        A = sum(w * Gi.double() for (_, w), Gi in zip(terms, G))  # (in, in)
        lam = ridge * float(torch.diagonal(A).mean()) + 1e-12
        rhs = sum(w * (Wi.double() @ Gi.double()) for (_, w), Wi, Gi in zip(terms, targets, G)) + lam * W0.double()
        A = A + lam * torch.eye(A.shape[0], dtype=A.dtype)
        W = torch.linalg.solve(A, rhs.T).T.float()  # A symmetric: W A = rhs  <=>  A Wᵀ = rhsᵀ
        fused[lname] = W
        ws = [w for _, w in terms]
        obj += ls_objective(W, targets, G, ws)
        obj_sum += ls_objective(W0 + sum(deltas.values()), targets, G, ws)
    return fused, {"objective": obj, "objective_naive_sum": obj_sum}
