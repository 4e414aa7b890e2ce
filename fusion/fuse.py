"""Fusion of concept adapters into **one named adapter** (PEFT ``add_weighted_adapter`` style).

:func:`add_fused_adapter` puts adapter ``adapter_name`` on the model next to the concepts: in
spectral mode an adapter of the concepts' own method when it can hold the sum
(:meth:`spectral_vision.SpectralDelta.concat`), else a ``lowrank`` adapter (PEFT LoRA on PEFT
layers) holding the exact factors of the fused delta. :func:`fuse` then removes the concepts and
``merge_and_unload`` s the fused adapter: the one merge path of each backend. Modes and the one
meaning of ``weights`` (per-concept strength) are in :mod:`fusion.compose`; least squares in
:mod:`fusion.record`; the layer kinds in :mod:`fusion.backends`.

The official baseline also hard-codes the band when it converts concepts, so concepts 2..N land on
the wrong columns; here every delta is computed by the core from the columns stored in its own
adapter file.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

import spectral_vision as sv

from .backends import all_layers, backends
from .bands import OverlapReport, find_overlaps
from .compose import check_weights, coefficient, dense_factors, layer_factors, method_concat
from .metrics import InterferenceReport, interference
from .record import activate, least_squares_weights, record_grams

__all__ = ["MODES", "fuse", "add_fused_adapter", "FusionResult", "load_concepts", "is_finite_model"]

MODES = ("spectral", "mean", "weighted", "lora_sum", "least_squares")


@dataclass
class FusionResult:
    """What a fusion did. ``adapter``: the fused adapter's name (``None`` once merged and unloaded)."""

    model: nn.Module
    mode: str
    concepts: list[str]
    weights: list[float]  # per-concept strength wᵢ
    overlap: OverlapReport
    seconds: float  # wall time of the fusion (adapter loading excluded; least_squares: input recording included)
    layers: list[str] = field(default_factory=list)
    metrics: Optional[InterferenceReport] = None
    info: dict = field(default_factory=dict)  # method of the fused adapter, least-squares objective, ...
    adapter: Optional[str] = None


def _peft_names(model: nn.Module) -> list[str]:
    return [n for b in backends(model) if b.kind != "spectral" for n in b.adapter_names()]


def load_concepts(model: nn.Module, adapters: Sequence[Union[str, Path]], names: Optional[Sequence[str]] = None,
                  progress: bool = False) -> list[str]:
    """Put the concepts on ``model``; returns their adapter names.

    Each item is an adapter name already on the model (spectral or PEFT LoRA), or a folder: a
    ``spectral_vision`` adapter (:func:`spectral_vision.load_adapter`, with all its checks) or a PEFT
    LoRA folder (``adapter_config.json`` with ``"peft_type": "LORA"``). Folder concepts are named after
    the folder (``names`` overrides).
    """
    present = set(sv.adapter_names(model)) | set(_peft_names(model))
    out = []
    for i, item in enumerate(adapters):
        name = names[i] if names is not None else None
        if isinstance(item, str) and item in present and not Path(item).is_dir():
            out.append(item)  # already on the model: keeps its name
            continue
        path = Path(item)
        if not path.is_dir():
            raise FileNotFoundError(f"{item!r} is neither an adapter on the model ({sorted(present)}) nor a folder")
        name = name or path.name
        if name in out or name in present:
            raise ValueError(f"two concepts named {name!r}: pass distinct names")
        cfg_file = path / "adapter_config.json"
        try:
            meta = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise sv.AdapterFileError(f"{cfg_file}: not a JSON adapter config ({e})") from None
        if isinstance(meta, dict) and meta.get("peft_type"):
            _load_peft(model, path, name)
        else:
            sv.load_adapter(model, path, adapter_name=name, progress=progress)
        out.append(name)
    if len(set(out)) != len(out):
        raise ValueError(f"concepts must be distinct, got {out}")
    return out


def _load_peft(model: nn.Module, path: Path, name: str) -> None:
    """Inject a PEFT LoRA folder (``save_pretrained`` layout) into ``model`` as adapter ``name``."""
    import peft
    from safetensors.torch import load_file

    config = peft.PeftConfig.from_pretrained(str(path))
    if config.peft_type != peft.PeftType.LORA:
        raise ValueError(f"{path}: only PEFT LoRA concepts can be fused (got {config.peft_type})")
    peft.inject_adapter_in_model(config, model, adapter_name=name)
    peft.set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")), adapter_name=name)


def _columns(layers) -> dict[str, dict[str, list[int]]]:
    """``{concept: {layer: singular columns}}`` of the spectral concepts (the overlap check's input)."""
    cols: dict[str, dict[str, list[int]]] = {}
    for h, present in layers:
        for n in present:
            cols.setdefault(n, {})
            if h.kind == "spectral":
                cols[n][h.name] = h.columns(n)
    return cols


def _check_finite(factors: dict) -> None:
    for ln, (B, A) in factors.items():
        if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
            raise ValueError(f"fusion produced non-finite values on layer {ln}: a concept holds NaN/inf weights "
                             "or the strengths are too large; nothing was written")


def add_fused_adapter(
    model: nn.Module,
    adapters: Sequence[Union[str, Path]],
    weights: Optional[Sequence[float]] = None,
    mode: str = "spectral",
    adapter_name: str = "fused",
    allow_overlap: bool = False,
    names: Optional[Sequence[str]] = None,
    inputs: Optional[dict[str, Iterable]] = None,
    run_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    ridge: float = 1e-3,
    metrics: bool = False,
    progress: bool = True,
) -> FusionResult:
    """Add adapter ``adapter_name``: the fusion of concept ``adapters`` with ``mode``; it becomes the active one.

    Args:
        model: the base model (any ``nn.Module``; for a diffusers pipeline see :mod:`fusion.pipeline`).
        adapters: adapter folders or names of adapters already on the model (they stay on it).
        weights: per-concept strength ``wᵢ`` (default 1 each), one meaning in every mode (:mod:`fusion.compose`).
        allow_overlap: fuse concepts sharing singular columns in spectral mode (refused by default,
            with an explanation of which layers overlap).
        inputs: ``{concept: iterable of batches}`` each concept's own inputs (its prompts), required by
            ``least_squares`` and used by the interference metrics; ``run_fn(model, batch)`` runs one
            batch (default: ``model(**b)`` for dicts, ``model(*b)`` for tuples, else ``model(b)``).
        ridge: least_squares ridge, relative to the mean eigenvalue of the summed input Gram matrix.
        metrics: compute the interference report (:mod:`fusion.metrics`).
    Save the result with ``sv.save_adapter(model, path, adapter_name)`` (spectral layers).
    """
    if mode not in MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; available: {list(MODES)}")
    names = load_concepts(model, adapters, names, progress=progress)
    weights = check_weights(weights, len(names))
    if adapter_name in names or adapter_name in sv.adapter_names(model) + _peft_names(model):
        raise ValueError(f"adapter {adapter_name!r} already exists on the model: pick another adapter_name")
    layers = all_layers(model, names)
    cols = _columns(layers)
    overlap = find_overlaps({n: cols.get(n, {}) for n in names})
    if mode == "spectral":
        not_spectral = [n for n in names if not cols.get(n)]
        if not_spectral:
            raise ValueError(f"spectral mode needs spectral_vision adapters; {not_spectral} are not "
                             "(use mode='lora_sum' for PEFT LoRA concepts)")
        if not overlap.ok and not allow_overlap:
            raise ValueError("cannot fuse in spectral mode: " + overlap.explain())
    strength = dict(zip(names, weights))
    grams, info, t_rec = None, {}, 0.0
    if inputs is not None and (metrics or mode == "least_squares"):
        t_rec = time.perf_counter()
        grams = record_grams(model, names, inputs, run_fn, [h for h, _ in layers], progress=progress)
        t_rec = time.perf_counter() - t_rec
    t0 = time.perf_counter()
    if mode == "least_squares":
        if grams is None:
            raise ValueError("least_squares needs each concept's inputs: pass inputs={concept: batches}")
        deltas, info = least_squares_weights(layers, names, weights, grams, ridge, progress=progress)
        factors = {ln: dense_factors(D) for ln, D in deltas.items()}
    else:
        c = coefficient(mode, weights)
        factors = {h.name: layer_factors(h, present, strength, c)
                   for h, present in tqdm(layers, desc=f"fuse {mode}", disable=not progress or len(layers) < 8)}
    _check_finite(factors)
    concat = method_concat(layers, strength) if mode == "spectral" and overlap.ok else None
    kinds = {h.kind for h, _ in layers}
    targets = next((h.adapter(n).cfg.target_modules for h, p in layers if h.kind == "spectral" for n in p), None)
    for b in backends(model):
        if concat is not None and b.kind == "spectral":
            b.write_method(adapter_name, *concat)
        else:
            b.write(adapter_name, {h.name: factors[h.name] for h, _ in layers if h.kind == b.kind and h.name in factors},
                    targets)
    activate(model, [adapter_name])
    seconds = time.perf_counter() - t0 + (t_rec if mode == "least_squares" else 0.0)
    info.update(seconds_record=t_rec, fused_method=concat[0].method if concat else "lowrank", backends=sorted(kinds))
    report = None
    if metrics:
        report = interference(all_layers(model, names + [adapter_name]), names, weights, adapter_name, grams,
                              progress=progress)
    return FusionResult(model, mode, names, weights, overlap, seconds, list(factors), report, info, adapter_name)


def fuse(model: nn.Module, adapters: Sequence[Union[str, Path]], weights: Optional[Sequence[float]] = None,
         mode: str = "spectral", allow_overlap: bool = False, names: Optional[Sequence[str]] = None,
         inputs: Optional[dict[str, Iterable]] = None, run_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
         ridge: float = 1e-3, metrics: bool = False, unload: bool = True, progress: bool = True,
         adapter_name: str = "fused") -> FusionResult:
    """:func:`add_fused_adapter`, then (``unload=True``) remove the concepts and ``merge_and_unload`` the fused
    adapter: ``model`` becomes a plain model with the fused weights. ``unload=False`` keeps the concepts and
    the fused adapter (active) on the model, e.g. to save it or switch back to a single concept."""
    res = add_fused_adapter(model, adapters, weights, mode, adapter_name, allow_overlap, names, inputs, run_fn,
                            ridge, metrics, progress)
    if unload:
        for b in backends(model):
            b.remove(res.concepts)
            b.merge_and_unload(adapter_name)
        res.adapter = None
    return res


def is_finite_model(model: nn.Module) -> bool:
    """Whether every floating parameter and buffer of ``model`` is finite (checked before writing a fusion)."""
    return all(bool(torch.isfinite(t).all()) for t in list(model.parameters()) + list(model.buffers())
               if t.is_floating_point())

