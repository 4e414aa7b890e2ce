"""File helpers shared by the library, the scripts, the demo and the benchmarks (the one place for each).

``atomic_write(path, write)``   write through a temp file in the same folder + ``os.replace``: a reader
                                (or a crash) sees the old file or the new one, never half of one
``atomic_write_text``/``_json`` the same for text / JSON
``file_sha256(path)``           hex sha256 of a file's bytes, read in 1 MiB chunks
``cache_root(*parts)``          ``$SPECTRAL_VISION_CACHE`` (default ``~/.cache/spectral_vision``) joined with ``parts``
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "file_sha256", "cache_root", "FILE_MODE"]

PathLike = Union[str, os.PathLike]
#: mode of files we write (mkstemp creates 0600; users share output folders, so use the usual 0644)
FILE_MODE = 0o644


def atomic_write(path: PathLike, write: Callable[[str], Any], mode: int = FILE_MODE) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    The parent folder is created. On any error (or a kill) the temp file is removed and ``path`` keeps
    its previous content. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding=encoding))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (non-JSON values are written with ``str``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def file_sha256(path: PathLike) -> str:
    """Hex sha256 digest (64 chars) of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root(*parts: str) -> Path:
    """``$SPECTRAL_VISION_CACHE`` (default ``~/.cache/spectral_vision``) joined with ``parts`` (not created)."""
    root = os.environ.get("SPECTRAL_VISION_CACHE") or os.path.join(Path.home(), ".cache", "spectral_vision")
    return Path(root).joinpath(*parts)
