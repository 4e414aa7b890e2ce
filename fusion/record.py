"""Layer-input statistics and Mix-of-Show-style least-squares fusion.

Mix-of-Show's "gradient fusion" finds, per layer, the weight that reproduces every concept's
single-concept outputs on that concept's own layer inputs ``Xᵢ (in, nᵢ)``::

    min_W  Σᵢ ‖W Xᵢ − (W₀ + ΔWᵢ(wᵢ)) Xᵢ‖²_F  +  λ ‖W − W₀‖²_F

(they run gradient steps; it is a linear least-squares problem, solved here exactly). Only the Gram
matrices ``Gᵢ = Xᵢ Xᵢᵀ (in, in)`` are needed, accumulated by forward hooks while concept ``i`` alone
is active on its own inputs (its prompts): the normal equations are
``W (Σᵢ Gᵢ + λI) = Σᵢ (W₀ + ΔWᵢ(wᵢ)) Gᵢ + λ W₀``. The ridge pulls directions that no concept's
inputs visit back to the base weight; ``λ = ridge · tr(Σᵢ Gᵢ) / in``. Concept weights ``wᵢ`` are strengths,
as in every mode: the target of concept ``i`` is ``W₀ + ΔWᵢ(wᵢ)`` (``wᵢ = 0``: keep the base on its inputs).

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

from .backends import backends

__all__ = ["record_grams", "least_squares_weights", "ls_objective", "default_run"]


def default_run(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for dicts, ``model(*batch)`` for tuples/lists, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _patches(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as rows ``(n, in)`` in the core's ``W (out, in)`` convention."""
    if isinstance(base, nn.Conv2d):
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError(f"least_squares records im2col inputs of plain convolutions only, not {base}")
        cols = F.unfold(x, base.kernel_size, base.dilation, base.padding, base.stride)  # (B, cin*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B*L, cin*kh*kw)
    return x.reshape(-1, x.shape[-1])  # (..., in) -> (n, in)


def activate(model: nn.Module, names: Sequence[str]) -> None:
    """Only adapters ``names`` run, on every backend of ``model`` (spectral and PEFT layers)."""
    for b in backends(model):
        b.activate(names)


@torch.no_grad()
def record_grams(
    model: nn.Module,
    names: Sequence[str],
    inputs: dict[str, Iterable],
    run_fn: Optional[Callable[[nn.Module, Any], Any]],
    handles: Sequence,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer name: {concept: G (in, in) fp32}}``: input Grams of the layers of ``handles`` (from
    :func:`fusion.backends.all_layers`) with each concept alone active.

    Concept ``i`` runs ``inputs[i]`` (its own prompts/batches) through ``run_fn`` (default
    :func:`default_run`). Afterwards the last concept is the active adapter: the caller activates what it needs.
    """
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"no inputs for concepts {missing}: pass inputs={{concept: batches}} for every concept")
    run_fn = run_fn or default_run
    grams: dict[str, dict[str, torch.Tensor]] = {h.name: {} for h in handles}
    current = {"name": None}

    def hook_for(h):
        def hook(module, args):
            X = _patches(h.base_layer, args[0].detach()).float()  # (n, in)
            g, c = grams[h.name], current["name"]
            g[c] = g[c] + X.T @ X if c in g else X.T @ X  # (in, in)
        return hook

    handles_ = [h.module.register_forward_pre_hook(hook_for(h)) for h in handles]
    was_training = model.training
    model.eval()
    try:
        batches = [(n, b) for n in names for b in inputs[n]]
        for n, batch in tqdm(batches, desc="record layer inputs", disable=not progress):
            if current["name"] != n:
                activate(model, [n])
                current["name"] = n
            run_fn(model, batch)
    finally:
        for hd in handles_:
            hd.remove()
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
def least_squares_weights(layers, names, weights, grams, ridge, progress=True):
    """Closed-form least-squares fusion of ``layers`` (``(handle, concepts present)`` pairs).

    The target of concept ``i`` is ``W₀ + ΔWᵢ(wᵢ)`` (its delta at strength ``wᵢ``, as in every mode); each
    concept's term has weight 1. Returns ``({layer: ΔW (out, in) fp32}, info)``: the fused deltas from ``W₀``
    and the summed objective of the fused and of the naive ``W₀ + Σ ΔWᵢ(wᵢ)`` weights
    (``info["objective"]``, ``info["objective_naive_sum"]``).
    """
    strength = dict(zip(names, weights))
    deltas, obj, obj_sum = {}, 0.0, 0.0
    for h, present in tqdm(layers, desc="least-squares fusion", disable=not progress):
        g = grams[h.name]
        terms = [n for n in names if n in g]
        if not terms:
            continue
        W0 = h.base_2d()
        ds = {n: h.delta(n, strength[n]).float() if n in present else torch.zeros_like(W0) for n in terms}
        targets = [W0 + ds[n] for n in terms]
        G = [g[n] for n in terms]
        A = sum(Gi.double() for Gi in G)  # (in, in)
        lam = ridge * float(torch.diagonal(A).mean()) + 1e-12
        rhs = sum(Wi.double() @ Gi.double() for Wi, Gi in zip(targets, G)) + lam * W0.double()
        A = A + lam * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        W = torch.linalg.solve(A, rhs.T).T.float()  # A symmetric: W A = rhs  <=>  A Wᵀ = rhsᵀ
        deltas[h.name] = W - W0
        ones = [1.0] * len(terms)
        obj += ls_objective(W, targets, G, ones)
        obj_sum += ls_objective(W0 + sum(ds.values()), targets, G, ones)
    return deltas, {"objective": obj, "objective_naive_sum": obj_sum}
