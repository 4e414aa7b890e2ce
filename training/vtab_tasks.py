"""The VTAB-1k task table: the one place that knows the 19 tasks, their groups, class counts and aliases.

Folder names are those of the widely used VTAB-1k release (NOAH / FacT / SSF / V-PETL Bench):
``<root>/<task>/{train800,val200,train800val200,test}.txt``. Papers average per group first and then
take the mean of the three group means; both that and the plain mean of the 19 tasks are reported.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["VTABTask", "CUSTOM", "TASKS", "GROUPS", "ALIASES", "SPLIT_SIZES", "PUBLISHED", "canonical_name", "resolve_task", "resolve_tasks"]


class VTABTask(NamedTuple):
    name: str  # folder name in the release (or the folder of a custom task)
    group: str  # "natural" | "specialized" | "structured" | "custom" (a user's own task in the same layout)
    num_classes: int

    @property
    def custom(self) -> bool:
        """A user's own task: reported apart, never averaged with (or compared to) the 19 VTAB-1k tasks."""
        return self.group == CUSTOM

CUSTOM = "custom"

_TABLE = [
    # natural
    ("cifar", "natural", 100), ("caltech101", "natural", 102), ("dtd", "natural", 47),
    ("oxford_flowers102", "natural", 102), ("oxford_iiit_pet", "natural", 37), ("svhn", "natural", 10),
    ("sun397", "natural", 397),
    # specialized
    ("patch_camelyon", "specialized", 2), ("eurosat", "specialized", 10), ("resisc45", "specialized", 45),
    ("diabetic_retinopathy", "specialized", 5),
    # structured
    ("clevr_count", "structured", 8), ("clevr_dist", "structured", 6), ("dmlab", "structured", 6),
    ("kitti", "structured", 4), ("dsprites_loc", "structured", 16), ("dsprites_ori", "structured", 16),
    ("smallnorb_azi", "structured", 18), ("smallnorb_ele", "structured", 9),
]

#: task name -> VTABTask, in the canonical 19-task column order
TASKS: dict[str, VTABTask] = {n: VTABTask(n, g, c) for n, g, c in _TABLE}
#: group name -> task names, in column order
GROUPS: dict[str, list[str]] = {g: [t.name for t in TASKS.values() if t.group == g]
                                for g in ("natural", "specialized", "structured")}
#: names used by other code bases and papers -> release folder name
ALIASES: dict[str, str] = {
    "cifar100": "cifar", "cifar_100": "cifar", "caltech": "caltech101", "flowers102": "oxford_flowers102",
    "oxford_flowers": "oxford_flowers102", "flowers": "oxford_flowers102", "oxford_pet": "oxford_iiit_pet",
    "pets": "oxford_iiit_pet", "pet": "oxford_iiit_pet", "camelyon": "patch_camelyon", "retinopathy": "diabetic_retinopathy",
    "resisc": "resisc45", "dsprites_location": "dsprites_loc", "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi", "smallnorb_elevation": "smallnorb_ele", "clevr_distance": "clevr_dist",
    "kitti_dist": "kitti",
}
#: required number of lines per split file (the test split is the task's full test set: size varies)
SPLIT_SIZES: dict[str, int] = {"train800": 800, "val200": 200, "train800val200": 1000}

#: Published VTAB-1k results (ViT-B/16 IN-21k), reference rows only: NOT measured by this project.
#: Per-task accuracies in the column order of TASKS, "average" = the paper's mean of the three group means,
#: "params_M" as printed (the papers do not all state whether the head is counted). Source: SpecLoRA paper
#: (Si et al., "Weight Spectra Induced Efficient Model Adaptation"), Table 3 "Results on VTAB-1K benchmark".
_SRC = "SpecLoRA paper (Si et al.), Table 3"
PUBLISHED: dict[str, dict] = {
    "LoRA": {"average": 74.5, "params_M": 0.29, "source": _SRC, "tasks": [
        67.1, 91.4, 69.4, 98.8, 90.4, 85.3, 54.0, 84.9, 95.3, 84.4, 73.6, 82.9, 69.2, 49.8, 78.5, 75.7, 47.1, 31.0, 44.0]},
    "NOAH": {"average": 75.5, "params_M": 0.36, "source": _SRC, "tasks": [
        69.6, 92.7, 70.2, 99.1, 90.4, 86.1, 53.7, 84.4, 95.4, 83.9, 75.8, 82.8, 68.9, 49.9, 81.7, 81.8, 48.3, 32.8, 44.2]},
    "SSF": {"average": 75.7, "params_M": 0.20, "source": _SRC, "tasks": [
        69.0, 92.6, 75.1, 99.4, 91.8, 90.2, 52.9, 87.4, 95.9, 87.4, 75.5, 75.9, 62.3, 53.3, 80.6, 77.3, 54.9, 29.5, 37.9]},
    "SpecLoRA": {"average": 76.7, "params_M": 0.30, "source": _SRC, "tasks": [
        72.5, 92.1, 71.6, 99.1, 91.0, 89.4, 55.8, 87.5, 95.4, 83.9, 74.7, 83.4, 64.5, 52.5, 81.9, 86.1, 53.4, 37.8, 44.4]},
}


def canonical_name(name: str) -> str:
    """``name`` lower-cased with ``-`` -> ``_`` and aliases resolved (may not be one of the 19)."""
    key = str(name).strip().lower().replace("-", "_")
    return ALIASES.get(key, key)


def resolve_task(name: str) -> VTABTask:
    """The task for a release folder name or an alias (case-insensitive, ``-`` = ``_``)."""
    key = canonical_name(name)
    if key not in TASKS:
        import difflib

        close = difflib.get_close_matches(key, list(TASKS) + list(ALIASES), n=3)
        raise ValueError(f"unknown VTAB task {name!r}; did you mean {close}? Tasks: {list(TASKS)}")
    return TASKS[key]


def resolve_tasks(names) -> list[VTABTask]:
    """``["all"]`` / group names (``natural``, ``specialized``, ``structured``) / task names -> tasks, no duplicates."""
    out: dict[str, VTABTask] = {}
    for n in names:
        if n == "all":
            out.update(TASKS)
        elif n in GROUPS:
            out.update({t: TASKS[t] for t in GROUPS[n]})
        else:
            t = resolve_task(n)
            out[t.name] = t
    return list(out.values())
