"""Backbone knowledge in one table: target-module presets per model family.

A preset is a regular expression matched (``re.fullmatch``) against qualified module names.
``SpectralConfig(target_modules=...)`` accepts a preset name, any other string (a regex, full
match, as in PEFT) or a list of names matched by suffix (``name == t`` or ``name.endswith("." + t)``).
"""
from __future__ import annotations

import difflib
import re
from typing import Optional, Union

from torch import nn

__all__ = ["PRESETS", "resolve_targets", "match_targets"]

PRESETS: dict[str, dict] = {
    # timm VisionTransformer (vit_*, deit_*, dinov2): attention qkv/proj and MLP fc1/fc2 of every block
    "timm_vit": {"regex": r"(.*\.)?blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))", "family": "timm"},
    # diffusers UNet2DConditionModel attention projections (self- and cross-attention)
    "sd_unet": {"regex": r".*attn\d\.(to_q|to_k|to_v|to_out\.0)", "family": "diffusers"},
    # ... plus the ResNet block 3x3 convolutions ("conv optional")
    "sd_unet_conv": {"regex": r".*(attn\d\.(to_q|to_k|to_v|to_out\.0)|resnets\.\d+\.(conv1|conv2))",
                     "family": "diffusers"},
    # transformers CLIPTextModel attention
    "clip_text": {"regex": r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)", "family": "transformers"},
    # LLaMA / Mistral / Qwen-style decoders
    "llama": {"regex": r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", "family": "transformers"},
    # BERT family (incl. MiniLM): attention query/key/value and every dense layer
    "bert": {"regex": r".*\.(query|key|value|dense)", "family": "transformers"},
    # GPT-2 (transformers Conv1D layers)
    "gpt2": {"regex": r".*\.(c_attn|c_proj|c_fc)", "family": "transformers"},
    # open_clip towers: the MLPs (nn.MultiheadAttention uses its in/out projection weights directly
    # without calling the submodules, so attention is not adaptable by module replacement)
    "open_clip": {"regex": r".*resblocks\.\d+\.mlp\.(c_fc|c_proj)", "family": "open_clip"},
}


def _compile(spec: Union[str, list[str], tuple]) -> "callable":
    if isinstance(spec, str):
        pattern = re.compile(PRESETS[spec]["regex"] if spec in PRESETS else spec)
        return lambda name: pattern.fullmatch(name) is not None
    names = list(spec)
    return lambda name: any(name == t or name.endswith("." + t) for t in names)


def resolve_targets(spec) -> str:
    """Human-readable form of a target spec (for error messages and model cards)."""
    if isinstance(spec, str) and spec in PRESETS:
        return f"preset {spec!r} ({PRESETS[spec]['regex']})"
    return repr(spec)


def match_targets(model: nn.Module, targets, exclude=None, supported: Optional[callable] = None) -> list[str]:
    """Qualified names of the modules of ``model`` matched by ``targets`` and not by ``exclude``.

    Only modules for which ``supported(module)`` is true are returned. If nothing matches, raises
    ``ValueError`` listing the closest module names, so a typo is caught before anything changes.
    """
    inc = _compile(targets)
    exc = _compile(exclude) if exclude else (lambda name: False)
    names = [n for n, m in model.named_modules() if n and inc(n) and not exc(n) and (supported is None or supported(m))]
    if not names:
        candidates = [n for n, m in model.named_modules() if n and (supported is None or supported(m))]
        keys = [targets] if isinstance(targets, str) else list(targets)
        leaf = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        close = sorted({c for k in keys for c in difflib.get_close_matches(str(k), leaf + candidates, n=5, cutoff=0.5)})
        raise ValueError(
            f"target_modules {resolve_targets(targets)} matched no adaptable layer of {type(model).__name__}. "
            f"Close names: {close or leaf[:20]}. Presets: {sorted(PRESETS)}"
        )
    return names
