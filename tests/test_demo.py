"""demos/ (sessions, uploads, views): concept loading and validation, shared base, cached fusions, tables.

Concepts are real spectral_vision adapter folders in the layout of ``training/dreambooth_spectral.py``
(``unet/`` + ``text_encoder/``), attached to ``builtin:tiny-sd`` (32 px) in given bands and perturbed.
"""
import copy
import hashlib
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import spectral_vision as sv
from helpers import perturb

from demos.sessions import AppConfig, PipelineCache, Session
from demos.store import SessionStore
from demos.uploads import check_allowed, check_base, parse_seeds, stage_upload
from demos.views import (
    builtin_concept_folders, concept_rows, default_prompt, interference_rows, list_concept_folders, spectrum_figure,
)

PRESETS = (("unet", "sd_unet"), ("text_encoder", "clip_text"))


def make_concept(pipe, folder, band, method="spectral_r", rank=2, seed=0, prompt=None, parts=PRESETS):
    """Write a concept folder: one perturbed adapter per component on singular band ``band`` of ``pipe``."""
    for comp, preset in parts:
        mod = copy.deepcopy(getattr(pipe, comp))
        sv.attach(mod, sv.SpectralConfig(method=method, rank=rank, band=band, target_modules=preset), progress=False)
        perturb(mod, std=0.3, seed=seed)
        sv.save_adapter(mod, Path(folder) / comp, extra_metadata={"instance_prompt": prompt} if prompt else None)
    return Path(folder)


def state_hash(module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A pipeline cache with builtin:tiny-sd and a concepts folder: cat (band 0), dog (band 1), clash (^A on
    band 0: overlaps cat), alien (adapters of another base with the same layer shapes)."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRAL_VISION_CACHE", str(base / "svcache"))
        root = tmp_path_factory.mktemp("concepts")
        cfg = AppConfig(model="builtin:tiny-sd", concepts_dirs=[root], upload_dir=tmp_path_factory.mktemp("up"),
                        record_timesteps=(999,))
        cache = PipelineCache()
        pipe = cache.get("builtin:tiny-sd")
        make_concept(pipe, root / "cat", 0, seed=1, prompt="a photo of sks cat")
        make_concept(pipe, root / "dog", 1, seed=2, prompt="a photo of zwx dog")
        make_concept(pipe, root / "clash", 0, method="spectral_a", seed=3, parts=PRESETS[:1])
        other = copy.deepcopy(pipe)
        with torch.no_grad():
            for p in other.unet.parameters():
                p.mul_(1.5)  # same names and shapes, other singular values
        make_concept(other, root / "alien", 0, seed=4, parts=PRESETS[:1])
        yield cfg, cache, root


def test_paths_and_inputs(env, tmp_path):
    cfg, _, root = env
    assert list_concept_folders(cfg.concepts_dirs) == [str(root / n) for n in ("alien", "cat", "clash", "dog")]
    assert check_allowed(root / "cat" / ".." / "dog", [root]) == (root / "dog").resolve()
    for bad in (tmp_path, root / ".." / "x", "/etc"):
        with pytest.raises(ValueError, match="outside the allowed"):
            check_allowed(bad, [root])
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)  # a link inside pointing outside
    try:
        with pytest.raises(ValueError, match="outside the allowed"):
            check_allowed(root / "escape", [root])
    finally:
        (root / "escape").unlink()
    assert check_base("builtin:tiny-sd", cfg.model, []) == "builtin:tiny-sd"
    assert check_base("org/some-model", cfg.model, []) == "org/some-model"  # hub id (loaded later, may fail cleanly)
    for bad, msg in (("builtin:nope", "unknown built-in"), (str(tmp_path), "not allowed"), ("../x", "not allowed")):
        with pytest.raises(ValueError, match=msg):
            check_base(bad, cfg.model, cfg.model_dirs)
    assert parse_seeds(" 3, 1 4", 4) == [3, 1, 4]
    for bad in ("", "1,1", "-1", "a", "1,2,3,4,5"):
        with pytest.raises(ValueError):
            parse_seeds(bad, 4)


def test_stage_upload_layouts_and_zip_slip(env, tmp_path):
    _, _, root = env
    z = tmp_path / "cat.zip"
    with zipfile.ZipFile(z, "w") as f:  # zip of the folder itself: cat/unet/..., cat/text_encoder/...
        for p in (root / "cat").rglob("*"):
            f.write(p, p.relative_to(root))
    out = stage_upload([z], tmp_path / "up", 2 ** 30)
    assert out.name.startswith("cat-") and (out / "unet" / "adapter_config.json").exists()
    pair = [root / "dog" / "unet" / n for n in ("adapter_config.json", "adapter_model.safetensors")]
    assert sorted(p.name for p in stage_upload(pair, tmp_path / "up", 2 ** 30, "d").iterdir()) == sorted(
        p.name for p in pair)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as f:
        f.writestr("../../outside.txt", "x")
    with pytest.raises(ValueError, match="outside the folder"):
        stage_upload([evil], tmp_path / "up", 2 ** 30)
    assert not (tmp_path / "outside.txt").exists()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="upload a .zip"):
        stage_upload([tmp_path / "notes.txt"], tmp_path / "up", 2 ** 30)
    (tmp_path / "bad.zip").write_text("nope")
    with pytest.raises(ValueError, match="not a valid zip"):
        stage_upload([tmp_path / "bad.zip"], tmp_path / "up", 2 ** 30)
    with pytest.raises(ValueError, match="too large"):
        stage_upload([z], tmp_path / "up", 10)
    assert len(list((tmp_path / "up").iterdir())) == 2  # refused uploads leave nothing behind


@pytest.mark.slow
def test_generate_fuses_on_a_copy(env):
    cfg, cache, root = env
    base = cache.get("builtin:tiny-sd")
    before = {c: state_hash(getattr(base, c)) for c in ("unet", "text_encoder")}
    s = Session(cfg, cache)
    for n in ("cat", "dog"):
        c = s.add_concept(root / n)
        assert c.method == "spectral_r" and c.rank == 2 and set(c.parts) == {"unet", "text_encoder"}
    assert s.concepts["dog"].band == "2-3" and s.concepts["cat"].prompt == "a photo of sks cat"
    headers, rows = concept_rows(s.concepts, s.overlap())
    assert [r[0] for r in rows] == ["cat", "dog"] and all(r[-1] == "disjoint" for r in rows)
    ticks = []
    r = s.generate("a photo", [0], steps=2, guidance=3.0, strengths={"dog": 0.0},
                   progress=lambda f, d: ticks.append(f))
    assert ticks[-1] == 1.0 and ticks == sorted(ticks)
    caps = [c for _, c in r.gallery]
    assert caps == ["fused (spectral), seed 0", "cat alone (w=1), seed 0", "dog alone (w=0), seed 0", "base, seed 0"]
    img = {c.split(",")[0]: np.asarray(i) for i, c in r.gallery}
    assert img["base"].shape == (192, 192, 3)  # 32 px shown at 6x
    # dog at strength 0 is the identity rotation: fused == cat alone (one adapter of rank 4 vs the concept's
    # rank 2: equal up to float rounding), dog alone == base bit for bit (its delta is exactly 0)
    assert np.abs(img["fused (spectral)"].astype(int) - img["cat alone (w=1)"]).max() <= 2
    np.testing.assert_array_equal(img["dog alone (w=0)"], img["base"])
    assert np.abs(img["cat alone (w=1)"].astype(int) - img["base"]).max() > 0
    # the shared base is untouched; a second session (other concepts) reproduces the base image
    assert {c: state_hash(getattr(base, c)) for c in ("unet", "text_encoder")} == before
    s2 = Session(cfg, cache)
    s2.add_concept(root / "dog")
    r2 = s2.generate("a photo", [0], steps=2, guidance=3.0, strengths={"dog": 0.0}, include_base=False)
    assert r2.columns == 2
    np.testing.assert_array_equal(np.asarray(r2.gallery[0][0]), img["base"])  # fused dog at w=0
    # concurrent sessions (as the queue runs them, one thread each) reproduce their sequential images
    out = {}
    threads = [threading.Thread(target=lambda k, ss, w: out.__setitem__(k, ss.generate(
        "a photo", [0], steps=2, guidance=3.0, strengths=w, include_base=False)), args=a)
        for a in (("s", s, {"dog": 0.0}), ("s2", s2, {"dog": 0.0}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(np.asarray(out["s"].gallery[0][0]), img["fused (spectral)"])  # cached fusion
    np.testing.assert_array_equal(np.asarray(out["s"].gallery[1][0]), img["cat alone (w=1)"])
    np.testing.assert_array_equal(np.asarray(out["s2"].gallery[0][0]), img["base"])
    assert {c: state_hash(getattr(base, c)) for c in ("unet", "text_encoder")} == before
    # disjoint ^R bands: every singular value kept, each concept's own-direction change is 0
    rep = r.interference
    assert rep.concepts == ["cat", "dog"] and rep.activations
    assert rep.overall["own_direction_change"]["cat"] < 1e-5 and rep.overall["shared_band_columns"] == 0
    assert rep.overall["output_subspace_cos2"] < 1e-5 and "bands: disjoint" in rep.explain()
    h, rows = interference_rows(rep)
    assert rows[0][0] == "OVERALL" and len(h) == 4 + 2 * 2 and len(rows) == 9
    s0, s1, bands = s.spectrum(r.layers[0])
    assert torch.allclose(s0, s1, rtol=1e-4, atol=1e-5) and set(bands) == {"cat", "dog"}
    assert spectrum_figure(s0, s1, bands, r.layers[0]).axes
    with pytest.raises(ValueError, match="not an adapted layer"):
        s.spectrum("unet.conv_in")


def test_bad_inputs_leave_the_session_intact(env, tmp_path):
    cfg, cache, root = env
    s = Session(cfg, cache)
    s.add_concept(root / "cat")
    keys = sv.adapter_names(s.work)
    with pytest.raises(sv.AdapterFileError, match="base weights differ"):
        s.add_concept(root / "alien")
    with pytest.raises(ValueError, match="outside the allowed"):
        s.add_concept(tmp_path)
    with pytest.raises(ValueError, match="already added"):
        s.add_concept(root / "cat", "cat2")
    with pytest.raises(ValueError, match="not a concept folder"):
        s.add_concept(root)
    # a truncated tensor file with its genuine config: refused, staged files deleted
    (tmp_path / "adapter_config.json").write_bytes((root / "cat/unet/adapter_config.json").read_bytes())
    tensors = (root / "cat/unet/adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(tensors[:-9])
    with pytest.raises(sv.AdapterFileError, match="truncated or modified"):
        s.add_upload([tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"], "broken")
    assert not any(s.upload_dir.iterdir())
    assert list(s.concepts) == ["cat"] and sv.adapter_names(s.work) == keys
    (tmp_path / "adapter_config.json").write_text("not an adapter")  # not JSON: a clear refusal, not a raw error
    with pytest.raises(sv.AdapterFileError, match="not a valid spectral_vision adapter config"):
        s.add_upload([tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"], "bogus")
    # overlapping bands: added, reported, refused by spectral fusion unless allowed
    s.add_concept(root / "clash")
    rows = concept_rows(s.concepts, s.overlap())[1]
    assert dict((r[0], r[-1]) for r in rows) == {"cat": "shares columns with clash", "clash": "shares columns with cat"}
    with pytest.raises(ValueError, match="overlapping bands"):
        s.generate("a photo", [0], steps=1)
    assert s.fusion(["cat", "clash"], [1.0, 1.0], "spectral", True).result.overlap.overlaps
    for bad in (dict(prompt=" "), dict(steps=0), dict(mode="nope"), dict(strengths={"x": 1.0})):
        with pytest.raises(ValueError):
            s.generate(**{"prompt": "a", "seeds": [0], "steps": 1, **bad})
    # uploads work; removing restores the base weights exactly
    up = s.add_upload([root / "dog" / "text_encoder" / n for n in ("adapter_config.json", "adapter_model.safetensors")],
                      "dogtext")
    assert set(up.parts) == {"text_encoder"} and up.folder.is_relative_to(s.upload_dir)
    base = cache.get("builtin:tiny-sd")
    for n in ("clash", "dogtext", "cat"):
        s.remove_concept(n)
    assert not s.concepts and not sv.adapter_names(s.work)
    for c in ("unet", "text_encoder"):
        assert state_hash(s.work[c]) == state_hash(getattr(base, c))


def test_app_builds_and_cli_defaults(env):
    gr = pytest.importorskip("gradio")
    from demos.fusion_app import build_app, parse_args

    a = parse_args([])
    assert (a.host, a.share, a.concepts_dir) == ("127.0.0.1", False, ["concepts"])
    cfg, cache, _ = env
    app, _ = build_app(cfg, SessionStore(cfg, cache), ["builtin:tiny-sd"])
    assert isinstance(app, gr.Blocks)


# ---- issue 14 item 2: one frozen base shared by every session; bounded, expiring sessions -------------------
def test_sessions_share_the_base_weights_and_are_bounded(env):
    cfg, cache, root = env
    base = cache.get("builtin:tiny-sd")
    base_ptrs = {c: {t.data_ptr() for t in getattr(base, c).state_dict().values()} for c in ("unet", "text_encoder")}
    clock = [0.0]
    small = AppConfig(model=cfg.model, concepts_dirs=cfg.concepts_dirs, upload_dir=cfg.upload_dir,
                      preload=[root / "cat"], max_sessions=2, session_ttl_s=60, record_timesteps=(999,))
    store = SessionStore(small, cache, clock=lambda: clock[0])
    s1, note = store.open(None)
    assert note == "" and list(s1.concepts) == ["cat"]  # preloaded
    for c in ("unet", "text_encoder"):  # no weight copied: every base tensor of the session is the base's own
        mine = {n: t for n, t in s1.work[c].state_dict().items() if ".adapters." not in n}
        assert {t.data_ptr() for t in mine.values()} <= base_ptrs[c]
        own = sum(t.numel() * t.element_size() for t in mine.values() if t.data_ptr() not in base_ptrs[c])
        assert own == 0
    assert store.open(s1.id)[0] is s1
    s2, _ = store.open(None)
    s3, _ = store.open(None)  # over max_sessions=2: the least recently used (s1) is closed
    assert len(store) == 2 and s1.work is None
    again, note = store.open(s1.id)
    assert again is not s1 and "expired" in note
    clock[0] = 61.0  # idle beyond the ttl: closed on the next access
    fresh, _ = store.open(None)
    assert len(store) == 1 and s2.work is None and s3.work is None
    store.close(fresh.id)
    assert len(store) == 0 and fresh.work is None


def test_one_generate_fuses_once_and_a_second_click_not_at_all(env, monkeypatch):
    cfg, cache, root = env
    import demos.sessions as sessions

    calls = []
    real = sessions.add_fused_adapter
    monkeypatch.setattr(sessions, "add_fused_adapter", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    s = Session(cfg, cache)
    for n in ("cat", "dog"):
        s.add_concept(root / n)
    s.generate("a photo", [0], steps=1, strengths={"cat": 1.0, "dog": 0.5}, include_base=False)
    assert len(calls) == 2  # the fusion of both, and dog alone at 0.5 (cat alone at 1 is the concept itself)
    s.generate("a photo", [0], steps=1, include_base=False)
    assert len(calls) == 2  # same selection: cached
    s.generate("a photo", [0], steps=1, strengths={"dog": 1.0}, include_base=False)
    assert len(calls) == 3  # a new selection: one fusion


# ---- issue 14 item 8: uploads ------------------------------------------------------------------------------
def test_upload_temp_files_are_deleted_and_many_entry_zips_refused_fast(env, tmp_path):
    _, _, root = env
    pair = []
    for n in ("adapter_config.json", "adapter_model.safetensors"):
        pair.append(tmp_path / n)
        pair[-1].write_bytes((root / "dog" / "unet" / n).read_bytes())
    out = stage_upload(pair, tmp_path / "up", 2 ** 30, "d", consume=True)
    assert not any(f.exists() for f in pair) and (out / "adapter_config.json").exists()  # Gradio's copies gone
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w") as f:
        for i in range(5000):
            f.writestr(f"e{i}", b"")
    with pytest.raises(ValueError, match="5000 entries"):
        stage_upload([bomb], tmp_path / "up", 2 ** 30, consume=True)
    assert not bomb.exists() and len(list((tmp_path / "up").iterdir())) == 1  # refused: nothing extracted


# ---- issue 15: defaults that fit the digits base ------------------------------------------------------------
def test_default_prompt_and_builtin_concepts():
    assert default_prompt([]) == "a handwritten digit 7"
    assert default_prompt(["a handwritten digit 3 bld", "a handwritten digit {digit} slt", None]) == \
        "a handwritten digit 7 bld slt"
    found, note = builtin_concept_folders()
    assert all(p.is_dir() for p in found.values())
    assert bool(found) != bool(note)  # either concepts, or a note saying why there are none
