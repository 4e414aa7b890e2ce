"""Band allocation lives in the core: :mod:`spectral_vision.bands` (this module re-exports it for fusion code)."""
from spectral_vision.bands import (  # noqa: F401
    REGISTRY_NAME, BandError, BandRegistry, LayerOverlap, OverlapReport, adapter_columns, band_columns, band_count,
    describe_columns, find_overlaps, layer_band_count,
)
from spectral_vision.bands import __all__  # noqa: F401
