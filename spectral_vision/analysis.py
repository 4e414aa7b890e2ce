"""Spectral analysis of a fine-tuned model against its base (paper 001, sec. 3; α of paper 000, sec. 1).

For every weight matrix ``W (out, in)`` (Linear, Conv1D, Conv2d as ``(out, cin/g·kh·kw)``, attention
in-projections: the layouts of :mod:`spectral_vision.geometry`) present in both models, with ``W = U Σ Vᵀ`` (base) and
``W' = U' Σ' V'ᵀ`` (tuned) from :func:`spectral_vision.decompose` (exact, sign-canonical):

* ``sigma_base`` / ``sigma_tuned``: the singular values (all of them, or the top ``max_sv``);
* ``cos_u[i] = |u_iᵀ u'_i|``, ``cos_v[i] = |v_iᵀ v'_i|`` for the top ``k`` same-index pairs (paper 001, Fig. 2);
* ``rel_change[i] = (σ'_i − σ_i) / σ_i`` for the top ``k`` (paper 001, Fig. 1: "top singular values amplified");
* ``alpha_base`` / ``alpha_tuned``: power-law exponent of the rank-ordered spectrum, the least-squares fit of
  ``log σ_i = c − α log i`` over ``i = 1 … ⌈fit_fraction · min(out, in)⌉`` (default: the top half; the
  bottom of a finite matrix's spectrum falls off faster than any power law, so it is left out);
* ``erank_base`` / ``erank_tuned``: effective rank (Roy & Vetterli, 2007), ``exp(H(p))`` with
  ``p_i = σ_i / Σ_j σ_j`` and ``H`` the Shannon entropy (natural log); between 1 and ``min(out, in)``;
* ``delta_rel_fro = ‖W' − W‖_F / ‖W‖_F``.

Models are given as an ``nn.Module`` (a model with attached, unmerged spectral adapters counts with its
active adapters), a state dict, ``zoo:<name>``, a ``.safetensors`` / ``.bin`` file, or a folder holding
safetensors files (timm / transformers / diffusers ``save_pretrained`` folders, diffusers pipeline folders
with one sub-folder per component). ``TUNED`` may also be an adapter folder (spectral_vision or PEFT):
it is applied to a copy of ``BASE`` and merged.

CLI (:mod:`spectral_vision.analysis_cli`)::

    python -m spectral_vision.analysis BASE TUNED --out figs/ [--targets timm_vit] [--k 32]
    spectral-analysis builtin:digits concepts/bold --out figs/   # a DreamBooth concept folder (unet/, text_encoder/)
"""
from __future__ import annotations

import copy
import csv
import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .fileio import atomic_write
from .io import CONFIG_NAME
from .geometry import find_geometry, flatten_2d, layer_kind, weight_2d
from .layers import SpectralLayer
from .presets import _compile
from .svd import decompose

__all__ = ["effective_rank", "power_law_alpha", "compare_weights", "collect_weights", "load_source", "analyze",
           "save_report", "plot_spectrum", "main"]

#: state-dict keys that are lookup tables, not linear maps (skipped unless ``targets`` asks for them)
EMBEDDING_RE = re.compile(r"(.*[._])?(embeddings?|embed_tokens|wte|wpe|pos_embed|cls_token)(\.weight)?$")
Source = Union[nn.Module, dict, str, Path]


# ---- spectrum statistics ------------------------------------------------------------------------------
def effective_rank(S: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(−Σ p_i log p_i)``, ``p = S / ΣS``, of singular values ``S (n,)``."""
    S = S.double().clamp_min(0)
    total = S.sum()
    if total <= 0:
        return 0.0
    p = S[S > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def power_law_alpha(S: torch.Tensor, fit_fraction: float = 0.5, n: Optional[int] = None) -> float:
    """Exponent ``α`` of ``σ_i ∝ i^{−α}``: least squares of ``log σ_i`` on ``log i`` for ``i = 1 … ⌈fit_fraction·n⌉``.

    ``S (m,)`` descending; ``n`` is the full spectrum length (default ``m``; the fit uses at most the ``m``
    values given). Zero singular values are dropped. Returns ``nan`` with fewer than 2 usable points.
    """
    if not 0 < fit_fraction <= 1:
        raise ValueError(f"fit_fraction must be in (0, 1], got {fit_fraction}")
    n = S.numel() if n is None else n
    top = min(S.numel(), max(2, math.ceil(fit_fraction * n)))
    s = S[:top].double()
    i = torch.arange(1, top + 1, dtype=torch.float64, device=s.device)
    keep = s > 0
    if keep.sum() < 2:
        return float("nan")
    x, y = i[keep].log(), s[keep].log()
    x = x - x.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    return -slope


@torch.no_grad()
def compare_weights(W0: torch.Tensor, W1: torch.Tensor, name: str = "", k: int = 32, fit_fraction: float = 0.5,
                    max_sv: Optional[int] = None, cache: bool = False) -> dict:
    """One layer's record (plain Python types) comparing base ``W0 (out, in)`` with tuned ``W1 (out, in)``."""
    if W0.shape != W1.shape or W0.dim() != 2:
        raise ValueError(f"{name}: need two 2-D weights of one shape, got {tuple(W0.shape)} and {tuple(W1.shape)}")
    n = min(W0.shape)
    m = n if max_sv is None else min(int(max_sv), n)
    b0, b1 = decompose(W0, m, cache=cache), decompose(W1, m, cache=cache)  # U (out, m), S (m,), V (in, m)
    kk = min(k, m)
    cos_u = (b0.U[:, :kk] * b1.U[:, :kk]).sum(0).abs()  # (kk,) |u_iᵀ u'_i|
    cos_v = (b0.V[:, :kk] * b1.V[:, :kk]).sum(0).abs()  # (kk,) |v_iᵀ v'_i|
    rel = (b1.S[:kk] - b0.S[:kk]) / b0.S[:kk].clamp_min(1e-12)  # (kk,)
    W0f = W0.float()
    return {
        "name": name, "shape": list(W0.shape), "k": kk, "fit_range": [1, min(m, max(2, math.ceil(fit_fraction * n)))],
        "sigma_base": b0.S.tolist(), "sigma_tuned": b1.S.tolist(),
        "cos_u": cos_u.tolist(), "cos_v": cos_v.tolist(), "rel_change": rel.tolist(),
        "alpha_base": power_law_alpha(b0.S, fit_fraction, n), "alpha_tuned": power_law_alpha(b1.S, fit_fraction, n),
        "erank_base": effective_rank(b0.S), "erank_tuned": effective_rank(b1.S),
        "delta_rel_fro": float((W1.float() - W0f).norm() / W0f.norm().clamp_min(1e-12)),
    }


# ---- weights from models, state dicts and folders -----------------------------------------------------------
@torch.no_grad()
def collect_weights(src: Union[nn.Module, dict], targets=None, transpose_conv1d: bool = True) -> dict[str, torch.Tensor]:
    """``{layer name: W (out, in) fp32}``; names are module names (state dicts: keys without ``.weight``).

    Modules: every Linear / Conv2d / Conv1D; a :class:`SpectralLayer` contributes its effective weight
    (base + active, unmerged adapters). State dicts: every 2-D / 4-D ``*.weight`` except embedding tables.
    ``targets``: a preset name, a regex (full match) or a list of suffixes, as in :class:`SpectralConfig`.
    ``transpose_conv1d=False`` keeps GPT-2 ``Conv1D`` weights as stored ``(in, out)``, like a state dict does
    (used when a module is compared with a state dict, so that both sides share one layout).
    """
    keep = _compile(targets) if targets is not None else (lambda name: True)
    out: dict[str, torch.Tensor] = {}
    if isinstance(src, nn.Module):
        for name, m in src.named_modules():
            name = name.replace(".base_layer.", ".")  # modules inside a wrapped layer keep their plain name
            if name.endswith(".base_layer") or not keep(name):
                continue
            if isinstance(m, SpectralLayer) or find_geometry(m)[0] is not None:
                W = weight_2d(m)  # (out, in); a SpectralLayer: base + active, unmerged adapters
                kind = m.kind if isinstance(m, SpectralLayer) else layer_kind(m)
                out[name] = W.T if kind == "conv1d" and not transpose_conv1d else W  # Conv1D as stored: (in, out)
        return out
    for key, t in src.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        if t.dim() in (2, 4) and t.is_floating_point() and key.endswith("weight") and keep(name):
            if targets is None and EMBEDDING_RE.fullmatch(key):
                continue
            out[name] = flatten_2d(t)  # (out, ...) -> (out, in)
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _load_module_folder(path: Path) -> nn.Module:
    """A module from a ``save_pretrained`` folder (diffusers model, transformers model, timm hub layout)."""
    cfg = json.loads((path / "config.json").read_text())
    if "_class_name" in cfg:
        import diffusers

        return getattr(diffusers, cfg["_class_name"]).from_pretrained(str(path)).eval()
    if cfg.get("architectures"):
        import transformers

        return getattr(transformers, cfg["architectures"][0]).from_pretrained(str(path)).eval()
    if "architecture" in cfg:
        import timm

        weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).exists()), None)
        return timm.create_model(cfg["architecture"], pretrained=weights is not None, num_classes=cfg.get("num_classes"),
                                 pretrained_cfg_overlay={"file": str(weights)} if weights else None).eval()
    raise ValueError(f"{path}/config.json is neither a diffusers, a transformers nor a timm config")


def load_source(spec: Source, as_module: bool = False) -> Union[nn.Module, dict]:
    """An ``nn.Module`` or a state dict from ``spec`` (see the module docstring); ``as_module`` requires a module."""
    if isinstance(spec, (nn.Module, dict)):
        if as_module and not isinstance(spec, nn.Module):
            raise ValueError("applying an adapter needs the base as a model (zoo:<name> or a model folder)")
        return spec
    s = str(spec)
    if s.startswith("zoo:"):
        from .zoo import create_model

        return create_model(s[4:])
    path = Path(s)
    if not path.exists():
        raise FileNotFoundError(f"{s}: no such file or folder (or use zoo:<name>)")
    if as_module:
        if path.is_dir() and (path / "config.json").exists():
            return _load_module_folder(path)
        raise ValueError(f"{s}: applying an adapter needs the base as a model (zoo:<name> or a model folder)")
    if path.is_file():
        return _read_state_dict(path)
    files = sorted(path.rglob("*.safetensors")) or sorted(path.rglob("*.bin"))
    if not files:
        raise ValueError(f"{s}: no .safetensors / .bin weight files in this folder")
    sd: dict[str, torch.Tensor] = {}
    for f in files:  # diffusers pipeline folders: prefix keys with the component sub-folder
        rel = f.parent.relative_to(path)
        prefix = "" if str(rel) == "." else ".".join(rel.parts) + "."
        sd.update({prefix + k: v for k, v in _read_state_dict(f).items()})
    return sd


def _is_adapter_folder(spec) -> Optional[str]:
    """``"spectral"`` / ``"peft"`` if ``spec`` is an adapter folder, else ``None``."""
    if not isinstance(spec, (str, Path)) or not (Path(spec) / CONFIG_NAME).exists():
        return None
    meta = json.loads((Path(spec) / CONFIG_NAME).read_text())
    return "spectral" if meta.get("library") == "spectral_vision" else ("peft" if "peft_type" in meta else None)


def _apply_adapter(base: nn.Module, path: Path, kind: str) -> nn.Module:
    model = copy.deepcopy(base)
    if kind == "spectral":
        from .io import load_adapter
        from .model import merge_and_unload

        return merge_and_unload(load_adapter(model, path, progress=False))
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


def _align(names0: Sequence[str], names1: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of names of the same layer: exact matches, else a unique ``.``-suffix match (``model.x`` ~ ``x``)."""
    common = [n for n in names0 if n in set(names1)]
    if common:
        return [(n, n) for n in common]
    pairs = []
    for a in names0:
        hits = [b for b in names1 if a.endswith("." + b) or b.endswith("." + a)]
        if len(hits) == 1:
            pairs.append((a, hits[0]))
    return pairs


def analyze(base: Source, tuned: Source, targets=None, k: int = 32, fit_fraction: float = 0.5,
            max_sv: Optional[int] = None, progress: bool = True) -> list[dict]:
    """Per-layer records (see :func:`compare_weights`) for every layer present, with one shape, in both models.

    ``tuned`` may be an adapter folder (spectral_vision or PEFT), applied to (a copy of) ``base`` and merged.
    """
    adapter = _is_adapter_folder(tuned)
    base_src = load_source(base, as_module=adapter is not None)
    tuned_src = _apply_adapter(base_src, Path(tuned), adapter) if adapter else load_source(tuned)
    same = isinstance(base_src, nn.Module) == isinstance(tuned_src, nn.Module)  # else: state-dict layout for both
    W0 = collect_weights(base_src, targets, transpose_conv1d=same)
    W1 = collect_weights(tuned_src, targets, transpose_conv1d=same)
    pairs = [(a, b) for a, b in _align(list(W0), list(W1)) if W0[a].shape == W1[b].shape]
    if not pairs:
        raise ValueError(f"no layer of one name and shape in both models (base: {list(W0)[:5]}, tuned: {list(W1)[:5]})")
    return [compare_weights(W0[a], W1[b], a, k, fit_fraction, max_sv)
            for a, b in tqdm(pairs, desc="spectra", disable=not progress or len(pairs) < 8)]


# ---- report: JSON, CSV, figures -------------------------------------------------------------------------------
def summary_row(r: dict) -> dict:
    """The scalar columns of one record (the CSV row); ``top4`` means the top ``min(4, k)`` pairs."""
    top = min(r["k"], 4)
    return {"name": r["name"], "out": r["shape"][0], "in": r["shape"][1], "k": r["k"],
            "delta_rel_fro": r["delta_rel_fro"], "alpha_base": r["alpha_base"], "alpha_tuned": r["alpha_tuned"],
            "erank_base": r["erank_base"], "erank_tuned": r["erank_tuned"], "sigma1_rel_change": r["rel_change"][0],
            "mean_rel_change_top4": sum(r["rel_change"][:top]) / top,
            "mean_cos_u_top4": sum(r["cos_u"][:top]) / top, "mean_cos_v_top4": sum(r["cos_v"][:top]) / top,
            "mean_cos_u_topk": sum(r["cos_u"]) / r["k"], "mean_cos_v_topk": sum(r["cos_v"]) / r["k"]}


def plot_spectrum(spectra: dict, ax=None, title: Optional[str] = None, top: Optional[int] = None,
                  loglog: bool = True, path: Optional[Union[str, Path]] = None):
    """Overlay singular-value spectra ``{label: S (n,)}`` (tensors or lists) on ``ax`` (a new figure if ``None``).

    Returns the figure; ``path`` saves it (PNG/PDF by extension). Used for base vs tuned and by the fusion
    demo (before/after).
    """
    from matplotlib.figure import Figure

    fig = ax.figure if ax is not None else Figure(figsize=(4.5, 3.4), layout="constrained")
    ax = ax if ax is not None else fig.add_subplot()
    for (label, S), ls in zip(spectra.items(), ("-", "--", ":", "-.") * 8):
        s = torch.as_tensor(S, dtype=torch.float64)[:top]
        ax.plot(range(1, s.numel() + 1), s.tolist(), ls, label=label, lw=1.4)
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σ_i")
    if title:
        ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    if path is not None:
        fig.savefig(str(path), dpi=120)
    return fig


def _heatmap(fig, ax, rows: list[list[float]], names: list[str], title: str, vmin, vmax, cmap):
    im = ax.imshow(rows, aspect="auto", vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("singular index i")
    ax.set_yticks(range(len(names)), [n[-40:] for n in names], fontsize=5 if len(names) > 30 else 7)
    fig.colorbar(im, ax=ax, shrink=0.8)


def save_report(records: list[dict], out_dir: Union[str, Path], layers: Optional[Sequence[str]] = None,
                figures: bool = True, n_spectra: int = 4) -> dict[str, Path]:
    """Write ``analysis.json`` (all records), ``analysis.csv`` (:func:`summary_row`) and figures to ``out_dir``.

    Figures: ``spectra.png`` (base vs tuned for ``layers``, default the ``n_spectra`` most changed),
    ``cosine.png`` (heatmaps of ``cos_u`` / ``cos_v``, layer × index), ``sigma_change.png`` (heatmap of
    ``rel_change``), ``alpha.png`` (α before/after per layer). Returns ``{what: path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "analysis.json", "csv": out / "analysis.csv"}
    atomic_write(paths["json"], lambda f: Path(f).write_text(json.dumps(records, indent=1)))
    rows = [summary_row(r) for r in records]

    def write_csv(f):
        with open(f, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    atomic_write(paths["csv"], write_csv)
    if not figures or not records:
        return paths
    from matplotlib.figure import Figure

    by_name = {r["name"]: r for r in records}
    chosen = list(layers) if layers else [r["name"] for r in sorted(records, key=lambda r: -r["delta_rel_fro"])][:n_spectra]
    missing = [n for n in chosen if n not in by_name]
    if missing:
        raise KeyError(f"layers {missing} are not in the analysis; known: {list(by_name)[:10]} ...")
    cols = min(len(chosen), 2)
    fig = Figure(figsize=(4.5 * cols, 3.4 * math.ceil(len(chosen) / cols)), layout="constrained")
    for i, n in enumerate(chosen):
        plot_spectrum({"base": by_name[n]["sigma_base"], "tuned": by_name[n]["sigma_tuned"]},
                      ax=fig.add_subplot(math.ceil(len(chosen) / cols), cols, i + 1), title=n)
    paths["spectra"] = out / "spectra.png"
    fig.savefig(str(paths["spectra"]), dpi=120)

    names = [r["name"] for r in records]
    k = max(r["k"] for r in records)
    nan = float("nan")

    def rows(key):  # layer × index, padded with NaN (blank) where a layer has fewer than k pairs
        return [r[key] + [nan] * (k - len(r[key])) for r in records]

    height = 1.5 + 0.16 * len(records)
    fig = Figure(figsize=(11, height), layout="constrained")
    for j, key in enumerate(("cos_u", "cos_v")):
        _heatmap(fig, fig.add_subplot(1, 2, j + 1), rows(key), names,
                 f"|{key[-1]}_iᵀ {key[-1]}'_i| (same index)", 0.0, 1.0, "viridis")
    paths["cosine"] = out / "cosine.png"
    fig.savefig(str(paths["cosine"]), dpi=120)

    fig = Figure(figsize=(6, height), layout="constrained")
    change = rows("rel_change")
    lim = max(1e-6, max(abs(v) for r in records for v in r["rel_change"]))
    _heatmap(fig, fig.add_subplot(), change, names, "(σ'_i − σ_i) / σ_i", -lim, lim, "RdBu_r")
    paths["sigma_change"] = out / "sigma_change.png"
    fig.savefig(str(paths["sigma_change"]), dpi=120)

    fig = Figure(figsize=(max(5, 0.18 * len(records)), 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([r["alpha_base"] for r in records], "o-", ms=3, label="base")
    ax.plot([r["alpha_tuned"] for r in records], "s--", ms=3, label="tuned")
    if len(records) <= 40:
        ax.set_xticks(range(len(records)), [n[-30:] for n in names], rotation=90, fontsize=6)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("power-law α (fit over top part)")
    ax.legend(fontsize=7)
    paths["alpha"] = out / "alpha.png"
    fig.savefig(str(paths["alpha"]), dpi=120)
    return paths


def main(args=None) -> int:
    """The ``spectral-analysis`` command (:func:`spectral_vision.analysis_cli.main`): 0 on success, 1 on bad input."""
    from .analysis_cli import main as cli_main

    return cli_main(args)
