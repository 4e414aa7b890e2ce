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
from fusion.compose import fused_adapter
from fusion.fuse import fuse
from fusion.metrics import spaces, principal_angles
from fusion.record import ls_objective
from tests.conftest import perturb

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
@pytest.mark.parametrize("model,preset", [("tiny-clip-text", "clip_text"),
                                          ("tiny-unet", r".*(attn1\.to_q|attn2\.to_k|resnets\.0\.conv1)")])
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
    m = concepts(method="spectral_r")
    snap = snapshot(m, CONCEPTS)
    w = [1.0, 1.0, 1.0] if mode == "mean" else [2.0, 1.0, 1.0]
    fuse(m, CONCEPTS, weights=w, mode=mode, progress=False)
    for ln, s in snap.items():
        singles = [s["W"] + s["d"][n] for n in CONCEPTS]  # the official code averages merged weights
        want = sum(wi * Wi for wi, Wi in zip(w, singles)) / sum(w)
        torch.testing.assert_close(fused_2d(m, ln, s["W"].shape), want, atol=1e-5, rtol=1e-5)
        if mode == "mean":  # = W0 + ΔW_i / N
            torch.testing.assert_close(want, s["W"] + sum(s["d"].values()) / 3, atol=1e-5, rtol=1e-5)


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
    sv.set_adapter(m, CONCEPTS)
    from fusion.record import least_squares_weights
    from fusion.fuse import adapted_layers

    one = [t for t in adapted_layers(m, CONCEPTS) if t[0] == "encoder.layers.1.self_attn.q_proj"]
    Wls = least_squares_weights(m, CONCEPTS, [1.0] * 3, {id(layer): dict(zip(CONCEPTS, G))}, 1e-6, one,
                                progress=False)[0][one[0][0]]
    f = lambda W: ls_objective(W, targets, G, [1.0] * 3)  # noqa: E731
    assert f(Wls) < f(W0 + sum(t - W0 for t in targets))
    E = torch.randn_like(Wls) * 1e-2
    assert f(Wls + E) > f(Wls) and f(Wls - E) > f(Wls)  # the normal equations' solution is the minimum


# ---- single-adapter composition, metrics --------------------------------------------------------------
@pytest.mark.parametrize("method,w", [("spectral_r", [1.0, 0.5, 2.0]), ("spectral_a", [0.7, 0.7, 0.7])])
def test_fused_adapter_equals_spectral_fusion(tmp_path, method, w):
    m = concepts(method=method, alpha=1.5)
    cfg = fused_adapter(m, CONCEPTS, w)
    assert cfg.rank == 9 and cfg.columns == list(range(9))
    sv.save_adapter(m, tmp_path / "fused", "fused")
    sv.detach(m, "fused")
    fuse(m, CONCEPTS, w, progress=False)
    m2 = sv.merge_and_unload(sv.load_adapter(create_model("tiny-clip-text"), tmp_path / "fused", progress=False))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)
    if method == "spectral_a":
        with pytest.raises(ValueError, match="different alpha"):
            fused_adapter(concepts(method=method), CONCEPTS, [1.0, 0.5, 1.0])


def test_metrics_angles_and_own_change():
    m = concepts(bands_=(0, 1, 1))
    snap = snapshot(m, CONCEPTS)
    res = fuse(m, CONCEPTS, mode="mean", metrics=True, progress=False)
    rep = res.metrics
    for ln, d in rep.layers.items():
        p01, p12 = d["pairs"]["c0|c1"], d["pairs"]["c1|c2"]
        assert p01["col_overlap"] < 1e-6 and abs(p01["col_angle"] - 90) < 1e-3 and p01["row_overlap"] < 1e-6
        assert p12["col_overlap"] > 0.1  # same band: the column spaces lie in the same 3-d subspace
        s = snap[ln]
        E = sum(s["d"].values()) / 3 - s["d"]["c0"]  # mean − single_0, weight space (no activations)
        assert abs(d["own_change"]["c0"] - float(E.norm() / s["d"]["c0"].norm())) < 1e-4
    assert not rep.activations and "OVERALL" in rep.table()
    Q = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64))[0]
    assert principal_angles(Q, Q)[0] == pytest.approx(1.0) and principal_angles(Q, Q)[1] == pytest.approx(0, abs=1e-3)
    B, A = torch.randn(10, 2), torch.randn(2, 7)
    Qc, Qr = spaces(B, A)
    assert Qc.shape == (10, 2) and torch.allclose((Qc @ Qc.T).float() @ (B @ A), B @ A, atol=1e-5)


def test_metrics_spectral_r_own_direction_change_is_zero(tmp_path):
    m = concepts()
    inputs = {n: [torch.randint(0, 1000, (1, 6))] for n in CONCEPTS}
    rep = fuse(m, CONCEPTS, metrics=True, inputs=inputs, progress=False).metrics
    assert rep.activations and rep.overall["col_overlap"] < 1e-6 and rep.overall["row_overlap"] < 1e-6
    assert all(v < 1e-4 for v in rep.overall["own_dir_change"].values())
    assert all(v > 1e-3 for v in rep.overall["own_change"].values())  # inputs do see other bands
    rep.save_json(tmp_path / "i.json")
    rep.plot(tmp_path / "i.png")
    assert json.loads((tmp_path / "i.json").read_text())["concepts"] == CONCEPTS
    assert (tmp_path / "i.png").stat().st_size > 1000


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
    assert (tmp_path / "fused" / "interference.png").exists() and (tmp_path / "fused" / "model_index.json").exists()
    fused = load_pipeline(str(tmp_path / "fused"))
    main(parse_args(common + ["--out", str(tmp_path / "ad"), "--format", "adapter", "--no-metrics"]))
    base = load_pipeline("builtin:tiny-sd")
    for comp in ("unet", "text_encoder"):
        mod = sv.merge_and_unload(sv.load_adapter(getattr(base, comp), tmp_path / "ad" / comp, progress=False))
        for (k, a), (_, b) in zip(mod.state_dict().items(), getattr(fused, comp).state_dict().items()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)
    with pytest.raises(SystemExit):
        parse_args(common[:-4] + ["--out", "x", "--weights", "1"])


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
