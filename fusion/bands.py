"""Band allocation: give every concept of a base model its own disjoint band of singular columns.

A *concepts folder* (e.g. ``out/``, holding one adapter folder per concept) carries a registry file
``bands.json``::

    {"version": 1,
     "concepts": {"cat": {"adapter_dir": "out/cat", "method": "spectral_r", "rank": 4, "band": 0,
                          "columns": [0, 1, 2, 3], "registered": "2025-01-01T12:00:00"}}}

``columns`` are the singular indices (of every adapted layer) the concept's adapter uses; for a band
``b`` of rank ``r`` they are ``range(b*r, (b+1)*r)``. Writes are atomic (temp file + ``os.replace``)
and serialised with an advisory file lock, so several training runs can allocate bands at once.

:func:`find_overlaps` checks actual adapter folders layer by layer (adapters may store per-layer
columns) and :meth:`OverlapReport.explain` says which layers overlap on which columns.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import spectral_vision as sv

__all__ = ["BandRegistry", "band_columns", "find_overlaps", "OverlapReport", "LayerOverlap", "REGISTRY_NAME"]

REGISTRY_NAME = "bands.json"
_VERSION = 1


def band_columns(band: int, rank: int) -> list[int]:
    """Singular indices of band ``band`` at rank ``rank``: ``[band*rank, (band+1)*rank)`` (the core's rule,
    :meth:`spectral_vision.SpectralConfig.band_columns`; it raises ``ValueError`` on a bad band or rank)."""
    return sv.SpectralConfig(rank=rank, band=band).band_columns()


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive advisory lock on ``path`` (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class BandRegistry:
    """The ``bands.json`` registry of a concepts folder (created on first :meth:`register`)."""

    def __init__(self, folder: Union[str, os.PathLike]):
        self.folder = Path(folder)
        self.path = self.folder / REGISTRY_NAME

    # ---- file ------------------------------------------------------------------------------------
    def _read(self) -> dict:
        if not self.path.exists():
            return {"version": _VERSION, "concepts": {}}
        try:
            data = json.loads(self.path.read_text())
            data["concepts"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path} is not a valid band registry: {e}") from None
        return data

    def _write(self, data: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=REGISTRY_NAME, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _lock(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        return _locked(self.folder / (REGISTRY_NAME + ".lock"))

    # ---- queries ----------------------------------------------------------------------------------
    def concepts(self) -> dict[str, dict]:
        """``{concept: entry}`` with keys ``adapter_dir, method, rank, band, columns, registered``."""
        return self._read()["concepts"]

    def used_columns(self) -> set[int]:
        """Union of the columns of all registered concepts."""
        return {c for e in self.concepts().values() for c in e["columns"]}

    def next_free_band(self, rank: int) -> int:
        """Smallest band index ``b`` whose columns ``[b*rank, (b+1)*rank)`` no registered concept uses."""
        used = self.used_columns()
        b = 0
        while used.intersection(band_columns(b, rank)):
            b += 1
        return b

    def check_overlap(self, columns: Union[int, Iterable[int]], rank: Optional[int] = None,
                      exclude: Optional[str] = None) -> list[tuple[str, list[int]]]:
        """Registered concepts whose columns intersect ``columns``: ``[(concept, sorted overlap)]``.

        ``columns`` is a list of singular indices, or a band index when ``rank`` is given (then the
        columns are ``band_columns(columns, rank)``). ``exclude`` skips one concept (re-registering).
        """
        cols = set(band_columns(int(columns), rank) if rank is not None and isinstance(columns, int)
                   else (int(c) for c in columns))
        out = []
        for name, e in self.concepts().items():
            if name == exclude:
                continue
            common = sorted(cols.intersection(e["columns"]))
            if common:
                out.append((name, common))
        return out

    # ---- updates ----------------------------------------------------------------------------------
    def register(self, concept: str, adapter_dir: Union[str, os.PathLike], method: str, rank: int,
                 band: Optional[int] = None, columns: Optional[Sequence[int]] = None,
                 allow_overlap: bool = False) -> dict:
        """Record ``concept`` (replacing an entry of the same name) and return its entry.

        ``columns`` default to ``band_columns(band, rank)``. Raises ``ValueError`` if they overlap
        another registered concept's columns, unless ``allow_overlap``.
        """
        with self._lock():
            return self._register(concept, adapter_dir, method, rank, band, columns, allow_overlap)

    def _register(self, concept, adapter_dir, method, rank, band, columns, allow_overlap) -> dict:
        if columns is None:
            if band is None:
                raise ValueError("register() needs band or columns")
            columns = band_columns(band, rank)
        columns = sorted(int(c) for c in columns)
        clash = self.check_overlap(columns, exclude=concept)
        if clash and not allow_overlap:
            desc = "; ".join(f"{n!r} on columns {c}" for n, c in clash)
            raise ValueError(f"concept {concept!r} (columns {columns}) overlaps {desc}. Use band "
                             f"{self.next_free_band(rank)} (next free at rank {rank}) or allow_overlap=True")
        data = self._read()
        entry = {"adapter_dir": str(adapter_dir), "method": method, "rank": int(rank),
                 "band": None if band is None else int(band), "columns": columns,
                 "registered": _dt.datetime.now().isoformat(timespec="seconds")}
        data["concepts"][concept] = entry
        self._write(data)
        return entry

    def allocate(self, concept: str, adapter_dir: Union[str, os.PathLike], method: str, rank: int) -> int:
        """Take the next free band for ``concept`` and register it, atomically; returns the band."""
        with self._lock():
            band = self.next_free_band(rank)
            self._register(concept, adapter_dir, method, rank, band, None, False)
        return band

    def unregister(self, concept: str) -> None:
        with self._lock():
            data = self._read()
            if data["concepts"].pop(concept, None) is not None:
                self._write(data)

    def __repr__(self) -> str:
        return f"BandRegistry({str(self.folder)!r}, concepts={list(self.concepts())})"


# ---- checking adapter folders -----------------------------------------------------------------------
@dataclass
class LayerOverlap:
    layer: str
    a: str  # concept names
    b: str
    columns: list[int]  # shared singular indices on this layer


@dataclass
class OverlapReport:
    """Per-layer column overlaps between adapters; ``ok`` when there are none."""

    concepts: list[str]
    overlaps: list[LayerOverlap] = field(default_factory=list)
    layers_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.overlaps

    def explain(self, max_layers: int = 8) -> str:
        """Readable summary: which concept pairs overlap, on how many / which layers and columns."""
        if self.ok:
            return f"no overlap: {len(self.concepts)} concepts on disjoint columns in all {self.layers_checked} layers"
        pairs: dict[tuple[str, str], list[LayerOverlap]] = {}
        for o in self.overlaps:
            pairs.setdefault((o.a, o.b), []).append(o)
        lines = [f"overlapping bands in {len({o.layer for o in self.overlaps})} of {self.layers_checked} layers:"]
        for (a, b), lst in pairs.items():
            lines.append(f"  {a!r} and {b!r} share columns in {len(lst)} layer(s):")
            for o in lst[:max_layers]:
                lines.append(f"    {o.layer}: columns {o.columns}")
            if len(lst) > max_layers:
                lines.append(f"    ... and {len(lst) - max_layers} more layers")
        lines.append("Retrain one concept on a free band (BandRegistry.next_free_band / --band auto) "
                     "or pass allow_overlap=True (--allow-overlap) to fuse anyway (the deltas then interfere).")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def adapter_columns(path: Union[str, os.PathLike]) -> dict[str, list[int]]:
    """``{layer: singular columns}`` stored in adapter folder ``path`` (read via ``sv.read_adapter``)."""
    from spectral_vision import read_adapter

    _, tensors = read_adapter(path)
    return {k[: -len(".columns")]: v.tolist() for k, v in tensors.items() if k.endswith(".columns")}


def find_overlaps(adapters: Union[Sequence[Union[str, os.PathLike]], dict[str, dict[str, list[int]]]],
                  names: Optional[Sequence[str]] = None) -> OverlapReport:
    """Check adapters for shared singular columns, layer by layer.

    ``adapters``: adapter folders, or already-read ``{concept: {layer: columns}}``. ``names``
    default to the folder names.
    """
    if isinstance(adapters, dict):
        cols = dict(adapters)
    else:
        paths = [Path(p) for p in adapters]
        names = list(names) if names is not None else [p.name for p in paths]
        if len(names) != len(paths):
            raise ValueError(f"{len(names)} names for {len(paths)} adapters")
        cols = {n: adapter_columns(p) for n, p in zip(names, paths)}
    concepts = list(cols)
    layers = sorted({layer for c in cols.values() for layer in c})
    report = OverlapReport(concepts, layers_checked=len(layers))
    for layer in layers:
        for i, a in enumerate(concepts):
            for b in concepts[i + 1:]:
                if layer in cols[a] and layer in cols[b]:
                    common = sorted(set(cols[a][layer]).intersection(cols[b][layer]))
                    if common:
                        report.overlaps.append(LayerOverlap(layer, a, b, common))
    return report
