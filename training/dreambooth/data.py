"""Inputs of a run, checked before any model is loaded: instance/class images, per-image captions, built-in sets.

Captions follow the ``datasets`` imagefolder layout: a ``metadata.jsonl`` in the image folder with rows
``{"file_name": "0000.png", "<caption_column>": "a handwritten digit 7 sks"}``; an image without a row may have
``<image>.txt`` beside it; any other image gets ``--instance_prompt`` (class images: ``--class_prompt``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from spectral_vision.baselines import is_peft_method
from spectral_vision.bands import BandRegistry, describe_columns
from spectral_vision.fileio import cache_root, file_sha256
from spectral_vision.integrations.diffusers import SKIMAGE_PHOTOS, bundled_instance_images

from .args import DIGITS_PREFIX, IMAGE_EXTENSIONS, InputError

METADATA = "metadata.jsonl"


def load_rgb(path: Path) -> Image.Image:
    """An RGB image; 16-bit and float grayscale (PIL modes ``I;16*``, ``I``, ``F``) are scaled to 8 bits
    instead of clipped (``convert("RGB")`` alone turns a 16-bit PNG almost white)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or im.mode == "I":
            a = np.asarray(im, dtype=np.float64)  # (H, W) in [0, 65535]
            im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8))
        elif im.mode == "F":
            a = np.asarray(im, dtype=np.float64)
            scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
            im = Image.fromarray(np.clip(np.round(a * scale), 0, 255).astype(np.uint8))
        return im.convert("RGB")


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


# ---- captions ------------------------------------------------------------------------------------------------
def read_metadata(folder: Path) -> dict[str, dict]:
    """Rows of ``folder/metadata.jsonl`` keyed by ``file_name`` (``{}`` when there is none). Raises
    :class:`InputError` on a malformed line, a missing/duplicate ``file_name`` or one that leaves the folder."""
    path = folder / METADATA
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e})") from None
    rows = {}
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


def has_captions(folder: Path, column: Optional[str]) -> bool:
    """Whether ``folder`` holds at least one caption (metadata row with ``column`` or a ``.txt``)."""
    if column is None or not folder.is_dir():
        return False
    return any(column in r for r in read_metadata(folder).values()) or any(folder.glob("*.txt"))


# ---- built-in instance sets ----------------------------------------------------------------------------------
def digit_set(concept: str) -> SimpleNamespace:
    """``builtin:digits-<concept>``: held-out digits transformed by ``digit_concepts`` (written once into the
    cache): ``instance_dir``, ``class_dir`` (the same digits untransformed), per-image captions, ``validation``
    prompts (one per digit 0-9 with the concept's token)."""
    from training import digit_concepts as dc

    known = list(dc.ALL_CONCEPTS)
    if concept not in known:
        raise InputError(f"unknown built-in concept {DIGITS_PREFIX}{concept}; available: "
                         f"{[DIGITS_PREFIX + c for c in known]}")
    # the token is part of the key: a set written under another token (an older version) is never reused
    root = cache_root("instance_images", f"digits-{concept}-{dc.ALL_CONCEPTS[concept].token}")
    if not (root / "class" / METADATA).is_file():  # written once, into a temp folder renamed in one step
        root.parent.mkdir(parents=True, exist_ok=True)  # (DDP ranks and parallel runs race here)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
        try:
            dc.write_instance_set(concept, tmp / "instance", class_dir=tmp / "class")
            try:
                os.rename(tmp, root)
            except OSError:
                if not (root / "class" / METADATA).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return SimpleNamespace(instance_dir=root / "instance", class_dir=root / "class",
                           validation=[dc.concept_prompt([concept], d) for d in range(10)])


def instance_folder(args) -> tuple[Path, Optional[SimpleNamespace]]:
    """``(folder, builtin digit set or None)`` of ``--instance_data_dir`` (built-ins are written on first use)."""
    name = args.instance_data_dir
    if name.startswith(DIGITS_PREFIX):
        ds = digit_set(name[len(DIGITS_PREFIX):])
        return ds.instance_dir, ds
    if name.startswith("builtin:"):
        photo = name.split(":", 1)[1]
        if photo not in SKIMAGE_PHOTOS:
            raise InputError(f"unknown builtin instance set {photo!r}; available: {list(SKIMAGE_PHOTOS)} and "
                             f"{DIGITS_PREFIX}<concept>")
        return bundled_instance_images(photo), None
    return Path(name), None


# ---- everything checked before a model is loaded -------------------------------------------------------------
def adapter_name_for(concept: str) -> str:
    """A module-key-safe adapter name for ``concept`` (no dots: ``nn.ModuleDict`` keys)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", concept) or "default"


def prepare_inputs(args) -> SimpleNamespace:
    """Check every input before any model is loaded: images, captions, an explicit band. Returns the inputs."""
    folder, builtin = instance_folder(args)
    instance = list_images(folder, "instance")
    if not instance:
        raise InputError(f"instance folder {folder} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    rows = read_metadata(folder)
    captions = captions_for(instance, rows, folder, args.caption_column, args.instance_prompt, "instance",
                            "--instance_prompt")
    class_prompts = None
    if args.with_prior_preservation:  # per-image class prompts from the instance metadata, else --class_prompt
        if args.class_data_dir is None:
            args.class_data_dir = str(builtin.class_dir)
        found = [rows.get(f.name, {}).get(args.class_prompt_column) for f in instance]
        class_prompts = sorted({str(c) for c in found if c}) or None
        if class_prompts is None and args.class_prompt is None and not has_captions(Path(args.class_data_dir),
                                                                                     args.caption_column):
            raise InputError("--with_prior_preservation needs --class_prompt, captions in --class_data_dir or a "
                             f"{args.class_prompt_column!r} column in the instance metadata.jsonl")
    n_examples = max(len(instance), args.num_class_images if args.with_prior_preservation else 0)
    if args.train_batch_size > n_examples:
        raise InputError(f"--train_batch_size {args.train_batch_size} is larger than the dataset ({n_examples} "
                         f"examples): every batch would repeat images; use at most {n_examples}")
    if args.validation_prompt is None and builtin is not None:
        args.validation_prompt = "|".join(builtin.validation)
    out = Path(args.output_dir).resolve()
    concept = args.concept_name or out.name
    registry = None if is_peft_method(args.adapter) else BandRegistry(args.concepts_dir or out.parent)
    if registry is not None and args.band != "auto":
        check_band_free(registry, concept, int(args.band), args.rank)
    h = hashlib.sha256()
    for f, cap in zip(instance, captions):
        h.update(f"{f.name}\0{file_sha256(f)}\0{cap}\0".encode())
    return SimpleNamespace(instance_dir=folder, instance_images=instance, instance_captions=captions,
                           class_prompts=class_prompts, concept=concept, adapter_name=adapter_name_for(concept),
                           band=None, registry=registry, data_sha256=h.hexdigest())


def check_band_free(registry: BandRegistry, concept: str, band: int, rank: int) -> None:
    """Raise :class:`InputError` if ``band`` overlaps another concept registered in ``registry``."""
    clash = registry.check_overlap(band, rank, exclude=concept)
    if clash:
        desc = "; ".join(f"{n!r} (columns {c})" for n, c in clash)
        raise InputError(f"--band {band} at --rank {rank} (singular columns {describe_columns(band, rank)}) "
                         f"overlaps concepts registered in {registry.path}: {desc}. Use --band auto (next free "
                         f"band: {registry.next_free_band(rank, exclude=concept)}) or another --concepts_dir")
