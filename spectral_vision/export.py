"""Exact export of a spectral adapter to a standard LoRA file (PEFT/diffusers or kohya-ss keys).

Every method gives an exact factorisation ``ΔW = B A`` (``B (out, R)``, ``A (R, in)``, see
:meth:`SpectralDelta.factors`), so the adapter *is* a LoRA of rank ``R`` (Spectral Adapter^A:
``2r``, ^R: ``r``, ...) with scale 1. Exported tensors are these factors, reshaped to the LoRA
layout of the layer; nothing is approximated. Only when ``R`` exceeds ``min(out, in)`` (a
factorisation that is larger than the matrix) or exceeds a user ``max_rank`` is ``ΔW`` truncated
with the shared SVD (:func:`spectral_vision.decompose`) to that rank; the relative error
``‖ΔW − B'A'‖_F / ‖ΔW‖_F`` is then reported per layer and a warning is printed (for
``R > min(out, in)`` the truncation loses nothing and the error is at rounding level).

Layouts (``W`` convention of :mod:`spectral_vision.layers`):

=================  ==========================  ===========================
layer              ``lora_A`` / ``lora_down``  ``lora_B`` / ``lora_up``
=================  ==========================  ===========================
``nn.Linear``      ``(R, in)``                 ``(out, R)``
``Conv1D`` (GPT2)  ``(R, in)``                 ``(out, R)`` (PEFT: ``fan_in_fan_out=True``)
``nn.Conv2d``      ``(R, cin, kh, kw)``        ``(out, R, 1, 1)``
=================  ==========================  ===========================

Keys: PEFT/diffusers ``<prefix>.<module path>.lora_A.weight`` / ``.lora_B.weight`` (prefix
``unet`` / ``text_encoder``); kohya-ss ``lora_unet_<path with _>.lora_down.weight``,
``.lora_up.weight`` and ``.alpha``, text encoder ``lora_te_text_model_...``. kohya loaders scale
by ``alpha / rank``; diffusers reads a single ``alpha`` per component (its converter loses
per-module alphas), so in kohya files the rank is made uniform per component by zero-padding
``B`` and ``A`` (exact: the padded rows/columns contribute ``0``) and ``alpha = rank``.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .fileio import atomic_write
from .layers import SpectralLayer
from .model import adapter_config, spectral_layers
from .svd import decompose

__all__ = ["export_lora", "lora_factors", "FORMATS"]

FORMATS = ("peft", "kohya")
#: kohya-ss key prefixes of the Stable Diffusion components (others: ``lora_<name>``)
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


@torch.no_grad()
def lora_factors(layer: SpectralLayer, adapter_name: str = "default",
                 max_rank: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(B (out, R'), A (R', in), info)`` with ``B A = ΔW`` of ``adapter_name`` on ``layer``, fp32, CPU.

    ``R' = R`` (the method's exact factor rank) unless ``R > min(out, in)`` or ``R > max_rank``,
    in which case ``ΔW`` is truncated to ``R' = min(out, in, max_rank)`` singular triplets
    (split as ``B = U √S``, ``A = √S Vᵀ``). ``info``: ``factor_rank`` (R), ``rank`` (R'), ``exact``,
    ``truncated_to`` (``None`` or R'), ``rel_error`` (``‖ΔW − B A‖_F / ‖ΔW‖_F``, measured against
    :meth:`delta_weight` for every layer: rounding level when exact or when ``R' = min(out, in)``).
    """
    delta = layer.adapters[adapter_name]
    B, A = (t.detach().float().cpu() for t in delta.factors())  # (out, R), (R, in)
    dW = delta.delta_weight().detach().float().cpu()  # (out, in): the single source of truth
    out_f, in_f = dW.shape
    R = B.shape[1]
    limit = min(out_f, in_f) if max_rank is None else min(int(max_rank), out_f, in_f)
    exact = R <= limit
    if not exact:
        basis = decompose(dW, k=limit, cache=False)  # U (out, k), S (k,), V (in, k)
        root = basis.S.sqrt()
        B, A = basis.U * root, (basis.V * root).T  # (out, k), (k, in)
    norm = float(dW.norm())
    err = float((dW - B @ A).norm()) / norm if norm > 0 else 0.0
    return B.contiguous(), A.contiguous(), {"factor_rank": R, "rank": B.shape[1], "exact": exact,
                                            "truncated_to": None if exact else limit, "rel_error": err}


def _components(models, prefix: Optional[str]) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {"unet" if prefix is None else prefix: models}
    if isinstance(models, dict) and models and all(isinstance(m, nn.Module) for m in models.values()):
        if prefix is not None:
            raise ValueError("prefix= applies to a single module; the keys of the dict are the prefixes")
        return dict(models)
    raise TypeError("models must be an nn.Module or a non-empty dict {component name: nn.Module}")


def _holdings(comps: dict, prefix: Optional[str]) -> str:
    """What the given model(s) really hold, for the error message (never a component name the user did not pass)."""
    from .baselines import peft_adapter_names
    from .model import adapter_names

    def one(m):
        spectral, peft = adapter_names(m), peft_adapter_names(m)
        text = f"spectral adapters {spectral}"
        if peft:
            text += f", PEFT adapters {peft} (already LoRA-style: save them with peft's get_peft_model_state_dict)"
        return text

    if len(comps) == 1 and prefix is None:  # a bare module: no component name of ours in the message
        return f"the model ({type(next(iter(comps.values()))).__name__}) holds {one(next(iter(comps.values())))}"
    return "; ".join(f"component {c!r} ({type(m).__name__}) holds {one(m)}" for c, m in comps.items())


def _kohya_name(component: str, module: nn.Module, path: str) -> str:
    """kohya-ss module name; CLIP text encoders get the canonical ``text_model.`` root that SD tools expect
    (recent transformers flatten ``CLIPTextModel``; diffusers strips the root again for such models)."""
    if type(module).__name__.startswith("CLIPTextModel") and not hasattr(module, "text_model"):
        path = "text_model." + path
    head = KOHYA_PREFIX.get(component, f"lora_{component}" if component else "lora")
    return f"{head}_{path.replace('.', '_')}"


def _layout(layer: SpectralLayer, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA layout of the factors: conv ``A (R, in) -> (R, cin, kh, kw)``, ``B (out, R) -> (out, R, 1, 1)``."""
    if layer.kind == "conv2d":
        R = A.shape[0]
        return B[:, :, None, None], A.reshape(R, *layer.base_layer.weight.shape[1:])  # (out,R,1,1), (R,cin,kh,kw)
    return B, A  # linear and Conv1D: ΔW (out, in) = B A in both (PEFT transposes Conv1D itself)


def _pad(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``B (out, R)``, ``A (R, in)`` to ``rank`` (exact: ``B A`` is unchanged)."""
    extra = rank - B.shape[1]
    if extra <= 0:
        return B, A
    return torch.cat([B, B.new_zeros(B.shape[0], extra)], 1), torch.cat([A, A.new_zeros(extra, A.shape[1])], 0)


def export_lora(
    models: Union[nn.Module, dict],
    path: Union[str, Path],
    adapter_name: str = "default",
    format: str = "peft",
    prefix: Optional[str] = None,
    max_rank: Optional[int] = None,
    uniform_rank: Optional[bool] = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Write adapter ``adapter_name`` of ``models`` as one LoRA ``.safetensors`` file (atomically).

    Args:
        models: an ``nn.Module`` (component ``prefix``, default ``"unet"``; ``prefix=""`` for bare keys)
            or ``{"unet": unet, "text_encoder": text_encoder}`` (dict keys are the component prefixes).
        path: output file (parent folders are created).
        format: ``"peft"`` (diffusers/PEFT keys) or ``"kohya"`` (kohya-ss keys with ``.alpha``).
        max_rank: optional rank cap; layers above it are SVD-truncated and their error reported.
        uniform_rank: zero-pad ranks to the largest rank of each component (default: kohya only).
        dtype: dtype of the written tensors (factors are computed in fp32).

    Returns:
        ``{"path", "format", "adapter_name", "exact", "max_rel_error", "layers": {module key: {"component",
        "module", "kind", "shape", "factor_rank", "rank", "exact", "truncated_to", "rel_error"}}, "peft_config": {component:
        LoraConfig kwargs (r, lora_alpha, rank_pattern, alpha_pattern, target_modules, fan_in_fan_out)}}``.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    uniform_rank = (format == "kohya") if uniform_rank is None else uniform_rank
    comps = _components(models, prefix)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    peft_cfg: dict[str, dict] = {}
    source_cfg = None
    for comp, module in comps.items():
        found = [(n, l) for n, l in spectral_layers(module) if adapter_name in l.adapters]
        if not found:
            continue
        odd = [f"{n} ({type(l.base_layer).__name__})" for n, l in found if not l.geometry.plain_lora]
        if odd:  # grouped / "same"-padded / weight-standardised convs, attention in-projections
            raise ValueError(f"layers {odd[:5]} cannot be written as a standard LoRA (see docs/layers.md)")
        source_cfg = source_cfg or adapter_config(module, adapter_name).to_dict()
        facs = {n: (l, *lora_factors(l, adapter_name, max_rank)) for n, l in found}
        top = max(info["rank"] for _, _, _, info in facs.values())
        ranks = {}
        for name, (layer, B, A, info) in facs.items():
            if uniform_rank:
                B, A = _pad(B, A, top)
            up, down = _layout(layer, B, A)
            rank = up.shape[1]
            if format == "peft":
                key = f"{comp}.{name}" if comp else name
                tensors[f"{key}.lora_A.weight"] = down.to(dtype).contiguous()
                tensors[f"{key}.lora_B.weight"] = up.to(dtype).contiguous()
            else:
                key = _kohya_name(comp, module, name)
                tensors[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
                tensors[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
                tensors[f"{key}.alpha"] = torch.tensor(float(rank), dtype=dtype, device="cpu")  # alpha/rank = 1
            ranks[name] = rank
            layers[key] = {"component": comp, "module": name, "kind": layer.kind,
                           "shape": list(layer.weight_shape), **info, "rank": rank}
        r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
        pattern = {f"^{re.escape(n)}$": k for n, k in ranks.items() if k != r}
        peft_cfg[comp] = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                          "target_modules": sorted(ranks),
                          "fan_in_fan_out": any(facs[n][0].kind == "conv1d" for n in ranks)}
    if not layers:
        raise KeyError(f"export_lora: no adapter {adapter_name!r} to export; {_holdings(comps, prefix)}")

    lossy = {k: v for k, v in layers.items() if not v["exact"]}
    if lossy:
        worst = max(v["rel_error"] for v in lossy.values())
        warnings.warn(f"export_lora: {len(lossy)} layer(s) truncated by SVD to rank "
                      f"{sorted({v['truncated_to'] for v in lossy.values()})} (max relative error {worst:.3e}); "
                      f"see the returned report's 'layers'", stacklevel=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rank_pattern = {k: v["rank"] for k, v in layers.items()}
    metadata = {
        "format": "pt", "spectral_vision.version": __version__, "spectral_vision.export_format": format,
        "spectral_vision.adapter_name": adapter_name, "spectral_vision.rank_pattern": json.dumps(rank_pattern),
        "spectral_vision.adapter_config": json.dumps(source_cfg), "spectral_vision.peft_config": json.dumps(peft_cfg),
        "spectral_vision.max_rel_error": f"{max(v['rel_error'] for v in layers.values()):.3e}",
    }
    if format == "kohya":  # the fields kohya-ss / A1111 tools read
        dim = max(rank_pattern.values())
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(dim),
                         "ss_network_alpha": str(dim)})
    atomic_write(path, lambda f: save_file(tensors, f, metadata=metadata))
    return {"path": str(path), "format": format, "adapter_name": adapter_name, "exact": not lossy,
            "max_rel_error": max(v["rel_error"] for v in layers.values()), "layers": layers,
            "peft_config": peft_cfg}
