"""VTAB-1k data and models: the task table, data validation, normalizations, timm loading, own tasks.

Runs on the offline fixture (real images from scikit-learn / scikit-image, 32 px; ``vtab_root`` in conftest.py)
with the tiny timm ViT from the zoo. Training, sweeps and reports: test_vtab_runs.py.
"""
import os

import numpy as np
import pytest
import torch

from helpers import VTAB_TINY, copy_vtab_task, own_vtab_task, rewrite_lines
from training import vtab_train
from training.vtab_data import NORMALIZATIONS, VTABDataError, VTABDataset, validate_task
from training.vtab_tasks import GROUPS, TASKS, resolve_task, resolve_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_task_table():
    assert len(TASKS) == 19 and [len(GROUPS[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert sum(t.num_classes for t in TASKS.values()) == 100 + 102 + 47 + 102 + 37 + 10 + 397 + 2 + 10 + 45 + 5 + 8 + 6 \
        + 6 + 4 + 16 + 16 + 18 + 9
    for alias, name in [("cifar100", "cifar"), ("oxford_pet", "oxford_iiit_pet"), ("flowers102", "oxford_flowers102"),
                        ("pets", "oxford_iiit_pet"), ("Smallnorb-Azi", "smallnorb_azi")]:
        assert resolve_task(alias).name == name
    assert [t.name for t in resolve_tasks(["specialized", "eurosat"])] == GROUPS["specialized"]
    with pytest.raises(ValueError, match="did you mean"):
        resolve_task("cifar1000")


def test_validation_errors(vtab_root, tmp_path):
    validate_task(vtab_root, "dtd")  # the fixture passes (its marker allows the reduced splits)
    strict = copy_vtab_task(vtab_root, tmp_path / "a", marker=False)
    with pytest.raises(VTABDataError, match=r"task 'dtd': split 'train800' has 24 images, VTAB-1k requires 800"):
        validate_task(strict, "dtd")
    with pytest.raises(VTABDataError, match=r"'dtd': the test split uses 18 of the 47 classes.*--custom"):
        validate_task(strict, "dtd", allow_small_splits=True)  # reduced splits pass; other data under a VTAB name not
    validate_task(strict, "dtd", splits=["train800", "val200"], allow_small_splits=True)

    wrong = copy_vtab_task(vtab_root, tmp_path / "b")  # more lines than VTAB allows: never accepted
    rewrite_lines(os.path.join(wrong, "dtd", "val200.txt"), lambda ls: ls * 17)
    with pytest.raises(VTABDataError, match=r"'dtd': split 'val200' has 204 images, VTAB-1k requires 200"):
        validate_task(wrong, "dtd")

    label = copy_vtab_task(vtab_root, tmp_path / "c")
    rewrite_lines(os.path.join(label, "dtd", "test.txt"), lambda ls: [ls[0].rsplit(" ", 1)[0] + " 47"] + ls[1:])
    with pytest.raises(VTABDataError, match=r"'dtd': split 'test' has 1 labels outside \[0, 46\] \(47 classes\)"):
        validate_task(label, "dtd")

    missing = copy_vtab_task(vtab_root, tmp_path / "d")
    os.remove(os.path.join(missing, "dtd", "images", "train800", "000003.jpg"))
    with pytest.raises(VTABDataError, match=r"'dtd': split 'train800' lists 1 missing image files.*000003.jpg"):
        validate_task(missing, "dtd")
    with pytest.raises(VTABDataError, match="'dtd'.*missing image"):  # also via the dataset and the train script
        vtab_train.main(vtab_train.parse_args(["--data_root", missing, "--task", "dtd", "--epochs", "1", *VTAB_TINY]))

    garbled = copy_vtab_task(vtab_root, tmp_path / "e")
    rewrite_lines(os.path.join(garbled, "dtd", "train800.txt"), lambda ls: ["images/train800/000000.jpg"] + ls[1:])
    with pytest.raises(VTABDataError, match=r"'dtd': .*train800.txt:1: expected '<image path> <label>'"):
        validate_task(garbled, "dtd")
    os.remove(os.path.join(garbled, "dtd", "test.txt"))
    with pytest.raises(VTABDataError, match="'dtd': split file .*test.txt is missing"):
        validate_task(garbled, "dtd", splits=["test"])


def test_normalizations_exact(vtab_root):
    ds = {n: VTABDataset(vtab_root, "svhn", "val200", image_size=32, normalization=n) for n in NORMALIZATIONS}
    x0, y0 = ds["none"][5]
    assert x0.shape == (3, 32, 32) and 0 <= x0.min() and x0.max() <= 1 and x0.max() > 0.5
    torch.testing.assert_close(ds["half"][5][0], (x0 - 0.5) / 0.5, rtol=0, atol=1e-6)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    torch.testing.assert_close(ds["imagenet"][5][0], (x0 - mean) / std, rtol=0, atol=1e-6)
    assert ds["none"][5][1] == y0 == int(open(os.path.join(vtab_root, "svhn", "val200.txt")).read().split()[11])
    # direct bicubic resize, no crop: a streamed (not preloaded) test split gives the same pixels as preloading
    a, b = (VTABDataset(vtab_root, "svhn", "test", image_size=24, normalization="none", preload=p) for p in (0, 1))
    assert torch.equal(a[3][0], b[3][0]) and a[3][0].shape == (3, 24, 24)


def _save_jax_npz(model, path, num_heads=4, head_classes=21843):
    """Write ``model`` in the layout of Google's original ``ViT-B_16.npz`` (Flax names, HWIO / (D, H, hd) kernels)."""
    t = lambda x: x.detach().numpy()  # noqa: E731
    D = model.embed_dim
    w = {"embedding/kernel": t(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),  # (out,in,kh,kw) -> (kh,kw,in,out)
         "embedding/bias": t(model.patch_embed.proj.bias), "cls": t(model.cls_token),
         "Transformer/posembed_input/pos_embedding": t(model.pos_embed),
         "Transformer/encoder_norm/scale": t(model.norm.weight), "Transformer/encoder_norm/bias": t(model.norm.bias),
         "head/kernel": np.zeros((D, head_classes), np.float32), "head/bias": np.zeros(head_classes, np.float32),
         "pre_logits/kernel": np.zeros((D, D), np.float32), "pre_logits/bias": np.zeros(D, np.float32)}
    for i, blk in enumerate(model.blocks):
        b = f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)
        for n, wq, bq in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[b + f"MultiHeadDotProductAttention_1/{n}/kernel"] = t(wq.T.reshape(D, num_heads, -1))  # (D, H, hd)
            w[b + f"MultiHeadDotProductAttention_1/{n}/bias"] = t(bq.reshape(num_heads, -1))  # (H, hd)
        w[b + "MultiHeadDotProductAttention_1/out/kernel"] = t(blk.attn.proj.weight.reshape(D, num_heads, -1)
                                                               .permute(1, 2, 0))  # (D, H*hd) -> (H, hd, D)
        w[b + "MultiHeadDotProductAttention_1/out/bias"] = t(blk.attn.proj.bias)
        for ln, norm in (("LayerNorm_0", blk.norm1), ("LayerNorm_2", blk.norm2)):
            w[b + f"{ln}/scale"], w[b + f"{ln}/bias"] = t(norm.weight), t(norm.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[b + f"MlpBlock_3/Dense_{r}/kernel"], w[b + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.weight.T), t(fc.bias)
    np.savez(path, **w)


def test_load_vit_local_files(tmp_path):
    from safetensors.torch import save_file

    from spectral_vision.integrations.timm import load_vit

    src = load_vit("zoo:tiny-vit", num_classes=10, image_size=32)
    arch = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        m = load_vit("vit_base_patch16_224", num_classes=3, checkpoint_path=str(tmp_path / f), image_size=32, **arch)
        assert torch.equal(m.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
        assert m.head.out_features == 3 and m.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    _save_jax_npz(src, tmp_path / "ViT-B_16.npz")  # the file VTAB-1k papers start from, in miniature
    m = load_vit(checkpoint_path=str(tmp_path / "ViT-B_16.npz"), num_classes=3, image_size=32, **arch)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.eval().forward_features(x), src.eval().forward_features(x), rtol=1e-5, atol=1e-5)
    assert m.head.out_features == 3
    m = load_vit(str(tmp_path / "w.safetensors"), num_classes=5, image_size=48, **arch)  # a bare file path
    assert m.pos_embed.shape == (1, 1 + 6 * 6, 64)  # resampled from 4x4 to 6x6 patches
    with pytest.raises(ValueError, match="does not fit"):
        load_vit("vit_base_patch16_224", num_classes=3, checkpoint_path=str(tmp_path / "w.pth"), image_size=32,
                 patch_size=8, embed_dim=64, depth=3, num_heads=4)


def test_zoo_tiny_vit_default_cfg_matches_input():
    """timm's data config of zoo:tiny-vit is what the model takes (it was 224 for a 32 px model)."""
    import timm

    from spectral_vision.zoo import create_model

    for kw, side in (({}, 32), ({"img_size": 48}, 48)):
        m = create_model("tiny-vit", **kw)
        cfg = timm.data.resolve_data_config({}, model=m)
        assert m.default_cfg["input_size"] == cfg["input_size"] == (3, side, side)
        assert m(torch.randn(1, *cfg["input_size"])).shape == (1, 10)
        assert not m.pretrained_cfg.get("hf_hub_id")  # random weights: nothing on the hub to point at


def test_own_data_under_a_vtab_name_is_refused(vtab_root, tmp_path):
    """A 5-class folder named 'dtd' is not VTAB-1k's 47-class dtd: refused (not silently given a 47-way head
    and mixed with published dtd numbers) unless --custom makes it a custom task."""
    from training.vtab_data import resolve_data_task

    root = own_vtab_task(vtab_root, tmp_path / "own", "dtd")
    with pytest.raises(VTABDataError, match=r"'dtd': the test split uses 5 of the 47 classes.*--custom"):
        validate_task(root, "dtd", allow_small_splits=True)
    with pytest.raises(VTABDataError, match=r"VTAB-1k's dtd \(47 classes\), not 5; .*add --custom"):
        resolve_data_task(root, "dtd", num_classes=5)
    task = resolve_data_task(root, "dtd", custom=True)
    assert (task.group, task.num_classes) == ("custom", 5)
    validate_task(root, task)  # custom: any split sizes
