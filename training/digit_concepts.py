"""Digit concepts with measurable signatures: real image transformations of held-out digits.

Each concept is a transformation of a ``(N, H, W)`` gray image in [0, 1] (ink = 1 on a dark
background) and a *signature*: a per-image number that the transformation moves and the others
(nearly) do not. Signatures are polarity-aware (measured on the ink, whatever the background).

==========  =====================================  ===================================================
concept     transformation                         signature
==========  =====================================  ===================================================
``bold``    grey dilation with a disk (radius 2)   stroke width in px: ink area / skeleton length
``slant``   horizontal shear ``x += k (cy - y)``   slant in degrees: ``atan(-cov(x, y) / var(y))`` of the
            (top leans right, ``k = 0.45``)        ink distribution (a shear by k adds exactly k)
``invert``  ``1 - x`` (dark ink on a light page)   background level: mean of the 3-px border ring
==========  =====================================  ===================================================

    write_instance_set("bold", gray_images, "concepts/data/bold")   # PNGs for dreambooth_spectral.py
    signatures(gray_images)                                         # {"bold": (N,), "slant": (N,), ...}
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

__all__ = ["Concept", "CONCEPTS", "bold", "slant", "invert", "ink", "stroke_width", "slant_degrees", "background",
           "apply", "signatures", "write_instance_set", "concept_prompt"]


# ---- transformations: (N, H, W) in [0, 1] -> (N, H, W) in [0, 1] ----------------------------------------------
def bold(gray: np.ndarray, radius: int = 2) -> np.ndarray:
    """Morphological (grey) dilation of the ink with a disk of ``radius`` px: thicker strokes."""
    from scipy.ndimage import grey_dilation
    from skimage.morphology import disk

    fp = disk(radius).astype(bool)
    thick = np.stack([grey_dilation(im, footprint=fp) for im in ink(gray)])  # (N, H, W), ink up
    return np.where(_inverted(gray)[:, None, None], 1 - thick, thick).clip(0, 1).astype(np.float32)


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


def stroke_width(gray: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Mean stroke width in px: area of the ink mask / length of its skeleton."""
    from skimage.morphology import skeletonize

    masks = ink(gray) > threshold
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


@dataclass(frozen=True)
class Concept:
    name: str
    token: str  # rare word the concept is bound to in prompts
    transform: Callable[[np.ndarray], np.ndarray]
    signature: Callable[[np.ndarray], np.ndarray]
    unit: str


# order of application when several are combined (invert last, so bold/slant act on the ink)
CONCEPTS = {
    "bold": Concept("bold", "sks", bold, stroke_width, "px stroke width"),
    "slant": Concept("slant", "zwx", slant, slant_degrees, "degrees slant"),
    "invert": Concept("invert", "vvn", invert, background, "background level"),
}


def apply(names: Sequence[str], gray: np.ndarray) -> np.ndarray:
    """Apply the named concepts' transformations (in :data:`CONCEPTS` order)."""
    bad = [n for n in names if n not in CONCEPTS]
    if bad:
        raise ValueError(f"unknown concept(s) {bad}; available: {list(CONCEPTS)}")
    out = np.asarray(gray, dtype=np.float32)
    for name, c in CONCEPTS.items():
        if name in names:
            out = c.transform(out)
    return out


def signatures(gray: np.ndarray) -> dict[str, np.ndarray]:
    """Every concept's signature per image: ``{name: (N,)}``."""
    return {name: c.signature(gray) for name, c in CONCEPTS.items()}


def concept_prompt(names: Sequence[str], digit: Union[int, str, None] = None) -> str:
    """``"a handwritten digit 3 sks zwx"``: the base caption, then the concepts' tokens (``digit=None``: none)."""
    base = "a handwritten digit" if digit is None else f"a handwritten digit {digit}"
    return " ".join([base] + [CONCEPTS[n].token for n in CONCEPTS if n in names])


def write_instance_set(names: Union[str, Sequence[str]], gray: np.ndarray, folder: Union[str, os.PathLike]) -> Path:
    """Transform ``gray`` with the concept(s) and write RGB PNGs ``000.png ...`` to ``folder`` (atomic per file)."""
    from PIL import Image

    names = [names] if isinstance(names, str) else list(names)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(apply(names, gray)):
        tmp, final = folder / f".{i:03d}.png.tmp", folder / f"{i:03d}.png"
        rgb = np.repeat((im * 255).round().astype(np.uint8)[..., None], 3, axis=-1)  # (H, W, 3)
        Image.fromarray(rgb).save(tmp, format="PNG")
        os.replace(tmp, final)
    return folder
