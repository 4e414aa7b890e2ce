"""`SpectralDelta`: the base class of every method, and the method registry.

A method is one small file that subclasses :class:`SpectralDelta` and implements only what is
particular to it: its parameters (``__init__``), its weight change ``delta_weight()`` (fp32, the
single source of truth) and an exact low-rank factorisation ``factors()`` that the fast
delta-form forward, merging-free inference, LoRA export and fusion use. Everything else
(wrapping layers, forward, merge/unmerge, save/load) is written once in
:mod:`spectral_vision.layers` and :mod:`spectral_vision.model`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SpectralConfig
from ..svd import Basis

__all__ = ["SpectralDelta", "register_method", "get_method", "available_methods", "NoOptions"]

_METHODS: dict[str, type["SpectralDelta"]] = {}


@dataclasses.dataclass
class NoOptions:
    """Methods without options of their own."""


def register_method(cls: type["SpectralDelta"]) -> type["SpectralDelta"]:
    """Class decorator: make ``cls`` selectable as ``SpectralConfig(method=cls.name)``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type["SpectralDelta"]:
    """The registered method class called ``name``; a clear error lists the known names."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_METHODS)}") from None


def available_methods() -> list[str]:
    """Names of all registered methods."""
    return sorted(_METHODS)


class SpectralDelta(nn.Module):
    """One adapter on one layer with 2-D weight ``W (out, in)``: ``W' = W + ΔW``.

    Subclasses set ``name`` (registry key), optionally ``Options`` (a dataclass of
    method-specific options read from ``SpectralConfig.options``), and implement
    ``__init__``, ``delta_weight`` and ``factors``.

    Persistent state (what is saved) is the module's ``state_dict()``: trainable parameters plus
    persistent buffers such as ``columns``. The basis ``U, S, V`` is registered as non-persistent
    buffers: it is recomputed (or read from the SVD cache) from the base weight at load time.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: whether ΔW is zero at initialisation (checked by the shared invariant tests)
    zero_init: ClassVar[bool] = True
    #: ``cfg.rank`` counts singular columns, so it cannot exceed a layer's ``min(out, in)`` (load-time check)
    rank_is_columns: ClassVar[bool] = True

    def __init__(self, basis: Basis, weight: torch.Tensor, cfg: SpectralConfig, columns: torch.Tensor):
        """Args:
        basis: top-``k`` triplets of ``W`` (``k = num_components(...)``), fp32.
        weight: ``W (out, in)`` fp32 (read-only; keep only what the method needs).
        cfg: the adapter's config.
        columns: ``(c,)`` long tensor of the singular indices this adapter uses.
        """
        super().__init__()
        self.cfg = cfg
        self.opts = self.parse_options(cfg.options)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("columns", columns.clone().long(), persistent=True)

    # ---- what a method declares -------------------------------------------------------------
    @classmethod
    def parse_options(cls, options: dict[str, Any]):
        """Validate ``SpectralConfig.options`` against ``cls.Options`` (unknown keys are an error)."""
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"method {cls.name!r} has no options {sorted(unknown)}; known: {sorted(known)}")
        return cls.Options(**options)

    @classmethod
    def num_components(cls, cfg: SpectralConfig, out_features: int, in_features: int) -> int:
        """How many top singular triplets to decompose (default: up to the last used column)."""
        return max(cfg.band_columns()) + 1

    @classmethod
    def default_columns(cls, cfg: SpectralConfig, out_features: int, in_features: int) -> list[int]:
        """The singular indices used when none are stored (default: the config's band)."""
        return cfg.band_columns()

    def delta_weight(self, scale: float = 1.0) -> torch.Tensor:
        """``ΔW (out, in)`` in float32, written straight from the method's equations.

        ``scale`` is the adapter's strength: the method behaves as if trained with ``alpha * scale``
        (a multiple of ΔW for most methods; ^R scales its Cayley generator). ``scale=0`` gives 0.
        """
        raise NotImplementedError

    def factors(self, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact factorisation ``ΔW(scale) = B @ A`` with ``B (out, R)``, ``A (R, in)``, float32.

        Used by the delta-form forward (two thin matmuls, the weight is never rebuilt), by LoRA
        export and by fusion. Tested against :meth:`delta_weight` for every method.
        """
        raise NotImplementedError

    @classmethod
    def concat(cls, deltas: Sequence["SpectralDelta"], scales: Sequence[float]) -> Optional[tuple[float, dict]]:
        """One adapter of this method equal to ``Σᵢ deltas[i].delta_weight(scales[i])``, or ``None``.

        ``deltas`` are adapters of this method on one layer with disjoint ``columns``. Returns
        ``(alpha, state)``: the fused adapter's ``alpha`` and its ``state_dict`` on the concatenated
        columns ``cat(d.columns)`` (rank ``Σ rᵢ``). ``None`` when this method cannot hold the sum
        exactly (the default): fusion then stores the concatenated :meth:`factors` instead.
        """
        return None

    def forward_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``Δ(x) = x ΔWᵀ`` for ``x (..., in)`` -> ``(..., out)`` in ``x``'s dtype: the delta-form forward
        of linear layers. Default: two thin matmuls through :meth:`factors`; a method may override it
        with a cheaper exact path (the shared invariant tests compare it with :meth:`delta_weight`)."""
        B, A = self.factors()  # (out, R), (R, in)
        return F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))

    # ---- helpers for subclasses ---------------------------------------------------------------
    def register_basis(self, basis: Basis, columns: Optional[torch.Tensor] = None) -> None:
        """Keep the selected triplets as non-persistent fp32 buffers ``U (out,c)``, ``S (c,)``, ``V (in,c)``."""
        b = basis.select(self.columns if columns is None else columns)
        self.register_buffer("U", b.U.contiguous(), persistent=False)
        self.register_buffer("S", b.S.contiguous(), persistent=False)
        self.register_buffer("V", b.V.contiguous(), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.name}, out={self.out_features}, in={self.in_features}, columns={self.columns.numel()}"
