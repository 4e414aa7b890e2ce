"""`SpectralConfig`: what to adapt, with which method, in which spectral band.

Every field is type- and range-checked on construction (also when read from an adapter file, where
:func:`spectral_vision.load_adapter` turns the error into an ``AdapterFileError``): a config can never
ask for unbounded work (``svd_power_iters``/``svd_oversample`` are small bounded ints).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

#: bounds of the integer fields (a file can never request unbounded work)
MAX_RANK = 1 << 16
MAX_OVERSAMPLE = 256
MAX_POWER_ITERS = 16


def _int(name: str, value, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``; floats (``2.5``, even ``2.0``), strings and bools are refused."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        v = operator.index(value)  # int, numpy / torch integer scalars
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _targets(name: str, value, optional: bool):
    if value is None and optional:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) and t for t in value):
        return list(value)
    raise TypeError(f"{name} must be a preset name, a regex or a non-empty list of names, got {value!r}")


@dataclass
class SpectralConfig:
    """Configuration of one named adapter. Saved as ``adapter_config.json`` next to its tensors."""

    method: str = "spectral_a"  # registered method name: see ``spectral_vision.available_methods()``
    rank: int = 4  # r: number of singular triplets (or LoRA rank) the method adapts per layer
    band: int = 0  # band i selects singular columns [i*r, (i+1)*r); disjoint bands fuse without overlap
    columns: Optional[list[int]] = None  # explicit singular column indices (overrides band)
    target_modules: Union[str, list[str]] = "timm_vit"  # preset name, regex (full match) or list of suffixes
    exclude_modules: Optional[Union[str, list[str]]] = None  # same syntax; matches are never adapted
    alpha: float = 1.0  # strength: scales ΔW (^A, SVDiff) or the rotation's skew generator (^R); finite
    svd: str = "auto"  # "exact" | "randomized" | "auto" (see spectral_vision.svd.decompose)
    svd_oversample: int = 10  # randomized SVD: extra probe columns, 0..256
    svd_power_iters: int = 4  # randomized SVD: subspace (power) iterations, 0..16
    svd_cache: bool = True  # cache decompositions on disk, keyed by the weight's hash
    options: dict[str, Any] = field(default_factory=dict)  # method-specific options (validated by the method)

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise TypeError(f"method must be a method name (str), got {self.method!r}")
        self.rank = _int("rank", self.rank, 1, MAX_RANK)
        self.band = _int("band", self.band, 0, MAX_RANK)
        if self.columns is not None:
            if not isinstance(self.columns, (list, tuple)) or not self.columns:
                raise ValueError(f"columns must be a non-empty list of indices, got {self.columns!r}")
            cols = [_int("columns[]", c, 0, MAX_RANK * 4) for c in self.columns]
            if len(set(cols)) != len(cols):
                raise ValueError(f"columns must be distinct non-negative indices, got {self.columns}")
            self.columns = cols
        self.target_modules = _targets("target_modules", self.target_modules, optional=False)
        self.exclude_modules = _targets("exclude_modules", self.exclude_modules, optional=True)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if self.svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"svd must be 'auto', 'exact' or 'randomized', got {self.svd!r}")
        self.svd_oversample = _int("svd_oversample", self.svd_oversample, 0, MAX_OVERSAMPLE)
        self.svd_power_iters = _int("svd_power_iters", self.svd_power_iters, 0, MAX_POWER_ITERS)
        if not isinstance(self.svd_cache, bool):
            raise TypeError(f"svd_cache must be true or false, got {self.svd_cache!r}")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise TypeError(f"options must be a dict with str keys, got {self.options!r}")

    def band_columns(self) -> list[int]:
        """Singular column indices this adapter uses: ``columns`` or ``range(band*r, (band+1)*r)``."""
        if self.columns is not None:
            return list(self.columns)
        return list(range(self.band * self.rank, (self.band + 1) * self.rank))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpectralConfig":
        """Build from a dict (e.g. read from ``adapter_config.json``); unknown fields are an error."""
        if not isinstance(d, dict):
            raise TypeError(f"a SpectralConfig is a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SpectralConfig fields {sorted(map(str, unknown))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
