"""timm Vision Transformers for fine-tuning: hub ids, local weight files or offline zoo models, new head.

    from spectral_vision.integrations.timm import load_vit
    model = load_vit("vit_base_patch16_224.orig_in21k", num_classes=100)          # hub (downloads once)
    model = load_vit(checkpoint_path="weights/ViT-B_16.npz", num_classes=100)      # original JAX ViT-B_16
    model = load_vit("vit_base_patch16_224", num_classes=100, checkpoint_path="vit.safetensors")  # or .pth
    model = load_vit("zoo:tiny-vit", num_classes=10, image_size=32)               # offline, random weights

``vit_base_patch16_224.orig_in21k`` is the ImageNet-21k ViT-B/16 of the original paper (the
``ViT-B_16.npz`` that VTAB-1k papers compare against); ``.augreg_in21k`` are different weights.
Every path ends with ``model.reset_classifier(num_classes)``: a freshly initialised linear head
(``nn.Linear`` default init, as FacT/PETL-ViT scripts do), whatever the checkpoint carried.
"""
from __future__ import annotations

import os
from typing import Optional

from torch import nn

__all__ = ["DEFAULT_VIT", "load_vit", "head_parameters"]

DEFAULT_VIT = "vit_base_patch16_224.orig_in21k"


def _load_file(model: nn.Module, path: str) -> None:
    """Load a local ``.npz`` (JAX/Flax), ``.safetensors`` or ``.pth``/``.bin`` checkpoint into ``model``, head excluded."""
    import timm.models

    if os.path.splitext(path)[-1].lower() in (".npz", ".npy"):
        if not hasattr(model, "load_pretrained"):
            raise ValueError(f"{type(model).__name__} cannot read JAX .npz checkpoints ({path})")
        model.load_pretrained(path)  # timm's JAX loader: pos-embed resampling, qkv fusing; head only if shapes match
        return
    sd = timm.models.load_state_dict(path)  # safetensors or torch (unwraps 'state_dict' / 'model' / EMA)
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        sd = checkpoint_filter_fn(sd, model)  # converts other ViT layouts, resamples pos_embed to image size
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # the head is always new
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {path} does not fit {type(model).__name__}: missing {missing[:8]}, "
            f"unexpected {result.unexpected_keys[:8]} (is the architecture / name_or_path right?)"
        )


def load_vit(
    name_or_path: str = DEFAULT_VIT,
    num_classes: int = 1000,
    drop_path_rate: float = 0.1,
    pretrained: bool = True,
    checkpoint_path: Optional[str] = None,
    image_size: Optional[int] = None,
    **kwargs,
) -> nn.Module:
    """A timm ViT with a new ``num_classes`` linear head.

    Args:
        name_or_path: a timm model name / hub id (``vit_base_patch16_224.orig_in21k``,
            ``hf-hub:timm/...``), a local weight file (architecture ``vit_base_patch16_224`` unless
            ``architecture=`` is given), or ``zoo:<name>`` for an offline model from
            :func:`spectral_vision.zoo.create_model` (random weights, for tests).
        num_classes: classes of the new head.
        drop_path_rate: stochastic depth rate of the blocks.
        pretrained: load the hub weights of ``name_or_path`` (ignored with a local file or zoo).
        checkpoint_path: local ``.npz`` / ``.safetensors`` / ``.pth`` weights for architecture ``name_or_path``.
        image_size: input resolution if not the architecture's (position embeddings are resampled).
        kwargs: further timm model arguments (``architecture=`` selects the class for a bare file).
    """
    import timm

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    size = {} if image_size is None else {"img_size": int(image_size)}
    if str(name_or_path).startswith("zoo:"):
        from ..zoo import create_model

        model = create_model(name_or_path[4:], num_classes=num_classes, drop_path_rate=drop_path_rate, **size, **kwargs)
    else:
        arch = kwargs.pop("architecture", None)
        if checkpoint_path is None and os.path.isfile(str(name_or_path)):
            checkpoint_path, name_or_path = name_or_path, arch or "vit_base_patch16_224"
        if checkpoint_path is not None:
            if not os.path.isfile(checkpoint_path):
                raise FileNotFoundError(f"checkpoint_path {checkpoint_path!r} does not exist")
            model = timm.create_model(arch or name_or_path, pretrained=False, num_classes=num_classes,
                                      drop_path_rate=drop_path_rate, **size, **kwargs)
            _load_file(model, checkpoint_path)
        else:
            model = timm.create_model(name_or_path, pretrained=pretrained, num_classes=num_classes,
                                      drop_path_rate=drop_path_rate, **size, **kwargs)
    model.reset_classifier(num_classes)  # a new linear head, whatever the source carried
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier head (``model.get_classifier()``), e.g. to keep it trainable."""
    return list(model.get_classifier().parameters())
