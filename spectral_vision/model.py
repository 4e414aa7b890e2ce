"""Model-level API: attach/detach adapters by target pattern, switch, merge, count parameters.

All state lives in the :class:`~spectral_vision.layers.SpectralLayer` wrappers, so these
functions work on any ``nn.Module`` (including ones wrapped by DDP/accelerate) by walking its
modules.
"""
from __future__ import annotations

import warnings
from typing import Iterator, NamedTuple, Optional, Union

from torch import nn
from tqdm.auto import tqdm

from .config import SpectralConfig
from .layers import SpectralLayer, layer_kind
from .methods.base import get_method
from .presets import match_targets

__all__ = [
    "attach", "detach", "set_adapter", "enable_adapters", "disable_adapters", "merge", "unmerge",
    "merge_and_unload", "spectral_layers", "adapter_names", "adapter_config", "trainable_parameters",
    "ParamCount", "check_adapter_name",
]


def check_adapter_name(name) -> str:
    """An adapter name is a non-empty str usable as a module key and a folder name (no ``.``, ``/``, ``\\``)."""
    if not isinstance(name, str) or not name or len(name) > 128:
        raise TypeError(f"adapter name must be a non-empty str (<= 128 chars), got {name!r}")
    if any(c in name for c in "./\\\0") or name.startswith("-"):
        raise ValueError(f"adapter name {name!r} may not contain '.', '/', '\\' or NUL (it names modules and folders)")
    return name


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def spectral_layers(model: nn.Module) -> Iterator[tuple[str, SpectralLayer]]:
    """``(qualified name, layer)`` for every wrapped layer; names are those of the base model."""
    for name, module in model.named_modules():
        if isinstance(module, SpectralLayer):
            yield name, module


def _names(model: nn.Module) -> list[str]:
    return adapter_names(model)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present on the model, in insertion order."""
    seen: dict[str, None] = {}
    for _, layer in spectral_layers(model):
        seen.update(dict.fromkeys(layer.adapters))
    return list(seen)


def adapter_config(model: nn.Module, adapter_name: str = "default") -> SpectralConfig:
    """The :class:`SpectralConfig` adapter ``adapter_name`` was attached with."""
    for _, layer in spectral_layers(model):
        if adapter_name in layer.adapters:
            return layer.adapters[adapter_name].cfg
    raise KeyError(f"no adapter {adapter_name!r} on this model; it holds {adapter_names(model)}")


def attach(
    model: nn.Module,
    cfg: SpectralConfig,
    adapter_name: str = "default",
    columns: Optional[dict[str, list[int]]] = None,
    progress: bool = True,
) -> nn.Module:
    """Add adapter ``adapter_name`` to every layer matched by ``cfg.target_modules``, in place.

    Matched ``nn.Linear`` / ``nn.Conv2d`` / ``Conv1D`` layers are replaced by
    :class:`SpectralLayer` wrappers (a layer already wrapped gets one more adapter). All base
    parameters are frozen; the new adapter becomes active and trainable (with any adapters that
    were already active). ``columns`` optionally gives singular indices per layer name (used by
    :func:`load_adapter` and importance scoring). On any error nothing is left changed.

    Returns the same ``model``.
    """
    get_method(cfg.method)  # fail early on an unknown method
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another adapter_name or detach it")

    # nn.MultiheadAttention reads out_proj.weight directly and never calls its forward: not adaptable
    mha_owned = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
                 if isinstance(m, nn.MultiheadAttention)}

    def supported(m):
        return isinstance(m, SpectralLayer) or layer_kind(m) is not None

    def adaptable(name, m):
        return supported(m) and name not in mha_owned

    if columns is not None:  # exact layer names (load_adapter, importance scoring)
        names = list(columns)
        present = dict(model.named_modules())
        bad = [n for n in names if n not in present or not adaptable(n, present[n])]
        if bad:
            raise ValueError(f"layers {bad[:5]} are not adaptable layers of {type(model).__name__} "
                             f"(is this the base model the adapter was trained on?)")
    else:
        names = match_targets(model, cfg.target_modules, cfg.exclude_modules, supported)
        skipped = [n for n in names if n in mha_owned]
        names = [n for n in names if not n.endswith(".base_layer") and n not in mha_owned]
        if skipped and not names:
            raise ValueError(f"{skipped[:3]} belong to nn.MultiheadAttention, whose forward uses the weight "
                             "directly; target the attention module itself (its in-projection) or the MLP instead")
        if skipped:
            warnings.warn(f"skipped {len(skipped)} out_proj layers inside nn.MultiheadAttention (its forward reads "
                          f"the weight directly): {skipped}", stacklevel=2)
    added: list[tuple[str, SpectralLayer, bool]] = []
    try:
        for name in tqdm(names, desc=f"attach {cfg.method}", disable=not progress or len(names) < 8):
            module = model.get_submodule(name)
            wrapped = isinstance(module, SpectralLayer)
            try:
                layer = module if wrapped else SpectralLayer(module)  # TypeError for an unsupported subclass
                layer.add_adapter(adapter_name, cfg, None if columns is None else columns[name])
            except Exception as e:
                raise type(e)(f"layer {name!r}: {e}") from e
            if not wrapped:
                _set_module(model, name, layer)
            added.append((name, layer, wrapped))
    except Exception:
        for name, layer, wrapped in reversed(added):  # roll back: the model is as it was
            if wrapped:
                layer.remove_adapter(adapter_name)
            else:
                _set_module(model, name, layer.base_layer)
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    _refresh_trainable(model)
    return model


def _refresh_trainable(model: nn.Module) -> None:
    """Only the parameters of active adapters require grad."""
    for _, layer in spectral_layers(model):
        for name, delta in layer.adapters.items():
            for p in delta.parameters():
                p.requires_grad_(name in layer.active_adapters)


def detach(model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
    """Remove adapter ``adapter_name`` (default: all adapters, restoring the original modules).

    Layers are restored bit for bit (the base module object itself is put back); other adapters of a
    layer stay as they were (merged ones stay merged unless ``adapter_name`` itself was merged).
    """
    for name, layer in list(spectral_layers(model)):
        if adapter_name is not None and adapter_name not in layer.adapters:
            continue
        if adapter_name is not None:
            layer.remove_adapter(adapter_name)  # unmerges only if this adapter was merged
        if adapter_name is None or not layer.adapters:
            layer.unmerge()
            _set_module(model, name, layer.base_layer)
    return model


def set_adapter(model: nn.Module, adapter_name: Union[str, list[str]]) -> None:
    """Make ``adapter_name`` (or several names, summed) the active, trainable adapter(s)."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    missing = set(names) - set(adapter_names(model))
    if missing:
        raise KeyError(f"no adapter(s) {sorted(missing)}; this model holds {adapter_names(model)}")
    for _, layer in spectral_layers(model):
        if layer.merged_adapters:
            layer.unmerge()
        layer.active_adapters = [n for n in names if n in layer.adapters]
    _refresh_trainable(model)


def enable_adapters(model: nn.Module) -> None:
    """Use the active adapters again after :func:`disable_adapters`."""
    for _, layer in spectral_layers(model):
        layer.disabled = False


def disable_adapters(model: nn.Module) -> None:
    """Run the base model only (merged layers are unmerged)."""
    for _, layer in spectral_layers(model):
        layer.unmerge()
        layer.disabled = True


def _peft():
    from . import baselines

    return baselines


def merge(model: nn.Module, adapter_names: Optional[list[str]] = None) -> None:
    """Fold the active adapters (or ``adapter_names``) into the base weights for inference.

    Works on spectral adapters and on PEFT baselines injected by :mod:`spectral_vision.baselines`.
    Raises ``ValueError`` if the model holds no adapter at all, ``KeyError`` for an unknown name
    (never a silent no-op).
    """
    spectral, peft_names = _names(model), _peft().peft_adapter_names(model)
    if not spectral and not peft_names:
        raise ValueError(f"merge: {type(model).__name__} holds no adapter (spectral or PEFT)")
    if adapter_names is not None:
        unknown = sorted(set(adapter_names) - set(spectral) - set(peft_names))
        if unknown:
            raise KeyError(f"merge: no adapter(s) {unknown}; this model holds spectral {spectral}, PEFT {peft_names}")
    for _, layer in spectral_layers(model):
        names = None if adapter_names is None else [n for n in adapter_names if n in layer.adapters]
        layer.merge(names)
    if peft_names:
        _peft().merge_peft(model, None if adapter_names is None else [n for n in adapter_names if n in peft_names])


def unmerge(model: nn.Module) -> None:
    """Restore every merged layer's base weight exactly (spectral layers; PEFT layers as PEFT does)."""
    for _, layer in spectral_layers(model):
        layer.unmerge()
    _peft().unmerge_peft(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Bake the active adapters into the weights and remove the wrappers: a plain model again
    (PEFT baselines too)."""
    _peft().unload_peft(model, merge=True)
    for name, layer in list(spectral_layers(model)):
        layer.merge()
        layer._original_weight = None
        _set_module(model, name, layer.base_layer)
    return model


class ParamCount(NamedTuple):
    trainable: int  # parameters with requires_grad
    total: int  # all parameters (base + adapters)
    percent: float  # 100 * trainable / base parameters (as in the papers' tables)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParamCount:
    """Count trainable and total parameters; percent is relative to the base model's size."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapters = sum(p.numel() for _, l in spectral_layers(model) for p in l.adapters.parameters())
    base = max(total - adapters, 1)
    return ParamCount(trainable, total, 100.0 * trainable / base)
