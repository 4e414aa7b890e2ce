"""Bands: every concept of a base model gets its own disjoint band of singular columns (the core's one place).

The rule: band ``b`` at rank ``r`` is the singular columns ``[b*r, (b+1)*r)`` of every adapted layer
(:func:`band_columns`, :meth:`spectral_vision.SpectralConfig.band_columns`); a layer with ``k`` singular values
holds ``k // r`` bands (:func:`band_count`).

A *concepts folder* (one adapter folder per concept) carries a registry ``bands.json``::

    {"version": 1,
     "concepts": {"cat": {"adapter_dir": "out/cat", "method": "spectral_r", "rank": 4, "band": 0,
                          "columns": [0, 1, 2, 3], "registered": "2025-01-01T12:00:00"}}}

Every read-modify-write happens under an advisory file lock (``bands.json.lock``, POSIX ``flock``) and the
file is replaced atomically, so several training runs can :meth:`BandRegistry.allocate` at once and each
gets a different band.

    reg = BandRegistry("concepts")
    band = reg.allocate("dog", "concepts/dog", "spectral_a", rank=4, num_bands=8)   # locked: pick + record
    reg.register("dog", "concepts/dog", "spectral_a", 4, band, columns)             # final columns (locked)

:func:`find_overlaps` checks actual adapter folders layer by layer and :meth:`OverlapReport.explain` says
which layers overlap on which columns.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from torch import nn

from .config import SpectralConfig
from .fileio import atomic_write_text

__all__ = ["BandRegistry", "BandError", "band_columns", "describe_columns", "band_count", "layer_band_count", "find_overlaps",
           "OverlapReport", "LayerOverlap", "adapter_columns", "REGISTRY_NAME"]

REGISTRY_NAME = "bands.json"
_VERSION = 1


class BandError(ValueError):
    """A band that overlaps another concept's, or none left in the concepts folder."""


def band_columns(band: int, rank: int) -> list[int]:
    """Singular indices of band ``band`` at rank ``rank``: ``[band*rank, (band+1)*rank)`` (the rule of
    :meth:`SpectralConfig.band_columns`; ``ValueError`` on a negative band or a rank < 1)."""
    return SpectralConfig(rank=rank, band=band).band_columns()


def describe_columns(band: int, rank: int) -> str:
    """``"4..7"``: the first and last singular column of band ``band`` at rank ``rank`` (for messages)."""
    cols = band_columns(band, rank)
    return f"{cols[0]}..{cols[-1]}"


def band_count(num_columns: int, rank: int) -> int:
    """How many whole bands of rank ``rank`` fit in ``num_columns`` singular columns."""
    return int(num_columns) // int(rank)


def layer_band_count(layers: Iterable[nn.Module], rank: int) -> int:
    """Bands of rank ``rank`` every one of ``layers`` holds: ``min over layers of min(out, in) // rank``
    (Linear ``(out, in)``, Conv2d ``(out, in*kh*kw)``, GPT-2 Conv1D ``(in, out)``: min of the 2-D sides)."""
    sides = [min(m.weight.shape[0], m.weight[0].numel()) for m in layers]
    if not sides:
        raise ValueError("no layers")
    return band_count(min(sides), rank)


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
    """The ``bands.json`` registry of a concepts folder (created on first :meth:`register` / :meth:`allocate`)."""

    def __init__(self, folder: Union[str, os.PathLike]):
        self.folder = Path(folder)
        self.path = self.folder / REGISTRY_NAME

    # ---- file ------------------------------------------------------------------------------------
    def _read(self) -> dict:
        if not self.path.exists():
            return {"version": _VERSION, "concepts": {}}
        try:
            data = json.loads(self.path.read_text())
            data["concepts"].items()
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path} is not a valid band registry: {e}") from None
        return data

    def _write(self, data: dict) -> None:
        atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def lock(self):
        """Context manager: the registry's exclusive lock (hold it around any read-decide-write)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return _locked(self.folder / (REGISTRY_NAME + ".lock"))

    _lock = lock  # the old private name

    # ---- queries ----------------------------------------------------------------------------------
    def concepts(self) -> dict[str, dict]:
        """``{concept: entry}`` with keys ``adapter_dir, method, rank, band, columns, registered``."""
        return self._read()["concepts"]

    def used_columns(self, exclude: Optional[str] = None) -> set[int]:
        """Union of the columns of all registered concepts (but ``exclude``)."""
        return {c for n, e in self.concepts().items() if n != exclude for c in e["columns"]}

    def next_free_band(self, rank: int, exclude: Optional[str] = None) -> int:
        """Smallest band index ``b`` whose columns ``[b*rank, (b+1)*rank)`` no registered concept (but
        ``exclude``) uses."""
        used = self.used_columns(exclude)
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
        """Record ``concept`` (replacing an entry of the same name) under the lock and return its entry.

        ``columns`` default to ``band_columns(band, rank)``. Raises :class:`BandError` if they overlap
        another registered concept's columns, unless ``allow_overlap``.
        """
        with self.lock():
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
            raise BandError(f"concept {concept!r} (columns {columns}) overlaps {desc} (registered in {self.path}). "
                            f"Use band {self.next_free_band(rank, concept)} (next free at rank {rank}) or "
                            "allow_overlap=True")
        data = self._read()
        entry = {"adapter_dir": str(adapter_dir), "method": method, "rank": int(rank),
                 "band": None if band is None else int(band), "columns": columns,
                 "registered": _dt.datetime.now().isoformat(timespec="seconds")}
        data["concepts"][concept] = entry
        self._write(data)
        return entry

    def allocate(self, concept: str, adapter_dir: Union[str, os.PathLike], method: str, rank: int,
                 band: Optional[int] = None, num_bands: Optional[int] = None) -> int:
        """Pick ``concept``'s band and record it, in one locked step; returns the band.

        ``band=None``: the concept's own registered band (same rank, still free), else the next free one;
        an explicit ``band`` must be free. ``num_bands``: bands the adapted layers hold (see
        :func:`layer_band_count`); past it raises :class:`BandError` ("all N bands of this folder are taken").
        """
        with self.lock():
            own = self.concepts().get(concept)
            if band is None:
                keep = own is not None and own.get("band") is not None and own["rank"] == rank \
                    and not self.check_overlap(int(own["band"]), rank, exclude=concept)
                band = int(own["band"]) if keep else self.next_free_band(rank, exclude=concept)
                if num_bands is not None and band >= num_bands:
                    others = sorted(n for n in self.concepts() if n != concept)
                    raise BandError(f"all {num_bands} bands of this folder ({self.folder}) are taken at rank {rank} "
                                    f"(the adapted layers hold {num_bands} bands; concepts: {others}). Use another "
                                    "concepts folder, a lower rank, or remove a concept from bands.json")
            elif num_bands is not None and band >= num_bands:
                raise BandError(f"band {band} does not exist at rank {rank}: the adapted layers hold {num_bands} "
                                f"bands (0..{num_bands - 1})")
            self._register(concept, adapter_dir, method, rank, band, None, False)
        return band

    def unregister(self, concept: str) -> None:
        with self.lock():
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
    from .io import read_adapter

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
