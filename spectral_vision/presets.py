"""Backbone knowledge in one table: target-module presets per model family.

A preset is a regular expression matched (``re.fullmatch``) against qualified module names.
``SpectralConfig(target_modules=...)`` accepts a preset name, any other string (a regex, full
match, as in PEFT) or a list of names matched by suffix (``name == t`` or ``name.endswith("." + t)``).
``"auto"`` picks the preset of a transformers model from ``model.config.model_type``
(:func:`default_preset`; each preset lists its ``model_types``).
"""
from __future__ import annotations

import difflib
import re
from typing import Optional, Union

from torch import nn

__all__ = ["PRESETS", "MODEL_TYPE_PRESETS", "default_preset", "resolve_targets", "match_targets"]

# transformers encoders/decoders: the attention and MLP projections of every block, nothing else (no
# embeddings, relative-position projections, poolers, classification heads or lm_head: heads are new at
# fine-tuning time, their basis would come from a random init; they are trained whole, see modules_to_save)
_ENC = r"(.*\.)?encoder\.layer\.\d+\."  # BERT-style encoder block
_BERT = _ENC + r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
_LLAMA = r"(.*\.)?layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"

PRESETS: dict[str, dict] = {
    # timm VisionTransformer (vit_*, deit_*, dinov2): attention qkv/proj and MLP fc1/fc2 of every block
    "timm_vit": {"regex": r"(.*\.)?blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))", "family": "timm"},
    # diffusers UNet2DConditionModel attention projections (self- and cross-attention)
    "sd_unet": {"regex": r".*attn\d\.(to_q|to_k|to_v|to_out\.0)", "family": "diffusers"},
    # ... plus the ResNet block 3x3 convolutions ("conv optional")
    "sd_unet_conv": {"regex": r".*(attn\d\.(to_q|to_k|to_v|to_out\.0)|resnets\.\d+\.(conv1|conv2))",
                     "family": "diffusers"},
    # ... the ResNet block 3x3 convolutions alone (spatial concepts, on layers the attention concepts leave free)
    "sd_unet_resnet": {"regex": r".*resnets\.\d+\.(conv1|conv2)", "family": "diffusers"},
    # transformers CLIPTextModel attention
    "clip_text": {"regex": r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)", "family": "transformers"},
    # BERT family (incl. MiniLM, ELECTRA, ERNIE): query/key/value, attention output, intermediate, output
    "bert": {"regex": _BERT, "family": "transformers", "model_types": ("bert", "electra", "ernie")},
    # RoBERTa / XLM-R / CamemBERT: the same block layout as BERT
    "roberta": {"regex": _BERT, "family": "transformers", "model_types": ("roberta", "xlm-roberta", "camembert")},
    # MPNet: q/k/v/o sit under attention.attn
    "mpnet": {"regex": _ENC + r"(attention\.attn\.(q|k|v|o)|intermediate\.dense|output\.dense)",
              "family": "transformers", "model_types": ("mpnet",)},
    # DeBERTa-v2/v3: content projections (not the relative-position pos_key_proj/pos_query_proj) + MLP
    "deberta_v2": {"regex": _ENC + r"(attention\.self\.(query_proj|key_proj|value_proj)|attention\.output\.dense"
                            r"|intermediate\.dense|output\.dense)", "family": "transformers",
                   "model_types": ("deberta-v2",)},
    # LLaMA-style decoders: q/k/v/o and the gated MLP of every layer
    "llama": {"regex": _LLAMA, "family": "transformers",
              "model_types": ("llama", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "smollm3")},
    "mistral": {"regex": _LLAMA, "family": "transformers", "model_types": ("mistral",)},
    "qwen2": {"regex": _LLAMA, "family": "transformers", "model_types": ("qwen2", "qwen3")},
    # GPT-2 (transformers Conv1D layers): fused qkv, attention output, MLP
    "gpt2": {"regex": r"(.*\.)?h\.\d+\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj))", "family": "transformers",
             "model_types": ("gpt2",)},
    # T5 / FLAN-T5 (encoder and decoder): self- and cross-attention q/k/v/o, (gated) MLP wi/wi_0/wi_1/wo
    "t5": {"regex": r"(.*\.)?block\.\d+\.layer\.\d+\.((SelfAttention|EncDecAttention)\.(q|k|v|o)"
                    r"|DenseReluDense\.(wi|wi_0|wi_1|wo))", "family": "transformers", "model_types": ("t5", "mt5")},
    # open_clip towers: the MLPs (nn.MultiheadAttention uses its in/out projection weights directly
    # without calling the submodules, so attention is not adaptable by module replacement)
    "open_clip": {"regex": r".*resblocks\.\d+\.mlp\.(c_fc|c_proj)", "family": "open_clip"},
}


#: ``config.model_type`` -> preset name (built from the ``model_types`` of :data:`PRESETS`)
MODEL_TYPE_PRESETS: dict[str, str] = {t: name for name, p in PRESETS.items() for t in p.get("model_types", ())}


def default_preset(model: nn.Module) -> str:
    """The preset name for a transformers model, from ``model.config.model_type``.

    DDP / accelerate wrappers (``.module``) are looked through. Raises ``ValueError`` naming the
    model type and the known ones when there is none (pass ``target_modules`` explicitly then).
    """
    model = getattr(model, "module", model)
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in MODEL_TYPE_PRESETS:
        raise ValueError(f"no target preset for model_type {mtype!r} ({type(model).__name__}); pass target_modules= "
                         f"(a preset name, a regex or a list of module names). Known model types: "
                         f"{sorted(MODEL_TYPE_PRESETS)}")
    return MODEL_TYPE_PRESETS[mtype]


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

    ``targets="auto"`` means :func:`default_preset` of ``model``. Only modules for which
    ``supported(module)`` is true are returned. If nothing matches, raises ``ValueError`` listing
    the closest module names, so a typo is caught before anything changes.
    """
    if isinstance(targets, str) and targets == "auto":
        targets = default_preset(model)
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
