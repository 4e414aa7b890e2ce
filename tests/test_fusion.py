"""fusion/: band registry, exact spectral composition, baselines, least squares, metrics, CLIP plumbing, CLI.

"Own-band output" of concept i on a layer: the layer output projected on the concept's band of left
singular vectors, ``Uᵢ Uᵢᵀ W x`` (``Uᵢ = U[:, columnsᵢ]`` of the base weight). Spectral fusion of
disjoint ^R concepts must give exactly the single-concept model's own-band output for every x.
"""
import json

import pytest
import torch

import spectral_vision as sv
from spectral_vision.zoo import create_model

from fusion import bands
from fusion.backends import all_layers
from fusion.fuse import add_fused_adapter, fuse
from fusion.metrics import spaces, principal_angles
from fusion.record import least_squares_weights, ls_objective
from helpers import perturb

CONCEPTS = ["c0", "c1", "c2"]


def concepts(model="tiny-clip-text", method="spectral_r", bands_=(0, 1, 2), rank=3, preset="clip_text",
             std=0.3, alpha=1.0):
    """A tiny model with one perturbed adapter per band (all perturbed: all made active first)."""
    m = create_model(model)
    for i, b in enumerate(bands_):
        sv.attach(m, sv.SpectralConfig(method=method, rank=rank, band=b, alpha=alpha, target_modules=preset),
                  CONCEPTS[i], progress=False)
    sv.set_adapter(m, CONCEPTS[: len(bands_)])
    perturb(m, std=std, seed=3)
    return m


def snapshot(m, names):
    """Per layer: base W, single-concept deltas, and the base basis."""
    out = {}
    for ln, layer in sv.spectral_layers(m):
        out[ln] = {"W": layer.weight_2d().clone(), "d": {n: layer.adapters[n].delta_weight().detach().clone()
                                                        for n in names if n in layer.adapters},
                   "cols": {n: layer.adapters[n].columns.tolist() for n in names if n in layer.adapters}}
    return out


def fused_2d(m, ln, shape):
    return m.get_submodule(ln).weight.detach().float().reshape(shape[0], -1)  # (out, in[,kh,kw]) -> (out, in)


# ---- bands ---------------------------------------------------------------------------------------------
def test_band_registry(tmp_path):
    reg = bands.BandRegistry(tmp_path)
    assert reg.next_free_band(4) == 0 and reg.concepts() == {}
    reg.register("cat", tmp_path / "cat", "spectral_r", 4, band=0)
    assert reg.next_free_band(4) == 1 and reg.next_free_band(2) == 2
    assert reg.check_overlap(1, rank=4) == [] and reg.check_overlap([3, 9]) == [("cat", [3])]
    with pytest.raises(ValueError, match="overlaps 'cat'.*Use band 1"):
        reg.register("dog", tmp_path / "dog", "spectral_r", 4, band=0)
    assert reg.allocate("dog", tmp_path / "dog", "spectral_a", 4) == 1
    assert set(json.loads((tmp_path / "bands.json").read_text())["concepts"]) == {"cat", "dog"}
    reg.register("cat", tmp_path / "cat", "spectral_r", 4, band=0)  # re-registering itself is fine
    assert bands.BandRegistry(tmp_path).concepts()["dog"]["columns"] == [4, 5, 6, 7]


def test_find_overlaps_on_adapter_folders(tmp_path):
    m = concepts(bands_=(0, 1))
    sv.attach(m, sv.SpectralConfig(method="spectral_a", rank=2, columns=[3, 6], target_modules="clip_text"), "c2",
              progress=False)
    for n in CONCEPTS:
        sv.save_adapter(m, tmp_path / n, n)
    assert bands.find_overlaps([tmp_path / "c0", tmp_path / "c1"]).ok
    rep = bands.find_overlaps([tmp_path / n for n in CONCEPTS])
    assert not rep.ok and {(o.a, o.b) for o in rep.overlaps} == {("c1", "c2")}
    assert all(o.columns == [3] for o in rep.overlaps) and len(rep.overlaps) == rep.layers_checked == 8
    assert "'c1' and 'c2' share columns in 8 layer(s)" in rep.explain() and "self_attn" in rep.explain()


# ---- spectral mode -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,preset", [("tiny-clip-text", "clip_text"), pytest.param(
    "tiny-unet", r".*(attn1\.to_q|attn2\.to_k|resnets\.0\.conv1)", marks=pytest.mark.slow)])
def test_spectral_r_keeps_singular_values_and_own_band(model, preset):
    m = concepts(model, preset=preset, rank=2)
    snap = snapshot(m, CONCEPTS)
    res = fuse(m, CONCEPTS, progress=False)
    assert not sv.adapter_names(m) and len(res.layers) == len(snap) and res.overlap.ok
    for ln, s in snap.items():
        W0, Wf = s["W"], fused_2d(m, ln, s["W"].shape)
        s0, sf = torch.linalg.svdvals(W0.double()), torch.linalg.svdvals(Wf.double())
        assert torch.allclose(sf, s0, rtol=0, atol=2e-5 * float(s0[0])), ln  # every singular value kept
        U = sv.decompose(W0, 6, "exact").U  # (out, 6): bands 0, 1, 2 of rank 2
        x = torch.randn(W0.shape[1], 5)
        moved = 0.0
        for i, n in enumerate(CONCEPTS):
            Ui = U[:, s["cols"][n]]
            single = W0 + s["d"][n]
            torch.testing.assert_close(Ui.T @ (Wf @ x), Ui.T @ (single @ x), atol=2e-5, rtol=1e-5)
            moved += float((Ui.T @ (single - W0)).norm())
        assert moved > 1e-2  # the concepts do change their bands
        P = U @ U.T  # outside every band the fused layer is the base
        torch.testing.assert_close((torch.eye(len(P)) - P) @ Wf, (torch.eye(len(P)) - P) @ W0, atol=2e-5, rtol=0)


def test_spectral_a_is_exact_sum_and_weights_scale_linearly():
    m = concepts(method="spectral_a", alpha=0.5)
    snap = snapshot(m, CONCEPTS)
    w = [1.0, 0.25, -2.0]
    fuse(m, CONCEPTS, weights=w, progress=False)
    for ln, s in snap.items():
        want = s["W"] + sum(wi * s["d"][n] for wi, n in zip(w, CONCEPTS))
        torch.testing.assert_close(fused_2d(m, ln, s["W"].shape), want, atol=1e-5, rtol=1e-5)


def test_spectral_r_weight_scales_generator():
    """^R strength w = the concept trained with alpha·w (orthogonal for every w); w = 0 removes it."""
    m = concepts()
    ref = concepts()
    for n in CONCEPTS:  # the same concepts with alpha scaled by hand
        for _, layer in sv.spectral_layers(ref):
            layer.adapters[n].cfg = sv.SpectralConfig(**{**layer.adapters[n].cfg.to_dict(),
                                                         "alpha": {"c0": 0.5, "c1": 0.0, "c2": 3.0}[n]})
    want = {ln: l.weight_2d() + l.adapters["c0"].delta_weight() + l.adapters["c2"].delta_weight()
            for ln, l in sv.spectral_layers(ref)}
    assert all(float(l.adapters["c1"].delta_weight().detach().abs().max()) == 0 for _, l in sv.spectral_layers(ref))
    fuse(m, CONCEPTS, weights=[0.5, 0.0, 3.0], progress=False)
    for ln, W in want.items():
        torch.testing.assert_close(fused_2d(m, ln, W.shape), W.detach(), atol=1e-5, rtol=1e-5)


def test_overlap_refused_with_explanation_unless_allowed():
    m = concepts(bands_=(0, 1, 1))
    with pytest.raises(ValueError, match=r"'c1' and 'c2' share columns in 8 layer\(s\)"):
        fuse(m, CONCEPTS, progress=False)
    assert set(sv.adapter_names(m)) == set(CONCEPTS)  # nothing fused
    snap = snapshot(m, CONCEPTS)
    res = fuse(m, CONCEPTS, allow_overlap=True, progress=False)
    assert not res.overlap.ok
    for ln, s in snap.items():
        torch.testing.assert_close(fused_2d(m, ln, s["W"].shape), s["W"] + sum(s["d"].values()), atol=1e-5, rtol=1e-5)


# ---- baselines -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mean", "weighted"])
def test_mean_dilutes_each_delta(mode):
    m = concepts(method="spectral_a")  # linear in its strength: the official averages of merged weights
    snap = snapshot(m, CONCEPTS)
    w = [1.0, 1.0, 1.0] if mode == "mean" else [2.0, 1.0, 1.0]
    fuse(m, CONCEPTS, weights=w, mode=mode, progress=False)
    for ln, s in snap.items():
        singles = [s["W"] + s["d"][n] for n in CONCEPTS]  # the official code averages merged weights
        want = sum(wi * Wi for wi, Wi in zip(w, singles)) / sum(w)
        torch.testing.assert_close(fused_2d(m, ln, s["W"].shape), want, atol=1e-5, rtol=1e-5)
        if mode == "mean":  # = W0 + ΔW_i / N
            torch.testing.assert_close(want, s["W"] + sum(s["d"].values()) / 3, atol=1e-5, rtol=1e-5)


def test_weights_have_one_meaning_the_strength():
    """Every mode starts from ΔW_i(w_i) = delta_weight(scale=w_i): for ^R (non-linear in w) mean at w is
    W0 + Σ ΔW_i(w_i) / N, and least_squares' targets are the concepts at their strengths."""
    w = [0.5, 2.0, 1.0]
    m = concepts()
    want = {ln: l.weight_2d() + sum(l.adapters[n].delta_weight(wi).detach() for n, wi in zip(CONCEPTS, w)) / 3
            for ln, l in sv.spectral_layers(m)}
    fuse(m, CONCEPTS, weights=w, mode="mean", progress=False)
    for ln, W in want.items():
        torch.testing.assert_close(fused_2d(m, ln, W.shape), W, atol=1e-5, rtol=1e-5)
    for bad in ([float("nan"), 1.0, 1.0], [1.0, float("inf"), 1.0], [1.0, 1.0]):
        m = concepts()
        with pytest.raises(ValueError, match="finite|weights for"):
            fuse(m, CONCEPTS, weights=bad, progress=False)
        assert set(sv.adapter_names(m)) == set(CONCEPTS)  # nothing fused, nothing written


def test_lora_sum_matches_peft_with_both_adapters_active():
    pytest.importorskip("peft")
    from spectral_vision.baselines import attach_peft

    m = create_model("tiny-clip-text")
    for n in ("a", "b"):
        attach_peft(m, "lora", 4, "clip_text", adapter_name=n)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    from peft.tuners.lora import LoraLayer

    for mod in m.modules():
        if isinstance(mod, LoraLayer):
            mod.set_adapter(["a", "b"])
    ids = torch.randint(0, 1000, (2, 7))
    want = m(ids).last_hidden_state
    res = fuse(m, ["a", "b"], mode="lora_sum", progress=False)
    assert len(res.layers) == 8 and not any(isinstance(x, LoraLayer) for x in m.modules())
    torch.testing.assert_close(m(ids).last_hidden_state, want, atol=1e-4, rtol=1e-4)


def test_least_squares_reduces_objective_and_is_a_minimum():
    m = concepts(bands_=(0, 1, 1))  # two concepts overlap: the naive sum interferes
    g = torch.Generator().manual_seed(0)
    inputs = {n: [torch.randint(0, 1000, (2, 9), generator=g)] for n in CONCEPTS}
    res = fuse(m, CONCEPTS, mode="least_squares", inputs=inputs, ridge=1e-6, metrics=True, unload=False,
               progress=False)
    assert res.info["objective"] < 0.5 * res.info["objective_naive_sum"]
    assert res.adapter == "fused" and res.info["fused_method"] == "lowrank"  # a named adapter, concepts kept
    layer = dict(sv.spectral_layers(m))["encoder.layers.1.self_attn.q_proj"]
    # recompute the objective from freshly captured inputs X_i of each single-concept model
    X = {}
    h = layer.register_forward_pre_hook(lambda mod, a: X.__setitem__(cur[0], a[0].detach().reshape(-1, a[0].shape[-1])))
    sv.unmerge(m)
    for n in CONCEPTS:
        cur = [n]
        sv.set_adapter(m, n)
        m(inputs[n][0])
    h.remove()
    W0 = layer.weight_2d()
    targets = [W0 + layer.adapters[n].delta_weight().detach() for n in CONCEPTS]
    G = [X[n].T @ X[n] for n in CONCEPTS]
    one = [t for t in all_layers(m, CONCEPTS) if t[0].name == "encoder.layers.1.self_attn.q_proj"]
    Wls = W0 + least_squares_weights(one, CONCEPTS, [1.0] * 3, {one[0][0].name: dict(zip(CONCEPTS, G))}, 1e-6,
                                     progress=False)[0][one[0][0].name]
    f = lambda W: ls_objective(W, targets, G, [1.0] * 3)  # noqa: E731
    assert f(Wls) < f(W0 + sum(t - W0 for t in targets))
    E = torch.randn_like(Wls) * 1e-2
    assert f(Wls + E) > f(Wls) and f(Wls - E) > f(Wls)  # the normal equations' solution is the minimum


# ---- the named fused adapter, scale, concat, metrics ----------------------------------------------------
@pytest.mark.parametrize("method,w,fused_method", [("spectral_r", [1.0, 0.5, 2.0], "spectral_r"),
                                                   ("spectral_a", [0.7, 0.7, 0.7], "spectral_a"),
                                                   ("spectral_a", [1.0, 0.5, 1.0], "lowrank"),
                                                   ("svdiff", [1.0, 0.5, 2.0], "lowrank")])
def test_fused_adapter_saves_loads_and_merges_to_the_fusion(tmp_path, method, w, fused_method):
    bands_ = (0, 1, 2) if method != "svdiff" else (0, 0, 0)
    m = concepts(method=method, alpha=1.5, bands_=bands_)
    res = add_fused_adapter(m, CONCEPTS, w, mode="spectral" if method != "svdiff" else "lora_sum", progress=False)
    cfg = sv.adapter_config(m, "fused")
    assert res.adapter == "fused" and cfg.method == res.info["fused_method"] == fused_method
    if fused_method == "spectral_r":
        assert cfg.rank == 9 and cfg.columns == list(range(9))
    sv.save_adapter(m, tmp_path / "fused", "fused")
    sv.detach(m, "fused")
    fuse(m, CONCEPTS, w, mode=res.mode, progress=False)
    m2 = sv.merge_and_unload(sv.load_adapter(create_model("tiny-clip-text"), tmp_path / "fused", progress=False))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("method", sv.available_methods())
def test_scale_is_the_strength_for_every_method(method):
    m = concepts(method=method, bands_=(0,), rank=2, alpha=0.7)
    for _, layer in sv.spectral_layers(m):
        d = layer.adapters["c0"]
        for s in (0.0, 0.5, 2.0):
            B, A = d.factors(s)
            torch.testing.assert_close(B @ A, d.delta_weight(s), atol=1e-5, rtol=1e-4)
        assert float(d.delta_weight(0.0).detach().abs().max()) == 0
        torch.testing.assert_close(d.delta_weight(1.0), d.delta_weight())
        if method != "spectral_r":  # linear methods: a multiple of ΔW
            torch.testing.assert_close(d.delta_weight(2.0), 2 * d.delta_weight(), atol=1e-5, rtol=1e-5)
        else:  # ^R: the generator is scaled; ΔW(2) is the concept trained with alpha 1.4 (orthogonal, not 2·ΔW)
            ref = sv.SpectralConfig(**{**d.cfg.to_dict(), "alpha": 1.4})
            cfg, d.cfg = d.cfg, ref
            want = d.delta_weight()
            d.cfg = cfg
            torch.testing.assert_close(d.delta_weight(2.0), want)
        break


@pytest.mark.parametrize("method", ["spectral_r", "spectral_a", "lowrank"])
def test_concat_is_the_exact_sum(method):
    m = concepts(method=method, bands_=(0, 1), rank=2, alpha=0.8)
    layer = next(layer for _, layer in sv.spectral_layers(m))
    ds = [layer.adapters[n] for n in ("c0", "c1")]
    scales = [1.25, 1.25] if method == "spectral_a" else [0.5, 3.0]
    alpha, state = type(ds[0]).concat(ds, scales)
    cols = [c for d in ds for c in d.columns.tolist()]
    layer.add_adapter("cat", sv.SpectralConfig(method=method, rank=len(cols) if method != "lowrank" else 4,
                                               alpha=alpha), cols)
    layer.adapters["cat"].load_state_dict({**state, "columns": layer.adapters["cat"].columns})
    want = sum(d.delta_weight(s) for d, s in zip(ds, scales))
    torch.testing.assert_close(layer.adapters["cat"].delta_weight(), want.detach(), atol=1e-5, rtol=1e-5)
    if method == "spectral_a":
        assert type(ds[0]).concat(ds, [1.0, 0.5]) is None  # not one ^A adapter: fusion stores factors instead


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
    m = concepts(bands_=(0, 1, 1))
    snap = snapshot(m, CONCEPTS)
    res = fuse(m, CONCEPTS, mode="mean", metrics=True, progress=False)
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
    m = concepts()
    inputs = {n: [torch.randint(0, 1000, (1, 6))] for n in CONCEPTS}
    rep = fuse(m, CONCEPTS, metrics=True, inputs=inputs, progress=False).metrics
    assert rep.activations and rep.overall["output_subspace_cos2"] < 1e-6 and rep.overall["input_subspace_cos2"] < 1e-6
    assert all(v < 1e-4 for v in rep.overall["own_direction_change"].values())
    assert all(v > 1e-3 for v in rep.overall["own_output_change"].values())  # inputs do see other bands
    rep.save_json(tmp_path / "i.json")
    rep.plot(tmp_path / "i.png")
    saved = json.loads((tmp_path / "i.json").read_text())
    assert saved["concepts"] == CONCEPTS and set(saved["legend"]) >= {"shared_band_columns", "own_output_change"}
    assert saved["summary"][0].startswith("bands: disjoint")
    assert (tmp_path / "i.png").stat().st_size > 1000


def test_metrics_disjoint_additive_bands_explain_their_subspace_cosine():
    """Issue 15: ^A concepts on disjoint bands share no band column; their output subspaces still overlap
    (A_U leaves the band) and the report says so instead of a scary "overlap"."""
    m = concepts(method="spectral_a", bands_=(0, 1), rank=2)
    rep = fuse(m, CONCEPTS[:2], metrics=True, progress=False).metrics
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


def test_non_finite_concepts_are_refused_before_writing():
    m = concepts(bands_=(0, 1))
    layer = next(layer for _, layer in sv.spectral_layers(m))
    with torch.no_grad():
        layer.adapters["c1"].skew_U[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fuse(m, CONCEPTS[:2], progress=False)
    assert set(sv.adapter_names(m)) == {"c0", "c1"}  # no fused adapter, nothing merged


def test_fusion_speed_benchmark_quick(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fusion_speed.py"
    spec = importlib.util.spec_from_file_location("fusion_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(mod.parse_args(["--quick", "--modes", "spectral", "least_squares", "--json", str(tmp_path / "r.json")]))
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
