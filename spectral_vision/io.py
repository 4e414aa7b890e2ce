"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickle).

The safetensors file holds each adapter's persistent state (trainable tensors and the singular
``columns`` it uses) under ``"<layer name>.<tensor>"``, plus per layer the **basis signature**
``"__basis__.<layer name>"`` (``(c, 13)``: ``σ_i`` and 6+6 random projections of ``u_i``, ``v_i``,
see :mod:`spectral_vision.signature`). The JSON holds the config and, per layer, its kind, ``W``
shape, and the top singular values of the base weight (the **base fingerprint**), plus the reshape
convention, the library version and the SHA-256 of the tensor file.

Loading validates every field and tensor before it is used (see :func:`read_adapter`), checks the
base (singular values, then the singular vectors through the signature: a sign flip or a swap of
near-equal singular values is undone, another basis is refused) and rolls the model back on any
failure. Everything read from a file is bounded: a hostile file raises :class:`AdapterFileError`,
it never hangs, executes code or leaves a half-modified model.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .config import SpectralConfig
from .fileio import atomic_write, atomic_write_json, file_sha256
from .geometry import geometry_for, layer_kind
from .methods.base import get_method
from .layers import RESHAPE_CONVENTION, SpectralLayer
from .model import adapter_names, attach, check_adapter_name, detach, spectral_layers
from .adapter_file import CONFIG_NAME, SIG_PREFIX, WEIGHTS_NAME, AdapterFileError, read_adapter, split_key
from .signature import SIG_DIM, basis_signature, direct_match, match_basis
from .svd import Basis, decompose

__all__ = ["save_adapter", "load_adapter", "read_adapter", "base_fingerprint", "AdapterFileError",
           "CONFIG_NAME", "WEIGHTS_NAME"]

SIGMA_RTOL = 1e-2  # singular values of the same base agree far better than this across dtypes/devices
DELTA_LIMIT = 1e4  # ‖B‖·‖A‖ (a bound of ‖ΔW‖) above this × max(‖W‖, 1) is refused: 1e30 tensors, alpha 1e30


def base_fingerprint(layers: dict) -> str:
    """Short hex id of a base (layer names, shapes, top singular value to 3 digits)."""
    import hashlib

    h = hashlib.blake2b(digest_size=6)
    for name in sorted(layers):
        info = layers[name]
        h.update(f"{name}:{info['shape']}:{info['sigma'][0]:.3g};".encode())
    return h.hexdigest()


# ---- saving ---------------------------------------------------------------------------------------
def _save_one(model: nn.Module, path: Path, adapter_name: str, extra_metadata: Optional[dict]) -> Path:
    tensors, layers, cfg = {}, {}, None
    for name, layer in spectral_layers(model):
        if adapter_name not in layer.adapters:
            continue
        delta = layer.adapters[adapter_name]
        cfg = delta.cfg
        for key, t in delta.state_dict().items():
            t = t.detach().contiguous().cpu()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"adapter {adapter_name!r}, layer {name!r}: tensor {key!r} is not finite "
                                 "(NaN/inf): refusing to save a poisoned adapter")
            tensors[f"{name}.{key}"] = t
        if getattr(delta, "U", None) is not None and delta.columns.numel():
            tensors[SIG_PREFIX + name] = basis_signature(delta.U, delta.S, delta.V)  # (c, 1 + 2m)
        layers[name] = {"kind": layer.kind, "shape": list(layer.weight_shape),
                        "base_shape": list(layer.weight.shape), "sigma": delta.sigma_fingerprint}
    path.mkdir(parents=True, exist_ok=True)
    fp = base_fingerprint(layers)
    atomic_write(path / WEIGHTS_NAME, lambda f: save_file(
        tensors, f, metadata={"format": "pt", "library": "spectral_vision", "base_fingerprint": fp}))
    meta = {
        "library": "spectral_vision", "version": __version__, "adapter_name": adapter_name,
        "config": cfg.to_dict(), "reshape_convention": RESHAPE_CONVENTION, "base_fingerprint": fp,
        "basis_signature": {"dim": SIG_DIM, "key_prefix": SIG_PREFIX},
        "weights_sha256": file_sha256(path / WEIGHTS_NAME), "layers": layers, "extra": extra_metadata or {},
    }
    atomic_write_json(path / CONFIG_NAME, meta)
    return path


def _holdings(model: nn.Module) -> str:
    """What adapters the model holds, for error messages (spectral and PEFT)."""
    from .baselines import peft_adapter_names

    spectral, peft = adapter_names(model), peft_adapter_names(model)
    parts = [f"spectral adapters {spectral}"] if spectral or not peft else []
    if peft:
        parts.append(f"PEFT adapters {peft} (baselines: save them with peft's get_peft_model_state_dict / "
                     "spectral_vision.integrations.transformers.save_pretrained)")
    return "this model holds " + " and ".join(parts)


def save_adapter(model: nn.Module, path: Union[str, Path], adapter_name: Optional[str] = None,
                 extra_metadata: Optional[dict] = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to folder ``path`` (created; files replaced atomically).

    ``adapter_name=None`` saves what is there, as PEFT's ``save_pretrained`` does: a single adapter
    (whatever its name) into ``path`` itself; several adapters each into ``path/<name>/``, except
    ``"default"`` which goes into ``path`` itself. Each folder holds ``adapter_config.json`` +
    ``adapter_model.safetensors`` and loads with :func:`load_adapter` (the name is restored).
    ``extra_metadata`` (JSON-serialisable) is stored under ``"extra"``. Returns ``path``.
    Raises ``KeyError`` naming the adapters the model holds, ``ValueError`` for a non-finite tensor.
    """
    path = Path(path)
    names = adapter_names(model)
    if adapter_name is not None:
        if adapter_name not in names:
            raise KeyError(f"no adapter {adapter_name!r} to save; {_holdings(model)}")
        return _save_one(model, path, adapter_name, extra_metadata)
    if not names:
        raise KeyError(f"no spectral adapter to save; {_holdings(model)}")
    if len(names) == 1:
        return _save_one(model, path, names[0], extra_metadata)
    for name in names:
        check_adapter_name(name)
        _save_one(model, path if name == "default" else path / name, name, extra_metadata)
    return path


# ---- loading -----------------------------------------------------------------------------------------
def _check_layer(model_modules: dict, name: str, info: dict, tensors: dict) -> list[int]:
    """The saved ``columns`` of layer ``name`` after checking the layer against the model."""
    m = model_modules.get(name)
    if m is None:
        raise AdapterFileError(f"layer {name!r} of the adapter does not exist in this model (another base?)")
    m = m.base_layer if isinstance(m, SpectralLayer) else m
    kind = layer_kind(m)
    geo = geometry_for(m) if kind is not None else None
    shape = list(geo.weight.shape) if geo is not None else []
    if kind is None or shape != info["base_shape"]:
        raise AdapterFileError(f"layer {name!r}: adapter was made for a {info['kind']} weight {info['base_shape']}, "
                               f"this model has {type(m).__name__} {shape} (another base?)")
    if kind != info["kind"]:
        raise AdapterFileError(f"layer {name!r}: field 'kind' is {info['kind']!r}, the layer is {kind!r}")
    w2d = list(geo.shape)  # W (out, in) of the layer's geometry
    if info["shape"] != w2d:
        raise AdapterFileError(f"layer {name!r}: field 'shape' is {info['shape']}, the layer's W (out, in) is {w2d}")
    return tensors[f"{name}.columns"].tolist()


def _rebuild(layer: SpectralLayer, name: str, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
    """Replace adapter ``name`` of ``layer`` by one built on the matched columns ``U (out, c)``, ``S``, ``V``."""
    old = layer.adapters[name]
    cols = old.columns
    W = layer.weight_2d()  # (out, in) fp32
    k = int(cols.max()) + 1
    Ub = W.new_zeros(W.shape[0], k)
    Vb = W.new_zeros(W.shape[1], k)
    Sb = W.new_zeros(k)
    Ub[:, cols], Vb[:, cols], Sb[cols] = U.to(W), V.to(W), S.to(W)
    new = type(old)(Basis(Ub, Sb, Vb, "matched", ""), W, old.cfg, cols)
    new.sigma_fingerprint = old.sigma_fingerprint
    layer.adapters[name] = new


def _match_layer(layer: SpectralLayer, name: str, adapter: str, sig: torch.Tensor, strict: bool) -> None:
    delta = layer.adapters[adapter]
    cols = delta.columns.tolist()
    try:
        ok, _ = direct_match(sig, delta.U, delta.V)
        if ok:
            return
        cfg, (out_f, in_f) = delta.cfg, layer.weight_shape
        k = min(max(delta.U.shape[1], max(cols) + 1) + 4, min(out_f, in_f))  # a few columns past the last used
        basis = decompose(layer.weight_2d(), k, cfg.svd, cfg.svd_oversample, cfg.svd_power_iters, cfg.svd_cache)
        _, U, S, V, _ = match_basis(sig, basis.U, basis.S, basis.V, cols)
    except ValueError as e:
        if strict:
            raise AdapterFileError(f"layer {name!r}: {e}; pass strict_base=False to force") from None
        warnings.warn(f"layer {name!r}: {e}; loading anyway (strict_base=False)", stacklevel=3)
        return
    _rebuild(layer, adapter, U, S, V)


def _check_delta(layer: SpectralLayer, name: str, delta) -> None:
    """Refuse a ΔW that is not finite or absurdly large compared to ``W`` (hostile tensors, alpha 1e30)."""
    with torch.no_grad():
        B, A = delta.factors()  # (out, R), (R, in)
        bound = float(B.float().norm()) * float(A.float().norm())
        w = float(layer.weight_2d().norm())
    if not math.isfinite(bound) or bound > DELTA_LIMIT * max(w, 1.0):
        raise AdapterFileError(f"layer {name!r}: the adapter's ΔW is not finite or {bound:.3g} >> ‖W‖ = {w:.3g} "
                               f"(limit {DELTA_LIMIT:g}x): corrupt or hostile tensors / alpha")


def load_adapter(model: nn.Module, path: Union[str, Path], adapter_name: Optional[str] = None,
                 strict_base: bool = True, progress: bool = True) -> nn.Module:
    """Load an adapter folder onto ``model`` as ``adapter_name`` (default: the saved name).

    Checks (all raise :class:`AdapterFileError` naming the field / layer, and leave the model exactly
    as it was, requires_grad flags included): everything :func:`read_adapter` checks; every layer
    exists with the saved kind and shape; the rank fits the layers; the tensors are exactly the
    method's (no missing, no extra, same shapes); the base's top singular values match the saved ones
    (1 %); the recomputed singular vectors match the saved basis signature (a sign flip or a swap of
    near-equal singular values is undone; another basis is refused); ``ΔW`` is finite and bounded.
    ``strict_base=False`` turns the two base checks into warnings. Files saved without a signature
    (older versions) load with a warning. The adapter is active if its layers had none.
    """
    meta, tensors = read_adapter(path)
    cfg = SpectralConfig.from_dict(meta["config"])
    adapter_name = adapter_name or meta.get("adapter_name", "default")
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; pass another adapter_name or detach it")
    modules = dict(model.named_modules())
    columns = {name: _check_layer(modules, name, info, tensors) for name, info in meta["layers"].items()}
    smallest = min(min(info["shape"]) for info in meta["layers"].values())
    if cfg.rank > smallest and get_method(cfg.method).rank_is_columns:
        raise AdapterFileError(f"{path}: field 'config.rank' = {cfg.rank} exceeds the layers' min(out, in) = {smallest}")
    has_sig = any(k.startswith(SIG_PREFIX) for k in tensors) or "basis_signature" in meta
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, part = split_key(key, meta["layers"])
        if part != SIG_PREFIX:
            by_layer.setdefault(layer, {})[part] = t
    grads = {id(p): p.requires_grad for p in model.parameters()}
    try:
        attach(model, cfg, adapter_name, columns=columns, progress=progress)
    except Exception as e:
        raise AdapterFileError(f"{path}: the adapter does not fit this model: {e}") from e
    try:
        unsigned = []
        for name, layer in spectral_layers(model):
            if name not in columns:
                continue
            delta = layer.adapters[adapter_name]
            want, got = meta["layers"][name]["sigma"], delta.sigma_fingerprint
            n = min(len(want), len(got))
            bad = any(abs(a - b) > SIGMA_RTOL * max(abs(a), 1e-8) for a, b in zip(want[:n], got[:n]))
            if bad and strict_base:
                raise AdapterFileError(
                    f"layer {name!r}: the base weights differ from the ones this adapter was trained on "
                    f"(top singular values {got[:3]} vs saved {want[:3]}); pass strict_base=False to force")
            if getattr(delta, "U", None) is not None and delta.columns.numel():
                if SIG_PREFIX + name in tensors:
                    _match_layer(layer, name, adapter_name, tensors[SIG_PREFIX + name], strict_base)
                elif has_sig:
                    raise AdapterFileError(f"layer {name!r}: basis signature '{SIG_PREFIX}{name}' missing")
                else:
                    unsigned.append(name)
            delta = layer.adapters[adapter_name]
            expected = delta.state_dict()
            own = by_layer.get(name, {})
            extra = sorted(set(own) - set(expected))
            if extra:
                raise AdapterFileError(f"layer {name!r}: unexpected tensors {extra[:5]} for method {cfg.method!r}")
            for key, t in expected.items():
                if key not in own:
                    raise AdapterFileError(f"layer {name!r}: tensor {key!r} missing from {WEIGHTS_NAME}")
                if own[key].shape != t.shape:
                    raise AdapterFileError(f"layer {name!r}: tensor {key!r} has shape {tuple(own[key].shape)}, "
                                           f"expected {tuple(t.shape)}")
            delta.load_state_dict({k: own[k].to(expected[k].dtype) for k in expected}, strict=True)
            _check_delta(layer, name, delta)
        if unsigned:
            warnings.warn(f"{path}: saved without a basis signature (spectral_vision < 0.2): the sign and order of "
                          f"the singular vectors of {len(unsigned)} layer(s) cannot be verified; re-save it", stacklevel=2)
    except Exception as e:
        detach(model, adapter_name)
        for p in model.parameters():
            p.requires_grad_(grads.get(id(p), p.requires_grad))
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"{path}: {type(e).__name__}: {e}") from e
    return model
