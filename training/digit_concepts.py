"""Digit concepts with measurable signatures: real image transformations of held-out digits.

Each concept is a transformation of a ``(N, H, W)`` gray image in [0, 1] (ink = 1 on a dark
background) and a *signature*: a per-image number that the transformation moves and the others
(nearly) do not. Signatures are polarity-aware (measured on the ink, whatever the background).

==========  =====================================  ===================================================
concept     transformation                         signature
==========  =====================================  ===================================================
``bold``    grey dilation with a disk (radius 2)   stroke width in px: ink area / skeleton length
``thin``    grey erosion with a 3x3 square         stroke width in px (moves it down)
``slant``   horizontal shear ``x += k (cy - y)``   slant in degrees: ``atan(-cov(x, y) / var(y))`` of the
            (top leans right, ``k = 0.45``)        ink distribution (a shear by k adds exactly k)
``faint``   ink brightness x 0.5 (grey ink)        ink level: 99th percentile of the ink-up image
``small``   scale by 0.7 about the ink's centre    vertical size in px: RMS spread of the ink rows
``invert``  ``1 - x`` (dark ink on a light page)   background level: mean of the 3-px border ring
==========  =====================================  ===================================================

    s = write_instance_set("bold", "data/bold")  # imagefolder + metadata.jsonl for dreambooth_spectral.py
    s.instance_dir, s.class_dir, s.caption_column         # "a handwritten digit 7 <token>" / "... digit 7"
    signatures(gray_images)                               # {"bold": (N,), "slant": (N,), ...}

The instance sets are made from the base's HELD-OUT digits (the split recorded in ``builtin:digits``),
so the concept adapters never train on a digit the base was trained on; the class images (prior
preservation) are the same digits untransformed. Every caption carries its digit.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np


__all__ = ["Concept", "CONCEPTS", "EXTRA_CONCEPTS", "ALL_CONCEPTS", "set_tokens", "heldout_digits", "InstanceSet", "CONTEXT_WORDS", "with_context", "bold", "thin", "slant", "faint", "small", "invert", "ink", "stroke_width", "slant_degrees", "ink_level", "size", "background",
           "apply", "signatures", "write_instance_set", "concept_prompt"]


# ---- transformations: (N, H, W) in [0, 1] -> (N, H, W) in [0, 1] ----------------------------------------------
def bold(gray: np.ndarray, radius: int = 2) -> np.ndarray:
    """Morphological (grey) dilation of the ink with a disk of ``radius`` px: thicker strokes."""
    from scipy.ndimage import grey_dilation
    from skimage.morphology import disk

    fp = disk(radius).astype(bool)
    thick = np.stack([grey_dilation(im, footprint=fp) for im in ink(gray)])  # (N, H, W), ink up
    return np.where(_inverted(gray)[:, None, None], 1 - thick, thick).clip(0, 1).astype(np.float32)


def thin(gray: np.ndarray, size: int = 3) -> np.ndarray:
    """Morphological (grey) erosion of the ink with a ``size`` x ``size`` square: thinner strokes."""
    from scipy.ndimage import grey_erosion

    slim = np.stack([grey_erosion(im, size=(size, size)) for im in ink(gray)])  # (N, H, W), ink up
    return np.where(_inverted(gray)[:, None, None], 1 - slim, slim).clip(0, 1).astype(np.float32)


def slant(gray: np.ndarray, shear: float = 0.45) -> np.ndarray:
    """Shear each image about its centre: column ``x`` at row ``y`` takes ``x - shear (cy - y)`` (top leans right)."""
    from scipy.ndimage import affine_transform

    n, h, w = gray.shape
    cy = (h - 1) / 2
    # output (y, x) samples input (y, x - shear * (cy - y)) = matrix @ (y, x) + offset
    matrix = np.array([[1.0, 0.0], [shear, 1.0]])
    offset = np.array([0.0, -shear * cy])
    fill = [float(np.median(_border(im[None]))) for im in gray]  # keep the page colour at the edges
    return np.stack([affine_transform(im, matrix, offset=offset, order=1, mode="constant", cval=c)
                     for im, c in zip(gray, fill)]).clip(0, 1).astype(np.float32)


def small(gray: np.ndarray, scale: float = 0.7) -> np.ndarray:
    """Shrink each image's ink by ``scale`` about its ink centroid (the digit stays where it was, smaller)."""
    from scipy.ndimage import affine_transform

    a = ink(gray)
    h, w = a.shape[1:]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for im, src, c in zip(gray, a, _inverted(gray).astype(np.float32)):  # fill: the page colour, 0 or 1
        m = src / max(float(src.sum()), 1e-8)
        centre = np.array([(m * y).sum(), (m * x).sum()])  # (cy, cx) of the ink
        # output p samples input centre + (p - centre) / scale
        out.append(affine_transform(im, np.eye(2) / scale, offset=centre - centre / scale, order=1, mode="constant",
                                    cval=c))
    return np.stack(out).clip(0, 1).astype(np.float32)


def faint(gray: np.ndarray, level: float = 0.5) -> np.ndarray:
    """Grey ink: the ink's brightness multiplied by ``level`` (the page keeps its colour)."""
    a = ink(gray) * level
    return np.where(_inverted(gray)[:, None, None], 1 - a, a).clip(0, 1).astype(np.float32)


def invert(gray: np.ndarray) -> np.ndarray:
    """Dark ink on a light page."""
    return (1.0 - gray).astype(np.float32)


# ---- signatures: (N, H, W) -> (N,) ---------------------------------------------------------------------------
def _border(gray: np.ndarray, width: int = 3) -> np.ndarray:
    """``(N, ring pixels)``: the outer ``width``-px ring of each image."""
    m = np.ones(gray.shape[1:], dtype=bool)
    m[width:-width, width:-width] = False
    return gray[:, m]


def background(gray: np.ndarray) -> np.ndarray:
    """Mean of the 3-px border ring (0: dark page, 1: light page)."""
    return _border(gray).mean(1)


def _inverted(gray: np.ndarray) -> np.ndarray:
    return background(gray) > 0.5


def _ink_up(gray: np.ndarray) -> np.ndarray:
    return np.where(_inverted(gray)[:, None, None], 1 - gray, gray)


def ink(gray: np.ndarray) -> np.ndarray:
    """The ink as bright-on-dark, whatever the page polarity: ``(N, H, W)``."""
    return _ink_up(np.asarray(gray, dtype=np.float32))


def ink_level(gray: np.ndarray) -> np.ndarray:
    """Brightness of the ink: the 99th percentile of the ink-up image (1: full ink, 0.5: grey ink)."""
    return np.percentile(ink(gray).reshape(len(gray), -1), 99, axis=1).astype(np.float32)


def stroke_width(gray: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Mean stroke width in px: area of the ink mask (ink > ``threshold`` x the image's :func:`ink_level`, so grey
    ink is measured like black ink) / length of its skeleton."""
    from skimage.morphology import skeletonize

    a = ink(gray)
    masks = a > threshold * np.maximum(ink_level(gray), 0.05)[:, None, None]
    return np.array([m.sum() / max(skeletonize(m).sum(), 1) for m in masks], dtype=np.float32)


def slant_degrees(gray: np.ndarray) -> np.ndarray:
    """Slant of the ink in degrees (positive: top leans right), ``atan(-cov(x, y) / var(y))``."""
    a = ink(gray)
    n, h, w = a.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    m = a.reshape(n, -1) + 1e-8  # (N, H*W) ink weights
    m = m / m.sum(1, keepdims=True)
    xs, ys = x.ravel(), y.ravel()
    mx, my = m @ xs, m @ ys  # (N,)
    cov = m @ (xs * ys) - mx * my
    var_y = m @ (ys * ys) - my * my
    return np.degrees(np.arctan(-cov / np.maximum(var_y, 1e-6))).astype(np.float32)


def size(gray: np.ndarray) -> np.ndarray:
    """Vertical size of the ink in px: the ink-weighted RMS distance of its rows from their mean (a 0.7 scale
    multiplies it by 0.7; a shear leaves it unchanged)."""
    a = ink(gray)
    n, h, w = a.shape
    ys = np.arange(h, dtype=np.float32)
    rows = a.sum(2) + 1e-8  # (N, H) ink per row
    rows = rows / rows.sum(1, keepdims=True)
    my = rows @ ys
    return np.sqrt(np.maximum(rows @ (ys * ys) - my * my, 0.0)).astype(np.float32)


@dataclass(frozen=True)
class Concept:
    name: str
    token: str  # rare word the concept is bound to in prompts
    transform: Callable[[np.ndarray], np.ndarray]
    signature: Callable[[np.ndarray], np.ndarray]
    unit: str


# The fusable concepts, in order of application when several are combined. Tokens: chosen by measurement
# (benchmarks/results/concept_token.md): each one alone AND every combination of them appended to "a handwritten
# digit N" leave the base's digit accuracy at >= 99 % with no adapter (a pair that looks harmless alone can still
# wreck it together: "phol olis" drops it to 79 %).
CONCEPTS = {
    "bold": Concept("bold", "shill", bold, stroke_width, "px stroke width"),
    "slant": Concept("slant", "olis", slant, slant_degrees, "degrees slant"),
    "faint": Concept("faint", "spur", faint, ink_level, "ink level"),
}
# instance sets only, not trained by the benchmark: thin undoes bold; small and invert (applied last, so the others
# act on the ink) did not train on this base (docs/concepts.md). They reuse measured tokens.
EXTRA_CONCEPTS = {"thin": Concept("thin", "shill", thin, stroke_width, "px stroke width"),
                  "small": Concept("small", "spur", small, size, "px vertical size"),
                  "invert": Concept("invert", "spur", invert, background, "background level")}
ALL_CONCEPTS = {**CONCEPTS, **EXTRA_CONCEPTS}


def set_tokens(tokens: dict[str, str]) -> None:
    """Bind concepts to other tokens (``{"bold": "ohwx"}``), e.g. to measure a candidate token."""
    import dataclasses

    for name, tok in tokens.items():
        if name not in ALL_CONCEPTS or not tok or tok.strip() != tok:
            raise ValueError(f"bad token {tok!r} for concept {name!r} (concepts: {list(ALL_CONCEPTS)})")
        ALL_CONCEPTS[name] = dataclasses.replace(ALL_CONCEPTS[name], token=tok)
        if name in CONCEPTS:
            CONCEPTS[name] = ALL_CONCEPTS[name]


def apply(names: Sequence[str], gray: np.ndarray) -> np.ndarray:
    """Apply the named concepts' transformations (in :data:`CONCEPTS` order)."""
    bad = [n for n in names if n not in ALL_CONCEPTS]
    if bad:
        raise ValueError(f"unknown concept(s) {bad}; available: {list(ALL_CONCEPTS)}")
    if "thin" in names and len(names) > 1:
        raise ValueError("'thin' does not combine with other concepts")
    out = np.asarray(gray, dtype=np.float32)
    for name, c in ALL_CONCEPTS.items():
        if name in names:
            out = c.transform(out)
    return out


def signatures(gray: np.ndarray) -> dict[str, np.ndarray]:
    """Every concept's signature per image: ``{name: (N,)}`` (each signature function computed once)."""
    done: dict = {}
    for c in ALL_CONCEPTS.values():
        if c.signature not in done:
            done[c.signature] = c.signature(gray)
    return {name: done[c.signature] for name, c in ALL_CONCEPTS.items()}


def concept_prompt(names: Sequence[str], digit: Union[int, str, None] = None) -> str:
    """``"a handwritten digit 3 sks zwx"``: the base caption, then the concepts' tokens (``digit=None``: none)."""
    base = "a handwritten digit" if digit is None else f"a handwritten digit {digit}"
    tokens = [c.token for n, c in ALL_CONCEPTS.items() if n in names]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"concepts {list(names)} share a token ({tokens}): a prompt could not tell them apart")
    return " ".join([base] + tokens)


@dataclass(frozen=True)
class InstanceSet:
    """What :func:`write_instance_set` wrote: two imagefolders with ``metadata.jsonl`` (``file_name``, ``text``)."""
    concept: str  # "bold", or "bold+slant" for a combination
    instance_dir: Path  # transformed held-out digits, captions "a handwritten digit 7 <token(s)>"
    class_dir: Path  # the same digits untransformed, captions "a handwritten digit 7" (prior preservation)
    instance_prompt: str  # caption without a digit, a fallback for tools that take one prompt
    class_prompt: str
    num_images: int
    caption_column: str = "text"


def heldout_digits(num_per_digit: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num_per_digit`` held-out digits of each class from ``builtin:digits``' recorded split (never seen by the
    base): ``(10 * num_per_digit, 32, 32)`` gray in [0, 1] and labels, ordered 0, 1, ..., 9, 0, 1, ...."""
    from training.eval_digits_base import load_digit_images

    from spectral_vision.assets import read_metadata

    recipe = read_metadata()["recipe"]
    images, labels = load_digit_images(recipe.get("resolution", 32))
    ho = np.asarray(recipe["split"]["heldout"])
    rng = np.random.default_rng(seed)
    per = [rng.permutation(ho[labels[ho] == d]) for d in range(10)]
    if min(len(p) for p in per) < num_per_digit:
        raise ValueError(f"num_per_digit={num_per_digit}: only {min(len(p) for p in per)} held-out digits per class")
    idx = np.stack([p[:num_per_digit] for p in per], 1).ravel()  # (num_per_digit * 10,) digit-interleaved
    return images[idx], labels[idx]


def _write_folder(folder: Path, gray: np.ndarray, captions: Sequence[str]) -> None:
    from PIL import Image

    from spectral_vision.fileio import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").unlink(missing_ok=True)  # written last: a folder without it is incomplete
    rows = []
    for i, (im, cap) in enumerate(zip(gray, captions)):
        rgb = np.repeat((im * 255).round().astype(np.uint8)[..., None], 3, axis=-1)  # (H, W, 3)
        Image.fromarray(rgb).save(folder / f"{i:04d}.png", format="PNG")
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": cap}))
    atomic_write_text(folder / "metadata.jsonl", "\n".join(rows) + "\n")


# Words a caption may carry besides the digit and the concept token (context augmentation, below): common English
# words, one BPE token each, none of them a concept token.
CONTEXT_WORDS = ("red", "small", "style", "photo", "clean", "dark", "round", "quick", "paper", "simple", "old", "sharp",
                 "big", "soft", "blue", "plain")


def with_context(captions: Sequence[str], fraction: float, seed: int = 0) -> list[str]:
    """Add one of :data:`CONTEXT_WORDS` to a ``fraction`` of ``captions`` (seeded; each chosen caption gets a random
    word at a random position after its digit, e.g. ``"a handwritten digit 7 red shill"``). The intent: teach a
    concept adapter that its token, not the caption's length or last word, carries the concept, so it still acts
    when other concepts' tokens share the prompt. Measured on the digit concepts it did not help (slant got
    weaker alone and in fusion, docs/concepts.md), so it is an ablation, off by default."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"context fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    out = []
    for cap in captions:
        words = cap.split(" ")
        if rng.random() < fraction:
            words.insert(int(rng.integers(4, len(words) + 1)), str(rng.choice(CONTEXT_WORDS)))  # after "a handwritten digit N"
        out.append(" ".join(words))
    return out


def write_instance_set(concept: Union[str, Sequence[str]], folder: Union[str, os.PathLike], num_per_digit: int = 20,
                       class_dir: Union[str, os.PathLike, None] = None, seed: int = 0,
                       context: float = 0.0) -> InstanceSet:
    """Write a concept's DreamBooth data as two ``datasets`` imagefolders with per-image captions.

    ``folder/`` gets ``0000.png ...`` (the concept's transform of ``num_per_digit`` held-out digits per class, RGB)
    and ``metadata.jsonl`` (``{"file_name": "0000.png", "text": "a handwritten digit 0 sks"}``); ``class_dir``
    (default ``folder/../<folder name>-class``) the same digits untransformed, captioned ``"a handwritten digit 0"``.
    ``concept``: a name of :data:`CONCEPTS` / :data:`EXTRA_CONCEPTS`, or a list (combined, all tokens).
    ``context``: the fraction of instance and class captions that get a context word (:func:`with_context`).
    Train with ``dreambooth_spectral.py --instance_data_dir folder --caption_column text
    --with_prior_preservation --class_data_dir <class_dir>``.
    """
    names = [concept] if isinstance(concept, str) else list(concept)
    if not names:
        raise ValueError("write_instance_set needs at least one concept")
    if any(n not in ALL_CONCEPTS for n in names):
        raise ValueError(f"unknown concept(s) {[n for n in names if n not in ALL_CONCEPTS]}; "
                         f"available: {list(ALL_CONCEPTS)}")
    names = [n for n in ALL_CONCEPTS if n in names]  # canonical order, as in the prompts
    folder = Path(folder)
    class_dir = Path(class_dir) if class_dir is not None else folder.parent / f"{folder.name}-class"
    gray, labels = heldout_digits(num_per_digit, seed)
    _write_folder(folder, apply(names, gray), with_context([concept_prompt(names, d) for d in labels], context, seed))
    _write_folder(class_dir, gray, with_context([concept_prompt([], d) for d in labels], context, seed + 1))
    return InstanceSet("+".join(names), folder, class_dir, concept_prompt(names), concept_prompt([]), len(gray))
