#!/usr/bin/env python
"""DreamBooth with spectral adapters on the Stable Diffusion UNet (and CLIP text encoder).

Flags, defaults and outputs follow diffusers' ``examples/dreambooth/train_dreambooth_lora.py``; on top:
``--adapter spectral_a|spectral_r|svdiff|lorsa|speclora`` (or a PEFT baseline: ``lora``, ``dora``, ...),
``--band N|auto`` (disjoint singular bands per concept, recorded in the concepts folder's ``bands.json``),
exact LoRA export (diffusers/PEFT and kohya keys), atomic checkpoints and an exactly replayable run.

    # real Stable Diffusion 1.5 (hub id or local folder)
    accelerate launch training/dreambooth_spectral.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --instance_data_dir ./dog --instance_prompt "a photo of sks dog" --output_dir concepts/dog \\
      --adapter spectral_a --rank 4 --band auto --resolution 512 --train_batch_size 1 \\
      --learning_rate 1e-4 --lr_warmup_steps 0 --max_train_steps 500 --mixed_precision fp16

    # offline default: the trained builtin:digits base + scikit-image's cat photo, runs on a CPU
    python training/dreambooth_spectral.py --output_dir concepts/chelsea --max_train_steps 50

Determinism: the data order (per epoch), augmentations, VAE sampling, noise and timesteps are pure
functions of ``(--seed, step, rank)``, so a run resumed from a checkpoint replays the uninterrupted run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from accelerate.logging import get_logger
from diffusers.optimization import SchedulerType
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
 cast_frozen_, checkpoint_info, param_groups, resolve_resume, save_accelerate_checkpoint,
    step_seed,
)

import spectral_vision as sv  # noqa: E402
from spectral_vision.fileio import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from spectral_vision.baselines import BASELINES, attach_adapter, is_peft_method  # noqa: E402
from spectral_vision.integrations.diffusers import (  # noqa: E402
    SKIMAGE_PHOTOS, bundled_instance_images, load_pipeline, resolve_pretrained,
)

logger = get_logger("dreambooth_spectral")  # accelerate's: logs on the main process only

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
BUILTIN_PROMPTS = {"chelsea": "a photo of sks cat", "coffee": "a photo of sks coffee cup",
                   "astronaut": "a photo of sks astronaut", "rocket": "a photo of sks rocket"}
LORA_FILES = {"peft": "pytorch_lora_weights.safetensors", "kohya": "pytorch_lora_weights_kohya.safetensors"}


class InputError(ValueError):
    """A bad flag or input file, reported before any training."""


# ---- arguments ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default="builtin:digits",
                   help="hub id, local save_pretrained folder, builtin:digits (offline, trained on sklearn digits; the default) "
                        "or builtin:tiny-sd (offline, RANDOM weights)")
    g.add_argument("--revision", default=None, help="hub revision of the model")
    g.add_argument("--variant", default=None, help="weight variant, e.g. fp16")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer name or path if not the model's")

    g = p.add_argument_group("adapter")
    methods = sv.available_methods() + list(BASELINES)
    g.add_argument("--adapter", default="spectral_a", choices=methods,
                   help="spectral method (spectral_a, spectral_r, svdiff, lorsa, speclora) or a PEFT baseline")
    g.add_argument("--rank", type=int, default=4, help="singular triplets per layer (LoRA rank for baselines)")
    g.add_argument("--alpha", type=float, default=None,
                   help="adapter strength (spectral: SpectralConfig.alpha, default 1; LoRA: lora_alpha, default rank)")
    g.add_argument("--band", default="auto",
                   help="singular band N (columns [N*rank, (N+1)*rank)) or 'auto': the next band that no concept "
                        "registered in --concepts_dir uses")
    g.add_argument("--concepts_dir", default=None,
                   help="folder with the band registry bands.json (default: the parent of --output_dir)")
    g.add_argument("--concept_name", default=None, help="name in the registry (default: basename of --output_dir)")
    g.add_argument("--no_register", action="store_true", help="do not record the concept in bands.json")
    g.add_argument("--target_modules", default="sd_unet", help="UNet layers: preset name, regex or comma list")
    g.add_argument("--text_encoder_target_modules", default="clip_text", help="text encoder layers (same syntax)")
    g.add_argument("--adapter_options", default="{}", help="JSON dict of method options (SpectralConfig.options)")
    g.add_argument("--svd", default="auto", choices=["auto", "exact", "randomized"], help="decomposition algorithm")

    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", default="builtin:chelsea",
                   help=f"folder of instance images, or builtin:<photo> ({', '.join(SKIMAGE_PHOTOS)}: "
                        "real photos shipped by scikit-image)")
    g.add_argument("--instance_prompt", default=None,
                   help="prompt with the identifier of the instance, for images without a caption of their own "
                        "(required unless every image has one or the data is builtin)")
    g.add_argument("--caption_column", default="text",
                   help="per-image captions: this column of the folder's metadata.jsonl (the `datasets` imagefolder "
                        "layout, rows {\"file_name\": ..., \"<column>\": ...}), else <image>.txt beside the image, "
                        "else --instance_prompt / --class_prompt; 'none': one prompt for all images")
    g.add_argument("--class_prompt_column", default="class_prompt",
                   help="column of the instance metadata.jsonl with each image's class prompt (prior preservation: "
                        "class images are generated for these prompts)")
    g.add_argument("--class_data_dir", default=None, help="folder of class images (generated when missing)")
    g.add_argument("--class_prompt", default=None,
                   help="prompt of the class, for prior preservation (class images without a caption)")
    g.add_argument("--resolution", type=int, default=None,
                   help="training image size (default: the model's native size: 512 for SD 1.5, 32 for tiny-sd)")
    g.add_argument("--center_crop", action="store_true", help="center crop instead of random crop")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flips")
    g.add_argument("--tokenizer_max_length", type=int, default=None, help="default: the tokenizer's")
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true", help="add the prior preservation loss")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--num_class_images", type=int, default=100,
                   help="minimal number of class images; missing ones are sampled with --class_prompt")
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for sampling class images")
    g.add_argument("--class_inference_steps", type=int, default=50, help="denoising steps per class image")
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"])

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="spectral-dreambooth-model")
    g.add_argument("--seed", type=int, default=None, help="seed of the whole run (default: drawn, then recorded)")
    g.add_argument("--train_text_encoder", action="store_true", help="also adapt the CLIP text encoder")
    g.add_argument("--train_batch_size", type=int, default=4, help="batch size per device")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=5e-4)
    g.add_argument("--text_encoder_lr", type=float, default=5e-6, help="learning rate of the text encoder adapter")
    g.add_argument("--scale_lr", action="store_true", help="scale lr by GPUs x accumulation x batch size")
    g.add_argument("--lr_scheduler", default="constant", choices=[t.value for t in SchedulerType],
                   help="learning-rate schedule (diffusers.optimization.get_scheduler)")
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--lr_num_cycles", type=int, default=1)
    g.add_argument("--lr_power", type=float, default=1.0)
    g.add_argument("--snr_gamma", type=float, default=None, help="min-SNR loss weighting (5.0 recommended)")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--allow_tf32", action="store_true")

    g = p.add_argument_group("optimizer")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (needs bitsandbytes)")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-08)

    g = p.add_argument_group("precision")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="frozen weights in this dtype, adapter weights stay fp32 (default: accelerate config)")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a checkpoint every N updates")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder, or "latest"')

    g = p.add_argument_group("validation and logging")
    g.add_argument("--validation_prompt", default=None)
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_epochs", type=int, default=50)
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none"')
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--lora_export", nargs="*", default=["peft", "kohya"], choices=sorted(LORA_FILES),
                   help="LoRA files written next to the adapter (exact)")

    args = p.parse_args(argv)
    try:
        check_args(args)
    except InputError as e:
        p.error(str(e))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations (diffusers' checks plus ours); raises :class:`InputError`."""
    positive = ["rank", "train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                "num_validation_images", "validation_epochs", "sample_batch_size", "validation_inference_steps"]
    for name in positive + ["max_train_steps", "checkpoints_total_limit", "resolution"]:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise InputError(f"--{name} must be >= 1, got {v}")
    if args.band != "auto" and not (args.band.isdigit()):
        raise InputError(f"--band must be a non-negative integer or 'auto', got {args.band!r}")
    if args.with_prior_preservation:
        if args.class_data_dir is None:  # --class_prompt may come from captions (checked in prepare_inputs)
            raise InputError("--with_prior_preservation needs --class_data_dir (and --class_prompt or captions)")
    elif args.class_data_dir is not None or args.class_prompt is not None:
        warnings.warn("--class_data_dir/--class_prompt are only used with --with_prior_preservation")
    if args.caption_column.lower() == "none":
        args.caption_column = None
    if args.instance_prompt is None:  # builtin photos have one; folders may caption every image
        photo = args.instance_data_dir.split(":", 1)[1] if args.instance_data_dir.startswith("builtin:") else None
        args.instance_prompt = BUILTIN_PROMPTS.get(photo)
        if args.instance_prompt is None and args.caption_column is None:
            raise InputError("--instance_prompt is required (e.g. 'a photo of sks dog') with --caption_column none")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise InputError(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        warnings.warn("--mixed_precision fp16 without a GPU: frozen weights run in float16 on the CPU (slow; "
                      "bf16 is the CPU choice). Adapter weights stay float32.")
    try:
        args.adapter_options = json.loads(args.adapter_options) if isinstance(args.adapter_options, str) \
            else dict(args.adapter_options)
    except json.JSONDecodeError as e:
        raise InputError(f"--adapter_options is not valid JSON: {e}") from None
    if is_peft_method(args.adapter):
        if args.adapter_options:
            raise InputError("--adapter_options is for spectral methods only")
        if args.band != "auto":
            warnings.warn(f"--band is ignored for the PEFT baseline {args.adapter!r} (it has no singular bands)")
    for name in ("target_modules", "text_encoder_target_modules"):  # "a,b" -> suffix list; presets/regex stay
        v = getattr(args, name)
        if isinstance(v, str) and "," in v:
            setattr(args, name, [t.strip() for t in v.split(",") if t.strip()])


# ---- inputs ------------------------------------------------------------------------------------------------
def list_images(folder: Path, what: str) -> list[Path]:
    """Image files of ``folder`` (by extension), each verified to decode; raises :class:`InputError`."""
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} does not exist")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                   and not f.name.startswith("."))
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
        except Exception as e:
            raise InputError(f"{what} image {f} cannot be read ({type(e).__name__}: {e}); fix or remove it") from None
    return files


def prepare_inputs(args) -> SimpleNamespace:
    """Check every input before any model is loaded: images, band registry. Returns the resolved inputs."""
    if args.instance_data_dir.startswith("builtin:"):
        photo = args.instance_data_dir.split(":", 1)[1]
        if photo not in SKIMAGE_PHOTOS:
            raise InputError(f"unknown builtin instance set {photo!r}; available: {list(SKIMAGE_PHOTOS)}")
        folder = bundled_instance_images(photo)
    else:
        folder = Path(args.instance_data_dir)
    instance = list_images(folder, "instance")
    if not instance:
        raise InputError(f"instance folder {folder} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    rows = read_metadata(folder)
    captions = captions_for(instance, rows, folder, args.caption_column, args.instance_prompt, "instance",
                            "--instance_prompt")
    class_prompts = None
    if args.with_prior_preservation:  # per-image class prompts from the instance metadata, else --class_prompt
        found = [rows.get(f.name, {}).get(args.class_prompt_column) for f in instance]
        class_prompts = sorted({str(c) for c in found if c}) or None
        if class_prompts is None and args.class_prompt is None and not _has_captions(Path(args.class_data_dir),
                                                                                      args.caption_column):
            raise InputError("--with_prior_preservation needs --class_prompt, captions in --class_data_dir or a "
                             f"{args.class_prompt_column!r} column in the instance metadata.jsonl")
    out = Path(args.output_dir).resolve()
    concept = args.concept_name or out.name
    band, registry = resolve_band(args, concept, out)
    return SimpleNamespace(instance_dir=folder, instance_images=instance, instance_captions=captions,
                           class_prompts=class_prompts, concept=concept, band=band, registry=registry)


METADATA = "metadata.jsonl"


def read_metadata(folder: Path) -> dict[str, dict]:
    """Rows of ``folder/metadata.jsonl`` (the ``datasets`` imagefolder layout) keyed by ``file_name``; ``{}``
    when there is none. Raises :class:`InputError` on a malformed line, a missing/duplicate ``file_name`` or
    one that leaves the folder."""
    path = folder / METADATA
    if not path.is_file():
        return {}
    rows = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {i} is not JSON: {e}") from None
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name:
            raise InputError(f"{path} line {i} has no \"file_name\" string")
        target = (folder / name).resolve()
        if target.parent != folder.resolve():
            raise InputError(f"{path} line {i}: file_name {name!r} is not a file of {folder}")
        if target.name in rows:
            raise InputError(f"{path} line {i}: {name!r} appears twice")
        rows[target.name] = row
    return rows


def captions_for(images: list[Path], rows: dict[str, dict], folder: Path, column: Optional[str],
                 fallback: Optional[str], what: str, flag: str) -> list[str]:
    """One caption per image: ``rows[name][column]``, else ``<stem>.txt`` beside it, else ``fallback``.
    Raises :class:`InputError` naming the images left without a caption (or a column no row has)."""
    if column is None:
        return [fallback] * len(images)
    if rows and not any(column in r for r in rows.values()):
        cols = sorted({k for r in rows.values() for k in r} - {"file_name"})
        raise InputError(f"{folder / METADATA} has no column {column!r} (columns: {cols}); pass --caption_column "
                         f"with one of them, or --caption_column none to use {flag} for every image")
    out, missing = [], []
    for f in images:
        cap = rows.get(f.name, {}).get(column)
        txt = f.with_suffix(".txt")
        if cap is None and txt.is_file():
            cap = txt.read_text(encoding="utf-8", errors="replace").strip()
        if cap is not None and not isinstance(cap, str):
            raise InputError(f"{what} caption of {f.name} in {folder / METADATA} is not a string: {cap!r}")
        cap = cap or fallback
        if not cap:
            missing.append(f.name)
        out.append(cap)
    if missing:
        raise InputError(f"{len(missing)} {what} image(s) have no caption ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}): add them to {METADATA} / a .txt file, or pass {flag}")
    return out


def _has_captions(folder: Path, column: Optional[str]) -> bool:
    """Whether ``folder`` holds at least one caption (metadata row with ``column`` or a ``.txt``)."""
    if column is None or not folder.is_dir():
        return False
    return any(column in r for r in read_metadata(folder).values()) or any(folder.glob("*.txt"))


def resolve_band(args, concept: str, out: Path):
    """``(band, registry)``; refuses a band that overlaps another registered concept (PEFT baselines: no band)."""
    if is_peft_method(args.adapter):
        return None, None
    from fusion.bands import BandRegistry

    registry = BandRegistry(args.concepts_dir or out.parent)
    own = registry.concepts().get(concept)
    if args.band == "auto":
        band = own["band"] if own and own.get("band") is not None and own["rank"] == args.rank \
            else _next_free_band(registry, args.rank, exclude=concept)
    else:
        band = int(args.band)
    clash = registry.check_overlap(band, args.rank, exclude=concept)
    if clash:
        desc = "; ".join(f"{n!r} (columns {c})" for n, c in clash)
        raise InputError(f"--band {band} at --rank {args.rank} (singular columns {band * args.rank}.."
                         f"{(band + 1) * args.rank - 1}) overlaps concepts registered in {registry.path}: {desc}. "
                         f"Use --band auto (next free band: {_next_free_band(registry, args.rank, concept)}) or "
                         f"another --concepts_dir")
    return band, registry


def _next_free_band(registry, rank: int, exclude: str) -> int:
    band = 0
    while registry.check_overlap(band, rank, exclude=exclude):
        band += 1
    return band


# ---- data ----------------------------------------------------------------------------------------------------
class DreamBoothDataset(Dataset):
    """Instance images (and class images for prior preservation) with their tokenized captions.

    Items are fetched with a key ``(index, aug_seed)``: the crop and flip are drawn from
    ``torch.Generator().manual_seed(aug_seed)``, so an item is a pure function of its key. Returns
    ``{"instance_images": (3, size, size) in [-1, 1], "instance_prompt_ids": (L,), ...class_*}``.
    ``instance_prompt_ids`` / ``class_prompt_ids``: one ``(L,)`` tensor for all images or a list, one per image.
    """

    def __init__(self, instance_images, instance_prompt_ids, size, center_crop=False, random_flip=False,
                 class_images=None, class_prompt_ids=None):
        self.instance_images, self.instance_prompt_ids = list(instance_images), instance_prompt_ids
        self.class_images, self.class_prompt_ids = list(class_images or []), class_prompt_ids
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def _load(self, path: Path, g: torch.Generator) -> torch.Tensor:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        image = TF.resize(image, self.size, interpolation=TF.InterpolationMode.BILINEAR)  # short side = size
        w, h = image.size
        if self.center_crop:
            top, left = (h - self.size) // 2, (w - self.size) // 2
        else:
            top = int(torch.randint(0, h - self.size + 1, (1,), generator=g))
            left = int(torch.randint(0, w - self.size + 1, (1,), generator=g))
        image = TF.crop(image, top, left, self.size, self.size)
        if self.random_flip and torch.rand((), generator=g) < 0.5:
            image = TF.hflip(image)
        return TF.to_tensor(image) * 2.0 - 1.0  # (3, size, size) in [-1, 1]

    def __getitem__(self, key) -> dict:
        index, aug_seed = key
        g = torch.Generator().manual_seed(int(aug_seed))
        i = index % len(self.instance_images)
        ex = {"instance_images": self._load(self.instance_images[i], g),
              "instance_prompt_ids": _pick(self.instance_prompt_ids, i)}
        if self.class_images:
            j = index % len(self.class_images)
            ex["class_images"] = self._load(self.class_images[j], g)
            ex["class_prompt_ids"] = _pick(self.class_prompt_ids, j)
        return ex


def _pick(ids, i: int) -> torch.Tensor:
    return ids[i] if isinstance(ids, (list, tuple)) else ids


def collate_fn(examples: list[dict]) -> dict:
    """Instance then class examples in one batch (one UNet pass): ``pixel_values (B', 3, H, W)``, ``input_ids (B', L)``."""
    pixels = [e["instance_images"] for e in examples] + [e["class_images"] for e in examples if "class_images" in e]
    ids = [e["instance_prompt_ids"] for e in examples] + [e["class_prompt_ids"] for e in examples if "class_images" in e]
    return {"pixel_values": torch.stack(pixels).contiguous().float(), "input_ids": torch.stack(ids)}


class StepBatchSampler:
    """Batches for micro-steps ``[start, stop)``: a pure function of ``(seed, micro-step, rank)``.

    Epoch ``e`` visits the dataset in the order ``randperm(n)`` seeded with ``step_seed(seed, e)``; a global
    batch of ``batch_size * num_processes`` positions is split between the processes (positions past the end
    wrap around, as accelerate's even batches do). Yields lists of ``(index, aug_seed)``.
    """

    def __init__(self, n: int, batch_size: int, num_processes: int, rank: int, seed: int, start: int, stop: int):
        self.n, self.bs, self.world, self.rank, self.seed = n, batch_size, num_processes, rank, seed
        self.start, self.stop = start, stop
        self.batches_per_epoch = math.ceil(n / (batch_size * num_processes))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self):
        perm, perm_epoch = None, -1
        for m in range(self.start, self.stop):
            epoch, j = divmod(m, self.batches_per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(step_seed(self.seed, epoch))
                perm, perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
            first = j * self.bs * self.world + self.rank * self.bs
            yield [(perm[(first + i) % self.n], step_seed(self.seed, epoch, first + i)) for i in range(self.bs)]


def tokenize(tokenizer, prompt: str, max_length: Optional[int] = None) -> torch.Tensor:
    """``(L,)`` token ids padded to ``max_length`` (default: the tokenizer's, 77 for CLIP)."""
    return tokenizer(prompt, truncation=True, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     return_tensors="pt").input_ids[0]


@torch.no_grad()
def generate_class_images(args, accelerator, prompts: Optional[list[str]] = None) -> None:
    """Sample ``--num_class_images`` minus the present ones (seeded per image). ``prompts``: per-image class
    prompts (cycled; their captions go to the folder's ``metadata.jsonl``), else ``--class_prompt``."""
    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    have = len(list_images(class_dir, "class"))
    if have >= args.num_class_images:
        return
    captioned, prompts = prompts is not None, prompts or [args.class_prompt]
    dtype = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.prior_generation_precision, torch.float16 if accelerator.device.type == "cuda" else torch.float32)
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, torch_dtype=dtype)
    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    todo = list(range(have, args.num_class_images))
    rows = []
    with accelerator.split_between_processes(todo) as mine:
        chunks = [mine[i:i + args.sample_batch_size] for i in range(0, len(mine), args.sample_batch_size)]
        for chunk in tqdm(chunks, desc="Generating class images", disable=not accelerator.is_local_main_process):
            gens = [torch.Generator(accelerator.device).manual_seed(step_seed(args.seed, 7, i)) for i in chunk]
            texts = [prompts[i % len(prompts)] for i in chunk]
            images = pipe(texts, num_inference_steps=args.class_inference_steps,
                          height=args.resolution, width=args.resolution, generator=gens).images
            for i, text, image in zip(chunk, texts, images):
                name = f"{i}-{hashlib.sha1(image.tobytes()).hexdigest()}.jpg"
                atomic_write(class_dir / name, lambda tmp, im=image: im.save(tmp, format="JPEG"))
                rows.append({"file_name": name, args.caption_column or "text": text})
    rows = gather_objects(accelerator, rows)
    if accelerator.is_main_process and captioned and args.caption_column:
        old = list(read_metadata(class_dir).values())
        atomic_write_text(class_dir / METADATA, "".join(json.dumps(r) + "\n" for r in old + rows))
    accelerator.wait_for_everyone()
    del pipe


def gather_objects(accelerator, objs: list) -> list:
    """Concatenate a list from every process (in rank order) on all processes."""
    if accelerator.num_processes == 1:
        return objs
    from accelerate.utils import gather_object

    return gather_object(objs)


# ---- models and adapters -------------------------------------------------------------------------------------
def load_models(args) -> SimpleNamespace:
    """Tokenizer, DDPM noise scheduler, text encoder, VAE and UNet, loaded component by component."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_pretrained(args.pretrained_model_name_or_path)
    kw = dict(revision=args.revision, variant=args.variant)
    tok = (CLIPTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision) if args.tokenizer_name
           else CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=args.revision))
    m = SimpleNamespace(path=path, tokenizer=tok,
                        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=args.revision),
                        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
                        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
                        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw))
    for model in (m.text_encoder, m.vae, m.unet):
        model.requires_grad_(False)
    m.vae_scale_factor = 2 ** (len(m.vae.config.block_out_channels) - 1)
    return m


def add_adapters(args, models, band: Optional[int]) -> dict[str, nn.Module]:
    """Attach ``--adapter`` to the UNet (and text encoder); returns ``{"unet": unet, "text_encoder": te}`` of the
    adapted components. Raises :class:`InputError` (rank/band too large, no matching layer) before training."""
    targets = {"unet": (models.unet, args.target_modules)}
    if args.train_text_encoder:
        targets["text_encoder"] = (models.text_encoder, args.text_encoder_target_modules)
    for name, (model, spec) in targets.items():
        if is_peft_method(args.adapter):
            kw = {"alpha": args.alpha} if args.alpha is not None else {}
            if args.adapter == "lora":
                kw["init_lora_weights"] = "gaussian"  # as diffusers' LoRA scripts
        else:
            kw = dict(band=band, alpha=1.0 if args.alpha is None else args.alpha, svd=args.svd,
                      options=dict(args.adapter_options), progress=False)
        try:
            attach_adapter(model, args.adapter, args.rank, spec, **kw)
        except (ValueError, TypeError) as e:
            raise InputError(f"cannot attach --adapter {args.adapter} --rank {args.rank}"
                             f"{'' if band is None else f' --band {band}'} to the {name}: {e}") from None
    return {name: model for name, (model, _) in targets.items()}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's persistent tensors (what a checkpoint stores), for hashing and comparisons."""
    if any(True for _ in sv.spectral_layers(model)):
        return {f"{n}.{k}": t for n, layer in sv.spectral_layers(model)
                for k, t in layer.adapters["default"].state_dict().items()}
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_component(model: nn.Module, folder: Path, extra: Optional[dict] = None) -> None:
    """Adapter tensors only: ``sv.save_adapter`` (spectral) or PEFT's state dict as safetensors."""
    if any(True for _ in sv.spectral_layers(model)):
        sv.save_adapter(model, folder, extra_metadata=extra)
        return
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter_state(model).items()},
              str(folder / "adapter_model.safetensors"))


def load_component_(model: nn.Module, folder: Path) -> None:
    """Load adapter tensors saved by :func:`save_component` into the already attached adapter, in place
    (the optimizer keeps its parameter references)."""
    if not any(True for _ in sv.spectral_layers(model)):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    _, tensors = sv.read_adapter(folder)
    for name, layer in sv.spectral_layers(model):
        delta = layer.adapters["default"]
        keys = {k: f"{name}.{k}" for k in delta.state_dict()}
        missing = [v for v in keys.values() if v not in tensors]
        if missing or not torch.equal(tensors[keys["columns"]].to(delta.columns), delta.columns):
            raise sv.AdapterFileError(f"checkpoint {folder} does not match this run's adapter at layer {name!r} "
                                      f"(another --adapter/--rank/--band/--target_modules?)")
        delta.load_state_dict({k: tensors[v] for k, v in keys.items()})


def register_state_hooks(accelerator, adapted: dict[str, nn.Module]) -> None:
    """Checkpoints store adapter tensors only (``<ckpt>/unet``, ``<ckpt>/text_encoder``), never the base."""
    def component(model):
        model = accelerator.unwrap_model(model)
        return next(name for name, m in adapted.items() if m is model)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_component(accelerator.unwrap_model(model), Path(output_dir) / component(model))
        weights.clear()  # nothing else of the models goes into the checkpoint

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            load_component_(accelerator.unwrap_model(model), Path(input_dir) / component(model))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def make_optimizer(args, adapted: dict[str, nn.Module]):
    specs = [(adapted["unet"], args.learning_rate)]
    if "text_encoder" in adapted:
        specs.append((adapted["text_encoder"], args.text_encoder_lr))
    groups = param_groups(specs)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
               eps=args.adam_epsilon)


# ---- the training step ---------------------------------------------------------------------------------------
def compute_loss(args, batch: dict, unet, text_encoder, vae, noise_scheduler, weight_dtype, generator) -> torch.Tensor:
    """DreamBooth loss of one batch: noise prediction MSE (min-SNR weighted with ``--snr_gamma``), plus
    ``--prior_loss_weight`` x the class half's MSE with prior preservation. All randomness from ``generator``."""
    device = generator.device
    pixels = batch["pixel_values"].to(device, weight_dtype)  # (B', 3, H, W)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor  # (B', 4, h, w)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator,
                              device=device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.set_grad_enabled(args.train_text_encoder and torch.is_grad_enabled()):
        hidden = text_encoder(batch["input_ids"].to(device))[0]  # (B', L, D)
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0].float()
    kind = noise_scheduler.config.prediction_type
    target = noise if kind == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    target = target.float()
    prior = None
    if args.with_prior_preservation:  # first half instance, second half class (see collate_fn)
        pred, pred_prior = pred.chunk(2)
        target, target_prior = target.chunk(2)
        timesteps = timesteps.chunk(2)[0]
        prior = F.mse_loss(pred_prior, target_prior)
    if args.snr_gamma is None:
        loss = F.mse_loss(pred, target)
    else:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)  # (B,)
        weight = torch.clamp(snr, max=args.snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
    return loss if prior is None else loss + args.prior_loss_weight * prior


# ---- validation and outputs ----------------------------------------------------------------------------------
def log_validation(args, accelerator, ctx, epoch: int, final: bool = False) -> list:
    """Sample ``--num_validation_images`` for ``--validation_prompt`` (seeded) with the current adapter."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    m = ctx.models
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=accelerator.unwrap_model(m.text_encoder), tokenizer=m.tokenizer,
        unet=accelerator.unwrap_model(m.unet), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
        scheduler=DPMSolverMultistepScheduler.from_config(m.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    with accelerator.autocast():
        images = [pipe(args.validation_prompt, num_inference_steps=args.validation_inference_steps,
                       height=args.resolution, width=args.resolution, generator=generator).images[0]
                  for _ in range(args.num_validation_images)]
    folder = Path(args.output_dir) / ("" if final else "validation")
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / (f"image_{i}.png" if final else f"epoch{epoch:04d}_{i}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("test" if final else "validation", np.stack([np.asarray(i) for i in images]),
                                      epoch, dataformats="NHWC")
    return images


def adapter_hash(adapted: dict[str, nn.Module]) -> str:
    """SHA-256 of all adapter tensors (component, name order): equal on every rank after DDP training."""
    h = hashlib.sha256()
    for comp, model in sorted(adapted.items()):
        for k, t in sorted(adapter_state(model).items()):
            h.update(f"{comp}.{k}".encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def export_loras(args, adapted: dict[str, nn.Module]) -> dict:
    """Exact LoRA files loadable by ``pipe.load_lora_weights`` (diffusers keys) and kohya-ss tools."""
    out, reports = Path(args.output_dir), {}
    if is_peft_method(args.adapter):  # baselines: diffusers' own serialisation
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict

        layers = {f"{c}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(m))
                  for c, m in adapted.items()}
        StableDiffusionPipeline.save_lora_weights(out, **layers, safe_serialization=True)
        return {"peft": {"path": str(out / LORA_FILES["peft"]), "exact": True}}
    for fmt in args.lora_export:
        rep = sv.export_lora(adapted, out / LORA_FILES[fmt], format=fmt)
        ranks = sorted({v["rank"] for v in rep["layers"].values()})
        reports[fmt] = {"path": rep["path"], "exact": rep["exact"], "max_rel_error": rep["max_rel_error"],
                        "ranks": ranks}
    return reports


def caption_summary(args, inputs) -> str:
    """``instance prompt `...` (4 images)`` or ``per-image captions (20 images, 10 distinct, e.g. `...`)``."""
    n, distinct = len(inputs.instance_captions), sorted(set(inputs.instance_captions))
    if len(distinct) == 1:
        return f"instance prompt `{distinct[0]}` ({n} images)"
    return f"per-image captions ({n} images, {len(distinct)} distinct, e.g. `{distinct[0]}`)"


def write_model_card(args, ctx, exports: dict, params: sv.ParamCount) -> None:
    builtin = args.pretrained_model_name_or_path == "builtin:tiny-sd"  # the random-weight one
    band = ctx.inputs.band
    cols = "n/a (PEFT baseline)" if band is None else f"{band} (singular columns {band * args.rank}.." \
                                                        f"{(band + 1) * args.rank - 1} of every adapted layer)"
    lora = "\n".join(f"- `{Path(r['path']).name}` ({fmt} keys, LoRA ranks {r.get('ranks', [args.rank])}, "
                     f"{'exact' if r['exact'] else 'SVD-truncated, max rel. error %.2e' % r['max_rel_error']})"
                     for fmt, r in exports.items())
    images = "".join(f"![image_{i}](./image_{i}.png)\n" for i in range(len(ctx.final_images)))
    note = ("\n> **The base model is `builtin:tiny-sd`: a small Stable Diffusion pipeline with RANDOM weights** "
            "(real diffusers/transformers architecture and the real CLIP vocabulary, never trained). The recipe, "
            "files and numbers are real, but the images are noise-like: a random-weight base cannot draw the "
            "concept. Train on a real base (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`) for pictures.\n"
            if builtin else "")
    card = f"""---
base_model: {args.pretrained_model_name_or_path}
instance_prompt: {args.instance_prompt or ctx.inputs.instance_captions[0]}
library_name: spectral_vision
tags: [stable-diffusion, text-to-image, diffusers, dreambooth, spectral-adapter, lora]
---
# {ctx.inputs.concept}: DreamBooth concept ({args.adapter}, rank {args.rank})
{note}
- concept: `{ctx.inputs.concept}`, {caption_summary(args, ctx.inputs)}
- method: `{args.adapter}`, rank {args.rank}, band {cols}
- adapted: UNet `{args.target_modules}`{f", text encoder `{args.text_encoder_target_modules}`" if args.train_text_encoder else ""}
- trainable parameters: {params.trainable:,} ({params.percent:.4f}% of the base)
- steps: {ctx.global_step} at batch {args.train_batch_size} x {ctx.num_processes} process(es) x {args.gradient_accumulation_steps} accumulation, resolution {args.resolution}, seed {args.seed}
- prior preservation: {args.with_prior_preservation}

## Files
- `unet/`{", `text_encoder/`" if args.train_text_encoder else ""}: the adapter (`spectral_vision.load_adapter`)
{lora}
- `training_args.json`: every argument, the band and the run summary

```python
pipe.load_lora_weights("{args.output_dir}", weight_name="{LORA_FILES['peft']}")
```
{images}"""
    (Path(args.output_dir) / "README.md").write_text(card)


def save_outputs(args, accelerator, ctx) -> dict:
    """Adapters, LoRA exports, args JSON, band registration and model card (main process)."""
    out = Path(args.output_dir)
    adapted = {k: accelerator.unwrap_model(m) for k, m in ctx.adapted.items()}
    extra = {"concept": ctx.inputs.concept, "instance_prompt": args.instance_prompt or ctx.inputs.instance_captions[0],
             "band": ctx.inputs.band,
             "base_model": args.pretrained_model_name_or_path}
    for comp, model in adapted.items():
        save_component(model, out / comp, extra)
    exports = export_loras(args, adapted)
    params = sv.trainable_parameters(adapted["unet"])
    if "text_encoder" in adapted:
        te = sv.trainable_parameters(adapted["text_encoder"])
        params = sv.ParamCount(params.trainable + te.trainable, params.total + te.total,
                               100.0 * (params.trainable + te.trainable) /
                               max(params.total + te.total - params.trainable - te.trainable, 1))
    summary = {"global_step": ctx.global_step, "final_loss": ctx.last_loss, "band": ctx.inputs.band,
               "concept": ctx.inputs.concept, "trainable_params": params.trainable, "num_processes": ctx.num_processes,
               "adapter_sha256_per_rank": ctx.rank_hashes, "weight_dtype": str(ctx.weight_dtype), "exports": exports,
               "resumed_from": ctx.resumed_from}
    atomic_write_json(out / "training_args.json", {"args": vars(args), "summary": summary})
    if ctx.inputs.registry is not None and not args.no_register:
        cols = sorted({int(c) for m in adapted.values() for _, layer in sv.spectral_layers(m)
                       for c in layer.adapters["default"].columns.tolist()})
        ctx.inputs.registry.register(ctx.inputs.concept, out / "unet", args.adapter, args.rank, ctx.inputs.band, cols)
    write_model_card(args, ctx, exports, params)
    return summary


# ---- main -------------------------------------------------------------------------------------------------------
def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = None if args.report_to in (None, "none") else args.report_to
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)))


def setup(args) -> tuple:
    """Everything before the first step: inputs, accelerator, models, adapters, optimizer, resume."""
    from accelerate.utils import broadcast_object_list
    from diffusers.optimization import get_scheduler

    inputs = prepare_inputs(args)  # fails here on bad inputs, before any model is loaded
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    saved_seed = checkpoint_info(resume)["info"].get("seed") if resume is not None else None
    if args.seed is None:  # the checkpoint's seed, else one drawn on the main process and shared; recorded
        args.seed = saved_seed if saved_seed is not None else \
            broadcast_object_list([int.from_bytes(os.urandom(4), "little")])[0]
    elif saved_seed is not None and saved_seed != args.seed:
        logger.warning(f"resuming with --seed {args.seed} but the checkpoint was made with {saved_seed}: "
                       "the rest of the run will not replay the original one")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    models = load_models(args)
    args.resolution = args.resolution or models.unet.config.sample_size * models.vae_scale_factor
    if args.resolution % models.vae_scale_factor:
        raise InputError(f"--resolution {args.resolution} must be a multiple of {models.vae_scale_factor} (the VAE's)")
    adapted = add_adapters(args, models, inputs.band)  # fails here on a rank/band too large for a layer
    if args.with_prior_preservation:
        generate_class_images(args, accelerator, inputs.class_prompts)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (models.unet, models.vae, models.text_encoder):  # frozen weights in weight_dtype, adapters fp32
        cast_frozen_(model, weight_dtype).to(accelerator.device)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable()
    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate, args.text_encoder_lr = args.learning_rate * factor, args.text_encoder_lr * factor
    dataset = make_dataset(args, models.tokenizer, inputs)
    optimizer = make_optimizer(args, adapted)
    steps_per_epoch = math.ceil(math.ceil(len(dataset) / (args.train_batch_size * accelerator.num_processes))
                                / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    prepared = accelerator.prepare(*adapted.values(), optimizer, lr_scheduler)
    adapted = dict(zip(adapted, prepared[:len(adapted)]))
    optimizer, lr_scheduler = prepared[len(adapted):]
    models.unet, models.text_encoder = adapted["unet"], adapted.get("text_encoder", models.text_encoder)
    register_state_hooks(accelerator, {k: accelerator.unwrap_model(m) for k, m in adapted.items()})
    ctx = SimpleNamespace(inputs=inputs, models=models, adapted=adapted, optimizer=optimizer, lr_scheduler=lr_scheduler,
                          dataset=dataset, weight_dtype=weight_dtype, num_processes=accelerator.num_processes,
                          global_step=0, last_loss=float("nan"), resumed_from=None, final_images=[], rank_hashes=[])
    if resume is not None:
        accelerator.load_state(str(resume))  # adapter tensors (hook), optimizer, scheduler, RNG states
        ctx.global_step, ctx.resumed_from = checkpoint_info(resume)["step"], str(resume)
        logger.info(f"Resuming from checkpoint {resume} at step {ctx.global_step}")
    elif args.resume_from_checkpoint == "latest":
        logger.info(f"no complete checkpoint in {args.output_dir}: starting a new run")
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-spectral", config={k: v for k, v in vars(args).items()
                                                                 if isinstance(v, (int, float, str, bool))})
    return accelerator, ctx


def make_dataset(args, tokenizer, inputs) -> DreamBoothDataset:
    cache = {}

    def ids_of(captions: list[str]) -> list[torch.Tensor]:
        return [cache.setdefault(c, tokenize(tokenizer, c, args.tokenizer_max_length)) for c in captions]

    ids = ids_of(inputs.instance_captions)
    class_images = class_ids = None
    if args.with_prior_preservation:
        folder = Path(args.class_data_dir)
        class_images = list_images(folder, "class")[:args.num_class_images]
        class_ids = ids_of(captions_for(class_images, read_metadata(folder), folder, args.caption_column,
                                        args.class_prompt, "class", "--class_prompt"))
    return DreamBoothDataset(inputs.instance_images, ids, args.resolution, args.center_crop, args.random_flip,
                             class_images, class_ids)


def train(args, accelerator, ctx) -> None:
    """The loop: micro-steps ``[global_step*GA, max_train_steps*GA)``, checkpoints, validation, progress."""
    ga, rank = args.gradient_accumulation_steps, accelerator.process_index
    sampler = StepBatchSampler(len(ctx.dataset), args.train_batch_size, accelerator.num_processes, rank, args.seed,
                               ctx.global_step * ga, args.max_train_steps * ga)
    loader = DataLoader(ctx.dataset, batch_sampler=sampler, collate_fn=collate_fn,
                        num_workers=args.dataloader_num_workers)
    m = ctx.models
    trained = list(ctx.adapted.values())
    for model in trained:
        model.train()
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=args.max_train_steps, initial=ctx.global_step, desc="Steps",
               disable=not accelerator.is_local_main_process)
    micro_losses = []
    for micro, batch in zip(range(sampler.start, sampler.stop), loader):
        generator = torch.Generator(accelerator.device).manual_seed(step_seed(args.seed, 1, micro, rank))
        with accelerator.accumulate(*trained):
            loss = compute_loss(args, batch, m.unet, m.text_encoder, m.vae, m.noise_scheduler, ctx.weight_dtype,
                                generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            ctx.optimizer.step()
            ctx.lr_scheduler.step()
            ctx.optimizer.zero_grad(set_to_none=True)
        micro_losses.append(loss.detach().item())
        if accelerator.sync_gradients:
            ctx.global_step += 1
            ctx.last_loss = sum(micro_losses) / len(micro_losses)
            micro_losses.clear()
            if not math.isfinite(ctx.last_loss):
                raise FloatingPointError(f"loss is {ctx.last_loss} at step {ctx.global_step}: lower --learning_rate "
                                         f"or use bf16 instead of fp16")
            logs = {"loss": ctx.last_loss, "lr": ctx.lr_scheduler.get_last_lr()[0]}
            bar.update(1)
            bar.set_postfix(**logs)
            accelerator.log(logs, step=ctx.global_step)
            if ctx.global_step % args.checkpointing_steps == 0:
                path = save_accelerate_checkpoint(accelerator, args.output_dir, ctx.global_step,
                                                  args.checkpoints_total_limit,
                                                  info={"seed": args.seed, "band": ctx.inputs.band})
                logger.info(f"Saved state to {path}")
        epoch, j = divmod(micro + 1, sampler.batches_per_epoch)
        if (j == 0 and args.validation_prompt and accelerator.is_main_process
                and (epoch - 1) % args.validation_epochs == 0):
            log_validation(args, accelerator, ctx, epoch - 1)
    bar.close()


def main(args: argparse.Namespace) -> dict:
    """Train, then write the outputs; returns the run summary (also in ``training_args.json``)."""
    accelerator, ctx = setup(args)
    train(args, accelerator, ctx)
    accelerator.wait_for_everyone()
    own = adapter_hash({k: accelerator.unwrap_model(m) for k, m in ctx.adapted.items()})
    ctx.rank_hashes = accelerator.gather_for_metrics([own], use_gather_object=True) \
        if accelerator.num_processes > 1 else [own]
    if len(set(ctx.rank_hashes)) > 1:
        raise RuntimeError(f"ranks ended with different adapters: {ctx.rank_hashes}")
    summary = {}
    if accelerator.is_main_process:
        if args.validation_prompt:
            ctx.final_images = log_validation(args, accelerator, ctx, args.num_train_epochs, final=True)
        summary = save_outputs(args, accelerator, ctx)
        logger.info(f"adapter, LoRA export and model card written to {args.output_dir}")
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    try:
        main(parse_args())
    except InputError as e:
        sys.exit(f"error: {e}")
