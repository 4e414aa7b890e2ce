"""fusion: compose concept adapters trained on disjoint spectral bands (see README, "Fuse concepts").

    bands.py       BandRegistry (bands.json in a concepts folder), per-layer overlap check of adapter folders
    fuse.py        fuse(model, adapters, weights, mode): spectral | mean | weighted | lora_sum | least_squares
    record.py      layer-input Gram recording (forward hooks) and the closed-form least-squares fusion
    compose.py     fused_adapter(): the spectral fusion as one ordinary adapter (block-diagonal Cayley for ^R)
    metrics.py     interference: principal angles, own-output change; table / JSON / plot
    pipeline.py    diffusers pipelines: concept folders, prompt recording, fuse_pipeline()
    clip_score.py  CLIP image / text alignment with open_clip
    __main__.py    python -m fusion
"""
from .bands import BandRegistry, find_overlaps
from .fuse import MODES, FusionResult, fuse

__all__ = ["BandRegistry", "find_overlaps", "MODES", "FusionResult", "fuse"]
