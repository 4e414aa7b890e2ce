"""PEFT baselines (LoRA, DoRA, OFT, VeRA, PiSSA) behind the same call as the spectral methods.

Every comparison in this project is against the real implementation in 🤗 PEFT, not a copy::

    from spectral_vision.baselines import attach_adapter
    attach_adapter(model, "lora", rank=8, target_modules="timm_vit")        # PEFT LoRA, in place
    attach_adapter(model, "spectral_a", rank=8, target_modules="timm_vit")  # our method, same call

Adapters are injected **in place** (:func:`peft.inject_adapter_in_model`; for VeRA, whose
projections are shared state, the ``VeraModel`` tuner is built directly and only its mutated model
is kept), the base is frozen and only adapter parameters are trainable. Our target specs are
translated for PEFT: a preset name from :data:`spectral_vision.presets.PRESETS` becomes its regex
string (PEFT, like us, full-matches a string and suffix-matches a list).

What ``rank`` means per baseline:

=======  ===================================================================================
lora     LoRA rank ``r`` (``lora_alpha`` defaults to ``r``, so the scaling ``alpha/r`` is 1)
dora     LoRA rank ``r`` with ``use_dora=True`` (magnitude vector + LoRA direction)
pissa    LoRA rank ``r`` with ``init_lora_weights="pissa"`` (the top-``r`` SVD moves into A, B;
         **the base weight is replaced by the residual** ``W − U_r S_r V_rᵀ``, as in PEFT)
oft      ``oft_block_size`` (block-diagonal orthogonal blocks of that size; pass ``r=`` or
         ``oft_block_size=`` in ``peft_kwargs`` to override)
vera     VeRA rank ``r`` of the shared frozen random projections (trainable: two scaling vectors)
=======  ===================================================================================
"""
from __future__ import annotations

from typing import Optional, Union

from torch import nn

from .presets import PRESETS

__all__ = ["BASELINES", "is_peft_method", "peft_target_modules", "attach_peft", "attach_adapter", "peft_layers",
           "peft_adapter_names", "merge_peft", "unmerge_peft", "unload_peft"]

BASELINES = ("lora", "dora", "oft", "vera", "pissa")

TargetSpec = Union[str, list, tuple]


def is_peft_method(name: str) -> bool:
    """True if ``name`` is one of the PEFT baselines in :data:`BASELINES`."""
    return str(name).lower() in BASELINES


def peft_target_modules(spec: Optional[TargetSpec]):
    """Translate our target spec for PEFT: preset name -> its regex; regex strings and lists pass through."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return PRESETS[spec]["regex"] if spec in PRESETS else spec
    return list(spec)


def _peft_config(method: str, rank: int, targets, exclude, alpha: Optional[float], peft_kwargs: dict):
    import peft

    common = dict(target_modules=targets, **({"exclude_modules": exclude} if exclude is not None else {}))
    if method in ("lora", "dora", "pissa"):
        kw = dict(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=0.0, bias="none")
        if method == "dora":
            kw["use_dora"] = True
        if method == "pissa":
            kw["init_lora_weights"] = "pissa"
        return peft.LoraConfig(**{**kw, **common, **peft_kwargs})
    if alpha is not None:
        raise ValueError(f"{method} has no alpha (scaling); leave alpha=None")
    if method == "oft":
        kw = {} if ("r" in peft_kwargs or "oft_block_size" in peft_kwargs) else {"oft_block_size": rank, "r": 0}
        return peft.OFTConfig(**{**kw, **common, **peft_kwargs})
    if method == "vera":
        return peft.VeraConfig(**{"r": rank, **common, **peft_kwargs})
    raise ValueError(f"unknown PEFT baseline {method!r}; available: {list(BASELINES)}")


def attach_peft(
    model: nn.Module,
    method: str,
    rank: int,
    target_modules: TargetSpec,
    alpha: Optional[float] = None,
    adapter_name: str = "default",
    exclude_modules: Optional[TargetSpec] = None,
    **peft_kwargs,
) -> nn.Module:
    """Inject PEFT baseline ``method`` into ``model`` in place and freeze everything else.

    Args:
        model: any ``nn.Module`` (timm, diffusers, transformers, open_clip).
        method: one of :data:`BASELINES`.
        rank: see the module docstring (LoRA rank; OFT block size; VeRA rank).
        target_modules: preset name, regex (full match) or list of name suffixes.
        alpha: ``lora_alpha`` for lora/dora/pissa (default ``rank``); must be ``None`` for oft/vera.
        adapter_name: PEFT adapter name.
        exclude_modules: same syntax as ``target_modules``; matches are not adapted.
        peft_kwargs: extra fields for the PEFT config (``LoraConfig``/``OFTConfig``/``VeraConfig``),
            e.g. ``lora_dropout=0.1``, ``init_lora_weights="pissa_niter_4"``, ``d_initial=0.1``.

    Returns the same ``model``; its trainable parameters are exactly the new adapter's.
    """
    method = str(method).lower()
    if not is_peft_method(method):
        raise ValueError(f"unknown PEFT baseline {method!r}; available: {list(BASELINES)}")
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    import peft

    config = _peft_config(method, int(rank), peft_target_modules(target_modules), peft_target_modules(exclude_modules),
                          alpha, peft_kwargs)
    snapshot = _snapshot(model)
    try:
        _inject(model, method, config, adapter_name, target_modules)
    except Exception:
        _restore(model, snapshot, adapter_name)  # PEFT replaces modules one by one: never leave a half-modified model
        raise
    return model


def _snapshot(model: nn.Module) -> dict:
    """What :func:`_restore` needs: the module objects by name, the parameter data and requires_grad flags."""
    return {"modules": dict(model.named_modules()), "names": set(peft_adapter_names(model)),
            "params": {id(p): (p, p.data, p.requires_grad) for p in model.parameters()},
            "peft_config": getattr(model, "peft_config", None), "had_config": hasattr(model, "peft_config")}


def _restore(model: nn.Module, snap: dict, adapter_name: str) -> None:
    """Undo a failed injection: put every original module object back, restore parameter data and flags."""
    modules = snap["modules"]
    if adapter_name not in snap["names"]:  # layers that were PEFT layers already got one more adapter
        for _, m in peft_layers(model):
            if adapter_name in _layer_names(m):
                m.delete_adapter(adapter_name)
    for name, module in list(model.named_modules()):
        if name and name in modules and modules[name] is not module:
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, modules[name])
    for p, data, grad in snap["params"].values():
        if p.data is not data:
            p.data = data  # PiSSA replaces the base weight by its residual
        p.requires_grad_(grad)
    if snap["had_config"]:
        model.peft_config = snap["peft_config"]
    elif hasattr(model, "peft_config"):
        del model.peft_config


def _inject(model: nn.Module, method: str, config, adapter_name: str, target_modules) -> None:
    import peft

    if method == "vera":
        # VeRA keeps its random projections vera_A/vera_B on the tuner (shared state), which
        # inject_adapter_in_model refuses. Building the tuner mutates `model` in place; every VeRA
        # layer holds a reference to the shared projection BufferDicts, so the tuner object itself
        # is not needed afterwards (projections are regenerated from `projection_prng_key`).
        peft.VeraModel(model, config, adapter_name)
    else:
        peft.inject_adapter_in_model(config, model, adapter_name=adapter_name)
    from peft.tuners.tuners_utils import BaseTunerLayer

    own = set()
    for module in model.modules():  # adapter parameters: those the tuner layers keep per adapter name
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                sub = getattr(module, attr, None)
                if isinstance(sub, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in sub:
                    obj = sub[adapter_name]
                    own.update(id(p) for p in (obj.parameters() if isinstance(obj, nn.Module) else [obj]))
    if not own:
        raise ValueError(f"{method}: target_modules {target_modules!r} matched no layer PEFT can adapt")
    for p in model.parameters():
        p.requires_grad_(id(p) in own)


# ---- PEFT layers injected in place: names, merge, unload (used by spectral_vision.merge & co) -------------
def peft_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every PEFT tuner layer (LoRA, DoRA, OFT, VeRA, PiSSA) in ``model``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # peft not installed: no PEFT layer can exist
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _layer_names(m) -> list[str]:
    seen: dict[str, None] = {}
    for attr in m.adapter_layer_names:
        sub = getattr(m, attr, None)
        if isinstance(sub, (nn.ModuleDict, nn.ParameterDict)):
            seen.update(dict.fromkeys(sub.keys()))
    return list(seen)


def peft_adapter_names(model: nn.Module) -> list[str]:
    """Names of the PEFT adapters present in ``model`` (empty without PEFT layers)."""
    seen: dict[str, None] = {}
    for _, m in peft_layers(model):
        seen.update(dict.fromkeys(_layer_names(m)))
    return list(seen)


def merge_peft(model: nn.Module, adapter_names: Optional[list[str]] = None) -> int:
    """Merge PEFT adapters (default: the active ones) into the base weights; returns the number of layers."""
    layers = peft_layers(model)
    for _, m in layers:
        names = None if adapter_names is None else [n for n in adapter_names if n in _layer_names(m)]
        if names == []:
            continue
        m.merge(adapter_names=names)
    return len(layers)


def unmerge_peft(model: nn.Module) -> None:
    """Undo :func:`merge_peft` (PEFT subtracts the merged delta again)."""
    for _, m in peft_layers(model):
        if m.merged:
            m.unmerge()


def unload_peft(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every PEFT layer by its base layer, merging its active adapters first when ``merge``."""
    for name, m in peft_layers(model):
        if merge and not m.merged:
            m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
    if hasattr(model, "peft_config") and not peft_layers(model):
        del model.peft_config
    return model


def attach_adapter(model: nn.Module, method: str, rank: int, target_modules: TargetSpec, **kw) -> nn.Module:
    """One call for every method: spectral methods through :func:`spectral_vision.attach`, baselines through PEFT.

    ``kw`` for spectral methods: any :class:`~spectral_vision.SpectralConfig` field (``alpha``,
    ``band``, ``columns``, ``exclude_modules``, ``svd``, ``options``...) plus ``adapter_name``,
    ``layer_columns`` (per-layer singular indices, e.g. from importance scoring) and ``progress``.
    For baselines, ``kw`` goes to :func:`attach_peft`. Returns the same ``model``.
    """
    if is_peft_method(method):
        return attach_peft(model, method, rank, target_modules, **kw)
    from . import SpectralConfig, attach, available_methods

    if method not in available_methods():
        raise ValueError(f"unknown method {method!r}; spectral: {available_methods()}, PEFT: {list(BASELINES)}")
    attach_kw = {k: kw.pop(k) for k in ("adapter_name", "progress") if k in kw}
    layer_columns = kw.pop("layer_columns", None)
    cfg = SpectralConfig(method=method, rank=rank, target_modules=target_modules, **kw)
    return attach(model, cfg, columns=layer_columns, **attach_kw)
