"""Interference metrics of a fusion, per layer and overall.

For concepts ``i, j`` on a layer with deltas ``ΔWᵢ = Bᵢ Aᵢ`` (exact factors of the core):

* **overlap of column / row spaces**: principal angles between ``col(ΔWᵢ)`` and ``col(ΔWⱼ)``
  (resp. the row spaces), from orthonormal bases computed from the factors (QR of ``Bᵢ`` then a small
  SVD, never the full ``(out, in)`` matrix). Reported as ``overlap = ‖QᵢᵀQⱼ‖²_F / min(kᵢ, kⱼ)``
  (mean squared cosine, 0 = orthogonal, 1 = one space inside the other) and the smallest principal
  angle in degrees (90 = orthogonal). Disjoint ^R bands give exactly 0 / 90°.
* **own-output change** of concept ``i``: ``‖(W − Wᵢ) Xᵢ‖_F / ‖ΔWᵢ Xᵢ‖_F`` with ``W`` the fused weight,
  ``Wᵢ = W₀ + ΔWᵢ`` the single-concept weight (at the concept's spectral-mode strength) and ``Xᵢ``
  the concept's own recorded layer inputs (through their Gram ``Gᵢ``; with no recorded inputs
  ``Gᵢ = I``, i.e. the weight-space ratio ``‖W − Wᵢ‖_F / ‖ΔWᵢ‖_F``). 0 = the concept's layer output is
  unchanged by fusion; 1 = as large as the concept's whole effect.
* **own-direction change**: the same with the error projected onto ``col(ΔWᵢ)`` (the output
  directions concept ``i`` writes to). For disjoint ^R bands in spectral mode it is exactly 0.

Overall numbers aggregate energy over layers: ``sqrt(Σ_layers num² / Σ_layers den²)``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["spaces", "principal_angles", "interference", "InterferenceReport"]


def spaces(B: torch.Tensor, A: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases ``(Qcol (out, k), Qrow (in, k))`` of the column / row space of ``ΔW = B A``.

    ``B (out, R)``, ``A (R, in)``; ``k`` is the numerical rank (singular values > rtol·max).
    """
    Qb, Rb = torch.linalg.qr(B.double())  # (out, R), (R, R)
    P, s, Qt = torch.linalg.svd(Rb @ A.double(), full_matrices=False)  # ΔW = Qb P diag(s) Qt
    k = int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0
    return Qb @ P[:, :k], Qt[:k].T


def principal_angles(Q1: torch.Tensor, Q2: torch.Tensor) -> tuple[float, float]:
    """``(overlap, smallest principal angle in degrees)`` between two orthonormal bases."""
    if Q1.shape[1] == 0 or Q2.shape[1] == 0:
        return 0.0, 90.0
    c = torch.linalg.svdvals(Q1.double().T @ Q2.double()).clamp(max=1.0)  # cosines of the principal angles
    overlap = float((c ** 2).sum()) / min(Q1.shape[1], Q2.shape[1])
    return overlap, math.degrees(math.acos(float(c.max())))


@dataclass
class InterferenceReport:
    concepts: list[str]
    layers: dict[str, dict] = field(default_factory=dict)  # per layer: pairs + per-concept changes
    overall: dict = field(default_factory=dict)
    activations: bool = False  # True when own-output change used recorded inputs

    def to_dict(self) -> dict:
        return {"concepts": self.concepts, "activations": self.activations, "overall": self.overall,
                "layers": self.layers}

    def save_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    def table(self, max_layers: int = 12) -> str:
        """Plain-text table: worst layers (by max own-output change), then the overall row."""
        cs = self.concepts
        head = f"{'layer':<48} {'col ovl':>8} {'row ovl':>8} {'min ang':>8} " + " ".join(f"{c[:10]:>10}" for c in cs)
        lines = [f"own-output change ‖(fused−single_i)X_i‖/‖ΔW_i X_i‖ per concept "
                 f"({'recorded activations' if self.activations else 'weight space, X = I'}); overlaps max over pairs",
                 head, "-" * len(head)]

        def row(name, d):
            ch = " ".join(f"{d['own_change'].get(c, float('nan')):>10.4f}" for c in cs)
            return f"{name[-48:]:<48} {d['col_overlap']:>8.4f} {d['row_overlap']:>8.4f} {d['min_angle']:>8.2f} {ch}"

        worst = sorted(self.layers.items(), key=lambda kv: -max(kv[1]["own_change"].values(), default=0))
        for name, d in worst[:max_layers]:
            lines.append(row(name, d))
        if len(worst) > max_layers:
            lines.append(f"... {len(worst) - max_layers} more layers (see the JSON)")
        lines.append("-" * len(head))
        lines.append(row("OVERALL", self.overall))
        lines.append(f"{'own-direction change (overall)':<48} {'':>8} {'':>8} {'':>8} "
                     + " ".join(f"{self.overall['own_dir_change'].get(c, float('nan')):>10.4f}" for c in cs))
        return "\n".join(lines)

    def plot(self, path) -> Path:
        """Bar plot per layer of each concept's own-output change, with the column overlap."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.layers)
        x = torch.arange(len(names)).numpy()
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 4))
        width = 0.8 / max(len(self.concepts), 1)
        for k, c in enumerate(self.concepts):
            ax.bar(x + k * width, [self.layers[n]["own_change"].get(c, 0.0) for n in names], width, label=c)
        ax.plot(x, [self.layers[n]["col_overlap"] for n in names], "k.", label="column-space overlap")
        ax.set_xlabel("layer")
        ax.set_ylabel("own-output change / overlap")
        ax.set_xticks(x[:: max(1, len(names) // 20)])
        ax.set_title("fusion interference per layer")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@torch.no_grad()
def interference(model, names: Sequence[str], weights: Sequence[float], fused: dict[str, torch.Tensor],
                 grams: Optional[dict] = None, progress: bool = True) -> InterferenceReport:
    """Interference of ``fused`` weights (``{layer: W (out, in)}``); the concepts must still be on ``model``."""
    from .fuse import _base_2d, adapted_layers, concept_delta
    from spectral_vision.layers import SpectralLayer

    rep = InterferenceReport(list(names), activations=grams is not None)
    num = {n: 0.0 for n in names}
    den = {n: 0.0 for n in names}
    num_dir = {n: 0.0 for n in names}
    worst = {"col_overlap": 0.0, "row_overlap": 0.0, "min_angle": 90.0}
    strength = dict(zip(names, weights))
    for lname, layer, present in tqdm(adapted_layers(model, names), desc="interference", disable=not progress):
        if lname not in fused:
            continue
        W0, W = _base_2d(layer), fused[lname]
        sp, deltas = {}, {}
        for n in present:
            deltas[n] = concept_delta(layer, n, strength[n])
            if isinstance(layer, SpectralLayer):
                B, A = layer.adapters[n].factors()  # (out, R), (R, in) at alpha (scale-free spaces)
            else:
                A = layer.lora_A[n].weight.float()
                B = layer.lora_B[n].weight.float().reshape(W.shape[0], -1)  # (out, r[,1,1]) -> (out, r)
                A = A.reshape(B.shape[1], -1)  # (r, in[,kh,kw]) -> (r, in*kh*kw)
            sp[n] = spaces(B, A)
        d = {"pairs": {}, "own_change": {}, "own_dir_change": {}}
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                co, ang_c = principal_angles(sp[a][0], sp[b][0])
                ro, ang_r = principal_angles(sp[a][1], sp[b][1])
                d["pairs"][f"{a}|{b}"] = {"col_overlap": co, "row_overlap": ro, "col_angle": ang_c, "row_angle": ang_r}
        d["col_overlap"] = max((p["col_overlap"] for p in d["pairs"].values()), default=0.0)
        d["row_overlap"] = max((p["row_overlap"] for p in d["pairs"].values()), default=0.0)
        d["min_angle"] = min((min(p["col_angle"], p["row_angle"]) for p in d["pairs"].values()), default=90.0)
        g = grams.get(id(layer), {}) if grams is not None else {}
        for n in present:
            G = g.get(n)
            E = (W - W0 - deltas[n]).double()  # fused − single_i, (out, in)
            D = deltas[n].double()
            Q = sp[n][0]  # (out, k) concept's output directions
            if G is None:
                e2, d2, p2 = float((E ** 2).sum()), float((D ** 2).sum()), float(((Q.T @ E) ** 2).sum())
            else:
                G = G.double()
                e2 = float(((E @ G) * E).sum())
                d2 = float(((D @ G) * D).sum())
                QE = Q.T @ E
                p2 = float(((QE @ G) * QE).sum())
            d["own_change"][n] = math.sqrt(e2 / d2) if d2 > 0 else 0.0
            d["own_dir_change"][n] = math.sqrt(p2 / d2) if d2 > 0 else 0.0
            num[n] += e2
            den[n] += d2
            num_dir[n] += p2
        for k in ("col_overlap", "row_overlap"):
            worst[k] = max(worst[k], d[k])
        worst["min_angle"] = min(worst["min_angle"], d["min_angle"])
        rep.layers[lname] = d
    rep.overall = dict(worst)
    rep.overall["own_change"] = {n: math.sqrt(num[n] / den[n]) if den[n] > 0 else 0.0 for n in names}
    rep.overall["own_dir_change"] = {n: math.sqrt(num_dir[n] / den[n]) if den[n] > 0 else 0.0 for n in names}
    return rep
