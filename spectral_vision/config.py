"""`SpectralConfig`: what to adapt, with which method, in which spectral band."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class SpectralConfig:
    """Configuration of one named adapter. Saved as ``adapter_config.json`` next to its tensors."""

    method: str = "spectral_a"  # registered method name: see ``spectral_vision.available_methods()``
    rank: int = 4  # r: number of singular triplets (or LoRA rank) the method adapts per layer
    band: int = 0  # band i selects singular columns [i*r, (i+1)*r); disjoint bands fuse without overlap
    columns: Optional[list[int]] = None  # explicit singular column indices (overrides band)
    target_modules: Union[str, list[str]] = "timm_vit"  # preset name, regex (full match) or list of suffixes
    exclude_modules: Optional[Union[str, list[str]]] = None  # same syntax; matches are never adapted
    alpha: float = 1.0  # strength: scales ΔW (^A, SVDiff) or the rotation's skew generator (^R)
    svd: str = "auto"  # "exact" | "randomized" | "auto" (see spectral_vision.svd.decompose)
    svd_oversample: int = 10  # randomized SVD: extra probe columns
    svd_power_iters: int = 4  # randomized SVD: subspace (power) iterations
    svd_cache: bool = True  # cache decompositions on disk, keyed by the weight's hash
    options: dict[str, Any] = field(default_factory=dict)  # method-specific options (validated by the method)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.band < 0:
            raise ValueError(f"band must be >= 0, got {self.band}")
        if self.columns is not None:
            cols = [int(c) for c in self.columns]
            if not cols or min(cols) < 0 or len(set(cols)) != len(cols):
                raise ValueError(f"columns must be distinct non-negative indices, got {self.columns}")
            self.columns = cols
        if self.svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"svd must be 'auto', 'exact' or 'randomized', got {self.svd!r}")

    def band_columns(self) -> list[int]:
        """Singular column indices this adapter uses: ``columns`` or ``range(band*r, (band+1)*r)``."""
        if self.columns is not None:
            return list(self.columns)
        return list(range(self.band * self.rank, (self.band + 1) * self.rank))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpectralConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SpectralConfig fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
