"""Layer geometry: the one place that knows how each base-layer kind stores and applies its weight.

Every adapted layer is seen as a 2-D matrix ``W (out, in)`` (decomposed, adapted, merged). A
*geometry* is a small class per base-layer kind that maps the stored weight to that matrix and back
and applies a weight change ``ΔW = B A`` (``B (out, R)``, ``A (R, in)``) in the layer's own forward:

=====================================  =====================  ==========================  ========
base layer                             stored weight          ``W (out, in)``             forward
=====================================  =====================  ==========================  ========
``nn.Linear`` (and timm ``Linear``)    ``(out, in)``          the weight                  delta
transformers ``Conv1D``                ``(in, out)``          ``weight.T``                delta
``nn.Conv2d`` (any groups/padding)     ``(out, cin/g, kh, kw)``  ``(out, cin/g*kh*kw)``   delta
timm ``Conv2dSame`` (TF "same" pad)    as ``nn.Conv2d``       as ``nn.Conv2d``            delta
timm ``StdConv2d`` / ``ScaledStdConv2d``  as ``nn.Conv2d``    as ``nn.Conv2d`` (raw W)    weight
``nn.MultiheadAttention`` (in-proj)    ``in_proj_weight (3E, E)``  the weight             weight
=====================================  =====================  ==========================  ========

*delta*: the kind is linear in its weight, so ``y = base(x) + Δ(x)`` with ``Δ`` computed from the
factors (:meth:`LayerGeometry.delta_forward`). *weight*: the forward is not linear in the stored
weight (weight standardisation) or reads it directly (``nn.MultiheadAttention``), so the base's own
forward runs with the stored weight replaced by ``W + ΔW`` (:meth:`LayerGeometry.forward_with_weight`):
exactly what merging computes. Grouped convolutions (depthwise included) keep their stored layout:
row ``o`` of ``W`` is output channel ``o``'s filter over its own group's inputs (the block-diagonal
matrix with its zero blocks dropped), and ``ΔW`` is applied with the base's ``groups``.

A new kind is one registration (``docs/layers.md``)::

    @register_geometry("mylib.layers.MyConv")   # a class or its "module.QualName" (no import needed)
    class MyConvGeometry(Conv2dGeometry): ...

Lookup takes the most specific registered class in the module type's MRO. A subclass of a registered
type that overrides ``forward`` (or ``_conv_forward``) without a registration of its own is refused:
its forward may use the weight in a way the registered geometry does not know.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LayerGeometry", "LinearGeometry", "Conv1DGeometry", "Conv2dGeometry", "Conv2dSameGeometry",
    "StdConv2dGeometry", "MultiheadAttentionGeometry", "register_geometry", "find_geometry", "geometry_for",
    "layer_kind", "geometry_kinds", "base_weight", "weight_2d", "singular_values", "registered_geometries", "flatten_2d",
]

_REGISTRY: dict[Union[type, str], type["LayerGeometry"]] = {}
#: methods whose override in an unregistered subclass means "this layer computes differently"
_OVERRIDES = ("forward", "_conv_forward")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_geometry(*layer_types: Union[type, str]) -> Callable[[type], type]:
    """Class decorator: use the decorated :class:`LayerGeometry` for modules of ``layer_types``
    (classes, or ``"package.module.ClassName"`` strings so that no optional library is imported).
    The most specific registered class in a module's MRO wins."""
    def deco(cls: type["LayerGeometry"]) -> type["LayerGeometry"]:
        for t in layer_types:
            _REGISTRY[t] = cls
        return cls
    return deco


def registered_geometries() -> dict[str, str]:
    """``{layer type: geometry class name}`` of every registration (for docs and error messages)."""
    return {(t if isinstance(t, str) else _qualname(t)): g.__name__ for t, g in _REGISTRY.items()}


def _lookup(module: nn.Module):
    """``(MRO index, registered class, geometry)`` of the most specific registered type, or ``None``."""
    for i, c in enumerate(type(module).__mro__):
        g = _REGISTRY.get(c) or _REGISTRY.get(_qualname(c))
        if g is not None:
            return i, c, g
    return None


def find_geometry(module: nn.Module) -> tuple[Optional[type["LayerGeometry"]], Optional[str]]:
    """``(geometry class, None)`` for an adaptable module, ``(None, reason)`` for a module of a
    registered family that cannot be adapted, ``(None, None)`` for anything else."""
    found = _lookup(module)
    if found is None:
        return None, None
    i, c, g = found
    over = [f"{s.__name__}.{m}" for s in type(module).__mro__[:i] for m in _OVERRIDES if m in vars(s)]
    if over:
        return None, (f"{_qualname(type(module))} subclasses {c.__name__} but overrides {', '.join(over)} and "
                      f"has no registered layer geometry; register one with "
                      f"spectral_vision.geometry.register_geometry (see docs/layers.md)")
    reason = g.unsupported(module)
    return (None, reason) if reason else (g, None)


def geometry_for(module: nn.Module) -> "LayerGeometry":
    """The geometry of ``module``; ``TypeError`` saying why when it cannot be adapted."""
    g, reason = find_geometry(module)
    if g is None:
        raise TypeError(reason or f"cannot adapt {_qualname(type(module))}: supported are "
                                  f"{sorted(set(registered_geometries()))}")
    return g(module)


def geometry_kinds() -> tuple[str, ...]:
    """The ``kind`` names of every registered geometry (``"linear"``, ``"conv2d"``, ``"conv1d"``, ``"mha"``, ...)."""
    return tuple(sorted({g.kind for g in _REGISTRY.values() if g.kind}))


def layer_kind(module: nn.Module) -> Optional[str]:
    """The layout family (``"linear"``, ``"conv1d"``, ``"conv2d"``, ``"mha"``) of the most specific
    registered type of ``module``, or ``None``. Not ``None`` does not mean adaptable: an overriding
    subclass or an unsupported configuration is refused by :func:`geometry_for` with the reason."""
    found = _lookup(module)
    return None if found is None else found[2].kind


def flatten_2d(weight: torch.Tensor) -> torch.Tensor:
    """``(out, ...) -> (out, prod(...))`` float32, detached: the layout of a stored weight whose module is
    unknown (state dicts) and of Linear / Conv2d (``(out, cin/g, kh, kw) -> (out, cin/g*kh*kw)``)."""
    w = weight.detach()
    return w.reshape(w.shape[0], -1).float()


def _unwrap(module: nn.Module) -> nn.Module:
    from .layers import SpectralLayer

    return module.base_layer if isinstance(module, SpectralLayer) else module


def base_weight(module: nn.Module) -> torch.Tensor:
    """The stored parameter that is adapted (``weight``, or ``in_proj_weight`` for attention), base layout."""
    return geometry_for(_unwrap(module)).weight


@torch.no_grad()
def weight_2d(module: nn.Module, adapters: bool = True) -> torch.Tensor:
    """``W (out, in)`` float32 of a module of any registered kind (a copy).

    For a :class:`~spectral_vision.layers.SpectralLayer` with ``adapters=True``: the current base
    weight plus ``ΔW`` of the active, unmerged adapters (what the layer computes with, in the 2-D layout;
    merged adapters are already in the base weight); ``adapters=False``: the stored base weight only.
    """
    from .layers import SpectralLayer

    if isinstance(module, SpectralLayer):
        W = module.weight_2d()
        pending = [a for a in module.active_adapters if a not in module.merged_adapters]
        if adapters and pending and not module.disabled:
            W = W + module.delta_weight(pending).to(W)
        return W
    return geometry_for(module).to_2d()


@torch.no_grad()
def singular_values(module: nn.Module, k: Optional[int] = None, adapters: bool = True) -> torch.Tensor:
    """``σ (min(out, in),)`` (or the top ``k``), descending, float32, of :func:`weight_2d` of ``module``."""
    s = torch.linalg.svdvals(weight_2d(module, adapters))
    return s if k is None else s[:k]


class LayerGeometry:
    """Geometry of one base module. Subclasses set ``kind`` and implement the layout and forward."""

    #: layout family stored in adapter files and read by export ("linear", "conv1d", "conv2d", "mha")
    kind: ClassVar[str] = ""
    #: ``forward(W + ΔW) == forward(W) + delta_forward(ΔW)``; False: run the base forward with ``W + ΔW``
    additive: ClassVar[bool] = True
    #: the adapted parameter's attribute name
    weight_name: ClassVar[str] = "weight"
    #: a standard LoRA file (PEFT / kohya: ``base(x) + up(down(x))``, ``down`` with the base's conv
    #: settings and groups 1) reproduces ΔW exactly on this kind
    plain_lora: ClassVar[bool] = True

    def __init__(self, module: nn.Module):
        self.module = module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind}, W={tuple(self.shape)}, additive={self.additive})"

    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        """Why ``module`` cannot be adapted although its type is registered (``None``: it can)."""
        return None

    @property
    def weight(self) -> torch.Tensor:
        """The adapted parameter as stored."""
        return getattr(self.module, self.weight_name)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of ``W``."""
        w = self.weight
        return w.shape[0], w[0].numel()

    def to_2d(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W (out, in)`` float32 (detached; a copy for low-precision bases) of ``weight`` (default: own)."""
        return flatten_2d(self.weight if weight is None else weight)

    def from_2d(self, mat: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_2d`: ``(out, in)`` -> the stored layout (dtype of ``mat`` kept)."""
        return mat.reshape(self.weight.shape)

    def effective_weight(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight the base's forward actually applies for stored ``weight`` (default: own), base
        layout: the stored weight itself except for re-parametrised kinds (weight standardisation)."""
        return self.weight if weight is None else weight

    def delta_forward(self, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``Δ(x)``: the change of the layer's output for ``ΔW = B (out, R) @ A (R, in)``, in ``x``'s dtype."""
        raise NotImplementedError(f"{type(self).__name__} is not additive: use forward_with_weight")

    def adapter_forward(self, x: torch.Tensor, delta) -> torch.Tensor:
        """``Δ(x)`` of one adapter (a :class:`~spectral_vision.methods.base.SpectralDelta`)."""
        from .fastpath import fast_factors  # the method's sync-free factors where it has them

        B, A = fast_factors(delta)
        return self.delta_forward(x, B, A)

    def forward_with_weight(self, weight: torch.Tensor, *args, **kwargs):
        """The base module's own forward with its stored weight replaced by ``weight`` (base layout)."""
        return torch.func.functional_call(self.module, {self.weight_name: weight}, args, kwargs)


@register_geometry(nn.Linear, "timm.layers.linear.Linear")
class LinearGeometry(LayerGeometry):
    """``nn.Linear``: ``W`` is the weight; ``x (..., in) -> (..., out)``. timm's ``Linear`` only adds a
    TorchScript cast to the same computation."""

    kind = "linear"

    def delta_forward(self, x, B, A):
        return F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))  # (..., in) -> (..., R) -> (..., out)

    def adapter_forward(self, x, delta):
        return delta.forward_linear(x)  # the method's fast path (tested against delta_weight)


@register_geometry("transformers.pytorch_utils.Conv1D")
class Conv1DGeometry(LinearGeometry):
    """transformers' GPT-2 ``Conv1D``: stores ``(in, out)`` and computes ``x @ weight + bias``."""

    kind = "conv1d"

    @property
    def shape(self):
        return self.weight.shape[1], self.weight.shape[0]

    def to_2d(self, weight=None):
        w = (self.weight if weight is None else weight).detach()
        return w.T.float()  # (in, out) -> (out, in)

    def from_2d(self, mat):
        return mat.T  # (out, in) -> (in, out)


@register_geometry(nn.Conv2d)
class Conv2dGeometry(LayerGeometry):
    """``nn.Conv2d``: ``W (out, cin/g*kh*kw)``. ``groups == 1``: a ``kh×kw`` conv to ``R`` channels through
    the base's own padding path, then a 1×1 conv. ``groups > 1`` (depthwise included): ``ΔW`` is rebuilt in
    the stored layout (``out·cin/g·kh·kw`` entries, fewer than the factors' ``R·(g·in + out)``) and applied
    as a grouped conv."""

    kind = "conv2d"

    @property
    def plain_lora(self) -> bool:
        m = self.module
        return type(self) is Conv2dGeometry and m.groups == 1 and m.padding_mode == "zeros"

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base's convolution (padding, padding_mode, stride, dilation, groups) without bias."""
        return self.module._conv_forward(x, weight, None)

    def delta_forward(self, x, B, A):
        shape, R = self.weight.shape, A.shape[0]
        if self.module.groups != 1:
            return self._conv(x, (B @ A).to(x.dtype).reshape(shape))  # (out, cin/g, kh, kw)
        h = self._conv(x, A.to(x.dtype).reshape(R, *shape[1:]))  # (R, in) -> (R, cin, kh, kw): (N, R, H', W')
        return F.conv2d(h, B.to(x.dtype)[:, :, None, None])  # (out, R) -> (out, R, 1, 1)


@register_geometry("timm.layers.conv2d_same.Conv2dSame")
class Conv2dSameGeometry(Conv2dGeometry):
    """timm ``Conv2dSame``: TF "same" padding computed from the input size (``pad_same``), padding 0."""

    def _conv(self, x, weight):
        from timm.layers.conv2d_same import conv2d_same

        m = self.module
        return conv2d_same(x, weight, None, m.stride, m.padding, m.dilation, m.groups)


@register_geometry("timm.layers.std_conv.StdConv2d", "timm.layers.std_conv.StdConv2dSame",
                   "timm.layers.std_conv.ScaledStdConv2d", "timm.layers.std_conv.ScaledStdConv2dSame")
class StdConv2dGeometry(Conv2dGeometry):
    """timm weight-standardised convs (BiT / ResNetV2 / NFNet): the forward applies ``std(W)`` (times
    ``gain·scale`` for the scaled variants). ``W`` is the raw stored weight, and the adapted layer runs
    the module's own forward on ``W + ΔW``: the delta sits inside the standardisation, as in a merge."""

    additive = False

    def effective_weight(self, weight=None):
        m = self.module
        w = self.weight if weight is None else weight
        gain = (m.gain * m.scale).view(-1) if hasattr(m, "gain") else None
        return F.batch_norm(w.reshape(1, m.out_channels, -1), None, None, weight=gain, training=True,
                            momentum=0.0, eps=m.eps).reshape_as(w)


@register_geometry(nn.MultiheadAttention)
class MultiheadAttentionGeometry(LayerGeometry):
    """``nn.MultiheadAttention`` (open_clip, torchvision ViT): adapts the packed in-projection
    ``in_proj_weight (3E, E)`` (q, k, v stacked). Its forward hands the weight to
    ``F.multi_head_attention_forward``, so the adapted layer runs it with ``W + ΔW``. ``out_proj`` is read
    the same way and cannot be wrapped on its own."""

    kind = "mha"
    additive = False
    plain_lora = False
    weight_name = "in_proj_weight"

    @classmethod
    def unsupported(cls, module):
        if module.in_proj_weight is None:
            return ("nn.MultiheadAttention with kdim/vdim != embed_dim keeps separate q/k/v projection weights; "
                    "only the packed in_proj_weight is supported")
        return None
