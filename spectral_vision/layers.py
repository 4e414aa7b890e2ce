"""`SpectralLayer`: the one wrapper around a frozen base layer, holding named adapters.

Supported base layers and the **reshape convention** to the 2-D matrix ``W (out, in)`` that is
decomposed and adapted:

==========================  ======================  =======================================
base layer                  stored weight           ``W`` (out, in)
==========================  ======================  =======================================
``nn.Linear``               ``(out, in)``           the weight itself
``transformers`` ``Conv1D`` ``(in, out)``           ``weight.T``
``nn.Conv2d`` (groups=1)    ``(out, cin, kh, kw)``  ``weight.reshape(out, cin*kh*kw)`` ("out,in*kh*kw")
==========================  ======================  =======================================

Forward is the delta form ``y = base(x) + Σ_active Δ(x)`` where ``Δ`` is applied through the
method's factors ``ΔW = B A``: two thin matmuls (for convolutions, a ``kh×kw`` conv to ``R``
channels then a 1×1 conv), never a rebuilt weight. Merged adapters are folded into the base
weight (the original is kept so that unmerging is bit-exact).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import SpectralConfig
from .fastpath import choose_form, fast_factors, weight_form_forward
from .methods.base import SpectralDelta, get_method
from .svd import decompose, sigma_fingerprint

__all__ = ["SpectralLayer", "layer_kind", "SUPPORTED_TYPES"]

RESHAPE_CONVENTION = "out,in*kh*kw"


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers not installed
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> Optional[str]:
    """``"linear"``, ``"conv2d"``, ``"conv1d"`` (transformers' GPT-2 Conv1D) or ``None``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    c1 = _conv1d_type()
    if c1 is not None and isinstance(module, c1):
        return "conv1d"
    return None


SUPPORTED_TYPES = "nn.Linear, nn.Conv2d (groups=1, zero padding) and transformers Conv1D"


class SpectralLayer(nn.Module):
    """Wraps ``base_layer``; adapters live in ``self.adapters`` (a ``ModuleDict`` keyed by name)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TypeError(f"cannot adapt {type(base_layer).__name__}: supported are {SUPPORTED_TYPES}")
        if kind == "conv2d" and (base_layer.groups != 1 or base_layer.padding_mode != "zeros"):
            raise TypeError("Conv2d with groups != 1 or non-zero padding_mode is not supported")
        self.base_layer = base_layer
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._original_weight: Optional[torch.Tensor] = None

    # base attributes that model code reads directly (e.g. ``layer.weight.dtype``)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    # ---- the reshape convention ----------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the 2-D matrix ``W``."""
        w = self.base_layer.weight
        if self.kind == "conv1d":
            return w.shape[1], w.shape[0]
        return w.shape[0], w[0].numel()

    def weight_2d(self) -> torch.Tensor:
        """``W (out, in)`` as float32 (a copy for low-precision bases)."""
        w = self.base_layer.weight.detach()
        if self.kind == "conv1d":
            w = w.T  # (in, out) -> (out, in)
        return w.reshape(w.shape[0], -1).float()  # conv: (out, cin, kh, kw) -> (out, cin*kh*kw)

    def to_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_2d` for a ``(out, in)`` matrix."""
        w = self.base_layer.weight
        if self.kind == "conv1d":
            return delta.T  # (out, in) -> (in, out)
        return delta.reshape(w.shape)  # (out, cin*kh*kw) -> (out, cin, kh, kw)

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
        total = torch.zeros(out_f, in_f, device=self.base_layer.weight.device)
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
        w = self.base_layer.weight
        if self._original_weight is None:
            self._original_weight = w.detach().clone()
        w.copy_(self.to_base_layout(W).to(w.dtype))
        self.merged_adapters = list(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first merge."""
        if self._original_weight is not None:
            self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters = []

    # ---- forward -----------------------------------------------------------------------------------
    def _apply_delta(self, x: torch.Tensor, delta: SpectralDelta) -> torch.Tensor:
        if self.kind != "conv2d":
            return delta.forward_linear(x)
        B, A = fast_factors(delta)  # (out, R), (R, in) fp32
        conv, R = self.base_layer, A.shape[0]
        h = F.conv2d(x, A.to(x.dtype).reshape(R, *conv.weight.shape[1:]), None,  # (R, in) -> (R, cin, kh, kw)
                     conv.stride, conv.padding, conv.dilation)
        return F.conv2d(h, B.to(x.dtype)[:, :, None, None])  # (out, R) -> (out, R, 1, 1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if pending and not (args or kwargs) and choose_form(self, x, [self.adapters[n] for n in pending]) == "weight":
            return weight_form_forward(self, x, pending)  # op(x, W + ΔW): see spectral_vision.fastpath
        y = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                y = y + self._apply_delta(x, self.adapters[name])
        return y

    def extra_repr(self) -> str:
        return f"kind={self.kind}, W={self.weight_shape}, active={self.active_adapters}, merged={self.merged_adapters}"
