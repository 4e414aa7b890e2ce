"""Reading and validating adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

Everything read from a file is bounded and checked before use: regular files only (no FIFO, device or
folder), a config of bounded size in strict UTF-8 JSON without NaN/Infinity, every field typed and in
range, the tensor file matching its SHA-256 and parsing as safetensors, every tensor belonging to a
listed layer with a sane dtype and finite values. Any problem raises :class:`AdapterFileError` naming
the field or layer. :func:`spectral_vision.load_adapter` adds the checks that need the model.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file

from .config import SpectralConfig
from .fileio import file_sha256
from .geometry import geometry_kinds
from .layers import RESHAPE_CONVENTION
from .methods.base import get_method
from .model import check_adapter_name

__all__ = ["AdapterFileError", "read_adapter", "split_key", "CONFIG_NAME", "WEIGHTS_NAME", "SIG_PREFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SIG_PREFIX = "__basis__."  # tensor key prefix of the basis signatures (never a layer name)
MAX_CONFIG_BYTES = 64 << 20  # adapter_config.json larger than this is refused
MAX_OPTION_INT = 1 << 16  # integer method options read from a file (sizes of buffers) are bounded
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class AdapterFileError(ValueError):
    """An adapter folder that is missing, corrupt, hostile, or does not fit the model."""


def _regular_file(p: Path, what: str) -> int:
    """Size of ``p`` if it is a regular file (symlinks followed); devices, FIFOs and folders are refused."""
    try:
        st = os.stat(p)
    except OSError as e:
        raise AdapterFileError(f"{p} is not an adapter folder: {what} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise AdapterFileError(f"{p}: {what} is not a regular file (a folder, device or pipe)")
    return st.st_size


def _no_constant(c: str):
    raise ValueError(f"non-finite number {c}")


def _read_json(p: Path) -> dict:
    size = _regular_file(p, CONFIG_NAME)
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{p} is {size} bytes, larger than any adapter config ({MAX_CONFIG_BYTES})")
    try:
        with open(p, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
        meta = json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError, OSError) as e:
        raise AdapterFileError(f"{p} is not a valid spectral_vision adapter config (UTF-8 JSON): "
                               f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{p}: the config must be a JSON object, got {type(meta).__name__}")
    return meta


def _field_error(p: Path, field: str, msg: str) -> AdapterFileError:
    return AdapterFileError(f"{p}: field {field!r}: {msg}")


def _pos_ints(v, n: tuple[int, ...]) -> bool:
    return (isinstance(v, list) and len(v) in n
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x < 1 << 31 for x in v))


def _validate_meta(meta: dict, p: Path) -> SpectralConfig:
    """Check every field of an adapter config; returns its :class:`SpectralConfig`."""
    if meta.get("library", "spectral_vision") != "spectral_vision":
        raise _field_error(p, "library", f"{meta.get('library')!r} is not a spectral_vision adapter "
                                         "(a PEFT LoRA folder? load it with peft)")
    for key in ("config", "layers"):
        if key not in meta:
            raise _field_error(p, key, "missing")
    try:
        cfg = SpectralConfig.from_dict(meta["config"])
        cls = get_method(cfg.method)
        cls.parse_options(cfg.options)
    except (TypeError, ValueError) as e:
        raise _field_error(p, "config", str(e)) from None
    for k, v in cfg.options.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, str, type(None))):
            raise _field_error(p, f"config.options.{k}", f"must be a number, string or null, got {v!r}")
        if isinstance(v, (int, float)) and not (math.isfinite(v) and abs(v) <= MAX_OPTION_INT):
            raise _field_error(p, f"config.options.{k}", f"{v!r} is out of range (|x| <= {MAX_OPTION_INT})")
    if "adapter_name" in meta:
        try:
            check_adapter_name(meta["adapter_name"])
        except (TypeError, ValueError) as e:
            raise _field_error(p, "adapter_name", str(e)) from None
    conv = meta.get("reshape_convention", RESHAPE_CONVENTION)
    if conv != RESHAPE_CONVENTION:
        raise _field_error(p, "reshape_convention", f"{conv!r}; this version uses {RESHAPE_CONVENTION!r}")
    sha = meta.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise _field_error(p, "weights_sha256", "must be a 64-character hex digest")
    layers = meta["layers"]
    if not isinstance(layers, dict) or not layers:
        raise _field_error(p, "layers", f"must be a non-empty object {{layer name: info}}, got {layers!r:.80}")
    for name, info in layers.items():
        where = f"layers.{name}"
        if not name or name.startswith(SIG_PREFIX) or not isinstance(info, dict):
            raise _field_error(p, where, "must be an object with kind, shape, base_shape, sigma")
        if info.get("kind") not in geometry_kinds():
            raise _field_error(p, f"{where}.kind", f"{info.get('kind')!r} is not one of {geometry_kinds()}")
        if not _pos_ints(info.get("shape"), (2,)):
            raise _field_error(p, f"{where}.shape", f"must be [out, in] positive ints, got {info.get('shape')!r}")
        if not _pos_ints(info.get("base_shape"), (2, 4)):
            raise _field_error(p, f"{where}.base_shape", f"must be 2 or 4 positive ints, got {info.get('base_shape')!r}")
        sig = info.get("sigma")
        if (not isinstance(sig, list) or not 1 <= len(sig) <= 64
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s >= 0
                           for s in sig)):
            raise _field_error(p, f"{where}.sigma", "must be a non-empty list (<= 64) of finite non-negative "
                                                    f"singular values, got {sig!r:.80}")
    return cfg


def split_key(key: str, layers: dict) -> tuple[str, str]:
    """``(layer, tensor)`` of a tensor key: ``"<layer>.<tensor>"`` (longest layer) or ``"__basis__.<layer>"``."""
    if key.startswith(SIG_PREFIX):
        layer = key[len(SIG_PREFIX):]
        return (layer, SIG_PREFIX) if layer in layers else ("", key)
    best = ""
    for name in layers:
        if key.startswith(name + ".") and len(name) > len(best) and len(key) > len(name) + 1:
            best = name
    return (best, key[len(best) + 1:]) if best else ("", key)


def read_adapter(path: Union[str, Path]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify an adapter folder: ``(metadata, tensors)``. Raises :class:`AdapterFileError`.

    Verified here (no model needed): both files are regular files; the config is UTF-8 JSON of bounded
    size without NaN/Infinity, every field has its type and range (config, layers' kind/shape/sigma,
    adapter name); the tensor file matches its SHA-256 and parses; every tensor belongs to a listed
    layer, is floating point (or an integer ``columns``) and finite; ``columns`` are distinct, in range.
    """
    path = Path(path)
    if path.is_file():
        path = path.parent
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir() or not (cfg_file.exists() or cfg_file.is_symlink()) or not w_file.exists():
        raise AdapterFileError(f"{path} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    meta = _read_json(cfg_file)
    _validate_meta(meta, cfg_file)
    _regular_file(w_file, WEIGHTS_NAME)
    if meta.get("weights_sha256") and meta["weights_sha256"] != file_sha256(w_file):
        raise AdapterFileError(f"{w_file} does not match its config (truncated or modified file)")
    try:
        tensors = load_file(str(w_file))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # SafetensorError, OSError, a Rust panic...: a corrupt header or payload
        raise AdapterFileError(f"{w_file} is truncated or corrupt: {type(e).__name__}: {str(e)[:200]}") from None
    layers = meta["layers"]
    for key, t in tensors.items():
        layer, part = split_key(key, layers)
        if not layer:
            raise AdapterFileError(f"{w_file}: tensor {key!r} belongs to no layer listed in {CONFIG_NAME}")
        if part == "columns":
            out_f, in_f = layers[layer]["shape"]
            if t.dtype not in (torch.int64, torch.int32) or t.dim() != 1:
                raise AdapterFileError(f"layer {layer!r}: tensor 'columns' must be a 1-D int64 tensor, "
                                       f"got {t.dtype} {tuple(t.shape)}")
            cols = t.tolist()
            if len(set(cols)) != len(cols) or any(not 0 <= c < min(out_f, in_f) for c in cols):
                raise AdapterFileError(f"layer {layer!r}: field 'columns' {cols[:8]} must be distinct indices in "
                                       f"[0, {min(out_f, in_f)}) for its {out_f}x{in_f} weight")
        elif t.dtype not in FLOAT_DTYPES:
            raise AdapterFileError(f"layer {layer!r}: tensor {part!r} has dtype {t.dtype}, expected floating point")
        elif not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"layer {layer!r}: tensor {part!r} holds NaN or inf")
    missing = [n for n in layers if f"{n}.columns" not in tensors]
    if missing:
        raise AdapterFileError(f"layer {missing[0]!r}: tensor 'columns' missing from {WEIGHTS_NAME}")
    return meta, tensors
