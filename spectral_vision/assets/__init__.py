"""Shipped weights: the trained ``builtin:digits`` Stable Diffusion pipeline as ONE compact fp16 file.

``digits_base.safetensors`` holds the UNet, VAE and text-encoder weights (keys prefixed ``unet.``,
``vae.``, ``text_encoder.``) and, in its safetensors metadata, the components' configs and the
training recipe (``training/pretrain_digits_base.py`` writes it; it is regenerable). The CLIP
tokenizer is not stored: it is rebuilt from the BPE vocabulary ``open_clip_torch`` ships.

    pack_pipeline(pipe, path, recipe)      -> write the file (atomic), returns its size in bytes
    read_metadata(path)                    -> {"configs": {...}, "recipe": {...}}
    pipeline_from_asset(path, torch_dtype) -> diffusers.StableDiffusionPipeline
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from ..fileio import atomic_write, file_sha256

__all__ = ["DIGITS_BASE", "pack_pipeline", "read_metadata", "pipeline_from_asset", "asset_digest"]

DIGITS_BASE = Path(__file__).with_name("digits_base.safetensors")
_COMPONENTS = ("unet", "vae", "text_encoder")


def asset_digest(path: Union[str, Path] = DIGITS_BASE) -> str:
    """First 12 hex digits of the file's sha256 (cache key of the materialised pipeline)."""
    return file_sha256(path)[:12]


def pack_pipeline(pipe, path: Union[str, Path], recipe: Optional[dict] = None) -> int:
    """Write ``pipe``'s UNet / VAE / text encoder as fp16 + configs + ``recipe`` to ``path`` (atomic)."""
    from safetensors.torch import save_file

    tensors, configs = {}, {}
    for name in _COMPONENTS:
        module = getattr(pipe, name)
        for k, v in module.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().to(torch.float16).contiguous()
        cfg = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        configs[name] = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
    configs["scheduler"] = {"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}
    configs["tokenizer"] = {"model_max_length": pipe.tokenizer.model_max_length}
    meta = {"format": "spectral_vision.pipeline/1", "configs": json.dumps(configs, default=str),
            "recipe": json.dumps(recipe or {}, default=str)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta)).stat().st_size


def read_metadata(path: Union[str, Path] = DIGITS_BASE) -> dict:
    """``{"configs": ..., "recipe": ...}`` stored in the file's header (no tensors are read)."""
    from safetensors import safe_open

    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found; regenerate it with `python training/pretrain_digits_base.py`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "spectral_vision.pipeline/1":
        raise ValueError(f"{path} is not a spectral_vision pipeline file (metadata format {meta.get('format')!r})")
    return {"configs": json.loads(meta["configs"]), "recipe": json.loads(meta["recipe"])}


def pipeline_from_asset(path: Union[str, Path] = DIGITS_BASE, torch_dtype: torch.dtype = torch.float32):
    """Rebuild the ``StableDiffusionPipeline`` stored in ``path`` (tokenizer from open_clip's BPE file)."""
    import diffusers
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..integrations.diffusers import build_clip_tokenizer_files

    configs = read_metadata(path)["configs"]
    state = load_file(str(path))
    parts = {name: {k[len(name) + 1:]: v.to(torch_dtype) for k, v in state.items() if k.startswith(name + ".")}
             for name in _COMPONENTS}
    unet = diffusers.UNet2DConditionModel.from_config(configs["unet"])
    vae = diffusers.AutoencoderKL.from_config(configs["vae"])
    text_cfg = {k: v for k, v in configs["text_encoder"].items() if k != "_class_name"}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        module.load_state_dict(parts[name], strict=True)
        if torch_dtype != torch.float32:
            module.to(torch_dtype)
        module.eval().requires_grad_(False)
    sched_cfg = dict(configs["scheduler"])
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(build_clip_tokenizer_files(tmp)),
                                                  model_max_length=configs["tokenizer"]["model_max_length"])
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
