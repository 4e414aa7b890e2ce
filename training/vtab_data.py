"""VTAB-1k data in the layout of the widely used release, validated on load.

Layout: ``<root>/<task>/{train800,val200,train800val200,test}.txt``; each line is
``images/train800/000000.jpg 307``: an image path relative to the task folder, a space, a 0-based label.

Input pipeline (VTAB-1k protocol): direct bicubic resize to ``image_size`` x ``image_size`` (224),
no augmentation, then one of three recorded normalisations:

=========  =======================================================================
none       pixels in [0, 1] (original VTAB)
imagenet   (x - IMAGENET_MEAN) / IMAGENET_STD (the NOAH / FacT / SSF scripts)
half       (x - 0.5) / 0.5, i.e. [-1, 1] (what the original ViT weights were trained with)
=========  =======================================================================

A fixture made by ``make_vtab_fixture.py --small`` has smaller splits and a ``vtab_fixture.json``
marker at its root; reduced split sizes are accepted only with that marker or ``allow_small_splits``.

Custom tasks: any other folder ``<root>/<name>`` in the same layout is a user's own task
(:func:`resolve_data_task`): its class count is read from the labels (or given), its split sizes are free,
and it is reported as ``custom``, apart from the 19 VTAB-1k tasks and the published numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from training.vtab_tasks import CUSTOM, SPLIT_SIZES, TASKS, VTABTask, canonical_name, resolve_task

__all__ = ["NORMALIZATIONS", "FIXTURE_MARKER", "VTABDataError", "read_split", "validate_task", "fixture_info",
           "resolve_data_task", "check_data_root", "data_fingerprint", "VTABDataset"]

NORMALIZATIONS = {
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
SPLITS = ("train800", "val200", "train800val200", "test")
FIXTURE_MARKER = "vtab_fixture.json"


class VTABDataError(ValueError):
    """A VTAB task folder that does not follow the release layout (the message names the task)."""


def fixture_info(root: str) -> Optional[dict]:
    """The fixture marker at ``root`` (written by make_vtab_fixture.py), or ``None`` for real data."""
    path = os.path.join(root, FIXTURE_MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_split(root: str, task: VTABTask, split: str) -> list[tuple[str, int]]:
    """``[(relative image path, label)]`` of ``<root>/<task>/<split>.txt`` (format checked, not the files)."""
    path = os.path.join(root, task.name, f"{split}.txt")
    if not os.path.isfile(path):
        raise VTABDataError(f"task {task.name!r}: split file {path} is missing (expected the VTAB-1k release "
                            f"layout <root>/{task.name}/{{{','.join(SPLITS)}}}.txt)")
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(" ", 1)
            try:
                items.append((parts[0], int(parts[1])))
            except (IndexError, ValueError):
                raise VTABDataError(f"task {task.name!r}: {path}:{lineno}: expected '<image path> <label>', "
                                    f"got {line.strip()!r}") from None
    return items


def check_data_root(root: str) -> None:
    """Raise :class:`VTABDataError` (one line) unless ``root`` is an existing folder."""
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise VTABDataError(f"data root {root} {what}; expected one sub-folder per task "
                            f"(<root>/<task>/{{{','.join(SPLITS)}}}.txt), e.g. from make_vtab_fixture.py --out {root}")


def resolve_data_task(root: str, name: str, num_classes: Optional[int] = None, custom: bool = False) -> VTABTask:
    """The task trained from ``<root>/<name>``: one of the 19 VTAB-1k tasks, or a custom task.

    A name (or alias) of the 19 is that task unless ``custom``; any other name is a custom task whose
    folder must exist, with ``num_classes`` = 1 + the largest label of its splits unless given.
    """
    key = canonical_name(name)
    if key in TASKS and not custom:
        task = TASKS[key]
        if num_classes is not None and num_classes != task.num_classes:
            raise VTABDataError(f"task {task.name!r} is VTAB-1k's {task.name} ({task.num_classes} classes), not "
                                f"{num_classes}; for your own data in a folder of that name add --custom "
                                f"(reported as a custom task)")
        return task
    folder = os.path.join(root, str(name))
    if not os.path.isdir(folder):
        import difflib

        close = difflib.get_close_matches(key, list(TASKS), n=3)
        raise VTABDataError(f"task {name!r}: no folder {folder} (not one of the 19 VTAB-1k tasks either"
                            + (f"; did you mean {close}?)" if close else ")"))
    probe = VTABTask(str(name), CUSTOM, 0)
    labels = [y for split in SPLITS for _, y in read_split(root, probe, split)]
    found = max(labels) + 1 if labels else 0
    if min(labels, default=0) < 0:
        raise VTABDataError(f"task {name!r}: negative labels in its split files (labels are 0-based)")
    if num_classes is not None and num_classes < found:
        raise VTABDataError(f"task {name!r}: --num_classes {num_classes} but its splits use labels up to {found - 1}")
    return VTABTask(str(name), CUSTOM, num_classes or found)


def validate_task(root: str, task, splits=SPLITS, allow_small_splits: bool = False) -> dict[str, list]:
    """Check split sizes (800/200/1000), label range and image files; returns ``{split: items}``.

    Custom tasks (``task.group == "custom"``) may have any split sizes. A VTAB-1k task's full-size test split
    must use every class (the release's do): a folder of other data under a VTAB name is refused.
    Raises :class:`VTABDataError` naming the task and the first problems found.
    """
    task = resolve_task(task) if isinstance(task, str) else task
    if not os.path.isdir(os.path.join(root, task.name)):
        raise VTABDataError(f"task {task.name!r}: folder {os.path.join(root, task.name)} does not exist")
    small = allow_small_splits or bool((fixture_info(root) or {}).get("small", False))
    out = {}
    for split in splits:
        items = read_split(root, task, split)
        want = None if task.custom else SPLIT_SIZES.get(split)
        if not items:
            raise VTABDataError(f"task {task.name!r}: split {split!r} is empty")
        if want is not None and len(items) != want and not (small and len(items) < want):
            raise VTABDataError(f"task {task.name!r}: split {split!r} has {len(items)} images, VTAB-1k requires "
                                f"{want} (reduced splits only for fixtures: --allow_small_splits)")
        bad = [(p, y) for p, y in items if not 0 <= y < task.num_classes]
        if bad:
            raise VTABDataError(f"task {task.name!r}: split {split!r} has {len(bad)} labels outside "
                                f"[0, {task.num_classes - 1}] ({task.num_classes} classes), e.g. {bad[:3]}")
        missing = [p for p, _ in items if not os.path.isfile(os.path.join(root, task.name, p))]
        if missing:
            raise VTABDataError(f"task {task.name!r}: split {split!r} lists {len(missing)} missing image files, "
                                f"e.g. {missing[:3]} (relative to {os.path.join(root, task.name)})")
        used = len({y for _, y in items})
        if split == "test" and not task.custom and fixture_info(root) is None and used < task.num_classes:
            raise VTABDataError(f"task {task.name!r}: the test split uses {used} of the {task.num_classes} classes "
                                f"of VTAB-1k's {task.name}; if this is your own data, name its folder otherwise or "
                                f"pass --custom (reported as a custom task, never mixed with VTAB-1k numbers)")
        out[split] = items
    return out


def data_fingerprint(root: str, task) -> str:
    """sha256 (16 hex) of the task's split files: identifies the data independently of where it lives."""
    task = resolve_task(task) if isinstance(task, str) else task
    h = hashlib.sha256()
    for split in SPLITS:
        path = os.path.join(root, task.name, f"{split}.txt")
        h.update(split.encode())
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


class VTABDataset(Dataset):
    """One split of one task: ``(image (3, S, S) float32, label)`` pairs, validated on construction.

    Args:
        root: folder holding one sub-folder per task.
        task: release folder name or alias.
        split: ``train800`` | ``val200`` | ``train800val200`` | ``test``.
        image_size: ``S``; images are resized directly (bicubic) to ``S x S``, no crop, no augmentation.
        normalization: ``none`` | ``imagenet`` | ``half`` (see module docstring).
        preload: decode all images once into a ``(N, 3, S, S)`` uint8 tensor (default: train/val splits).
    """

    def __init__(self, root: str, task, split: str, image_size: int = 224, normalization: str = "imagenet",
                 allow_small_splits: bool = False, preload: Optional[bool] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
        self.task = resolve_task(task) if isinstance(task, str) else task
        self.root, self.split, self.image_size, self.normalization = root, split, int(image_size), normalization
        self.items = validate_task(root, self.task, [split], allow_small_splits)[split]
        mean, std = NORMALIZATIONS[normalization]
        self.mean = torch.tensor(mean).view(3, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)  # (3, 1, 1)
        self.images = None
        if preload if preload is not None else split != "test":
            self.images = torch.stack([self._decode(i) for i in range(len(self.items))])  # (N, 3, S, S) uint8

    def _decode(self, i: int) -> torch.Tensor:
        path = os.path.join(self.root, self.task.name, self.items[i][0])
        with Image.open(path) as im:
            im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S) uint8

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img = self.images[i] if self.images is not None else self._decode(i)
        x = img.float().div_(255.0)  # (3, S, S) in [0, 1]
        return (x - self.mean) / self.std, self.items[i][1]
