"""`SpectralLayer`: the one wrapper around a frozen base layer, holding named adapters.

The base layer's kind (``nn.Linear``, transformers ``Conv1D``, ``nn.Conv2d`` incl. grouped /
depthwise, timm ``Conv2dSame`` / ``StdConv2d``, ``nn.MultiheadAttention``, ...) is handled by its
registered :mod:`spectral_vision.geometry`: the 2-D matrix ``W (out, in)`` that is decomposed and
adapted, the way back to the stored layout, and how ``ΔW`` enters the forward.

Forward of *additive* kinds is the delta form ``y = base(x) + Σ_active Δ(x)`` where ``Δ`` is applied
through the method's factors ``ΔW = B A`` (two thin matmuls; for convolutions a ``kh×kw`` conv to
``R`` channels through the base's padding path, then a 1×1 conv), never a rebuilt weight. Other kinds
(weight standardisation, attention that reads its weight directly) run the base's own forward with
``W + ΔW``, which is what a merge writes. Merged adapters are folded into the base weight (the
original is kept so that unmerging is bit-exact).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import SpectralConfig
from .fastpath import choose_form, weight_form_forward
from .geometry import geometry_for, layer_kind
from .methods.base import SpectralDelta, get_method
from .svd import decompose, sigma_fingerprint

__all__ = ["SpectralLayer", "layer_kind", "SUPPORTED_TYPES"]

RESHAPE_CONVENTION = "out,in*kh*kw"

SUPPORTED_TYPES = ("nn.Linear, transformers Conv1D, nn.Conv2d (any groups / padding), timm Conv2dSame / "
                   "StdConv2d / ScaledStdConv2d, nn.MultiheadAttention (in_proj); more via register_geometry")


class SpectralLayer(nn.Module):
    """Wraps ``base_layer``; adapters live in ``self.adapters`` (a ``ModuleDict`` keyed by name).

    Attributes the wrapper does not have are read from the base layer (``layer.in_features``,
    ``attn.batch_first``), so model code that inspects its layers keeps working.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        geometry = geometry_for(base_layer)  # TypeError saying why for an unsupported layer
        self.base_layer = base_layer
        self.geometry = geometry
        self.kind = geometry.kind
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._original_weight: Optional[torch.Tensor] = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    # base attributes that model code reads directly (e.g. ``layer.weight.dtype``)
    @property
    def weight(self) -> torch.Tensor:
        """The adapted base parameter as stored (``in_proj_weight`` for attention)."""
        return self.geometry.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    # ---- the reshape convention (delegated to the geometry) -------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the 2-D matrix ``W``."""
        return self.geometry.shape

    def weight_2d(self) -> torch.Tensor:
        """``W (out, in)`` as float32 (a copy for low-precision bases) of the stored base weight."""
        return self.geometry.to_2d()

    def to_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_2d` for a ``(out, in)`` matrix."""
        return self.geometry.from_2d(delta)

    # ---- adapters --------------------------------------------------------------------------------
    def add_adapter(self, name: str, cfg: SpectralConfig, columns: Optional[list[int]] = None) -> SpectralDelta:
        """Create adapter ``name`` of ``cfg.method`` on this layer (the SVD comes from the shared
        decomposition and its cache). ``columns`` overrides the config's band (used at load time)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        cls = get_method(cfg.method)
        out_f, in_f = self.weight_shape
        cols = list(columns) if columns is not None else cls.default_columns(cfg, out_f, in_f)
        k = max(cls.num_components(cfg, out_f, in_f), max(cols, default=-1) + 1)  # cols may be empty
        if k > min(out_f, in_f):
            raise ValueError(
                f"{cfg.method} needs singular columns up to {k - 1} but this layer's weight ({out_f}x{in_f}) "
                f"has only {min(out_f, in_f)}: lower rank/band"
            )
        W = self.weight_2d()
        basis = decompose(W, k, cfg.svd, cfg.svd_oversample, cfg.svd_power_iters, cfg.svd_cache)
        delta = cls(basis, W, cfg, torch.tensor(cols, dtype=torch.long, device=W.device))
        delta.sigma_fingerprint = sigma_fingerprint(basis.S)
        self.adapters[name] = delta
        if not self.active_adapters:
            self.active_adapters = [name]
        return delta

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # ---- weights -----------------------------------------------------------------------------------
    def delta_weight(self, names: Optional[list[str]] = None) -> torch.Tensor:
        """Sum of ``ΔW (out, in)`` in fp32 of ``names`` (default: the active adapters)."""
        names = self.active_adapters if names is None else names
        out_f, in_f = self.weight_shape
        total = torch.zeros(out_f, in_f, device=self.weight.device)
        for n in names:
            total = total + self.adapters[n].delta_weight()
        return total

    @torch.no_grad()
    def merge(self, names: Optional[list[str]] = None) -> None:
        """Fold ``names`` (default: active adapters) into the base weight; keeps the original."""
        names = [n for n in (self.active_adapters if names is None else names) if n not in self.merged_adapters]
        if not names:
            return
        self.set_merged_weight(self.weight_2d() + self.delta_weight(names), self.merged_adapters + names)

    @torch.no_grad()
    def set_merged_weight(self, W: torch.Tensor, names: list[str]) -> None:
        """Write a merged ``W (out, in)`` into the base weight and mark ``names`` as merged (used by
        :meth:`merge` and by fusion). The original weight is kept, so :meth:`unmerge` is bit-exact."""
        w = self.weight
        if self._original_weight is None:
            self._original_weight = w.detach().clone()
        w.copy_(self.to_base_layout(W).to(w.dtype))
        self.merged_adapters = list(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first merge."""
        if self._original_weight is not None:
            self.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters = []

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not pending:
            return self.base_layer(x, *args, **kwargs)
        g = self.geometry
        if not g.additive:  # the base's own forward on W + ΔW: bit-identical to the merged weight
            w = self.weight
            return g.forward_with_weight((w.float() + g.from_2d(self.delta_weight(pending))).to(w.dtype),
                                         x, *args, **kwargs)
        if not (args or kwargs) and choose_form(self, x, [self.adapters[n] for n in pending]) == "weight":
            return weight_form_forward(self, x, pending)  # op(x, W + ΔW): see spectral_vision.fastpath
        y = self.base_layer(x, *args, **kwargs)
        for name in pending:
            y = y + g.adapter_forward(x, self.adapters[name])
        return y

    def extra_repr(self) -> str:
        return f"kind={self.kind}, W={self.weight_shape}, active={self.active_adapters}, merged={self.merged_adapters}"
