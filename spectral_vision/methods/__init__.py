"""Adapter methods: one file each, registered by name. Import order registers them."""
from .base import SpectralDelta, register_method, get_method, available_methods, NoOptions
from . import spectral_a, spectral_r, svdiff, speclora, lorsa, lowrank  # noqa: F401  (registration side effects)

__all__ = ["SpectralDelta", "register_method", "get_method", "available_methods", "NoOptions"]
