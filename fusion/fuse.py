"""`fuse()`: one model from several concept adapters, five ways.

Notation, per adapted layer: ``W₀ (out, in)`` the base weight (reshape convention of
:mod:`spectral_vision.layers`), ``ΔWᵢ = Bᵢ Aᵢ`` concept ``i``'s delta (``SpectralDelta.delta_weight``),
``wᵢ`` its weight (``weights``, default 1), ``N`` the number of concepts.

==================  =============================================================================
mode                fused weight ``W``
==================  =============================================================================
``spectral``        ``W₀ + Σᵢ ΔWᵢ(wᵢ)``: each concept's own delta on its own (disjoint) band, with its
                    ``alpha`` multiplied by ``wᵢ``. For ^A (and every method whose alpha scales ΔW)
                    that is ``wᵢ·ΔWᵢ``; for ^R it scales the Cayley generator, ``R(wᵢ) = (I − wᵢαK)⁻¹
                    (I + wᵢαK)``, so the fused layer is ``W₀`` with its band columns rotated by the
                    block-diagonal ``diag(R₁, R₂, …)``: **every singular value of W₀ is kept**, and the
                    output projected on concept ``i``'s band (``UᵢUᵢᵀ W x``, ``Uᵢ`` its singular columns)
                    equals the single-concept model's, for every input. ``wᵢ = 0`` removes concept ``i``.
                    Overlapping bands are refused unless ``allow_overlap``.
``mean``            ``(1/N) Σᵢ (W₀ + ΔWᵢ) = W₀ + (1/N) Σᵢ ΔWᵢ``: the official Spectral Adapter code's
                    average of the concepts' merged weights (each delta diluted by 1/N); weights ignored.
``weighted``        ``Σᵢ wᵢ (W₀ + ΔWᵢ) / Σⱼ wⱼ``: the official weighted average.
``lora_sum``        ``W₀ + Σᵢ wᵢ ΔWᵢ`` (linear in wᵢ): plain summed adapters, e.g. PEFT LoRA concepts
                    (``get_delta_weight`` of peft's LoRA layers) or spectral ones.
``least_squares``   Mix-of-Show gradient fusion in closed form, see :mod:`fusion.record`.
==================  =============================================================================

The official baseline also hard-codes the band when it converts concepts, so concepts 2..N land on
the wrong columns; here every delta is computed by the core from the columns stored in its own
adapter file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

import spectral_vision as sv
from spectral_vision.layers import SpectralLayer

from .bands import OverlapReport, find_overlaps

__all__ = ["MODES", "fuse", "FusionResult", "load_concepts", "concept_factors", "concept_delta", "fused_weights",
           "write_weights"]

MODES = ("spectral", "mean", "weighted", "lora_sum", "least_squares")


@dataclass
class FusionResult:
    """What :func:`fuse` did. ``model`` holds the fused weights (merged into the base layers)."""

    model: nn.Module
    mode: str
    concepts: list[str]
    weights: list[float]
    overlap: OverlapReport
    seconds: float  # wall time of the fusion (adapter loading excluded; least_squares: input recording included)
    layers: list[str] = field(default_factory=list)
    metrics: Optional[Any] = None  # fusion.metrics.InterferenceReport when computed
    info: dict = field(default_factory=dict)  # mode-specific numbers (least squares objective, ...)


# ---- concepts -----------------------------------------------------------------------------------------
def _peft_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is optional
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _peft_names(model: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for _, m in _peft_layers(model):
        seen.update(dict.fromkeys(m.lora_A.keys()))
    return list(seen)


def load_concepts(model: nn.Module, adapters: Sequence[Union[str, Path]], names: Optional[Sequence[str]] = None,
                  progress: bool = False) -> list[str]:
    """Put the concepts on ``model``; returns their adapter names.

    Each item is an adapter name already on the model (spectral or PEFT LoRA), or a folder: a
    ``spectral_vision`` adapter (loaded with :func:`spectral_vision.load_adapter`) or a PEFT LoRA
    folder (``adapter_config.json`` with ``"peft_type": "LORA"``). Folder concepts are named after
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
        import json

        meta = json.loads((path / "adapter_config.json").read_text()) if (path / "adapter_config.json").exists() else {}
        if meta.get("peft_type"):
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


# ---- per-layer deltas -------------------------------------------------------------------------------
@contextlib.contextmanager
def _strength(delta: sv.SpectralDelta, w: float):
    """Temporarily multiply the adapter's ``alpha`` by ``w`` (its config object is not shared afterwards)."""
    cfg = delta.cfg
    delta.cfg = dataclasses.replace(cfg, alpha=cfg.alpha * float(w))
    try:
        yield delta
    finally:
        delta.cfg = cfg


@torch.no_grad()
def concept_factors(layer: nn.Module, name: str, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact low-rank factors ``(B (out, R), A (R, in))`` with ``B A = concept_delta(layer, name, strength)``.

    Spectral adapters: the method's ``factors()``; plain PEFT LoRA: ``(scaling·lora_B, lora_A)``.
    ``None`` when no exact factors exist (PEFT variants such as DoRA): use :func:`concept_delta`.
    """
    if isinstance(layer, SpectralLayer):
        with _strength(layer.adapters[name], strength) as d:
            return d.factors()
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False) \
            or not hasattr(layer.lora_A[name], "weight"):
        return None
    A = layer.lora_A[name].weight.float()
    A = A.reshape(A.shape[0], -1)  # (r, in[, kh, kw]) -> (r, in*kh*kw)
    B = layer.lora_B[name].weight.float()
    B = B.reshape(B.shape[0], -1)  # (out, r[, 1, 1]) -> (out, r)
    if B.shape[1] != A.shape[0] or getattr(layer, "fan_in_fan_out", False):
        return None
    return strength * layer.scaling[name] * B, A


@torch.no_grad()
def concept_delta(layer: nn.Module, name: str, strength: float = 1.0) -> torch.Tensor:
    """``ΔW (out, in)`` fp32 of concept ``name`` on ``layer`` at spectral-mode strength (alpha × strength).

    For a PEFT LoRA layer, ``strength`` multiplies ``get_delta_weight`` (reshaped to ``(out, in)``).
    """
    if isinstance(layer, SpectralLayer):
        with _strength(layer.adapters[name], strength) as d:
            return d.delta_weight()
    dw = layer.get_delta_weight(name).float()
    return strength * dw.reshape(dw.shape[0], -1)  # conv (out, cin, kh, kw) -> (out, cin*kh*kw)


def _base_2d(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, SpectralLayer):
        return layer.weight_2d()
    w = layer.get_base_layer().weight.detach().float()
    return w.reshape(w.shape[0], -1)  # (out, in*kh*kw)


def adapted_layers(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module, list[str]]]:
    """``(layer name, layer, concepts present on it)`` for every layer carrying one of ``names``."""
    out = []
    for n, layer in list(sv.spectral_layers(model)) + list(_peft_layers(model)):
        have = layer.adapters if isinstance(layer, SpectralLayer) else layer.lora_A
        present = [c for c in names if c in have]
        if present:
            out.append((n, layer, present))
    return out


def fused_weights(layer: nn.Module, names: Sequence[str], weights: Sequence[float], mode: str) -> torch.Tensor:
    """Fused ``W (out, in)`` fp32 of one layer for the closed-form modes (all but least_squares).

    ``names``/``weights``: all concepts of the fusion (those absent from this layer contribute 0;
    ``mean``/``weighted`` still count them in N / Σw, as averaging whole models does).
    """
    W = _base_2d(layer)
    have = layer.adapters if isinstance(layer, SpectralLayer) else layer.lora_A
    if mode == "spectral":
        coef = [(n, 1.0, w) for n, w in zip(names, weights)]  # (name, linear coefficient, strength)
    elif mode == "mean":
        coef = [(n, 1.0 / len(names), 1.0) for n in names]
    elif mode == "weighted":
        total = float(sum(weights))
        if total == 0:
            raise ValueError("weighted mode needs weights with a non-zero sum")
        coef = [(n, w / total, 1.0) for n, w in zip(names, weights)]
    elif mode == "lora_sum":
        coef = [(n, w, 1.0) for n, w in zip(names, weights)]
    else:
        raise ValueError(f"fused_weights has no closed form for mode {mode!r}")
    Bs, As = [], []
    for n, c, s in coef:
        if n not in have or c == 0:
            continue
        f = concept_factors(layer, n, s)
        if f is None:  # no exact factors: dense delta
            W = W + c * concept_delta(layer, n, s)
        else:
            Bs.append(c * f[0])
            As.append(f[1])
    if not Bs:
        return W.clone()
    return torch.addmm(W, torch.cat(Bs, dim=1), torch.cat(As, dim=0))  # W + Σ cᵢ Bᵢ Aᵢ in one pass


# ---- writing -------------------------------------------------------------------------------------------
@torch.no_grad()
def write_weights(model: nn.Module, fused: dict[str, torch.Tensor], names: Sequence[str], unload: bool) -> None:
    """Put fused ``W (out, in)`` into the layers.

    ``unload=True``: the concept adapters are removed and the fused weights written into the plain
    base modules (the model is an ordinary model again). ``unload=False``: the spectral wrappers
    stay with the concepts marked as merged, so ``sv.unmerge(model)`` restores the base exactly and
    ``sv.set_adapter(model, name)`` gives a single-concept model back.
    """
    peft = dict(_peft_layers(model))
    if unload:
        for n in names:
            if n in sv.adapter_names(model):
                sv.detach(model, n)
        for lname, layer in peft.items():  # PEFT LoRA layers: put the base module back
            parent, _, child = lname.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    for lname, W in fused.items():
        module = model.get_submodule(lname)
        if isinstance(module, SpectralLayer):
            module.set_merged_weight(W, [n for n in names if n in module.adapters])
            module.active_adapters = list(module.merged_adapters)
        elif lname in peft and not unload:
            w = peft[lname].get_base_layer().weight
            w.copy_(W.reshape(w.shape).to(w.dtype))  # (out, in) -> base layout
        else:
            w = module.weight
            layout = SpectralLayer(module).to_base_layout(W)  # the core's reshape convention (wrapper not kept)
            w.copy_(layout.to(w.dtype))


# ---- the entry point -------------------------------------------------------------------------------------
def fuse(
    model: nn.Module,
    adapters: Sequence[Union[str, Path]],
    weights: Optional[Sequence[float]] = None,
    mode: str = "spectral",
    allow_overlap: bool = False,
    names: Optional[Sequence[str]] = None,
    inputs: Optional[dict[str, Iterable]] = None,
    run_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    ridge: float = 1e-3,
    metrics: bool = False,
    unload: bool = True,
    progress: bool = True,
) -> FusionResult:
    """Fuse concept ``adapters`` into ``model`` (in place) with ``mode``; see the module docstring.

    Args:
        model: the base model (any ``nn.Module``; for a diffusers pipeline see :mod:`fusion.pipeline`).
        adapters: adapter folders or names of adapters already on the model.
        weights: per-concept weight ``wᵢ`` (default 1 each), meaning per mode as documented above.
        allow_overlap: fuse concepts sharing singular columns in spectral mode (refused by default,
            with an explanation of which layers overlap).
        inputs: ``{concept: iterable of batches}`` each concept's own inputs (its prompts), required by
            ``least_squares`` and used by the interference metrics; ``run_fn(model, batch)`` runs one
            batch (default: ``model(**b)`` for dicts, ``model(*b)`` for tuples, else ``model(b)``).
        ridge: least_squares ridge, relative to the mean eigenvalue of the summed input Gram matrix.
        metrics: compute the interference report (:mod:`fusion.metrics`) before unloading.
        unload: remove the adapters and leave a plain fused model (see :func:`write_weights`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; available: {list(MODES)}")
    names = load_concepts(model, adapters, names, progress=progress)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} concepts")
    cols = {n: {ln: layer.adapters[n].columns.tolist() for ln, layer in sv.spectral_layers(model) if n in layer.adapters}
            for n in names}
    overlap = find_overlaps(cols)
    if mode == "spectral":
        if not overlap.ok and not allow_overlap:
            raise ValueError("cannot fuse in spectral mode: " + overlap.explain())
        if any(not c for c in cols.values()):
            raise ValueError(f"spectral mode needs spectral_vision adapters; {[n for n, c in cols.items() if not c]} "
                             "are not (use mode='lora_sum' for PEFT LoRA concepts)")
    layers = adapted_layers(model, names)
    grams, info, t_rec = None, {}, 0.0
    if inputs is not None and (metrics or mode == "least_squares"):
        from .record import record_grams

        t_rec = time.perf_counter()
        grams = record_grams(model, names, inputs, run_fn, [l for _, l, _ in layers], progress=progress)
        t_rec = time.perf_counter() - t_rec
    t0 = time.perf_counter()
    if mode == "least_squares":
        from .record import least_squares_weights

        if grams is None:
            raise ValueError("least_squares needs each concept's inputs: pass inputs={concept: batches}")
        fused, info = least_squares_weights(model, names, weights, grams, ridge, layers, progress=progress)
    else:
        fused = {ln: fused_weights(layer, names, weights, mode)
                 for ln, layer, _ in tqdm(layers, desc=f"fuse {mode}", disable=not progress or len(layers) < 8)}
    seconds = time.perf_counter() - t0 + (t_rec if mode == "least_squares" else 0.0)
    info["seconds_record"] = t_rec
    report = None
    if metrics:
        from .metrics import interference

        report = interference(model, names, weights, fused, grams, progress=progress)
    write_weights(model, fused, names, unload)
    return FusionResult(model, mode, names, weights, overlap, seconds, list(fused), report, info)
