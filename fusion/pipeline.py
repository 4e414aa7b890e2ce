"""Fusion for diffusers Stable Diffusion pipelines (UNet + CLIP text encoder).

A **concept folder** is what ``training/dreambooth_spectral.py`` writes; accepted layouts:

* ``concept/unet/`` and/or ``concept/text_encoder/``: spectral_vision adapter folders per component;
* ``concept/`` itself an adapter folder (spectral_vision or PEFT LoRA): its component is the one
  that has all of the adapter's layers (normally the UNet);
* ``concept/*.safetensors`` and no adapter folder: a LoRA file (``pytorch_lora_weights.safetensors``
  preferred, as written by diffusers' ``save_lora_weights`` and by the DreamBooth script for PEFT
  baselines), loaded with ``pipe.load_lora_weights`` (for ``lora_sum``).

Concept prompts (for least_squares recording and the metrics) come from ``prompts`` or, when not
given, from the concept's files: ``instance_prompt`` in the adapter's metadata (``extra``) or in a
JSON file of the training arguments in the concept folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

import spectral_vision as sv

from .fuse import FusionResult, fuse, load_concepts

__all__ = ["COMPONENTS", "concept_parts", "load_pipeline_concepts", "concept_prompt", "diffusion_inputs",
           "fuse_pipeline"]

COMPONENTS = ("unet", "text_encoder")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name (``save_lora_weights``), preferred over others


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").exists()


def concept_parts(pipe, folder: Union[str, Path]) -> dict[str, Path]:
    """``{component: adapter folder}`` of a concept folder (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"concept folder {folder} does not exist")
    parts = {c: folder / c for c in COMPONENTS if _is_adapter(folder / c)}
    if parts:
        return parts
    if _is_adapter(folder):
        meta = json.loads((folder / "adapter_config.json").read_text())
        layers = set(meta.get("layers", {}))
        for c in COMPONENTS:
            names = {n for n, _ in getattr(pipe, c).named_modules()}
            if not layers or layers <= names:  # PEFT folders list no layers: default to the UNet
                return {c: folder}
        raise ValueError(f"{folder}: its layers belong to neither the UNet nor the text encoder of this pipeline")
    if any(folder.glob("*.safetensors")):
        return {"lora_file": folder}
    raise ValueError(f"{folder} is not a concept folder: expected unet/ and/or text_encoder/ adapter folders, "
                     "an adapter folder, or a LoRA .safetensors file")


def load_pipeline_concepts(pipe, folders: Sequence[Union[str, Path]], names: Optional[Sequence[str]] = None) -> list[str]:
    """Load every concept onto the pipeline's components; returns the concept names (folder names)."""
    names = list(names) if names is not None else [Path(f).name for f in folders]
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} names for {len(folders)} concepts")
    if len(set(names)) != len(names):
        raise ValueError(f"concept names must be distinct, got {names} (pass names=...)")
    for folder, name in zip(folders, names):
        if not Path(folder).is_dir() and any(str(folder) in sv.adapter_names(getattr(pipe, c)) for c in COMPONENTS):
            continue  # already loaded under this name
        for comp, path in concept_parts(pipe, folder).items():
            if comp == "lora_file":
                files = sorted(Path(path).glob("*.safetensors"), key=lambda f: (f.name != LORA_FILE, f.name))
                pipe.load_lora_weights(str(path), weight_name=files[0].name, adapter_name=name)
            else:
                load_concepts(getattr(pipe, comp), [path], [name])
    return names


def concept_prompt(folder: Union[str, Path]) -> Optional[str]:
    """The concept's instance prompt from its adapter metadata or training-argument JSON, if any."""
    folder = Path(folder)
    for cfg in [folder / "adapter_config.json"] + [folder / c / "adapter_config.json" for c in COMPONENTS]:
        if cfg.exists():
            extra = json.loads(cfg.read_text()).get("extra") or {}
            for k in ("instance_prompt", "prompt"):
                if isinstance(extra.get(k), str):
                    return extra[k]
            if isinstance(extra.get("args"), dict) and isinstance(extra["args"].get("instance_prompt"), str):
                return extra["args"]["instance_prompt"]
    for js in sorted(folder.glob("*.json")):
        try:
            d = json.loads(js.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(d, dict) and isinstance(d.get("instance_prompt"), str):
            return d["instance_prompt"]
    return None


def diffusion_inputs(pipe, prompts: dict[str, Sequence[str]], seeds: Sequence[int] = (0, 1),
                     timesteps: Sequence[int] = (999, 500, 100), resolution: Optional[int] = None):
    """``(inputs, run_fn)`` for :func:`fusion.fuse` recording: each concept's prompts through the text
    encoder, then the UNet on seeded Gaussian latents at ``timesteps`` (the states sampling starts from)."""
    size = (resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    inputs = {c: [(p, s, t) for p in ps for s in seeds for t in timesteps] for c, ps in prompts.items()}

    def run(container: nn.Module, batch) -> None:
        prompt, seed, t = batch
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        emb = container["text_encoder"](ids.to(pipe.text_encoder.device))[0]  # (1, 77, d)
        g = torch.Generator().manual_seed(int(seed))
        lat = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=g, device="cpu")  # (1, 4, h, w)
        unet = container["unet"]
        unet(lat.to(unet.device, unet.dtype), torch.tensor([int(t)], device=unet.device), encoder_hidden_states=emb.to(unet.dtype))

    return inputs, run


def fuse_pipeline(pipe, folders: Sequence[Union[str, Path]], weights: Optional[Sequence[float]] = None,
                  mode: str = "spectral", names: Optional[Sequence[str]] = None,
                  prompts: Optional[Sequence[str]] = None, allow_overlap: bool = False, ridge: float = 1e-3,
                  metrics: bool = True, unload: bool = True, progress: bool = True, **record_kw) -> FusionResult:
    """Fuse concept folders into ``pipe`` (its UNet and text encoder, in place).

    ``prompts``: one prompt per concept (default: from the concept files). Needed by least_squares;
    used by the metrics when available (else the metrics are in weight space). ``record_kw`` go to
    :func:`diffusion_inputs` (``seeds``, ``timesteps``, ``resolution``).
    Returns the :class:`FusionResult`; ``result.model`` is a ``ModuleDict`` of the two components.
    """
    names = load_pipeline_concepts(pipe, folders, names)
    if prompts is None:
        found = [concept_prompt(f) for f in folders]
        prompts = found if all(found) else None
    if prompts is not None and len(prompts) != len(names):
        raise ValueError(f"{len(prompts)} prompts for {len(names)} concepts")
    container = nn.ModuleDict({c: getattr(pipe, c) for c in COMPONENTS})
    inputs = run = None
    if prompts is not None:
        inputs, run = diffusion_inputs(pipe, {n: [p] for n, p in zip(names, prompts)}, **record_kw)
    elif mode == "least_squares":
        raise ValueError("least_squares needs each concept's prompt: pass prompts (found none in the concept files)")
    res = fuse(container, names, weights, mode, allow_overlap, inputs=inputs, run_fn=run, ridge=ridge,
               metrics=metrics, unload=unload, progress=progress)
    if unload:
        for c in COMPONENTS:  # ModuleDict held the same objects; wrappers inside were swapped in place
            setattr(pipe, c, container[c])
    res.info["prompts"] = list(prompts) if prompts else None
    return res
