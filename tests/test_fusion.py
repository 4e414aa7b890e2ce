"""fusion/ composition: band registry, exact spectral composition, baselines, least squares, the fused adapter.

"Own-band output" of concept i on a layer: the layer output projected on the concept's band of left
singular vectors, ``Uᵢ Uᵢᵀ W x`` (``Uᵢ = U[:, columnsᵢ]`` of the base weight). Spectral fusion of
disjoint ^R concepts must give exactly the single-concept model's own-band output for every x.
Metrics, CLIP scoring, the command line and the benchmark: test_fusion_tools.py.
"""
import json

import pytest
import torch

import spectral_vision as sv
from spectral_vision.zoo import create_model

from fusion import bands
from fusion.backends import all_layers
from fusion.fuse import add_fused_adapter, fuse
from fusion.record import least_squares_weights, ls_objective
from helpers import FUSION_CONCEPTS, fusion_concepts, fusion_snapshot


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
    m = fusion_concepts(bands_=(0, 1))
    sv.attach(m, sv.SpectralConfig(method="spectral_a", rank=2, columns=[3, 6], target_modules="clip_text"), "c2",
              progress=False)
    for n in FUSION_CONCEPTS:
        sv.save_adapter(m, tmp_path / n, n)
    assert bands.find_overlaps([tmp_path / "c0", tmp_path / "c1"]).ok
    rep = bands.find_overlaps([tmp_path / n for n in FUSION_CONCEPTS])
    assert not rep.ok and {(o.a, o.b) for o in rep.overlaps} == {("c1", "c2")}
    assert all(o.columns == [3] for o in rep.overlaps) and len(rep.overlaps) == rep.layers_checked == 8
    assert "'c1' and 'c2' share columns in 8 layer(s)" in rep.explain() and "self_attn" in rep.explain()


# ---- spectral mode -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,preset", [("tiny-clip-text", "clip_text"), pytest.param(
    "tiny-unet", r".*(attn1\.to_q|attn2\.to_k|resnets\.0\.conv1)", marks=pytest.mark.slow)])
def test_spectral_r_keeps_singular_values_and_own_band(model, preset):
    m = fusion_concepts(model, preset=preset, rank=2)
    snap = fusion_snapshot(m, FUSION_CONCEPTS)
    res = fuse(m, FUSION_CONCEPTS, progress=False)
    assert not sv.adapter_names(m) and len(res.layers) == len(snap) and res.overlap.ok
    for ln, s in snap.items():
        W0, Wf = s["W"], fused_2d(m, ln, s["W"].shape)
        s0, sf = torch.linalg.svdvals(W0.double()), torch.linalg.svdvals(Wf.double())
        assert torch.allclose(sf, s0, rtol=0, atol=2e-5 * float(s0[0])), ln  # every singular value kept
        U = sv.decompose(W0, 6, "exact").U  # (out, 6): bands 0, 1, 2 of rank 2
        x = torch.randn(W0.shape[1], 5)
        moved = 0.0
        for i, n in enumerate(FUSION_CONCEPTS):
            Ui = U[:, s["cols"][n]]
            single = W0 + s["d"][n]
            torch.testing.assert_close(Ui.T @ (Wf @ x), Ui.T @ (single @ x), atol=2e-5, rtol=1e-5)
            moved += float((Ui.T @ (single - W0)).norm())
        assert moved > 1e-2  # the concepts do change their bands
        P = U @ U.T  # outside every band the fused layer is the base
        torch.testing.assert_close((torch.eye(len(P)) - P) @ Wf, (torch.eye(len(P)) - P) @ W0, atol=2e-5, rtol=0)


def test_spectral_a_is_exact_sum_and_weights_scale_linearly():
    m = fusion_concepts(method="spectral_a", alpha=0.5)
    snap = fusion_snapshot(m, FUSION_CONCEPTS)
    w = [1.0, 0.25, -2.0]
    fuse(m, FUSION_CONCEPTS, weights=w, progress=False)
    for ln, s in snap.items():
        want = s["W"] + sum(wi * s["d"][n] for wi, n in zip(w, FUSION_CONCEPTS))
        torch.testing.assert_close(fused_2d(m, ln, s["W"].shape), want, atol=1e-5, rtol=1e-5)


def test_spectral_r_weight_scales_generator():
    """^R strength w = the concept trained with alpha·w (orthogonal for every w); w = 0 removes it."""
    m = fusion_concepts()
    ref = fusion_concepts()
    for n in FUSION_CONCEPTS:  # the same concepts with alpha scaled by hand
        for _, layer in sv.spectral_layers(ref):
            layer.adapters[n].cfg = sv.SpectralConfig(**{**layer.adapters[n].cfg.to_dict(),
                                                         "alpha": {"c0": 0.5, "c1": 0.0, "c2": 3.0}[n]})
    want = {ln: l.weight_2d() + l.adapters["c0"].delta_weight() + l.adapters["c2"].delta_weight()
            for ln, l in sv.spectral_layers(ref)}
    assert all(float(l.adapters["c1"].delta_weight().detach().abs().max()) == 0 for _, l in sv.spectral_layers(ref))
    fuse(m, FUSION_CONCEPTS, weights=[0.5, 0.0, 3.0], progress=False)
    for ln, W in want.items():
        torch.testing.assert_close(fused_2d(m, ln, W.shape), W.detach(), atol=1e-5, rtol=1e-5)


def test_overlap_refused_with_explanation_unless_allowed():
    m = fusion_concepts(bands_=(0, 1, 1))
    with pytest.raises(ValueError, match=r"'c1' and 'c2' share columns in 8 layer\(s\)"):
        fuse(m, FUSION_CONCEPTS, progress=False)
    assert set(sv.adapter_names(m)) == set(FUSION_CONCEPTS)  # nothing fused
    snap = fusion_snapshot(m, FUSION_CONCEPTS)
    res = fuse(m, FUSION_CONCEPTS, allow_overlap=True, progress=False)
    assert not res.overlap.ok
    for ln, s in snap.items():
        torch.testing.assert_close(fused_2d(m, ln, s["W"].shape), s["W"] + sum(s["d"].values()), atol=1e-5, rtol=1e-5)


# ---- baselines -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mean", "weighted"])
def test_mean_dilutes_each_delta(mode):
    m = fusion_concepts(method="spectral_a")  # linear in its strength: the official averages of merged weights
    snap = fusion_snapshot(m, FUSION_CONCEPTS)
    w = [1.0, 1.0, 1.0] if mode == "mean" else [2.0, 1.0, 1.0]
    fuse(m, FUSION_CONCEPTS, weights=w, mode=mode, progress=False)
    for ln, s in snap.items():
        singles = [s["W"] + s["d"][n] for n in FUSION_CONCEPTS]  # the official code averages merged weights
        want = sum(wi * Wi for wi, Wi in zip(w, singles)) / sum(w)
        torch.testing.assert_close(fused_2d(m, ln, s["W"].shape), want, atol=1e-5, rtol=1e-5)
        if mode == "mean":  # = W0 + ΔW_i / N
            torch.testing.assert_close(want, s["W"] + sum(s["d"].values()) / 3, atol=1e-5, rtol=1e-5)


def test_weights_have_one_meaning_the_strength():
    """Every mode starts from ΔW_i(w_i) = delta_weight(scale=w_i): for ^R (non-linear in w) mean at w is
    W0 + Σ ΔW_i(w_i) / N, and least_squares' targets are the concepts at their strengths."""
    w = [0.5, 2.0, 1.0]
    m = fusion_concepts()
    want = {ln: l.weight_2d() + sum(l.adapters[n].delta_weight(wi).detach() for n, wi in zip(FUSION_CONCEPTS, w)) / 3
            for ln, l in sv.spectral_layers(m)}
    fuse(m, FUSION_CONCEPTS, weights=w, mode="mean", progress=False)
    for ln, W in want.items():
        torch.testing.assert_close(fused_2d(m, ln, W.shape), W, atol=1e-5, rtol=1e-5)
    for bad in ([float("nan"), 1.0, 1.0], [1.0, float("inf"), 1.0], [1.0, 1.0]):
        m = fusion_concepts()
        with pytest.raises(ValueError, match="finite|weights for"):
            fuse(m, FUSION_CONCEPTS, weights=bad, progress=False)
        assert set(sv.adapter_names(m)) == set(FUSION_CONCEPTS)  # nothing fused, nothing written


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
    m = fusion_concepts(bands_=(0, 1, 1))  # two concepts overlap: the naive sum interferes
    g = torch.Generator().manual_seed(0)
    inputs = {n: [torch.randint(0, 1000, (2, 9), generator=g)] for n in FUSION_CONCEPTS}
    res = fuse(m, FUSION_CONCEPTS, mode="least_squares", inputs=inputs, ridge=1e-6, metrics=True, unload=False,
               progress=False)
    assert res.info["objective"] < 0.5 * res.info["objective_naive_sum"]
    assert res.adapter == "fused" and res.info["fused_method"] == "lowrank"  # a named adapter, concepts kept
    layer = dict(sv.spectral_layers(m))["encoder.layers.1.self_attn.q_proj"]
    # recompute the objective from freshly captured inputs X_i of each single-concept model
    X = {}
    h = layer.register_forward_pre_hook(lambda mod, a: X.__setitem__(cur[0], a[0].detach().reshape(-1, a[0].shape[-1])))
    sv.unmerge(m)
    for n in FUSION_CONCEPTS:
        cur = [n]
        sv.set_adapter(m, n)
        m(inputs[n][0])
    h.remove()
    W0 = layer.weight_2d()
    targets = [W0 + layer.adapters[n].delta_weight().detach() for n in FUSION_CONCEPTS]
    G = [X[n].T @ X[n] for n in FUSION_CONCEPTS]
    one = [t for t in all_layers(m, FUSION_CONCEPTS) if t[0].name == "encoder.layers.1.self_attn.q_proj"]
    grams = {one[0][0].name: dict(zip(FUSION_CONCEPTS, G))}
    Wls = W0 + least_squares_weights(one, FUSION_CONCEPTS, [1.0] * 3, grams, 1e-6, progress=False)[0][one[0][0].name]
    f = lambda W: ls_objective(W, targets, G, [1.0] * 3)  # noqa: E731
    assert f(Wls) < f(W0 + sum(t - W0 for t in targets))
    E = torch.randn_like(Wls) * 1e-2
    assert f(Wls + E) > f(Wls) and f(Wls - E) > f(Wls)  # the normal equations' solution is the minimum


# ---- the named fused adapter, scale, concat ------------------------------------------------------------
@pytest.mark.parametrize("method,w,fused_method", [("spectral_r", [1.0, 0.5, 2.0], "spectral_r"),
                                                   ("spectral_a", [0.7, 0.7, 0.7], "spectral_a"),
                                                   ("spectral_a", [1.0, 0.5, 1.0], "lowrank"),
                                                   ("svdiff", [1.0, 0.5, 2.0], "lowrank")])
def test_fused_adapter_saves_loads_and_merges_to_the_fusion(tmp_path, method, w, fused_method):
    bands_ = (0, 1, 2) if method != "svdiff" else (0, 0, 0)
    m = fusion_concepts(method=method, alpha=1.5, bands_=bands_)
    mode = "spectral" if method != "svdiff" else "lora_sum"
    res = add_fused_adapter(m, FUSION_CONCEPTS, w, mode=mode, progress=False)
    cfg = sv.adapter_config(m, "fused")
    assert res.adapter == "fused" and cfg.method == res.info["fused_method"] == fused_method
    if fused_method == "spectral_r":
        assert cfg.rank == 9 and cfg.columns == list(range(9))
    sv.save_adapter(m, tmp_path / "fused", "fused")
    sv.detach(m, "fused")
    fuse(m, FUSION_CONCEPTS, w, mode=res.mode, progress=False)
    m2 = sv.merge_and_unload(sv.load_adapter(create_model("tiny-clip-text"), tmp_path / "fused", progress=False))
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("method", sv.available_methods())
def test_scale_is_the_strength_for_every_method(method):
    m = fusion_concepts(method=method, bands_=(0,), rank=2, alpha=0.7)
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
    m = fusion_concepts(method=method, bands_=(0, 1), rank=2, alpha=0.8)
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


def test_non_finite_concepts_are_refused_before_writing():
    m = fusion_concepts(bands_=(0, 1))
    layer = next(layer for _, layer in sv.spectral_layers(m))
    with torch.no_grad():
        layer.adapters["c1"].skew_U[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fuse(m, FUSION_CONCEPTS[:2], progress=False)
    assert set(sv.adapter_names(m)) == {"c0", "c1"}  # no fused adapter, nothing merged
