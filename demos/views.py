"""What the demo shows: defaults (base, built-in concepts, prompt), tables, images and the spectrum figure.

Plain functions and records, testable without a browser; the Gradio wiring is :mod:`demos.fusion_app`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["Concept", "GenerateResult", "default_model", "builtin_concept_folders", "default_prompt",
           "list_concept_folders", "concept_rows", "interference_rows", "rename_report", "for_display",
           "spectrum_figure", "DIGIT_PROMPT"]

DIGIT_PROMPT = "a handwritten digit 7"  # what the digits base was trained on: one digit per caption
_PROMPT_WORDS = {"a", "an", "the", "handwritten", "digit", "photo", "of", "in", "style"}


def _ranges(cols: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out = []
    for _, grp in itertools.groupby(enumerate(sorted(set(cols))), key=lambda t: t[1] - t[0]):
        g = [c for _, c in grp]
        out.append(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]))
    return ", ".join(out)


@dataclass
class Concept:
    """A concept loaded on a session as adapter ``key`` (one per component in ``parts``)."""

    name: str
    key: str
    folder: Path
    parts: dict[str, Path]
    method: str
    rank: int
    columns: dict[str, list[int]]  # "<component>.<layer>" -> singular columns
    prompt: Optional[str]
    strength: float = 1.0

    @property
    def band(self) -> str:
        return _ranges([c for cols in self.columns.values() for c in cols])


@dataclass
class GenerateResult:
    gallery: list  # (PIL image, caption), row-major: per seed [fused, each concept alone, base]
    columns: int
    mode: str
    overlap: object  # fusion.bands.OverlapReport
    interference: Optional[object]  # fusion.metrics.InterferenceReport (concept names, not adapter keys)
    layers: list[str]  # fused layers, most interfering first
    seconds_fuse: float  # the fusion's own time (least_squares: with its input recording)
    seconds_fusion: float  # fusion + input recording + metrics of this click (0 when cached)
    seconds_total: float


# ---- defaults -----------------------------------------------------------------------------------------
def default_model() -> str:
    """``builtin:digits`` (the trained offline base) when this install has it, else ``builtin:tiny-sd``."""
    from spectral_vision.integrations.diffusers import BUILTIN_PIPELINES

    try:
        from spectral_vision.assets import DIGITS_BASE
    except ImportError:
        return "builtin:tiny-sd"
    return "builtin:digits" if "builtin:digits" in BUILTIN_PIPELINES and DIGITS_BASE.exists() else "builtin:tiny-sd"


def builtin_concept_folders() -> tuple[dict[str, Path], str]:
    """``({name: folder}, note)``: the concepts shipped for ``builtin:digits``
    (``spectral_vision.assets.concepts.builtin_concepts()``); empty with a note saying why when there are none."""
    try:
        from spectral_vision.assets.concepts import builtin_concepts
    except ImportError:
        return {}, "no built-in concepts in this install (spectral_vision.assets.concepts is missing)"
    found = {n: Path(p) for n, p in builtin_concepts().items() if Path(p).is_dir()}
    if not found:
        return {}, ("no built-in concepts trained yet (spectral_vision/assets/concepts/ is empty): "
                    "train one with training/dreambooth_spectral.py and add it from --concepts_dir")
    return found, ""


def default_prompt(prompts: Sequence[Optional[str]]) -> str:
    """``"a handwritten digit 7"`` followed by the concepts' tokens (the words of their instance prompts that
    are not the digit caption), e.g. ``"a handwritten digit 7 bld slt"``."""
    tokens: dict[str, None] = {}
    for p in prompts:
        for w in (p or "").split():
            if w.lower() not in _PROMPT_WORDS and not w.isdigit() and "{" not in w:
                tokens[w] = None
    return " ".join([DIGIT_PROMPT, *tokens])


def list_concept_folders(concepts_dirs: Sequence[Path]) -> list[str]:
    """Concept folders (their direct ``unet/``, ``text_encoder/`` or own ``adapter_config.json``) in the
    concepts dirs, one level deep."""
    out = []
    for root in concepts_dirs:
        for d in sorted(p for p in Path(root).glob("*") if p.is_dir()):
            if any((d / c / "adapter_config.json").exists() for c in ("", "unet", "text_encoder")):
                out.append(str(d))
    return out


# ---- tables -------------------------------------------------------------------------------------------
_SHORT = {"unet": "unet", "text_encoder": "text"}


def concept_rows(concepts: dict, overlap) -> tuple[list[str], list[list]]:
    """``(headers, rows)`` of the concepts table, with the concepts each one shares band columns with."""
    rows = []
    for n, c in concepts.items():
        clash = sorted({o.b if o.a == n else o.a for o in overlap.overlaps if n in (o.a, o.b)})
        rows.append([n, c.method, c.rank, c.band, ", ".join(_SHORT.get(p, p) for p in c.parts), c.prompt or "",
                     ("shares columns with " + ", ".join(clash)) if clash else "disjoint"])
    return ["concept", "method", "rank", "band columns", "parts", "prompt", "bands"], rows


def rename_report(report, names: dict[str, str]):
    """The interference report with adapter keys replaced by concept names (in place; returns it)."""
    if report is None:
        return None
    ren = lambda d: {names.get(k, k): v for k, v in d.items()}  # noqa: E731
    report.concepts = [names.get(c, c) for c in report.concepts]
    for d in list(report.layers.values()) + [report.overall]:
        for k in ("own_output_change", "own_direction_change"):
            if k in d:
                d[k] = ren(d[k])
        if "pairs" in d:
            d["pairs"] = {"|".join(names.get(x, x) for x in p.split("|", 1)): v for p, v in d["pairs"].items()}
    return report


def interference_rows(report, max_layers: int = 8) -> tuple[list[str], list[list]]:
    """``(headers, rows)``: the overall row, then the ``max_layers`` most interfering layers, with the
    numbers named as in :mod:`fusion.metrics` (``report.explain()`` says what they mean)."""
    cs = report.concepts
    headers = ["layer", "shared band columns", "output-subspace cos²", "cos² of random subspaces"] + [
        f"{c}: {k}" for c in cs for k in ("own output change", "in own directions")]

    def row(name, d):
        return [name, d["shared_band_columns"], round(d["output_subspace_cos2"], 4),
                round(d["output_subspace_cos2_chance"], 4)] + [
            round(d[k].get(c, float("nan")), 4) for c in cs for k in ("own_output_change", "own_direction_change")]

    return headers, [row("OVERALL", report.overall)] + [row(n, d) for n, d in report.worst_layers()[:max_layers]]


# ---- images and figures ---------------------------------------------------------------------------------
def for_display(img, min_size: int = 192):
    """Upscale a small PIL image (nearest neighbour, integer factor) so the browser shows its pixels."""
    from PIL import Image

    f = max(1, -(-min_size // max(img.size)))
    return img if f == 1 else img.resize((img.size[0] * f, img.size[1] * f), Image.NEAREST)


def spectrum_figure(sv0: torch.Tensor, sv1: torch.Tensor, bands: dict[str, list[int]], layer: str, top: int = 48):
    """Figure: the first ``top`` singular values before/after fusion (:func:`spectral_vision.analysis.plot_spectrum`,
    index from 1) with each concept's band shaded, and their relative change. No pyplot (thread-safe)."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    from spectral_vision.analysis import plot_spectrum

    k = min(len(sv0), max(top, max((max(c) + 8 for c in bands.values() if c), default=0)))
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    a, b = fig.subplots(1, 2)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    x = torch.arange(1, k + 1)  # singular index i (from 1, as plot_spectrum)
    for j, (n, cols) in enumerate(bands.items()):
        for c in cols:
            for ax in (a, b):
                ax.axvspan(c + 0.5, c + 1.5, color=colors[(j + 2) % len(colors)], alpha=0.25,
                           label=f"band of {n}" if c == cols[0] and ax is a else None)
    plot_spectrum({"before (base)": sv0, "after fusion": sv1}, ax=a, top=k, loglog=False)
    a.set_yscale("log")
    a.legend(fontsize=7)
    rel = ((sv1[:k] - sv0[:k]) / sv0[:k].clamp_min(1e-12)).numpy()
    b.bar(x.numpy(), rel, color=colors[1])
    b.set_xlabel("index i")
    b.set_ylabel("relative change of σ_i")
    b.set_title(f"max |Δσ/σ| = {abs(rel).max():.2e}", fontsize=9)
    fig.suptitle(layer[-70:], fontsize=9)
    return fig
