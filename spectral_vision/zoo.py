"""Model registry: tiny models built from the real architecture classes, for tests and offline runs.

``create_model(name, **overrides)`` works like timm's: each entry is a function registered with
``@register_model`` that builds a real ``timm`` / ``diffusers`` / ``transformers`` model from a
small config (random weights, seeded). Real pretrained loading (hub ids and local paths) lives in
the integrations (``spectral_vision.integrations``); nothing here downloads anything.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["register_model", "create_model", "list_models"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its name with ``_`` replaced by ``-`` (``tiny_vit`` -> ``tiny-vit``)."""
    _MODELS[fn.__name__.replace("_", "-")] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, seed: int = 0, **overrides) -> nn.Module:
    """Build registered model ``name`` with ``torch.manual_seed(seed)``; ``overrides`` go to its config."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _MODELS[name](**overrides).eval()


@register_model
def tiny_vit(**kw) -> nn.Module:
    """timm ``VisionTransformer`` (ViT-B/16 architecture, shrunk): 32 px, patch 8, width 64, depth 2."""
    import timm

    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    cfg.update(kw)
    size = cfg["img_size"] if isinstance(cfg["img_size"], (tuple, list)) else (cfg["img_size"],) * 2
    # what the model takes (timm.data.resolve_data_config reads it); random weights: no hub id to point at
    overlay = dict(input_size=(3, *size), num_classes=cfg["num_classes"], hf_hub_id=None, url="",
                   tag="spectral-vision-zoo-random")
    return timm.create_model("vit_base_patch16_224", pretrained=False, pretrained_cfg_overlay=overlay, **cfg)


@register_model
def tiny_unet(**kw) -> nn.Module:
    """diffusers ``UNet2DConditionModel`` (SD layout, shrunk): 8x8x4 latents, blocks (32, 64)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
               attention_head_dim=8, norm_num_groups=8)
    cfg.update(kw)
    return UNet2DConditionModel(**cfg)


@register_model
def tiny_clip_text(**kw) -> nn.Module:
    """transformers ``CLIPTextModel`` (SD text encoder layout, shrunk): width 32, 2 layers."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=49408, max_position_embeddings=77, projection_dim=32)
    cfg.update(kw)
    return CLIPTextModel(CLIPTextConfig(**cfg))


@register_model
def tiny_llama(**kw) -> nn.Module:
    """transformers ``LlamaForCausalLM`` (GQA, SwiGLU), shrunk: width 64, 2 layers, vocab 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


@register_model
def tiny_gpt2(**kw) -> nn.Module:
    """transformers ``GPT2LMHeadModel`` (Conv1D layers), shrunk: width 64, 2 layers, vocab 256."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg))


@register_model
def tiny_open_clip(**kw) -> nn.Module:
    """open_clip ``CLIP`` (ViT image tower + text transformer), shrunk: 32 px, width 64/32, 2 layers each."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2)
    vision.update(kw.pop("vision", {}))
    text.update(kw.pop("text", {}))
    return CLIP(embed_dim=kw.pop("embed_dim", 32), vision_cfg=CLIPVisionCfg(**vision), text_cfg=CLIPTextCfg(**text), **kw)
