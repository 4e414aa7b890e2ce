"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickle).

The safetensors file holds only each adapter's persistent state (trainable tensors and the
singular ``columns`` it uses) under ``"<layer name>.<tensor>"``. The JSON holds the config and, per
layer, its kind, ``W`` shape, and the top singular values of the base weight (the **base
fingerprint**, robust to dtype and device), plus the reshape convention, the library version and
the SHA-256 of the tensor file. Loading checks all of it before touching the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import SpectralConfig
from .layers import RESHAPE_CONVENTION
from .model import adapter_names, attach, detach, spectral_layers

__all__ = ["save_adapter", "load_adapter", "read_adapter", "base_fingerprint", "AdapterFileError"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SIGMA_RTOL = 1e-2  # singular values of the same base agree far better than this across dtypes/devices


class AdapterFileError(ValueError):
    """An adapter folder that is missing, corrupt, or does not fit the model."""


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_fingerprint(layers: dict) -> str:
    """Short hex id of a base (layer names, shapes, top singular value to 3 digits)."""
    h = hashlib.blake2b(digest_size=6)
    for name in sorted(layers):
        info = layers[name]
        h.update(f"{name}:{info['shape']}:{info['sigma'][0]:.3g};".encode())
    return h.hexdigest()


def save_adapter(model: nn.Module, path: Union[str, Path], adapter_name: str = "default",
                 extra_metadata: Optional[dict] = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to folder ``path`` (created; files replaced atomically).

    Returns the folder path. ``extra_metadata`` (JSON-serialisable) is stored under ``"extra"``.
    """
    path = Path(path)
    tensors, layers, cfg = {}, {}, None
    for name, layer in spectral_layers(model):
        if adapter_name not in layer.adapters:
            continue
        delta = layer.adapters[adapter_name]
        cfg = delta.cfg
        for key, t in delta.state_dict().items():
            tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
        layers[name] = {"kind": layer.kind, "shape": list(layer.weight_shape),
                        "base_shape": list(layer.weight.shape), "sigma": delta.sigma_fingerprint}
    if cfg is None:
        raise KeyError(f"no adapter {adapter_name!r} on this model; present: {adapter_names(model)}")
    path.mkdir(parents=True, exist_ok=True)
    fp = base_fingerprint(layers)
    _atomic_write(path / WEIGHTS_NAME, lambda f: save_file(
        tensors, f, metadata={"format": "pt", "library": "spectral_vision", "base_fingerprint": fp}))
    meta = {
        "library": "spectral_vision", "version": __version__, "adapter_name": adapter_name,
        "config": cfg.to_dict(), "reshape_convention": RESHAPE_CONVENTION, "base_fingerprint": fp,
        "weights_sha256": _sha256(path / WEIGHTS_NAME), "layers": layers, "extra": extra_metadata or {},
    }
    _atomic_write(path / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(meta, indent=1)))
    return path


def read_adapter(path: Union[str, Path]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify an adapter folder: ``(metadata, tensors)``. Raises :class:`AdapterFileError`."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.exists() or not w_file.exists():
        raise AdapterFileError(f"{path} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        meta = json.loads(cfg_file.read_text())
        meta["config"], meta["layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AdapterFileError(f"{cfg_file} is not a valid spectral_vision adapter config: {e}") from None
    if meta.get("weights_sha256") and meta["weights_sha256"] != _sha256(w_file):
        raise AdapterFileError(f"{w_file} does not match its config (truncated or modified file)")
    try:
        tensors = load_file(str(w_file))
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{w_file} is truncated or corrupt: {e}") from None
    return meta, tensors


def load_adapter(model: nn.Module, path: Union[str, Path], adapter_name: Optional[str] = None,
                 strict_base: bool = True, progress: bool = True) -> nn.Module:
    """Load an adapter folder onto ``model`` as ``adapter_name`` (default: the saved name).

    Checks, before changing anything: every layer exists and has the saved shape, the tensors are
    complete; after decomposing, the base's singular values match the saved fingerprint
    (``strict_base=False`` skips that). Any failure raises :class:`AdapterFileError` naming the
    layer, and leaves the model as it was. The adapter is active if its layers had none.
    """
    meta, tensors = read_adapter(path)
    adapter_name = adapter_name or meta.get("adapter_name", "default")
    cfg = SpectralConfig.from_dict(meta["config"])
    modules = dict(model.named_modules())
    from .geometry import base_weight
    from .layers import SpectralLayer, layer_kind

    columns = {}
    for name, info in meta["layers"].items():
        m = modules.get(name)
        if m is None:
            raise AdapterFileError(f"layer {name!r} of the adapter does not exist in this model (another base?)")
        m = m if not isinstance(m, SpectralLayer) else m.base_layer
        shape = list(base_weight(m).shape) if layer_kind(m) is not None else None
        if shape is None or shape != info["base_shape"]:
            raise AdapterFileError(f"layer {name!r}: adapter was made for weight {info['base_shape']}, "
                                   f"this model has {shape} (another base?)")
        if f"{name}.columns" not in tensors:
            raise AdapterFileError(f"layer {name!r}: tensors missing from {WEIGHTS_NAME}")
        columns[name] = tensors[f"{name}.columns"].tolist()
    attach(model, cfg, adapter_name, columns=columns, progress=progress)
    try:
        for name, layer in spectral_layers(model):
            if name not in columns:
                continue
            delta = layer.adapters[adapter_name]
            want, got = meta["layers"][name]["sigma"], delta.sigma_fingerprint
            n = min(len(want), len(got))
            if strict_base and any(abs(a - b) > SIGMA_RTOL * max(abs(a), 1e-8) for a, b in zip(want[:n], got[:n])):
                raise AdapterFileError(
                    f"layer {name!r}: the base weights differ from the ones this adapter was trained on "
                    f"(top singular values {got[:3]} vs saved {want[:3]}); pass strict_base=False to force")
            own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            expected = delta.state_dict()
            for key, t in expected.items():
                if key not in own:
                    raise AdapterFileError(f"layer {name!r}: tensor {key!r} missing from {WEIGHTS_NAME}")
                if own[key].shape != t.shape:
                    raise AdapterFileError(f"layer {name!r}: tensor {key!r} has shape {tuple(own[key].shape)}, "
                                           f"expected {tuple(t.shape)}")
            delta.load_state_dict({k: own[k] for k in expected}, strict=True)
    except Exception:
        detach(model, adapter_name)
        raise
    return model
