"""What a run writes: validation images and the base-vs-concept grid, the adapter, exact LoRA exports, the
model card, ``training_args.json``, the band registration, the Hub upload, and the closing lines."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

import spectral_vision as sv
from spectral_vision.bands import describe_columns
from spectral_vision.baselines import is_peft_method
from spectral_vision.fileio import atomic_write, atomic_write_json, atomic_write_text
from training.common import step_seed

from .args import LORA_FILES, InputError
from .models import first_non_finite, is_spectral, save_component

GRID = "validation_grid.png"


def caption_summary(inputs) -> str:
    """``instance prompt `...` (4 images)`` or ``per-image captions (20 images, 10 distinct, e.g. `...`)``."""
    n, distinct = len(inputs.instance_captions), sorted(set(inputs.instance_captions))
    if len(distinct) == 1:
        return f"instance prompt `{distinct[0]}` ({n} images)"
    return f"per-image captions ({n} images, {len(distinct)} distinct, e.g. `{distinct[0]}`)"


# ---- Hub -------------------------------------------------------------------------------------------------------
def check_hub(args) -> Optional[SimpleNamespace]:
    """With ``--push_to_hub``: the Hub client and repo id, checked BEFORE training (offline: a clear error)."""
    if not args.push_to_hub:
        return None
    from huggingface_hub import HfApi, constants

    fix = (f"log in with `huggingface-cli login` (or pass --hub_token), or train without --push_to_hub and upload "
           f"later with `huggingface-cli upload <repo_id> {args.output_dir}`")
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise InputError(f"--push_to_hub: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE is set); {fix}")
    api = HfApi(token=args.hub_token)
    try:
        user = api.whoami()["name"]
    except Exception as e:  # no network, no token, bad token: all end here, before any training
        raise InputError(f"--push_to_hub: cannot use the Hugging Face Hub ({type(e).__name__}: {e}); {fix}") from None
    return SimpleNamespace(api=api, repo_id=args.hub_model_id or f"{user}/{Path(args.output_dir).name}")


def push_to_hub(args, hub) -> str:
    """Upload ``--output_dir`` (without checkpoints and logs), as diffusers' scripts do; returns the repo URL."""
    hub.api.create_repo(hub.repo_id, exist_ok=True)
    hub.api.upload_folder(repo_id=hub.repo_id, folder_path=args.output_dir, commit_message="End of training",
                          ignore_patterns=["step_*", "epoch_*", "checkpoint-*", f"{args.logging_dir}/*", ".*"])
    return f"https://huggingface.co/{hub.repo_id}"


# ---- validation ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def adapters_off(models: list):
    """The base model: every adapter of ``models`` disabled inside the block (spectral or PEFT)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for model in models:
        if is_spectral(model):
            sv.disable_adapters(model)
    for layer in peft_layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for model in models:
            if is_spectral(model):
                sv.enable_adapters(model)
        for layer in peft_layers:
            layer.enable_adapters(True)


def sample(args, accelerator, ctx, prompts: list[str], per_prompt: int) -> list:
    """``per_prompt`` images per prompt with the current models, ``--sample_batch_size`` at a time; image
    ``(j, k)`` is seeded by ``(--seed, j, k)`` so base and concept rows share their noise."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    m = ctx.models
    te = accelerator.unwrap_model(m.text_encoder).to(accelerator.device)  # back from the CPU when precomputed
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=te, tokenizer=m.tokenizer, unet=accelerator.unwrap_model(m.unet), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
        scheduler=DPMSolverMultistepScheduler.from_config(m.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    keys = [(j, k) for j in range(len(prompts)) for k in range(per_prompt)]
    images = []
    with accelerator.autocast():
        for start in range(0, len(keys), args.sample_batch_size):  # batched; one generator per image
            chunk = keys[start:start + args.sample_batch_size]
            gens = [torch.Generator(accelerator.device).manual_seed(step_seed(args.seed, 11, j, k)) for j, k in chunk]
            images += pipe([prompts[j] for j, _ in chunk], num_inference_steps=args.validation_inference_steps,
                           height=args.resolution, width=args.resolution, generator=gens).images
    if args.pre_compute_text_embeddings:
        te.to("cpu")
    return images


def _save_png(image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def grid(rows: list[list]) -> "Image.Image":
    """One image of equally sized PIL images, ``rows[r][c]`` at row r, column c."""
    from PIL import Image

    w, h = rows[0][0].size
    out = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            out.paste(im, (c * w, r * h))
    return out


def log_validation(args, accelerator, ctx, epoch: int, final: bool = False) -> list:
    """Sample the ``|``-separated ``--validation_prompt`` with the current adapter (``validation/epochNNNN_i.png``);
    ``final``: ``image_i.png`` and :data:`GRID` (row 1 the base, row 2 the concept; same prompts and seeds)."""
    prompts = args.validation_prompt.split("|")
    per_prompt = args.num_validation_images or (4 if len(prompts) == 1 else 1)
    images = sample(args, accelerator, ctx, prompts, per_prompt)
    out = Path(args.output_dir)
    for i, image in enumerate(images):
        _save_png(image, out / (f"image_{i}.png" if final else f"validation/epoch{epoch:04d}_{i}.png"))
    if final:
        with adapters_off([accelerator.unwrap_model(v) for v in ctx.adapted.values()]):
            base = sample(args, accelerator, ctx, prompts, per_prompt)
        _save_png(grid([base, images]), out / GRID)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("test" if final else "validation", np.stack([np.asarray(i) for i in images]),
                                      epoch, dataformats="NHWC")
    return images


# ---- files ----------------------------------------------------------------------------------------------------
def export_loras(args, adapted: dict, adapter_name: str) -> dict:
    """Exact LoRA files loadable by ``pipe.load_lora_weights`` (diffusers keys) and kohya-ss tools."""
    out, reports = Path(args.output_dir), {}
    if is_peft_method(args.adapter):  # baselines: diffusers' own serialisation
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict

        layers = {f"{c}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(m, adapter_name=adapter_name))
                  for c, m in adapted.items()}
        StableDiffusionPipeline.save_lora_weights(out, **layers, safe_serialization=True)
        return {"peft": {"path": str(out / LORA_FILES["peft"]), "exact": True}}
    for fmt in args.lora_export:
        rep = sv.export_lora(adapted, out / LORA_FILES[fmt], adapter_name=adapter_name, format=fmt)
        ranks = sorted({v["rank"] for v in rep["layers"].values()})
        reports[fmt] = {"path": rep["path"], "exact": rep["exact"], "max_rel_error": rep["max_rel_error"],
                        "ranks": ranks}
    return reports


def write_model_card(args, ctx, exports: dict, params: sv.ParamCount) -> None:
    band = ctx.band
    cols = "n/a (PEFT baseline)" if band is None else \
        f"{band} (singular columns {describe_columns(band, args.rank)} of every adapted layer)"
    lora = "\n".join(f"- `{Path(r['path']).name}` ({fmt} keys, LoRA ranks {r.get('ranks', [args.rank])}, "
                     f"{'exact' if r['exact'] else 'SVD-truncated, max rel. error %.2e' % r['max_rel_error']})"
                     for fmt, r in exports.items())
    images = "".join(f"![image_{i}](./image_{i}.png)\n" for i in range(len(ctx.final_images)))
    if ctx.final_images:
        images = f"![base (top) vs concept (bottom)](./{GRID})\n" + images
    note = ("\n> **The base model is `builtin:tiny-sd`: a small Stable Diffusion pipeline with RANDOM weights** "
            "(real diffusers/transformers architecture and the real CLIP vocabulary, never trained). The recipe, "
            "files and numbers are real, but the images are noise-like: a random-weight base cannot draw the "
            "concept. Train on a real base (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`) for pictures.\n"
            if args.pretrained_model_name_or_path == "builtin:tiny-sd" else "")
    te = f", text encoder `{args.text_encoder_target_modules}`" if args.train_text_encoder else ""
    card = f"""---
base_model: {args.pretrained_model_name_or_path}
instance_prompt: {args.instance_prompt or ctx.inputs.instance_captions[0]}
library_name: spectral_vision
tags: [stable-diffusion, text-to-image, diffusers, dreambooth, spectral-adapter, lora]
---
# {ctx.inputs.concept}: DreamBooth concept ({args.adapter}, rank {args.rank})
{note}
- concept: `{ctx.inputs.concept}` (adapter name `{ctx.inputs.adapter_name}`), {caption_summary(ctx.inputs)}
- method: `{args.adapter}`, rank {args.rank}, band {cols}
- adapted: UNet `{args.target_modules}`{te}
- trainable parameters: {params.trainable:,} ({params.percent:.4f}% of the base)
- steps: {ctx.global_step} at batch {args.train_batch_size} x {ctx.num_processes} process(es) x {args.gradient_accumulation_steps} accumulation, resolution {args.resolution}, seed {args.seed}
- prior preservation: {args.with_prior_preservation}

## Files
- `unet/`{", `text_encoder/`" if args.train_text_encoder else ""}: the adapter (`spectral_vision.load_adapter`)
{lora}
- `training_args.json`: every argument, the band and the run summary; `run_config.json`: what identifies the run

```python
pipe.load_lora_weights("{args.output_dir}", weight_name="{LORA_FILES['peft']}")
```
{images}"""
    atomic_write_text(Path(args.output_dir) / "README.md", card)


def save_outputs(args, accelerator, ctx) -> dict:
    """Adapters, LoRA exports, args JSON, band registration and model card (main process)."""
    out, name = Path(args.output_dir), ctx.inputs.adapter_name
    adapted = {k: accelerator.unwrap_model(m) for k, m in ctx.adapted.items()}
    bad = first_non_finite(adapted, name)
    if bad is not None:  # the loop stops first; never write a non-finite adapter
        raise FloatingPointError(f"adapter tensor {bad} is not finite: nothing written")
    extra = {"concept": ctx.inputs.concept, "instance_prompt": args.instance_prompt or ctx.inputs.instance_captions[0],
             "band": ctx.band, "base_model": args.pretrained_model_name_or_path}
    for comp, model in adapted.items():
        save_component(model, out / comp, name, extra)
    exports = export_loras(args, adapted, name)
    counts = [sv.trainable_parameters(m) for m in adapted.values()]
    trainable, total = sum(c.trainable for c in counts), sum(c.total for c in counts)
    params = sv.ParamCount(trainable, total, 100.0 * trainable / max(total - trainable, 1))
    summary = {"global_step": ctx.global_step, "final_loss": ctx.last_loss, "band": ctx.band,
               "concept": ctx.inputs.concept, "adapter_name": name, "trainable_params": params.trainable,
               "num_processes": ctx.num_processes, "adapter_sha256_per_rank": ctx.rank_hashes,
               "weight_dtype": str(ctx.weight_dtype), "exports": exports, "resumed_from": ctx.resumed_from}
    atomic_write_json(out / "training_args.json",
                      {"args": {k: v for k, v in vars(args).items() if k != "hub_token"}, "summary": summary})
    if ctx.inputs.registry is not None and not args.no_register:
        cols = sorted({int(c) for m in adapted.values() for _, layer in sv.spectral_layers(m)
                       for c in layer.adapters[name].columns.tolist()})
        ctx.inputs.registry.register(ctx.inputs.concept, out / "unet", args.adapter, args.rank, ctx.band, cols)
    write_model_card(args, ctx, exports, params)
    return summary


def _base_of(concept_dir: Path) -> Optional[str]:
    """The base model a concept folder written by this script was trained on (``None``: unknown)."""
    try:
        return json.loads((concept_dir / "training_args.json").read_text())["args"]["pretrained_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def next_steps(args, ctx) -> list[str]:
    """The closing lines: what was written where, and what to run next."""
    out = Path(args.output_dir)
    others = [] if ctx.inputs.registry is None else \
        [Path(e["adapter_dir"]) for n, e in ctx.inputs.registry.concepts().items() if n != ctx.inputs.concept]
    others = [str(p.parent) for p in others
              if p.name == "unet" and _base_of(p.parent) == args.pretrained_model_name_or_path]
    comps = " and ".join(f"{out / c}/" for c in ctx.adapted)
    lines = [f"Wrote concept '{ctx.inputs.concept}' to {out}/: adapter {comps}, LoRA "
             f"{', '.join(Path(r['path']).name for r in ctx.exports.values()) or '(none)'}, model card README.md"]
    if ctx.final_images:
        lines.append(f"Validation grid: {out / GRID} (top row: the base, bottom row: the concept; same prompts "
                     "and seeds)")
    fused = out.parent / "fused"
    lines += [f"Next: fuse it:    python -m fusion --base {args.pretrained_model_name_or_path} --adapters "
              f"{' '.join([str(out)] + others[:3])} --mode spectral --out {fused}",
              "      try it:     python -m demos.fusion_app"]
    return lines


def finish(args, accelerator, ctx) -> dict:
    """Final validation, outputs, Hub upload, closing lines (main process)."""
    if args.validation_prompt:
        ctx.final_images = log_validation(args, accelerator, ctx, args.num_train_epochs, final=True)
    summary = save_outputs(args, accelerator, ctx)
    ctx.exports = summary["exports"]
    lines = next_steps(args, ctx)
    if ctx.hub is not None:
        lines.insert(1, f"Uploaded to {push_to_hub(args, ctx.hub)}")
    print("\n".join(lines), flush=True)
    return summary
