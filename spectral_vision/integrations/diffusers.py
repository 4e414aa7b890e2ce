"""Stable Diffusion loading for training scripts: hub ids, local folders and the offline ``builtin:tiny-sd``.

* :func:`load_pipeline` returns a real ``diffusers.StableDiffusionPipeline`` (SD 1.x / 2.x layout) from a
  hub id (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``), a local folder written by ``save_pretrained``,
  or ``"builtin:tiny-sd"``.
* :func:`resolve_pretrained` maps a name to something ``from_pretrained(..., subfolder=...)`` accepts (the
  built-in is materialised once in the cache folder), so scripts can load components one by one as
  diffusers' examples do.
* ``builtin:tiny-sd`` is a small SD pipeline built from the real classes and configs
  (``UNet2DConditionModel`` from :func:`spectral_vision.zoo.create_model` ``"tiny-unet"``, ``CLIPTextModel``
  ``"tiny-clip-text"``, a two-block ``AutoencoderKL``, SD's ``PNDMScheduler`` config) and a ``CLIPTokenizer``
  whose ``vocab.json`` / ``merges.txt`` are built from the CLIP BPE file ``open_clip_torch`` ships. Its
  **weights are random** (fixed seed): it exercises the whole training recipe offline, but it has never
  seen an image, so its samples are noise-like textures, not pictures.
* ``builtin:digits`` is a small SD pipeline **trained** on scikit-learn's handwritten digits (32 px, prompts
  ``"a handwritten digit 3"``), shipped as one fp16 file in ``spectral_vision/assets`` (see
  ``training/pretrain_digits_base.py``); materialised into the cache folder on first use.
* :func:`bundled_instance_images` writes real photos shipped by scikit-image (``chelsea`` the cat,
  ``coffee``, ``astronaut``, ...) to a folder: a default DreamBooth instance set that needs no download.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from ..fileio import atomic_write, atomic_write_text, cache_root

__all__ = ["load_pipeline", "resolve_pretrained", "is_builtin", "build_clip_tokenizer_files",
           "bundled_instance_images", "BUILTIN_PIPELINES", "SKIMAGE_PHOTOS"]

#: built-in pipelines: name -> (cache folder name, builder). Bump the folder suffix when a builder changes.
BUILTIN_PIPELINES = {"builtin:tiny-sd": "tiny-sd-v1", "builtin:digits": "digits"}  # digits: + asset digest
#: RGB photos bundled with scikit-image (no download needed)
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
TINY_SD_SEED = 0
TINY_SD_RESOLUTION = 32  # default image size of the built-in (latents 16x16 with its 2x VAE)


def is_builtin(name_or_path: Union[str, Path]) -> bool:
    return str(name_or_path).startswith("builtin:")


# ---- CLIP tokenizer from open_clip's BPE file --------------------------------------------------------
def build_clip_tokenizer_files(folder: Union[str, Path]) -> Path:
    """Write CLIP's ``vocab.json`` (49408 entries) and ``merges.txt`` into ``folder``.

    Built exactly as CLIP builds its encoder from ``bpe_simple_vocab_16e6.txt.gz`` (the file
    ``open_clip_torch`` ships): the 256 byte-level characters, the same with ``</w>``, the 48894
    merges joined, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is the "#version" header
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    if len(encoder) != 49408:
        raise RuntimeError(f"CLIP vocabulary has {len(encoder)} entries, expected 49408 (unexpected BPE file)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "vocab.json", json.dumps(encoder, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


# ---- the built-in tiny SD pipeline -------------------------------------------------------------------
def _build_tiny_sd(folder: Path) -> None:
    """Materialise ``builtin:tiny-sd`` with ``save_pretrained`` into ``folder`` (random weights, fixed seed)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ..zoo import create_model

    vae_factor = 2  # two VAE blocks: one 2x downsampling (SD's VAE has four blocks, 8x)
    unet = create_model("tiny-unet", seed=TINY_SD_SEED, sample_size=TINY_SD_RESOLUTION // vae_factor)
    text_encoder = create_model("tiny-clip-text", seed=TINY_SD_SEED + 1)
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SD_SEED + 2)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=32, sample_size=TINY_SD_RESOLUTION,
                            scaling_factor=0.18215).eval()
    # Stable Diffusion v1's scheduler config (scheduler/scheduler_config.json of SD 1.5)
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    tokenizer = CLIPTokenizer.from_pretrained(str(build_clip_tokenizer_files(folder / "_bpe")),
                                              model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):  # also keep the slow-tokenizer files, as SD repos do
        os.replace(folder / "_bpe" / f, folder / "tokenizer" / f)
    shutil.rmtree(folder / "_bpe")
    (folder / "BUILTIN.md").write_text(
        "builtin:tiny-sd: a small Stable Diffusion pipeline built by spectral_vision from real diffusers/"
        "transformers classes with RANDOM weights (seed 0) and the real CLIP BPE vocabulary. It has never been "
        "trained: its images are noise-like, useful only to test training recipes offline.\n")


def resolve_pretrained(name_or_path: Union[str, Path]) -> str:
    """A hub id or local folder for ``from_pretrained``; built-ins are built once into the cache (atomically)."""
    name = str(name_or_path)
    if not is_builtin(name):
        return name
    if name not in BUILTIN_PIPELINES:
        raise ValueError(f"unknown built-in {name!r}; available: {sorted(BUILTIN_PIPELINES)}")
    folder_name, build = BUILTIN_PIPELINES[name], _build_tiny_sd
    if name == "builtin:digits":
        folder_name, build = _digits_builder()
    final = cache_root() / "pipelines" / folder_name
    if (final / "model_index.json").exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not (final / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def load_pipeline(name_or_path: Union[str, Path], revision: Optional[str] = None, variant: Optional[str] = None,
                  torch_dtype: Optional[torch.dtype] = None, **kwargs):
    """A ``StableDiffusionPipeline`` from a hub id, a local ``save_pretrained`` folder or ``"builtin:tiny-sd"``.

    ``revision`` / ``variant`` (e.g. ``"fp16"``) / ``torch_dtype`` are passed to diffusers'
    ``from_pretrained``; the safety checker is not loaded (training / evaluation use). Extra ``kwargs``
    go to ``from_pretrained`` too.
    """
    from diffusers import StableDiffusionPipeline

    path = resolve_pretrained(name_or_path)
    if is_builtin(name_or_path) and (revision or variant):
        raise ValueError(f"{name_or_path} has no revisions or variants")
    kwargs.setdefault("safety_checker", None)
    kwargs.setdefault("requires_safety_checker", False)
    if torch_dtype is not None:  # newer diffusers name it `dtype` (`torch_dtype` is deprecated there)
        from diffusers.pipelines import pipeline_utils

        kwargs["dtype" if "_resolve_dtype" in vars(pipeline_utils) else "torch_dtype"] = torch_dtype
    return StableDiffusionPipeline.from_pretrained(path, revision=revision, variant=variant, **kwargs)


# ---- builtin:digits: the trained digits base (issue 9) ----------------------------------------------------
def _digits_builder():
    """``(cache folder name, builder)`` of ``builtin:digits``: the real StableDiffusionPipeline trained on
    scikit-learn's handwritten digits by ``training/pretrain_digits_base.py``, shipped as one fp16 file in
    ``spectral_vision/assets`` (tokenizer rebuilt from open_clip's BPE); the folder name carries the file's
    digest, so a retrained file is materialised afresh."""
    from ..assets import DIGITS_BASE, asset_digest, pipeline_from_asset

    if not DIGITS_BASE.exists():
        raise FileNotFoundError(f"{DIGITS_BASE} is missing; regenerate it with `python training/pretrain_digits_base.py`")

    def build(folder: Path) -> None:
        pipeline_from_asset(DIGITS_BASE).save_pretrained(str(folder), safe_serialization=True)

    return f"digits-{asset_digest(DIGITS_BASE)}", build


# ---- bundled photos ------------------------------------------------------------------------------------
def _square_views(img, views: int) -> list:
    """``views`` square crops of an ``(H, W, 3)`` array: the centred largest square, then 80% squares
    along the diagonal (top-left to bottom-right)."""
    h, w = img.shape[:2]
    s = min(h, w)
    out = [img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]]
    s2 = int(0.8 * s)
    for i in range(views - 1):
        t = i / max(views - 2, 1)
        y, x = int(t * (h - s2)), int(t * (w - s2))
        out.append(img[y:y + s2, x:x + s2])
    return out


def bundled_instance_images(name: str = "chelsea", folder: Optional[Union[str, Path]] = None,
                            views: int = 4) -> Path:
    """Write real photos shipped by scikit-image to ``folder`` as a DreamBooth instance set; returns it.

    ``name``: one of :data:`SKIMAGE_PHOTOS` or several joined by commas. Each photo gives ``views``
    square crops (``<name>_<i>.png``). Default folder: ``$SPECTRAL_VISION_CACHE/instance_images/<name>``.
    """
    import numpy as np
    import skimage.data
    from PIL import Image

    names = [n.strip() for n in name.split(",") if n.strip()]
    bad = [n for n in names if n not in SKIMAGE_PHOTOS]
    if not names or bad:
        raise ValueError(f"unknown bundled photo(s) {bad or name!r}; available: {list(SKIMAGE_PHOTOS)}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    folder = Path(folder) if folder is not None else cache_root() / "instance_images" / "_".join(names)
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        img = np.asarray(getattr(skimage.data, n)())[..., :3]  # (H, W, 3) uint8
        for i, view in enumerate(_square_views(img, views)):
            target = folder / f"{n}_{i}.png"
            if target.exists():
                continue
            atomic_write(target, lambda tmp, v=view: Image.fromarray(np.ascontiguousarray(v)).save(tmp, format="PNG"))
    return folder
