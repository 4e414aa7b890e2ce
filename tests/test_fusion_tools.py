"""fusion/ around the composition: interference metrics, CLIP scoring, the ``python -m fusion`` command line,
diffusers LoRA files, the speed benchmark, the package's import graph (composition: test_fusion.py)."""
import json

import pytest
import torch

import spectral_vision as sv

from fusion.fuse import fuse
from fusion.metrics import principal_angles, spaces
from helpers import FUSION_CONCEPTS, fusion_concepts, fusion_snapshot, perturb


def test_fusion_imports_no_cycle():
    """No fusion module imports another that imports it back (at any depth, lazy imports included)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "fusion"
    graph = {}
    for f in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fusion."):
                deps.add(node.module.split(".")[1])
        graph[f.stem] = deps - {f.stem}

    def reach(a, seen):
        for b in graph.get(a, ()):
            if b not in seen:
                seen.add(b)
                reach(b, seen)
        return seen

    cycles = sorted(m for m in graph if m != "__init__" and m in reach(m, set()))
    assert not cycles, {m: graph[m] for m in cycles}


def test_metrics_angles_and_own_change():
    m = fusion_concepts(bands_=(0, 1, 1))
    snap = fusion_snapshot(m, FUSION_CONCEPTS)
    res = fuse(m, FUSION_CONCEPTS, mode="mean", metrics=True, progress=False)
    rep = res.metrics
    for ln, d in rep.layers.items():
        p01, p12 = d["pairs"]["c0|c1"], d["pairs"]["c1|c2"]
        assert p01["shared_band_columns"] == 0 and p12["shared_band_columns"] == 3
        assert p01["output_subspace_cos2"] < 1e-6 and abs(p01["min_angle_deg"] - 90) < 1e-2
        assert p01["input_subspace_cos2"] < 1e-6
        assert p12["output_subspace_cos2"] > 0.1  # same band: the column spaces lie in the same 3-d subspace
        s = snap[ln]
        E = sum(s["d"].values()) / 3 - s["d"]["c0"]  # mean − single_0, weight space (no activations)
        assert abs(d["own_output_change"]["c0"] - float(E.norm() / s["d"]["c0"].norm())) < 1e-4
    assert not rep.activations and "OVERALL" in rep.table()
    assert rep.overall["layers_sharing_columns"] == 8 and "spectral mode refuses" in rep.explain()
    Q = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64))[0]
    assert principal_angles(Q, Q)[0] == pytest.approx(1.0) and principal_angles(Q, Q)[1] == pytest.approx(0, abs=1e-3)
    B, A = torch.randn(10, 2), torch.randn(2, 7)
    Qc, Qr = spaces(B, A)
    assert Qc.shape == (10, 2) and torch.allclose((Qc @ Qc.T).float() @ (B @ A), B @ A, atol=1e-5)


def test_metrics_spectral_r_own_direction_change_is_zero(tmp_path):
    m = fusion_concepts()
    inputs = {n: [torch.randint(0, 1000, (1, 6))] for n in FUSION_CONCEPTS}
    rep = fuse(m, FUSION_CONCEPTS, metrics=True, inputs=inputs, progress=False).metrics
    assert rep.activations and rep.overall["output_subspace_cos2"] < 1e-6 and rep.overall["input_subspace_cos2"] < 1e-6
    assert all(v < 1e-4 for v in rep.overall["own_direction_change"].values())
    assert all(v > 1e-3 for v in rep.overall["own_output_change"].values())  # inputs do see other bands
    rep.save_json(tmp_path / "i.json")
    rep.plot(tmp_path / "i.png")
    saved = json.loads((tmp_path / "i.json").read_text())
    assert saved["concepts"] == FUSION_CONCEPTS and set(saved["legend"]) >= {"shared_band_columns", "own_output_change"}
    assert saved["summary"][0].startswith("bands: disjoint")
    assert (tmp_path / "i.png").stat().st_size > 1000


def test_metrics_disjoint_additive_bands_explain_their_subspace_cosine():
    """Issue 15: ^A concepts on disjoint bands share no band column; their output subspaces still overlap
    (A_U leaves the band) and the report says so instead of a scary "overlap"."""
    m = fusion_concepts(method="spectral_a", bands_=(0, 1), rank=2)
    rep = fuse(m, FUSION_CONCEPTS[:2], metrics=True, progress=False).metrics
    assert rep.overall["shared_band_columns"] == 0 and rep.overall["output_subspace_cos2"] > 1e-3
    text = rep.explain()
    assert "bands: disjoint on every layer" in text and "random subspaces" in text and "additive methods" in text


# ---- CLIP plumbing ------------------------------------------------------------------------------------
def test_clip_scorer_plumbing(tmp_path):
    from PIL import Image

    from fusion.clip_score import ClipScorer

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    scorer = ClipScorer("sv-tiny-clip", pretrained=None, config=tmp_path / "cfg.json")
    ims = [Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()) for _ in range(3)]
    f = scorer.image_features(ims)
    assert f.shape == (3, 16) and torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    assert scorer.image_alignment(ims[:1], ims[:1]) == pytest.approx(1.0, abs=1e-5)
    t = scorer.text_alignment(ims, "a photo of sks cat")
    assert -1 <= t <= 1
    assert scorer.text_features(["a cat", "a cat"]).shape == (2, 16)


# ---- CLI -------------------------------------------------------------------------------------------------
def test_cli_spectral_pipeline_and_adapter(tmp_path, capsys):
    from spectral_vision.integrations.diffusers import load_pipeline

    from fusion.__main__ import main, parse_args

    folders = []
    pipe = load_pipeline("builtin:tiny-sd")
    for i, c in enumerate(["cat", "dog"]):
        for comp, preset in (("unet", "sd_unet"), ("text_encoder", "clip_text")):
            mod = getattr(pipe, comp)
            sv.attach(mod, sv.SpectralConfig(method="spectral_r", rank=2, band=i, target_modules=preset), progress=False)
            perturb(mod, std=0.3, seed=i)
            sv.save_adapter(mod, tmp_path / c / comp, extra_metadata={"instance_prompt": f"a photo of sks{i} {c}"})
            sv.detach(mod)
        folders.append(str(tmp_path / c))
    common = ["--base", "builtin:tiny-sd", "--adapters", *folders, "--weights", "1", "0.8", "--seeds", "0",
              "--timesteps", "999"]
    rep = main(parse_args(common + ["--out", str(tmp_path / "fused")]))
    out = capsys.readouterr().out
    assert "OVERALL" in out and "no overlap" in out and rep["overlap_ok"]
    assert f"wrote {(tmp_path / 'fused').resolve()}/" in out and "StableDiffusionPipeline.from_pretrained" in out
    assert rep["interference_summary"][0].startswith("bands: disjoint")
    assert (tmp_path / "fused" / "interference.png").exists() and (tmp_path / "fused" / "model_index.json").exists()
    fused = load_pipeline(str(tmp_path / "fused"))
    main(parse_args(common + ["--out", str(tmp_path / "ad"), "--format", "adapter", "--no-metrics"]))
    assert "spectral_vision.load_adapter(pipe.unet" in capsys.readouterr().out
    base = load_pipeline("builtin:tiny-sd")
    for comp in ("unet", "text_encoder"):
        mod = sv.merge_and_unload(sv.load_adapter(getattr(base, comp), tmp_path / "ad" / comp, progress=False))
        for (k, a), (_, b) in zip(mod.state_dict().items(), getattr(fused, comp).state_dict().items()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)
    with pytest.raises(SystemExit):
        parse_args(common[:-4] + ["--out", "x", "--weights", "1"])


def test_cli_refuses_bad_weights_and_fails_nonzero(tmp_path, capsys):
    """Issue 14 item 6 / issue 17: `--weights nan 1` is refused before anything is written; any failure exits
    non-zero; the help documents --mode and shows no "(default: None)"."""
    import subprocess
    import sys

    from fusion.__main__ import cli, parse_args

    base = ["--base", "builtin:tiny-sd", "--adapters", "a", "b", "--out", str(tmp_path / "o")]
    for bad in (["nan", "1"], ["1", "-1"], ["inf", "1"], ["x", "1"]):
        with pytest.raises(SystemExit) as e:
            parse_args(base + ["--weights", *bad])
        assert e.value.code == 2 and "weights must be finite and >= 0" in capsys.readouterr().err or bad[0] == "x"
    assert not (tmp_path / "o").exists()
    assert cli(base) == 2  # missing folders: checked before loading anything, rc 2, one line
    assert capsys.readouterr().err == "error: concept folder a does not exist\n"
    assert not (tmp_path / "o").exists()
    r = subprocess.run([sys.executable, "-m", "fusion", "--help"], capture_output=True, text=True, check=True)
    assert "(default: None)" not in r.stdout and "least_squares: Mix-of-Show" in r.stdout
    assert r.stdout.count("(default: spectral)") == 1


def test_fusion_speed_benchmark_quick(tmp_path):
    import fusion_speed as mod  # benchmarks/ is on pytest's pythonpath

    argv = ["--quick", "--modes", "spectral", "least_squares", "--json", str(tmp_path / "r.json")]
    out = mod.main(mod.parse_args(argv))
    r = out["results"]
    assert r["spectral"]["layers"] == r["least_squares"]["layers"] == 40 and r["least_squares"]["record_s"] > 0
    saved = json.loads((tmp_path / "r.json").read_text())["results"]
    assert saved["least_squares"]["x_spectral"] > 1  # recording + solving costs more than one addmm per layer


@pytest.mark.slow
def test_lora_sum_of_diffusers_lora_files_matches_diffusers_fuse_lora(tmp_path):
    """Concept folders holding pytorch_lora_weights.safetensors (PEFT-baseline DreamBooth output)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    from spectral_vision.baselines import attach_peft
    from spectral_vision.integrations.diffusers import load_pipeline

    from fusion.pipeline import fuse_pipeline

    p = load_pipeline("builtin:tiny-sd")
    attach_peft(p.unet, "lora", 4, "sd_unet", adapter_name="a")
    attach_peft(p.unet, "lora", 4, "sd_unet", adapter_name="b")
    with torch.no_grad():
        for n, q in p.unet.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.1)
    for c in "ab":
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(p.unet, adapter_name=c))
        StableDiffusionPipeline.save_lora_weights(tmp_path / c, unet_lora_layers=sd, safe_serialization=True)
    ref = load_pipeline("builtin:tiny-sd")
    for c in "ab":
        ref.load_lora_weights(str(tmp_path / c), adapter_name=c)
    ref.set_adapters(["a", "b"], [1.0, 0.5])
    ref.fuse_lora(adapter_names=["a", "b"])
    ref.unload_lora_weights()  # keeps the fused weights, removes the LoRA layers
    pipe = load_pipeline("builtin:tiny-sd")
    res = fuse_pipeline(pipe, [tmp_path / "a", tmp_path / "b"], [1.0, 0.5], mode="lora_sum", progress=False)
    assert len(res.layers) == 32
    want = ref.unet.state_dict()
    got = pipe.unet.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
