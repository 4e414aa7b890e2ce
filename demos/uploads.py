"""Demo input checks: allowed paths, bases, seeds, and staging of uploaded concepts (zip or adapter files).

Every user mistake raises ``ValueError`` with a message meant for the UI. Uploads are bounded before
anything is extracted (file size, zip entry count, uncompressed size, paths escaping the folder), and
the temporary files Gradio hands over are deleted once staged (``consume=True``).
"""
from __future__ import annotations

import re
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

__all__ = ["check_allowed", "check_base", "parse_seeds", "stage_upload", "MAX_ZIP_ENTRIES"]

#: a concept folder holds a handful of files (unet/ + text_encoder/: config, tensors, card); this is generous
MAX_ZIP_ENTRIES = 64
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_allowed(path: Union[str, Path], roots: Sequence[Path]) -> Path:
    """``path`` resolved (symlinks and ``..`` followed) if it lies inside one of ``roots``, else ``ValueError``."""
    p = Path(path).expanduser().resolve()
    if not any(p.is_relative_to(r) for r in roots):
        raise ValueError(f"{path} is outside the allowed adapter folders (--concepts_dir and this session's uploads)")
    return p


def check_base(name: str, model: str, model_dirs: Sequence[Path]) -> str:
    """A base the app may load: built-ins, ``model`` (the app's ``--model``), hub ids, or local folders inside
    ``model_dirs``."""
    name = name.strip()
    if name.startswith("builtin:"):
        from spectral_vision.integrations.diffusers import BUILTIN_PIPELINES

        if name not in BUILTIN_PIPELINES:
            raise ValueError(f"unknown built-in {name!r}; available: {sorted(BUILTIN_PIPELINES)}")
        return name
    if name == model:
        return name
    if Path(name).expanduser().exists() or not _HUB_ID.match(name):
        if not model_dirs:
            raise ValueError(f"{name!r}: local base folders are not allowed here (start the app with --model "
                             "PATH or --model_dirs)")
        return str(check_allowed(name, model_dirs))
    return name


def parse_seeds(text: str, max_seeds: int) -> list[int]:
    """``"0, 1 5"`` -> ``[0, 1, 5]`` (distinct non-negative ints, at most ``max_seeds``)."""
    try:
        seeds = [int(s) for s in re.split(r"[,\s]+", str(text).strip()) if s]
    except ValueError:
        raise ValueError(f"seeds must be integers separated by commas, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"give 1 to {max_seeds} distinct non-negative seeds, got {text!r}")
    if len(seeds) > max_seeds:
        raise ValueError(f"at most {max_seeds} seeds per run, got {len(seeds)}")
    return seeds


def _extract_zip(path: Path, dest: Path, max_bytes: int, max_entries: int) -> None:
    """Extract ``path`` into ``dest`` after checking entry count, uncompressed size and member paths."""
    dest = dest.resolve()
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            if len(members) > max_entries:
                raise ValueError(f"{path.name}: {len(members)} entries (a concept folder has a few; at most "
                                 f"{max_entries})")
            if sum(m.file_size for m in members) > max_bytes:
                raise ValueError(f"{path.name}: uncompressed content larger than {max_bytes / 2**20:.0f} MB")
            for m in members:
                target = (dest / m.filename).resolve()
                if target != dest and not target.is_relative_to(dest):
                    raise ValueError(f"{path.name}: member {m.filename!r} points outside the folder")
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path.name} is not a valid zip file: {e}") from None


def stage_upload(files: Sequence[Union[str, Path]], root: Path, max_bytes: int, name: Optional[str] = None,
                 consume: bool = False, max_entries: int = MAX_ZIP_ENTRIES) -> Path:
    """Copy uploaded files into a fresh folder under ``root``; returns the concept folder.

    Accepted: a ``.zip`` of a concept folder (extracted; see the checks above), or an adapter's
    ``adapter_config.json`` + ``adapter_model.safetensors``. Nothing is validated here beyond the
    layout; loading does the rest. ``consume``: delete ``files`` afterwards, staged or refused (Gradio's
    temporary copies). A refused upload leaves nothing under ``root``.
    """
    files = [Path(f) for f in files or []]
    try:
        if not files:
            raise ValueError("no file uploaded")
        total = sum(f.stat().st_size for f in files)
        if total > max_bytes:
            raise ValueError(f"upload too large ({total / 2**20:.1f} MB > {max_bytes / 2**20:.0f} MB)")
        stem = re.sub(r"[^\w.-]", "_", name or (files[0].stem if files[0].suffix == ".zip" else "uploaded"))[:40]
        dest = Path(root) / f"{stem}-{uuid.uuid4().hex[:8]}"  # a fresh name: never overwrites
        Path(root).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
        try:
            if len(files) == 1 and files[0].suffix == ".zip":
                _extract_zip(files[0], tmp, max_bytes, max_entries)
                entries = list(tmp.iterdir())
                # a zip of the folder itself (cat/unet/...): its single top folder is the concept
                (entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp).rename(dest)
                return dest
            wanted = {"adapter_config.json", "adapter_model.safetensors"}
            got = {f.name: f for f in files}
            if set(got) != wanted:
                raise ValueError(f"upload a .zip of a concept folder, or exactly {sorted(wanted)} "
                                 f"(got {[f.name for f in files]})")
            for n, f in got.items():
                shutil.copyfile(f, tmp / n)
            tmp.rename(dest)
            return dest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if consume:
            for f in files:
                f.unlink(missing_ok=True)
