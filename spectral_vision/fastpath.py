"""The two forward forms of a :class:`~spectral_vision.layers.SpectralLayer`, and the cost model that picks one.

* **delta form** ``y = base(x) + Δ(x)``: ``Δ`` through the method's thin factors ``ΔW = B A`` (``R`` columns).
  Extra work per call: a few passes over the activations, ``N (in + out)`` elements each, forward and
  backward. Cheap in FLOPs, but on a GPU every pass is memory-bound (a rank-8 matmul reads and
  writes as many bytes as the full matmul it rides on).
* **weight form** ``y = op(x, W + B A)``: the weight is rebuilt in fp32 (one ``addmm`` per adapter,
  ``O(out·in·R)`` and independent of the batch), cast to the base dtype and used in the layer's
  own op. In training, backward pays one extra matmul ``∂W = gᵀ x`` (compute-bound; what full
  fine-tuning pays) instead of the memory-bound passes. Its output equals the merged model's.

``auto`` (the default) compares the two costs per call from the layer shape, the number of rows ``N``,
the dtype and rough device rates (:data:`RATES`): on a GPU, ViT-B- and SD-UNet-size layers train in the
weight form; on a CPU, big layers keep the delta form. ``SPECTRAL_VISION_FORWARD=delta|weight|auto``
changes the default; :func:`set_forward_form` fixes it per model or layer. Every form is exact to
fp32 rounding and tested against ``delta_weight`` (``tests/test_fastpath.py``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FORMS", "RATES", "DEFAULT_FORM", "set_default_form", "set_forward_form", "forward_form", "fast_factors",
           "form_costs", "choose_form", "weight_form_forward", "merged_weight"]

FORMS = ("auto", "delta", "weight")
#: rough sustained rates per device type: (16-bit matmul FLOP/s, fp32 matmul FLOP/s, memory bytes/s).
#: Only their ratios matter (FLOPs per byte); an H100/H200 sits near (4e14, 4e13, 3e12).
RATES = {"cuda": (4e14, 4e13, 3e12), "cpu": (1e11, 1e11, 1e10)}
_ATTR = "_sv_forward_form"


def _check(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"unknown forward form {form!r}; use one of {FORMS}")
    return form


#: the form of layers without their own setting (``$SPECTRAL_VISION_FORWARD``, read once at import)
DEFAULT_FORM = _check(os.environ.get("SPECTRAL_VISION_FORWARD", "auto").strip().lower() or "auto")


def set_default_form(form: str) -> None:
    """Set the form of every layer that has no form of its own (:func:`set_forward_form`)."""
    global DEFAULT_FORM
    DEFAULT_FORM = _check(form)


def set_forward_form(module: nn.Module, form: Optional[str]) -> nn.Module:
    """Fix the forward form of every :class:`SpectralLayer` in ``module`` (or of ``module`` itself):
    ``"delta"``, ``"weight"``, ``"auto"``, or ``None`` for the default. Returns ``module``."""
    from .layers import SpectralLayer

    if form is not None:
        _check(form)
    layers = [m for m in module.modules() if isinstance(m, SpectralLayer)]
    if not layers:
        raise ValueError(f"{type(module).__name__} holds no SpectralLayer: attach an adapter first")
    for layer in layers:
        setattr(layer, _ATTR, form)
    return module


def forward_form(layer: nn.Module) -> str:
    """The form ``layer`` is set to (``"auto"`` unless :func:`set_forward_form` or the env var says otherwise)."""
    return getattr(layer, _ATTR, None) or DEFAULT_FORM


def fast_factors(delta) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B (out, R), A (R, in))`` with ``B A = ΔW``: the method's ``fast_factors`` if it has one
    (fewer kernels, no host syncs), else its ``factors``."""
    f = getattr(delta, "fast_factors", None)
    return f() if f is not None else delta.factors()


def _factor_rank(delta) -> int:
    r = getattr(delta, "factor_rank", None)
    return int(r) if r is not None else int(delta.cfg.rank)


def _plain_op(layer) -> bool:
    """True when the layer's geometry is additive and its base forward is exactly the functional op
    :func:`weight_form_forward` calls (no subclass that pads, standardises or quantises in ``forward``)."""
    g = layer.geometry
    if not g.additive:
        return False
    fwd = type(layer.base_layer).forward
    if g.kind == "linear":
        return fwd is nn.Linear.forward
    if g.kind == "conv2d":
        return fwd is nn.Conv2d.forward
    return g.kind == "conv1d" and type(layer.base_layer).__name__ == "Conv1D"


def _rows(layer, x: torch.Tensor) -> int:
    """Number of rows ``N`` the layer's matmul sees (tokens, or output pixels of a convolution)."""
    if layer.kind != "conv2d":
        return x.numel() // max(x.shape[-1], 1)
    conv = layer.base_layer
    h, w = x.shape[-2:]
    if isinstance(conv.padding, str):  # "same" / "valid": the output is about the input's size
        return (x.shape[0] if x.dim() == 4 else 1) * h * w
    ho = (h + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    wo = (w + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
    return (x.shape[0] if x.dim() == 4 else 1) * ho * wo


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (RuntimeError, TypeError):  # device types without autocast (meta, ...)
        pass
    return x.dtype


def form_costs(out_f: int, in_f: int, n: int, r: int, size: int, train: bool, rates: tuple) -> tuple[float, float]:
    """Rough extra seconds of ``(delta form, weight form)`` over the frozen layer for one call.

    ``n`` rows of a ``(out_f, in_f)`` layer, ``r`` factor columns, ``size`` bytes per activation element,
    ``train``: adapter parameters need gradients; ``rates``: an entry of :data:`RATES`.
    Delta: ``3`` (``+5`` in backward) passes over ``n (in + out)`` activations plus the thin matmuls.
    Weight: the ``∂W = gᵀx`` matmul in backward plus building, casting and back-propagating ``W + B A``.
    """
    f16, f32, bw = rates
    flops, t, io = (f16 if size == 2 else f32), int(train), n * (in_f + out_f)
    delta = io * size * (3 + 5 * t) / bw + 2 * io * r * (1 + 2 * t) / flops
    weight = 2 * n * in_f * out_f * t / flops + out_f * in_f * 4 * (3 + 3 * t) / bw + 2 * out_f * in_f * r * (1 + 2 * t) / f32
    return delta, weight


def choose_form(layer, x: torch.Tensor, deltas: list) -> str:
    """``"delta"`` or ``"weight"`` for this call of ``layer`` on ``x`` with active adapters ``deltas``."""
    form = forward_form(layer)
    if form == "delta" or not _plain_op(layer):
        return "delta"
    if form == "weight":
        return "weight"
    if x.device.type not in RATES:
        return "delta"
    out_f, in_f = layer.weight_shape
    train = torch.is_grad_enabled() and any(p.requires_grad for d in deltas for p in d.parameters())
    delta, weight = form_costs(out_f, in_f, _rows(layer, x), sum(_factor_rank(d) for d in deltas),
                               torch.finfo(_compute_dtype(x)).bits // 8, train, RATES[x.device.type])
    return "weight" if weight < delta else "delta"


def _fp32_region(device_type: str):
    """Autocast off (the weight is built in fp32 whatever autocast is on)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, enabled=False)
    except (RuntimeError, TypeError):
        pass
    return contextlib.nullcontext()


def merged_weight(layer, names: list[str]) -> torch.Tensor:
    """``W + Σ ΔW`` of adapters ``names`` in the base weight's layout and dtype, built in fp32 with one
    ``addmm`` per adapter (differentiable w.r.t. the adapters' parameters)."""
    w = layer.base_layer.weight
    with _fp32_region(w.device.type):
        W = layer.weight_2d()  # (out, in) fp32
        for name in names:
            B, A = fast_factors(layer.adapters[name])  # (out, R), (R, in)
            W = torch.addmm(W, B, A)
        return layer.to_base_layout(W).to(w.dtype)


def weight_form_forward(layer, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The layer's own op with the rebuilt weight: ``op(x, W + Σ ΔW)`` (``x`` as the base layer takes it)."""
    base, W = layer.base_layer, merged_weight(layer, names)
    if layer.kind == "linear":
        return F.linear(x, W, base.bias)
    if layer.kind == "conv2d":
        return base._conv_forward(x, W, base.bias)
    out = torch.addmm(base.bias, x.reshape(-1, x.shape[-1]), W)  # transformers Conv1D: W (in, out)
    return out.view(*x.shape[:-1], W.shape[1])
