"""`SpectralModel`: the PEFT-like one-call entry (``get_spectral_model`` / ``from_pretrained``).

For users coming from 🤗 PEFT::

    model = sv.get_spectral_model(timm_or_diffusers_or_transformers_model, sv.SpectralConfig(...))
    model.print_trainable_parameters()
    ...train...
    model.save_pretrained("out/adapter")
    model = sv.SpectralModel.from_pretrained(fresh_base, "out/adapter")
    plain = model.merge_and_unload()

The wrapper holds the model (``base_model``), forwards calls and unknown attributes to it (so
``model.config``, ``model.generate``, ``unet.dtype`` work), and exposes PeftModel's method names on
top of the functional API (:mod:`spectral_vision.model`, :mod:`spectral_vision.io`), which keeps
working on the wrapped model and on ``model.base_model`` alike.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional, Union

from torch import nn

from . import model as _m
from .config import SpectralConfig
from .io import CONFIG_NAME, AdapterFileError, load_adapter, save_adapter

__all__ = ["SpectralModel", "get_spectral_model"]


class SpectralModel(nn.Module):
    """A model with spectral adapters, PeftModel-style. Build it with :func:`get_spectral_model` or
    :meth:`from_pretrained`; ``base_model`` is the (adapted, in place) original model."""

    def __init__(self, model: nn.Module, cfg: Optional[SpectralConfig] = None, adapter_name: str = "default",
                 progress: bool = False):
        super().__init__()
        if isinstance(model, SpectralModel):
            raise TypeError("model is already a SpectralModel: use add_adapter(...) for another adapter")
        self.base_model = model
        if cfg is not None:
            _m.attach(model, cfg, adapter_name, progress=progress)

    # ---- behave like the wrapped model ----------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its adapter layers)."""
        return self.base_model

    # ---- adapters --------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters on the model, in insertion order."""
        return _m.adapter_names(self.base_model)

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters (the union over layers)."""
        seen: dict[str, None] = {}
        for _, layer in _m.spectral_layers(self.base_model):
            seen.update(dict.fromkeys(layer.active_adapters))
        return list(seen)

    @property
    def active_adapter(self) -> str:
        """The active adapter's name (the first one when several are active)."""
        act = self.active_adapters
        if not act:
            raise AttributeError(f"no active adapter; the model holds {self.adapter_names}")
        return act[0]

    @property
    def spectral_config(self) -> dict[str, SpectralConfig]:
        """``{adapter name: SpectralConfig}`` (PEFT's ``peft_config``)."""
        return {n: _m.adapter_config(self.base_model, n) for n in self.adapter_names}

    peft_config = spectral_config

    def add_adapter(self, adapter_name: str, cfg: SpectralConfig, progress: bool = False) -> None:
        """Add another adapter; as in PEFT the active adapter does not change (call :meth:`set_adapter`)."""
        active = self.active_adapters
        _m.attach(self.base_model, cfg, adapter_name, progress=progress)
        if active:
            _m.set_adapter(self.base_model, active)

    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Make ``adapter_name`` (or several names, summed) the active, trainable adapter(s)."""
        _m.set_adapter(self.base_model, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (its layers are restored exactly once no adapter is left on them)."""
        if adapter_name not in self.adapter_names:
            raise KeyError(f"no adapter {adapter_name!r}; the model holds {self.adapter_names}")
        _m.detach(self.base_model, adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model only inside the block (merged layers are unmerged)."""
        _m.disable_adapters(self.base_model)
        try:
            yield
        finally:
            _m.enable_adapters(self.base_model)

    # ---- parameters ------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as PEFT's method of the same name."""
        c = _m.trainable_parameters(self.base_model)
        return c.trainable, c.total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: ... || all params: ... || trainable%: ...`` (PEFT's format)."""
        print(_m.trainable_parameters(self.base_model))

    # ---- merge -----------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the active adapters (or ``adapter_names``) into the weights; :meth:`unmerge_adapter` undoes it."""
        _m.merge(self.base_model, adapter_names)

    def unmerge_adapter(self) -> None:
        _m.unmerge(self.base_model)

    def merge_and_unload(self) -> nn.Module:
        """Bake the active adapters into the weights and return the plain model (no wrapper, no adapter layers)."""
        return _m.merge_and_unload(self.base_model)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the original model, restored exactly."""
        return _m.detach(self.base_model)

    # ---- files -----------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, Path], selected_adapters: Optional[list[str]] = None,
                        extra_metadata: Optional[dict] = None) -> Path:
        """Save adapters as :func:`spectral_vision.save_adapter` does: one adapter into ``save_directory``;
        several: ``"default"`` into ``save_directory``, every other one into ``save_directory/<name>/``."""
        path = Path(save_directory)
        if selected_adapters is None:
            return save_adapter(self.base_model, path, None, extra_metadata)
        names = list(selected_adapters)
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown or not names:
            raise KeyError(f"no adapter(s) {unknown or names}; the model holds {self.adapter_names}")
        if len(names) == 1:
            return save_adapter(self.base_model, path, names[0], extra_metadata)
        for n in names:
            save_adapter(self.base_model, path if n == "default" else path / n, n, extra_metadata)
        return path

    def load_adapter(self, path: Union[str, Path], adapter_name: Optional[str] = None, is_trainable: bool = False,
                     strict_base: bool = True) -> None:
        """Load one adapter folder (all checks of :func:`spectral_vision.load_adapter`) under ``adapter_name``."""
        active, before = self.active_adapters, set(self.adapter_names)
        load_adapter(self.base_model, path, adapter_name, strict_base=strict_base, progress=False)
        if active:
            _m.set_adapter(self.base_model, active)
        if not is_trainable:
            new = [n for n in self.adapter_names if n not in before]
            for _, layer in _m.spectral_layers(self.base_model):
                for n in new:
                    if n in layer.adapters:
                        layer.adapters[n].requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: Union[str, Path], adapter_name: Optional[str] = None,
                        is_trainable: bool = False, strict_base: bool = True) -> "SpectralModel":
        """Wrap ``model`` and load the adapter(s) saved in ``path`` (as PeftModel.from_pretrained).

        ``path`` holds one adapter (``adapter_config.json``) and/or adapters in subfolders (the layout of
        :meth:`save_pretrained`). ``adapter_name``: for a single adapter, the name to load it as (default:
        its saved name); with subfolders, load only that one. Loaded adapters are frozen unless
        ``is_trainable`` (then the first loaded one is active and trainable). Raises
        :class:`AdapterFileError` naming what the folder holds when nothing matches.
        """
        path = Path(path)
        root = (path / CONFIG_NAME).exists()
        subs = sorted(p for p in path.iterdir() if (p / CONFIG_NAME).is_file()) if path.is_dir() else []
        by_name = {p.name: p for p in subs}
        if adapter_name is not None and adapter_name in by_name:
            folders = [(by_name[adapter_name], adapter_name)]
        elif root:
            folders = [(path, adapter_name)] + ([(p, p.name) for p in subs] if adapter_name is None else [])
        elif adapter_name is None:
            folders = [(p, p.name) for p in subs]
        else:
            folders = []
        if not folders:
            held = list(by_name) + (["<the folder itself>"] if root else [])
            raise AdapterFileError(f"{path}: no adapter {adapter_name!r} here; it holds {held or 'no adapter'}")
        self = cls(model)
        before = set(self.adapter_names)
        try:
            for i, (folder, name) in enumerate(folders):
                self.load_adapter(folder, name, is_trainable=is_trainable and i == 0, strict_base=strict_base)
        except Exception:
            for name in [n for n in self.adapter_names if n not in before]:  # all or nothing
                _m.detach(model, name)
            raise
        loaded = [n for n in self.adapter_names if n not in before]
        for _, layer in _m.spectral_layers(model):  # frozen for inference unless is_trainable (the first one)
            for n in loaded:
                if n in layer.adapters:
                    layer.adapters[n].requires_grad_(is_trainable and n == loaded[0])
        return self


def get_spectral_model(model: nn.Module, cfg: SpectralConfig, adapter_name: str = "default",
                       progress: bool = False) -> SpectralModel:
    """Attach adapter ``adapter_name`` of ``cfg`` to ``model`` (in place) and return it wrapped in a
    :class:`SpectralModel` (PEFT's ``get_peft_model``). Only the adapter's parameters are trainable."""
    return SpectralModel(model, cfg, adapter_name, progress=progress)
