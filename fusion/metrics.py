"""Interference metrics of a fusion, per layer and overall, each named for what it measures.

For concepts ``i, j`` on a layer with deltas ``ΔWᵢ = Bᵢ Aᵢ`` (exact factors from the backends):

* ``shared_band_columns``: how many singular columns (band indices of the base's SVD) both concepts
  adapt. 0 = disjoint bands (what band allocation guarantees); > 0 makes spectral mode refuse.
* ``output_subspace_cos2`` / ``input_subspace_cos2``: mean squared cosine of the principal angles
  between the column spaces (the output directions the deltas write to) / row spaces (the input
  directions they read) of ``ΔWᵢ`` and ``ΔWⱼ``, ``‖QᵢᵀQⱼ‖²_F / min(kᵢ, kⱼ)``: 0 = orthogonal, 1 = one
  inside the other. Disjoint ^R bands give exactly 0. **It is not a band overlap**: ^A, LoRA and
  other additive methods move their vectors out of their band, so disjoint bands can still share
  output directions; ``*_cos2_chance = max(kᵢ, kⱼ) / dim`` is what two random subspaces of those sizes
  give, for comparison. ``min_angle_deg`` is the smallest principal angle (90 = orthogonal).
* ``own_output_change`` of concept ``i``: ``‖(W − Wᵢ) Xᵢ‖_F / ‖ΔWᵢ Xᵢ‖_F`` with ``W`` the fused weight,
  ``Wᵢ = W₀ + ΔWᵢ(wᵢ)`` the concept alone at its strength and ``Xᵢ`` its own recorded layer inputs
  (through their Gram; without recorded inputs ``X = I``: the weight-space ratio). 0 = fusion leaves
  the concept's layer output as alone; 1 = a change as large as the concept's whole effect.
* ``own_direction_change``: the same error projected on ``col(ΔWᵢ)``. Disjoint ^R bands: exactly 0.

Overall numbers: pair values are the worst layer; the changes aggregate energy over layers,
``sqrt(Σ num² / Σ den²)``. :data:`LEGEND` (also in the JSON) gives each number's meaning and the
rule-of-thumb thresholds :meth:`InterferenceReport.explain` applies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from spectral_vision.fileio import atomic_write, atomic_write_json
from spectral_vision.svd import decompose

__all__ = ["spaces", "principal_angles", "interference", "InterferenceReport", "LEGEND", "THRESHOLDS"]

#: rule-of-thumb thresholds used in the explanations (the JSON carries them too)
THRESHOLDS = {"crosstalk_little": 0.1, "crosstalk_strong": 0.5, "cos2_shared": 0.5}

LEGEND = {
    "shared_band_columns": "singular columns (band indices) both concepts adapt on a layer; 0 = disjoint bands. "
                           "> 0: spectral mode refuses (both would move the same singular vectors)",
    "output_subspace_cos2": "mean squared cosine between the output subspaces of the two deltas (0 = orthogonal, "
                            "1 = nested); not a band overlap: additive methods (^A, LoRA) leave their band. "
                            f"> {THRESHOLDS['cos2_shared']}: the concepts write largely to the same directions",
    "input_subspace_cos2": "the same for the input directions the deltas read (row spaces)",
    "output_subspace_cos2_chance": "what two random subspaces of the same sizes give: max(k_i, k_j) / out",
    "min_angle_deg": "smallest principal angle between the two concepts' subspaces (90 = orthogonal)",
    "own_output_change": "||(W_fused - W_alone_i) X_i|| / ||dW_i X_i||: how much fusion (the other concepts) changes "
                         "concept i's layer outputs on its own inputs, relative to its own effect; "
                         f"< {THRESHOLDS['crosstalk_little']} little crosstalk, "
                         f"> {THRESHOLDS['crosstalk_strong']} strong",
    "own_direction_change": "the same error projected on concept i's own output directions (0 for disjoint ^R)",
}


def spaces(B: torch.Tensor, A: torch.Tensor, rtol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases ``(Qcol (out, k), Qrow (in, k))`` of the column / row space of ``ΔW = B A``.

    ``B (out, R)``, ``A (R, in)``; ``k`` is the numerical rank (singular values > rtol·max). The SVD is
    the core's (:func:`spectral_vision.svd.decompose`) of the small ``(R, in)`` matrix ``R_B A``.
    """
    Qb, Rb = torch.linalg.qr(B.float())  # (out, R), (R, R)
    M = Rb @ A.float()  # ΔW = Qb M, (R, in)
    if not M.numel() or float(M.abs().max()) == 0:
        return B.new_zeros(B.shape[0], 0), A.new_zeros(A.shape[1], 0)
    b = decompose(M, method="exact", cache=False)  # M = P diag(s) Vᵀ
    k = int((b.S > rtol * b.S.max()).sum())
    return Qb @ b.U[:, :k], b.V[:, :k]


def principal_angles(Q1: torch.Tensor, Q2: torch.Tensor) -> tuple[float, float]:
    """``(mean squared cosine, smallest principal angle in degrees)`` between two orthonormal bases."""
    if Q1.shape[1] == 0 or Q2.shape[1] == 0:
        return 0.0, 90.0
    c = decompose(Q1.float().T @ Q2.float(), method="exact", cache=False).S.clamp(max=1.0)  # cosines
    return float((c ** 2).sum()) / min(Q1.shape[1], Q2.shape[1]), math.degrees(math.acos(float(c.max())))


@dataclass
class InterferenceReport:
    concepts: list[str]
    layers: dict[str, dict] = field(default_factory=dict)  # per layer: "pairs" + per-concept changes
    overall: dict = field(default_factory=dict)
    activations: bool = False  # True when own_output_change used recorded inputs

    def to_dict(self) -> dict:
        return {"concepts": self.concepts, "activations": self.activations, "legend": LEGEND,
                "thresholds": THRESHOLDS, "summary": self.explain().splitlines(), "overall": self.overall,
                "layers": self.layers}

    def save_json(self, path) -> Path:
        return atomic_write_json(path, self.to_dict())

    def explain(self) -> str:
        """Plain sentences: the bands, the shared directions (with chance), each concept's own change."""
        o, t = self.overall, THRESHOLDS
        lines = []
        if o["shared_band_columns"] == 0:
            lines.append(f"bands: disjoint on every layer (0 shared singular columns over {len(self.layers)} layers)")
        else:
            lines.append(f"bands: {o['shared_band_columns']} singular columns shared on {o['layers_sharing_columns']} "
                         "layers (spectral mode refuses this unless overlap is allowed)")
        cos2, chance = o["output_subspace_cos2"], o["output_subspace_cos2_chance"]
        kind = ("largely the same" if cos2 > t["cos2_shared"] else "orthogonal" if cos2 < 1e-6
                else "partly the same")
        lines.append(f"output directions: worst-layer cos² {cos2:.3f} (random subspaces: {chance:.3f}): the "
                     f"concepts write to {kind} directions" + ("" if cos2 < 1e-6 else
                                                               "; expected for additive methods (^A, LoRA) even on "
                                                               "disjoint bands"))
        for c in self.concepts:
            v, vd = o["own_output_change"].get(c, float("nan")), o["own_direction_change"].get(c, float("nan"))
            level = ("little" if v < t["crosstalk_little"] else "strong" if v > t["crosstalk_strong"]
                     else "moderate")
            lines.append(f"{c}: fusion changes its layer outputs by {v:.3f} of its own effect ({level} crosstalk; "
                         f"< {t['crosstalk_little']} little, > {t['crosstalk_strong']} strong); in its own "
                         f"output directions by {vd:.3f}" + (" (kept)" if vd < t["crosstalk_little"] else ""))
        return "\n".join(lines)

    def table(self, max_layers: int = 12) -> str:
        """Plain-text table: worst layers (by max own output change), the overall row, then :meth:`explain`."""
        cs = self.concepts
        head = (f"{'layer':<44} {'shared':>6} {'out cos²':>8} {'chance':>7} {'in cos²':>8} "
                + " ".join(f"{c[:10]:>10}" for c in cs))
        lines = [f"shared = singular columns both concepts adapt; cos² = subspace similarity (0 orthogonal, 1 nested); "
                 f"per concept: own output change ({'recorded inputs' if self.activations else 'weight space'})",
                 head, "-" * len(head)]

        def row(name, d):
            ch = " ".join(f"{d['own_output_change'].get(c, float('nan')):>10.4f}" for c in cs)
            return (f"{name[-44:]:<44} {d['shared_band_columns']:>6} {d['output_subspace_cos2']:>8.4f} "
                    f"{d['output_subspace_cos2_chance']:>7.4f} {d['input_subspace_cos2']:>8.4f} {ch}")

        for name, d in self.worst_layers()[:max_layers]:
            lines.append(row(name, d))
        if len(self.layers) > max_layers:
            lines.append(f"... {len(self.layers) - max_layers} more layers (see the JSON)")
        lines += ["-" * len(head), row("OVERALL", self.overall), self.explain()]
        return "\n".join(lines)

    def worst_layers(self) -> list[tuple[str, dict]]:
        return sorted(self.layers.items(), key=lambda kv: -max(kv[1]["own_output_change"].values(), default=0))

    def plot(self, path) -> Path:
        """Bar plot per layer of each concept's own output change, with the output-subspace cos²."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        names = list(self.layers)
        x = torch.arange(len(names), device="cpu").numpy()
        fig = Figure(figsize=(max(6, 0.25 * len(names) + 2), 4), layout="constrained")
        ax = fig.subplots()
        width = 0.8 / max(len(self.concepts), 1)
        for k, c in enumerate(self.concepts):
            ax.bar(x + k * width, [self.layers[n]["own_output_change"].get(c, 0.0) for n in names], width, label=c)
        ax.plot(x, [self.layers[n]["output_subspace_cos2"] for n in names], "k.", label="output-subspace cos²")
        ax.axhline(THRESHOLDS["crosstalk_little"], color="gray", lw=0.8, ls="--", label="little crosstalk below")
        ax.set_xlabel("layer")
        ax.set_ylabel("own output change / cos²")
        ax.set_xticks(x[:: max(1, len(names) // 20)])
        ax.set_title("fusion interference per layer")
        ax.legend(fontsize=7)
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def _pair(h, a: str, b: str, sp: dict) -> dict:
    co, ang_c = principal_angles(sp[a][0], sp[b][0])
    ro, ang_r = principal_angles(sp[a][1], sp[b][1])
    shared = len(set(h.columns(a)) & set(h.columns(b))) if h.kind == "spectral" else 0
    k = max(sp[a][0].shape[1], sp[b][0].shape[1])
    return {"shared_band_columns": shared, "output_subspace_cos2": co, "input_subspace_cos2": ro,
            "output_subspace_cos2_chance": k / max(sp[a][0].shape[0], 1), "min_angle_deg": min(ang_c, ang_r)}


@torch.no_grad()
def interference(layers: Sequence[tuple], names: Sequence[str], weights: Sequence[float], fused: str,
                 grams: Optional[dict] = None, progress: bool = True) -> InterferenceReport:
    """Interference of fused adapter ``fused`` with its concepts ``names`` at strengths ``weights``.

    ``layers``: ``(handle, concepts present)`` from :func:`fusion.backends.all_layers` (the concepts and
    ``fused`` on them); ``grams``: ``{layer: {concept: G (in, in)}}`` recorded inputs, or ``None``.
    """
    rep = InterferenceReport(list(names), activations=grams is not None)
    strength = dict(zip(names, weights))
    num, den, num_dir = ({n: 0.0 for n in names} for _ in range(3))
    worst = {"shared_band_columns": 0, "layers_sharing_columns": 0, "output_subspace_cos2": 0.0,
             "input_subspace_cos2": 0.0, "output_subspace_cos2_chance": 0.0, "min_angle_deg": 90.0}
    for h, present in tqdm(layers, desc="interference", disable=not progress):
        present = [n for n in present if n != fused]
        F_ = h.delta(fused).double() if fused in h.names() else 0.0  # W − W₀, (out, in)
        sp = {n: spaces(*h.factors(n)) for n in present}  # spaces at alpha: scale-free
        d = {"pairs": {f"{a}|{b}": _pair(h, a, b, sp) for i, a in enumerate(present) for b in present[i + 1:]},
             "own_output_change": {}, "own_direction_change": {}}
        for k in ("shared_band_columns", "output_subspace_cos2", "input_subspace_cos2",
                  "output_subspace_cos2_chance"):
            d[k] = max((p[k] for p in d["pairs"].values()), default=0)
        d["min_angle_deg"] = min((p["min_angle_deg"] for p in d["pairs"].values()), default=90.0)
        g = (grams or {}).get(h.name, {})
        for n in present:
            D = h.delta(n, strength[n]).double()  # ΔWᵢ(wᵢ)
            E = F_ - D  # fused − alone, (out, in)
            PE = sp[n][0].double().T @ E  # error in the concept's output directions
            G = g.get(n)
            if G is None:
                e2, d2, p2 = float((E ** 2).sum()), float((D ** 2).sum()), float((PE ** 2).sum())
            else:
                G = G.double()
                e2, d2, p2 = (float(((M @ G) * M).sum()) for M in (E, D, PE))
            d["own_output_change"][n] = math.sqrt(e2 / d2) if d2 > 0 else 0.0
            d["own_direction_change"][n] = math.sqrt(p2 / d2) if d2 > 0 else 0.0
            num[n], den[n], num_dir[n] = num[n] + e2, den[n] + d2, num_dir[n] + p2
        for k in ("output_subspace_cos2", "input_subspace_cos2", "output_subspace_cos2_chance"):
            worst[k] = max(worst[k], d[k])
        worst["shared_band_columns"] += d["shared_band_columns"]
        worst["layers_sharing_columns"] += int(d["shared_band_columns"] > 0)
        worst["min_angle_deg"] = min(worst["min_angle_deg"], d["min_angle_deg"])
        rep.layers[h.name] = d
    rep.overall = dict(worst)
    rep.overall["own_output_change"] = {n: math.sqrt(num[n] / den[n]) if den[n] > 0 else 0.0 for n in names}
    rep.overall["own_direction_change"] = {n: math.sqrt(num_dir[n] / den[n]) if den[n] > 0 else 0.0 for n in names}
    return rep
