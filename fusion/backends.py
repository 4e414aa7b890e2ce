"""Fusion backends: what fusion needs from a kind of adapter layer, written once per kind.

Fusion never branches on layer types and never reads a method's parameters: it goes through

* a **layer handle** per adapted layer: ``names()`` (adapters on it), ``base_2d()`` (``W₀ (out, in)``
  fp32, the core's 2-D layout), ``delta(name, scale)`` (``ΔW (out, in)`` fp32 at strength ``scale``),
  ``factors(name, scale)`` (exact ``(B (out, R), A (R, in))`` with ``B A = delta``), ``base_layer``;
* a **model backend** per kind: ``layers()`` (the handles), ``activate(names)`` (only those adapters
  run), ``write(adapter, factors)`` (add adapter ``adapter`` holding ``ΔW = B A`` per layer),
  ``remove(names)`` and ``merge_and_unload(adapter)`` (the one merge path: the kind's own merge).

:class:`SpectralBackend` serves :class:`spectral_vision.layers.SpectralLayer` (fused adapters are
``lowrank`` adapters, or one method's own concatenation, see :meth:`SpectralBackend.write_method`);
:class:`PeftLoraBackend` serves PEFT LoRA layers (fused adapters are PEFT LoRA adapters).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

import spectral_vision as sv
from spectral_vision.layers import SpectralLayer

from spectral_vision.geometry import weight_2d as _weight_2d  # the one 2-D layout of every layer kind

__all__ = ["SpectralBackend", "PeftLoraBackend", "backends", "all_layers", "base_2d"]

Factors = tuple[torch.Tensor, torch.Tensor]


def base_2d(module: nn.Module) -> torch.Tensor:
    """``W₀ (out, in)`` float32 of a base or wrapped layer (adapters excluded)."""
    return _weight_2d(module, adapters=False)


# ---- spectral_vision layers ------------------------------------------------------------------------------
class SpectralHandle:
    kind = "spectral"

    def __init__(self, name: str, module: SpectralLayer):
        self.name, self.module = name, module

    @property
    def base_layer(self) -> nn.Module:
        return self.module.base_layer

    def names(self) -> list[str]:
        return list(self.module.adapters)

    def base_2d(self) -> torch.Tensor:
        return base_2d(self.module)

    def delta(self, name: str, scale: float = 1.0) -> torch.Tensor:
        return self.module.adapters[name].delta_weight(scale).detach()

    def factors(self, name: str, scale: float = 1.0) -> Factors:
        B, A = self.module.adapters[name].factors(scale)
        return B.detach(), A.detach()

    def columns(self, name: str) -> list[int]:
        """The singular columns adapter ``name`` uses on this layer (its band)."""
        return self.module.adapters[name].columns.tolist()

    def adapter(self, name: str) -> sv.SpectralDelta:
        return self.module.adapters[name]


class SpectralBackend:
    """spectral_vision adapters of ``model`` (through the package's public functions)."""

    kind = "spectral"

    def __init__(self, model: nn.Module):
        self.model = model

    def layers(self) -> list[SpectralHandle]:
        return [SpectralHandle(n, m) for n, m in sv.spectral_layers(self.model)]

    def adapter_names(self) -> list[str]:
        return sv.adapter_names(self.model)

    def activate(self, names: Sequence[str]) -> None:
        sv.set_adapter(self.model, [n for n in names if n in sv.adapter_names(self.model)])

    def write(self, adapter: str, factors: dict[str, Factors], target_modules=None) -> None:
        """Add ``lowrank`` adapter ``adapter`` with ``ΔW = B A`` on each layer of ``factors`` (rank: the largest
        ``R``, smaller ones zero-padded; ``alpha = 1``). ``target_modules`` is recorded in its config."""
        if not factors:
            return
        rank = max(B.shape[1] for B, _ in factors.values())
        cfg = sv.SpectralConfig(method="lowrank", rank=max(rank, 1), alpha=1.0,
                                target_modules=target_modules or list(factors))
        sv.attach(self.model, cfg, adapter, columns={n: [] for n in factors}, progress=False)
        for n, m in sv.spectral_layers(self.model):
            if n in factors:
                m.adapters[adapter].set_factors(*factors[n])

    def write_method(self, adapter: str, cfg: sv.SpectralConfig, columns: dict[str, list[int]],
                     states: dict[str, dict]) -> None:
        """Add adapter ``adapter`` of ``cfg.method`` with per-layer ``columns`` and the ``states`` that the
        method's :meth:`~spectral_vision.SpectralDelta.concat` returned."""
        sv.attach(self.model, cfg, adapter, columns=columns, progress=False)
        for n, m in sv.spectral_layers(self.model):
            if n in states:
                d = m.adapters[adapter]
                d.load_state_dict({**states[n], "columns": d.columns}, strict=True)

    def remove(self, names: Sequence[str]) -> None:
        for n in names:
            if n in sv.adapter_names(self.model):
                sv.detach(self.model, n)

    def merge_and_unload(self, adapter: str) -> None:
        """Merge ``adapter`` into the base weights and drop every spectral wrapper."""
        if adapter in sv.adapter_names(self.model):
            sv.set_adapter(self.model, adapter)
        sv.merge_and_unload(self.model)


# ---- PEFT LoRA layers -------------------------------------------------------------------------------------
def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is optional
        return None
    return LoraLayer


class PeftLoraHandle:
    kind = "peft_lora"

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    @property
    def base_layer(self) -> nn.Module:
        return self.module.get_base_layer()

    def names(self) -> list[str]:
        return list(self.module.lora_A.keys())

    def base_2d(self) -> torch.Tensor:
        return base_2d(self.module.get_base_layer())

    def factors(self, name: str, scale: float = 1.0) -> Factors:
        """``(scale·scaling·lora_B, lora_A)`` in the 2-D layout; PEFT variants without exact factors
        (DoRA and other ``lora_variant`` adapters) are refused."""
        m = self.module
        if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False) \
                or not hasattr(m.lora_A[name], "weight"):
            raise ValueError(f"{self.name}: PEFT adapter {name!r} is a LoRA variant (e.g. DoRA) without exact "
                             "low-rank factors; only plain LoRA concepts can be fused")
        A = m.lora_A[name].weight.detach().float()
        A = A.reshape(A.shape[0], -1)  # (r, in[, kh, kw]) -> (r, in·kh·kw)
        B = m.lora_B[name].weight.detach().float()
        B = B.reshape(B.shape[0], -1)  # (out, r[, 1, 1]) -> (out, r)
        return float(scale) * m.scaling[name] * B, A

    def delta(self, name: str, scale: float = 1.0) -> torch.Tensor:
        B, A = self.factors(name, scale)
        return B @ A  # (out, in)


class PeftLoraBackend:
    """PEFT LoRA adapters injected into ``model`` (``peft.inject_adapter_in_model`` / diffusers' loaders)."""

    kind = "peft_lora"

    def __init__(self, model: nn.Module):
        self.model = model

    def layers(self) -> list[PeftLoraHandle]:
        t = _lora_layer_type()
        if t is None:
            return []
        return [PeftLoraHandle(n, m) for n, m in self.model.named_modules() if isinstance(m, t)]

    def adapter_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for h in self.layers():
            seen.update(dict.fromkeys(h.names()))
        return list(seen)

    def activate(self, names: Sequence[str]) -> None:
        for h in self.layers():
            here = [n for n in names if n in h.names()]
            if here:
                h.module.set_adapter(here)
            h.module.enable_adapters(bool(here))  # public BaseTunerLayer API

    def write(self, adapter: str, factors: dict[str, Factors], target_modules=None) -> None:
        """Add PEFT LoRA adapter ``adapter`` (``r`` = largest ``R``, ``lora_alpha = r``: scaling 1)."""
        import peft

        if not factors:
            return
        r = max(max(B.shape[1] for B, _ in factors.values()), 1)
        config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(factors))
        peft.inject_adapter_in_model(config, self.model, adapter_name=adapter)
        with torch.no_grad():
            for h in self.layers():
                if h.name not in factors:
                    continue
                B, A = factors[h.name]
                la, lb = h.module.lora_A[adapter].weight, h.module.lora_B[adapter].weight
                R = B.shape[1]
                la.zero_()
                lb.zero_()
                la.view(r, -1)[:R] = A.to(la)  # (r, in·kh·kw) view of (r, in[, kh, kw])
                lb.view(lb.shape[0], r)[:, :R] = B.to(lb)  # (out, r) view of (out, r[, 1, 1])

    def remove(self, names: Sequence[str]) -> None:
        for h in self.layers():
            for n in names:
                if n in h.names():
                    h.module.delete_adapter(n)

    def merge_and_unload(self, adapter: str) -> None:
        """PEFT's own merge of ``adapter`` into each base layer, then the base layer replaces the wrapper."""
        for h in self.layers():
            if adapter in h.names():
                h.module.merge(adapter_names=[adapter])
            parent, _, child = h.name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, h.module.get_base_layer())


BACKENDS = (SpectralBackend, PeftLoraBackend)


def backends(model: nn.Module) -> list:
    """One backend per adapter kind present on ``model`` (spectral_vision, PEFT LoRA)."""
    return [b(model) for b in BACKENDS]


def all_layers(model: nn.Module, names: Optional[Sequence[str]] = None) -> list[tuple[object, list[str]]]:
    """``(handle, concepts on it)`` for every adapted layer carrying one of ``names`` (default: any adapter)."""
    out = []
    for b in backends(model):
        for h in b.layers():
            have = h.names()
            present = have if names is None else [n for n in names if n in have]
            if present:
                out.append((h, present))
    return out
