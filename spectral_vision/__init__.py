"""spectral_vision: parameter-efficient fine-tuning in the spectral space of pretrained weights.

Where things live:
    svd.py        decomposition (exact / randomized, fp32, sign-canonical, disk cache)
    geometry.py   layer geometries: per base-layer kind the 2-D layout and how ΔW enters the forward
    layers.py     SpectralLayer: the one wrapper (forward, merge/unmerge) for every registered kind
    methods/      one file per method on SpectralDelta (registry in methods/base.py)
    presets.py    target-module presets per model family (the backbone table)
    model.py      attach / detach / set_adapter / merge / trainable_parameters
    io.py         safetensors save / load with base fingerprint and validation of every field
    adapter_file.py  reading + validating adapter folders (bounded, every field checked)
    signature.py  basis signatures: a reload never silently uses other singular vectors
    spectral_model.py  SpectralModel / get_spectral_model: the PEFT-like one-call entry
"""
__version__ = "0.1.0"

from .config import SpectralConfig
from .svd import Basis, decompose, canonicalize_signs
from .methods import SpectralDelta, register_method, get_method, available_methods
from .layers import SpectralLayer
from .geometry import register_geometry, singular_values
from .presets import PRESETS
from .model import (
    attach, detach, set_adapter, enable_adapters, disable_adapters, merge, unmerge, merge_and_unload,
    spectral_layers, adapter_names, adapter_config, trainable_parameters, ParamCount,
)
from .io import save_adapter, load_adapter, read_adapter, AdapterFileError
from .export import export_lora
from .spectral_model import SpectralModel, get_spectral_model

__all__ = [
    "SpectralConfig", "Basis", "decompose", "canonicalize_signs", "SpectralDelta", "register_method",
    "get_method", "available_methods", "SpectralLayer", "register_geometry", "singular_values", "PRESETS", "attach", "detach", "set_adapter",
    "enable_adapters", "disable_adapters", "merge", "unmerge", "merge_and_unload", "spectral_layers",
    "adapter_names", "adapter_config", "trainable_parameters", "ParamCount", "save_adapter",
    "load_adapter", "read_adapter", "AdapterFileError", "export_lora", "analysis", "SpectralModel",
    "get_spectral_model",
]


def __getattr__(name):  # sv.analysis (spectral study, CLI spectral-analysis) loads on first use
    if name == "analysis":
        import importlib

        return importlib.import_module(".analysis", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
