"""Band allocation lives in the core: :mod:`spectral_vision.bands` (this module re-exports it for fusion code)."""
from spectral_vision.bands import (  # noqa: F401
    REGISTRY_NAME, BandError, BandRegistry, LayerOverlap, OverlapReport, adapter_columns, band_columns, band_count,
    find_overlaps, layer_band_count,
)

__all__ = ["BandRegistry", "BandError", "band_columns", "band_count", "layer_band_count", "find_overlaps",
           "OverlapReport", "LayerOverlap", "adapter_columns", "REGISTRY_NAME"]
