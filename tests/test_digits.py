"""builtin:digits (the trained offline base), its pretraining / evaluation scripts, the digit concepts and
the fusion benchmark's --quick mode."""
import json

import numpy as np
import pytest
import torch

from spectral_vision.assets import DIGITS_BASE, pipeline_from_asset, read_metadata
from training import digit_concepts as dc
from training.eval_digits_base import DigitJudge, load_digit_images, split_indices


@pytest.fixture(scope="module")
def heldout():
    images, labels = load_digit_images()
    tr, ho = split_indices(labels, 0.3, 0)
    return images, labels, tr, ho


@pytest.mark.slow
def test_builtin_digits_offline_draws_the_prompted_digit(monkeypatch, heldout):
    """The shipped base loads offline (no hub) as a real StableDiffusionPipeline and draws the asked digit."""
    from diffusers import StableDiffusionPipeline

    from spectral_vision.integrations.diffusers import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert DIGITS_BASE.stat().st_size <= 12 * 2 ** 20
    pipe = load_pipeline("builtin:digits")
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    out = pipe([f"a handwritten digit {d}" for d in range(10)], num_inference_steps=20, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32)
    images, labels, tr, ho = heldout
    judge = DigitJudge().fit(images[ho], labels[ho])
    gray = np.stack([np.asarray(im, dtype=np.float32).mean(-1) / 255 for im in out.images])  # (10, 32, 32)
    assert (judge.predict(gray) == np.arange(10)).mean() >= 0.8
    recipe = read_metadata()["recipe"]  # the split the judge above used is the recorded one
    assert recipe["split"]["heldout"] == ho.tolist()


def test_concept_transforms_move_their_signature(heldout):
    images, labels, tr, ho = heldout
    x = images[ho[:40]]
    base = dc.signatures(x)
    bold, slant, small, inv = (dc.signatures(dc.apply([c], x)) for c in ("bold", "slant", "small", "invert"))
    assert (bold["bold"] > base["bold"] + 2).mean() > 0.9  # strokes thicker by > 2 px
    assert np.median(slant["slant"] - base["slant"]) > 15  # shear 0.45 ~ +24 degrees
    assert abs(np.median(bold["slant"] - base["slant"])) < 3 and abs(np.median(slant["bold"] - base["bold"])) < 1.5
    # small: a 0.7 scale multiplies the vertical size by ~0.7; a shear keeps it, a dilation moves it little
    np.testing.assert_allclose(np.median(small["small"] / base["small"]), 0.7, atol=0.03)
    assert abs(np.median(slant["small"] - base["small"])) < 0.3 and abs(np.median(bold["small"] - base["small"])) < 0.5
    assert abs(np.median(small["slant"] - base["slant"])) < 3  # scaling keeps the slant angle
    assert (dc.background(dc.apply(["small"], x)) < 0.1).all()  # the page stays dark (no grey fill at the edges)
    # faint: grey ink at half the level; stroke width and slant are measured relative to the ink level, so unchanged
    faint = dc.signatures(dc.apply(["faint"], x))
    np.testing.assert_allclose(faint["faint"], 0.5 * base["faint"], rtol=1e-5)
    np.testing.assert_allclose(faint["bold"], base["bold"], rtol=1e-5)
    np.testing.assert_allclose(faint["slant"], base["slant"], atol=1e-3)
    assert abs(np.median(bold["faint"] - base["faint"])) < 0.1 and abs(np.median(slant["faint"] - base["faint"])) < 0.1
    assert (inv["invert"] > 0.5).all() and (base["invert"] < 0.5).all()
    # polarity-aware: inverting keeps the other signatures exactly, and composes with the others
    np.testing.assert_array_equal(inv["bold"], base["bold"])
    np.testing.assert_array_equal(inv["slant"], base["slant"])
    np.testing.assert_allclose(dc.apply(["bold", "invert"], x), 1 - dc.apply(["bold"], x), atol=1e-6)
    with pytest.raises(ValueError, match="share a token"):  # the sets beyond CONCEPTS reuse measured tokens
        dc.concept_prompt(["faint", "invert"], 3)
    tb, ti = dc.CONCEPTS["bold"].token, dc.ALL_CONCEPTS["invert"].token
    assert dc.concept_prompt(["invert", "bold"], 3) == f"a handwritten digit 3 {tb} {ti}"


@pytest.mark.slow
def test_pretrain_tiny_run_resumes_exports_and_evaluates(tmp_path, monkeypatch):
    """A shrunk pretraining run: VAE, UNet (then resumed to one more step), fp16 export, evaluation."""
    from training import eval_digits_base
    from training import pretrain_digits_base as pre

    asset = tmp_path / "asset.safetensors"
    common = ["--output_dir", str(tmp_path / "run"), "--asset", str(asset), "--vae_channels", "8", "16", "16",
              "--unet_channels", "16", "32", "--text_hidden", "32", "--vae_steps", "2", "--vae_batch_size", "4",
              "--train_batch_size", "4", "--checkpointing_steps", "1", "--eval_samples", "0"]
    pre.main(pre.parse_args(common + ["--stage", "vae"]))
    pre.main(pre.parse_args(common + ["--stage", "unet", "--max_train_steps", "2"]))
    ck = torch.load(tmp_path / "run/unet_checkpoint.pt", weights_only=True)
    assert ck["step"] == 2
    rec = pre.main(pre.parse_args(common + ["--stage", "unet", "--max_train_steps", "3"]))
    assert rec["unet_steps"] == 3 and rec["resumed_from_step"] == 2  # resumed, not restarted
    rec = pre.main(pre.parse_args(common + ["--stage", "export"]))
    meta = read_metadata(asset)
    assert meta["recipe"]["unet_steps"] == 3 and meta["recipe"]["split"]["heldout"]
    pipe = pipeline_from_asset(asset)
    pipe.set_progress_bar_config(disable=True)
    res = eval_digits_base.evaluate(pipe, meta["recipe"], num_samples=10, guidances=(2.0,), steps=2, progress=False)
    assert 0.0 <= res["accuracy"]["2.0"] <= 1.0 and res["memorisation"]["ratio"] > 0
    assert res["judge_accuracy_on_train_digits"] > 0.95


@pytest.mark.slow
def test_fusion_digits_quick(tmp_path):
    """The benchmark end to end, shrunk: per-image-caption DreamBooth runs, solo and fused measurements, export."""
    import fusion_digits

    args = fusion_digits.parse_args(["--quick", "--output_dir", str(tmp_path), "--export_assets",
                                     str(tmp_path / "assets")])
    res = fusion_digits.main(args)
    assert {(x["method"], x["concept"]) for x in res["solo"]} == {("spectral_a", "bold"), ("spectral_a", "faint")}
    for x in res["solo"]:
        assert x["concept_prompt"]["n"] == 10 and 0 <= x["summary"]["acc_concept"] <= 1
    assert {(f["mode"], f["set"]) for f in res["fused"]} == {("spectral", "bold+faint"), ("mean", "bold+faint")}
    for f in res["fused"]:
        assert set(f["kept"]) == {"bold", "faint"} and f["fusion_seconds"] >= 0
        for c, v in f["kept_vs_real"].items():  # kept against what real combined digits keep
            np.testing.assert_allclose(v * f["real_kept"][c], f["kept"][c], rtol=1e-6)
        assert f["meets_vs_real"] == (f["all_tokens"]["accuracy"] >= fusion_digits.TARGETS["fused_acc"]
                                      and min(f["kept_vs_real"].values()) >= fusion_digits.TARGETS["kept"])
    meta = (tmp_path / "tmp/fusion_digits/data/bold/metadata.jsonl").read_text().splitlines()
    assert json.loads(meta[7])["text"] == dc.concept_prompt(["bold"], 7)  # per-image captions with the digit
    assert (tmp_path / "fusion_digits.md").read_text().count("| spectral_a |") == 4
    assert (tmp_path / "fusion_digits.png").exists()
    info = json.loads((tmp_path / "assets/bold/concept.json").read_text())
    assert info["band"] == 0 and (tmp_path / "assets/bold/unet/adapter_config.json").exists()


def test_fusion_digits_recipes_per_concept_and_layer_sets():
    import fusion_digits as fd

    args = fd.parse_args(["--recipe", "slant=2e-3,50,unet,conv", "--output_dir", "/nonexistent"])
    assert args.recipe["slant"] == (2e-3, 50, None, "conv") and args.recipe["bold"] == fd.RECIPES["bold"]
    assert fd.recipe_id(args.recipe["slant"]) == "lr0.002_s50_unet_conv"
    assert fd.recipe_id((3e-4, 600, 3e-4, "attn")) == "lr0.0003_s600_te"  # the ids of the earlier runs
    every = fd.parse_args(["--recipe", "1e-3,10,1e-4", "--output_dir", "/nonexistent"]).recipe
    assert set(every.values()) == {(1e-3, 10, 1e-4, "attn")}
    for bad in (["italic=1e-3,10,unet"], ["1e-3,10"], ["1e-3,10,unet,mlp"], ["1e-3,10,unet,conv,x"]):
        with pytest.raises(SystemExit):
            fd.parse_args(["--recipe", *bad])
    assert set(fd.LAYERS.values()) <= {"sd_unet", "sd_unet_conv", "sd_unet_resnet"}
    assert fd.parse_recipe("3e-3,10,unet,resnet") == (3e-3, 10, None, "resnet")
    with pytest.raises(SystemExit):
        fd.parse_args(["--context", "1.5"])
    ctx = fd.parse_args(["--context", "0.5", "--output_dir", "/nonexistent"])
    assert fd._ctx(ctx) == "_ctx0.5" and fd._ctx(args) == ""  # ablation runs never reuse the plain runs' folders
