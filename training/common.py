"""Shared helpers for the training scripts (DreamBooth, VTAB, LLM): atomic checkpoints, resume, param groups.

Small on purpose. Scripts, benchmarks and tests import it from the ``training`` package (installed with the
project, see ``training/__init__.py``)::

    from training.common import save_checkpoint, resolve_resume, param_groups, cast_frozen_, step_seed

Checkpoints are folders ``<output_dir>/checkpoint-<step>`` made **atomically**: the state is written to
``checkpoint-<step>.tmp``, a marker file (:data:`COMPLETE_MARKER`, JSON with the step and any ``info``) is
added last, then the folder is renamed. A run killed at any moment leaves either a complete checkpoint
or a ``*.tmp`` folder that :func:`list_checkpoints` / ``"latest"`` ignore (and the next save deletes).

=====================================  ===============================================================
``save_checkpoint(out, step, save_fn)``  write one checkpoint; ``save_fn(tmp_dir)`` writes the state
                                         (every process calls it, e.g. ``accelerator.save_state``);
                                         rotates to ``total_limit`` first
``save_accelerate_checkpoint(acc, ...)`` the same with an ``accelerate.Accelerator``
``list_checkpoints(out)``                ``[(step, path)]`` of complete checkpoints, ascending
``resolve_resume(out, "latest"|PATH)``   the checkpoint to resume from, or ``None`` (fresh start)
``checkpoint_info(path)``                the marker's JSON (``{"step": ..., "info": {...}}``)
``param_groups([(module, lr), ...])``    optimizer groups of the trainable parameters (fp32 checked)
``cast_frozen_(model, dtype)``           cast frozen weights for mixed precision; adapters stay fp32
``step_seed(seed, *keys)``               a 63-bit seed from ``(seed, epoch, step, rank, ...)``
``atomic_write_json(path, obj)``         :func:`spectral_vision.fileio.atomic_write_json` (re-exported)
=====================================  ===============================================================
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from spectral_vision.fileio import atomic_write_json

__all__ = ["CHECKPOINT_PREFIX", "COMPLETE_MARKER", "list_checkpoints", "checkpoint_info", "resolve_resume",
           "rotate_checkpoints", "save_checkpoint", "save_accelerate_checkpoint", "param_groups", "cast_frozen_",
           "step_seed", "atomic_write_json"]

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "checkpoint_complete.json"
_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")

PathLike = Union[str, os.PathLike]


# ---- finding checkpoints --------------------------------------------------------------------------------
def _is_complete(path: Path) -> bool:
    return path.is_dir() and _NAME.fullmatch(path.name) is not None and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``[(step, path)]`` sorted by step (``*.tmp`` and folders
    without the completion marker are ignored)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(_NAME.fullmatch(p.name).group(1)), p) for p in out.iterdir() if _is_complete(p)]
    return sorted(found)


def checkpoint_info(path: PathLike) -> dict:
    """The completion marker of checkpoint ``path``: ``{"step": int, "time": float, "info": dict}``."""
    return json.loads((Path(path) / COMPLETE_MARKER).read_text())


def resolve_resume(output_dir: PathLike, resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    """The checkpoint folder to resume from.

    ``None`` -> ``None``; ``"latest"`` -> the newest complete checkpoint of ``output_dir`` or ``None`` when
    there is none (a fresh start, as in diffusers' scripts). Anything else is a folder path or a name inside
    ``output_dir``; it must be a complete checkpoint, else ``FileNotFoundError`` / ``ValueError`` explains.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.exists() and (Path(output_dir) / path).exists():
        path = Path(output_dir) / path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such checkpoint folder "
                                f"(looked at {path} and in {output_dir})")
    if not _is_complete(path):
        raise ValueError(f"--resume_from_checkpoint {path}: not a complete checkpoint (the name must be "
                         f"{CHECKPOINT_PREFIX}<step> and it must contain {COMPLETE_MARKER}; an interrupted save "
                         f"leaves an incomplete folder)")
    return path


# ---- writing checkpoints --------------------------------------------------------------------------------
def rotate_checkpoints(output_dir: PathLike, total_limit: Optional[int], incoming: int = 1) -> list[Path]:
    """Delete the oldest complete checkpoints so that ``incoming`` new ones fit within ``total_limit``.

    Also deletes stale ``checkpoint-*.tmp`` folders of interrupted saves. Returns the deleted paths.
    """
    out = Path(output_dir)
    removed = [p for p in out.glob(f"{CHECKPOINT_PREFIX}*.tmp") if p.is_dir()]
    found = list_checkpoints(out)
    if total_limit is not None and len(found) + incoming > total_limit:
        removed += [p for _, p in found[: len(found) + incoming - total_limit]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def save_checkpoint(output_dir: PathLike, step: int, save_fn: Callable[[str], object], *,
                    total_limit: Optional[int] = None, info: Optional[dict] = None, is_main_process: bool = True,
                    barrier: Callable[[], object] = lambda: None) -> Path:
    """Write ``<output_dir>/checkpoint-<step>`` atomically and return its path.

    Args:
        save_fn: ``save_fn(tmp_dir: str)`` writes the training state; called on every process (with
            ``accelerate``, each rank writes its own RNG state).
        total_limit: keep at most this many checkpoints (oldest deleted first, before writing).
        info: JSON-serialisable data stored in the completion marker (read back by :func:`checkpoint_info`).
        is_main_process / barrier: for multi-process runs; only the main process rotates and renames.
    """
    out = Path(output_dir)
    final, tmp = out / f"{CHECKPOINT_PREFIX}{step}", out / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        rotate_checkpoints(out, total_limit, incoming=0 if _is_complete(final) else 1)
    barrier()
    save_fn(str(tmp))
    barrier()
    if is_main_process:
        atomic_write_json(tmp / COMPLETE_MARKER, {"step": int(step), "time": time.time(), "info": info or {}})
        if final.exists():  # re-saving a step (resumed from an older checkpoint): replace it
            old = out / f"{CHECKPOINT_PREFIX}{step}.old.tmp"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)  # atomic: the checkpoint appears complete or not at all
    barrier()
    return final


def save_accelerate_checkpoint(accelerator, output_dir: PathLike, step: int, total_limit: Optional[int] = None,
                               info: Optional[dict] = None) -> Path:
    """:func:`save_checkpoint` with ``accelerator.save_state`` (models, optimizers, schedulers, RNG states;
    register ``accelerator.register_save_state_pre_hook`` to store adapter tensors only)."""
    return save_checkpoint(output_dir, step, accelerator.save_state, total_limit=total_limit, info=info,
                           is_main_process=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)


# ---- parameters ---------------------------------------------------------------------------------------------
def param_groups(specs: Sequence[tuple[nn.Module, float]], weight_decay: Optional[float] = None) -> list[dict]:
    """Optimizer groups ``[{"params": [...], "lr": lr}, ...]``, one per ``(module, lr)`` with trainable
    parameters. Raises ``ValueError`` if none is trainable or a trainable parameter is not fp32 (mixed
    precision keeps trainable weights in fp32; cast them with ``.float()`` after :func:`cast_frozen_`)."""
    groups = []
    for module, lr in specs:
        params = [p for p in module.parameters() if p.requires_grad]
        bad = [p.dtype for p in params if p.dtype != torch.float32]
        if bad:
            raise ValueError(f"{type(module).__name__}: trainable parameters must be float32, found {set(bad)}")
        if params:
            group = {"params": params, "lr": lr}
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
            groups.append(group)
    if not groups:
        raise ValueError("no trainable parameters: attach an adapter first")
    return groups


@torch.no_grad()
def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to ``dtype`` in place, except in modules that own a trainable
    parameter (adapters: their weights and basis buffers stay fp32). Returns ``model``."""
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                setattr(module, name, b.to(dtype))
    return model


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that is a pure function of ``(seed, *keys)`` (e.g. epoch, step, rank): randomness drawn
    from ``torch.Generator().manual_seed(step_seed(...))`` replays exactly after a resume."""
    h = hashlib.blake2b(repr((int(seed),) + tuple(int(k) for k in keys)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1

