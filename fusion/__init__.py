"""fusion: compose concept adapters trained on disjoint spectral bands (see README, "Fuse concepts").

    bands.py       BandRegistry (bands.json in a concepts folder), per-layer overlap check of adapter folders
    backends.py    what fusion needs from a layer kind, once for spectral_vision and once for PEFT LoRA layers
    fuse.py        add_fused_adapter() (a named fused adapter) and fuse() (= it, merged and unloaded)
    compose.py     the modes' closed forms as exact factors; the one meaning of ``weights`` (strengths)
    record.py      layer-input Gram recording (forward hooks) and the closed-form least-squares fusion
    metrics.py     interference, each number named for what it measures; table / JSON / plot
    pipeline.py    diffusers pipelines: concept folders, prompt recording, fuse_pipeline()
    clip_score.py  CLIP image / text alignment with open_clip
    __main__.py    python -m fusion
"""
from .bands import BandRegistry, find_overlaps
from .fuse import MODES, FusionResult, add_fused_adapter, fuse

__all__ = ["BandRegistry", "find_overlaps", "MODES", "FusionResult", "add_fused_adapter", "fuse"]
