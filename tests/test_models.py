"""Core behaviour on tiny models built from real architecture configs (timm, diffusers, transformers)."""
import pytest
import torch

import spectral_vision as sv
from spectral_vision.zoo import create_model
from helpers import perturb


def _vit_inputs():
    return (torch.randn(2, 3, 32, 32),)


def _unet_inputs():
    return (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32))


def _text_inputs():
    return (torch.randint(0, 49408, (2, 7)),)


def _llm_inputs():
    return (torch.randint(0, 256, (2, 9)),)


FAMILIES = {  # model name, preset, inputs
    "timm_vit": ("tiny-vit", "timm_vit", _vit_inputs),
    "sd_unet": ("tiny-unet", "sd_unet", _unet_inputs),
    "sd_unet_conv": ("tiny-unet", "sd_unet_conv", _unet_inputs),
    "sd_unet_resnet": ("tiny-unet", "sd_unet_resnet", _unet_inputs),
    "clip_text": ("tiny-clip-text", "clip_text", _text_inputs),
    "llama": ("tiny-llama", "llama", _llm_inputs),
    "gpt2": ("tiny-gpt2", "gpt2", _llm_inputs),
}


def run(model, inputs):
    out = model(*inputs)
    if hasattr(out, "sample"):
        return out.sample
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["spectral_a", "spectral_r"])
def test_family_init_merge_detach_roundtrip(family, method, tmp_path):
    name, preset, make_inputs = FAMILIES[family]
    torch.manual_seed(0)
    inputs = make_inputs()
    model = create_model(name)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = run(model, inputs)
    sv.attach(model, sv.SpectralConfig(method=method, rank=2, target_modules=preset))
    layers = dict(sv.spectral_layers(model))
    assert layers, "preset matched nothing"
    if preset == "sd_unet_conv":
        assert any(l.kind == "conv2d" and l.base_layer.kernel_size == (3, 3) for l in layers.values())
    if preset == "sd_unet_resnet":  # the ResNet 3x3 convolutions and nothing else
        assert all(l.kind == "conv2d" and l.base_layer.kernel_size == (3, 3) and ".resnets." in n
                   for n, l in layers.items())
    with torch.no_grad():
        assert (run(model, inputs) - y0).abs().max() <= 1e-5  # init equals base
    perturb(model, std=0.2)
    with torch.no_grad():
        y = run(model, inputs)
        assert (y - y0).abs().max() > 1e-4
        sv.merge(model)
        torch.testing.assert_close(run(model, inputs), y, atol=1e-4, rtol=1e-4)
        sv.unmerge(model)
    sv.save_adapter(model, tmp_path / "ad")
    fresh = create_model(name)
    sv.load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, inputs), y, atol=1e-5, rtol=1e-5)
    sv.detach(model)
    assert not list(sv.spectral_layers(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state0[k]), k


def test_spectral_r_stays_orthogonal_after_training():
    model = create_model("tiny-vit")
    sv.attach(model, sv.SpectralConfig(method="spectral_r", rank=6, target_modules="timm_vit", alpha=2.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    eye = torch.eye(6)
    moved = 0.0
    for _, layer in sv.spectral_layers(model):
        with torch.no_grad():
            for R in layer.adapters["default"].rotations():
                assert (R.T @ R - eye).abs().max() <= 1e-5
                moved = max(moved, (R - eye).abs().max().item())
            # rotating singular vectors keeps the adapted weight's singular values
            W = layer.weight_2d() + layer.delta_weight()
            torch.testing.assert_close(torch.linalg.svdvals(W), torch.linalg.svdvals(layer.weight_2d()),
                                       atol=1e-4, rtol=1e-4)
    assert moved > 1e-3, "training should have rotated something"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["spectral_a", "spectral_r"])
def test_low_precision_base(dtype, method):
    model = create_model("tiny-vit").to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        y0 = model(x)
    sv.attach(model, sv.SpectralConfig(method=method, rank=2))
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)  # trainable tensors stay fp32
    with torch.no_grad():
        assert torch.equal(model(x), y0)  # zero delta adds exactly zero
    perturb(model, std=1.0)
    loss = model(x).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    with torch.no_grad():
        y = model(x)
        moved = (y.float() - y0.float()).abs().max()
        assert moved > 0.03
        sv.merge(model)
        assert model(x).dtype == dtype
        # a merge that did nothing would be off by `moved`; low-precision rounding stays far below a quarter of it
        assert (model(x).float() - y.float()).abs().max() <= 0.25 * moved


def test_wrong_base_and_corrupt_files_fail_clearly_and_change_nothing(tmp_path):
    model = create_model("tiny-vit")
    sv.attach(model, sv.SpectralConfig(rank=2))
    perturb(model)
    sv.save_adapter(model, tmp_path / "ad")

    other = create_model("tiny-vit", seed=123)  # same architecture, other weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(sv.AdapterFileError, match=r"layer 'blocks\.0\.attn\.qkv'.*base weights differ"):
        sv.load_adapter(other, tmp_path / "ad")
    assert not list(sv.spectral_layers(other))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())

    wider = create_model("tiny-vit", embed_dim=96)
    with pytest.raises(sv.AdapterFileError, match=r"layer 'blocks\.0\.attn\.qkv'.*weight \[192, 64\]"):
        sv.load_adapter(wider, tmp_path / "ad")
    assert not list(sv.spectral_layers(wider))

    f = tmp_path / "ad" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(sv.AdapterFileError, match="truncated"):
        sv.load_adapter(create_model("tiny-vit"), tmp_path / "ad")
    with pytest.raises(sv.AdapterFileError, match="not an adapter folder"):
        sv.load_adapter(create_model("tiny-vit"), tmp_path / "nothing")


def test_target_typo_lists_close_names_and_changes_nothing():
    model = create_model("tiny-vit")
    with pytest.raises(ValueError, match=r"matched no adaptable layer.*'qkv'"):
        sv.attach(model, sv.SpectralConfig(target_modules=["qvk"]))
    assert not list(sv.spectral_layers(model))
    with pytest.raises(ValueError, match="unknown method"):
        sv.attach(model, sv.SpectralConfig(method="lora_typo"))


def test_rank_too_large_rolls_back():
    model = create_model("tiny-vit")
    with pytest.raises(ValueError, match="has only 64"):
        sv.attach(model, sv.SpectralConfig(rank=40, band=1))
    assert not list(sv.spectral_layers(model))


def test_named_adapters_switch_disable_and_bands():
    model = create_model("tiny-vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = model(x)
    sv.attach(model, sv.SpectralConfig(rank=2, band=0), adapter_name="cat")
    sv.attach(model, sv.SpectralConfig(method="spectral_r", rank=2, band=1), adapter_name="dog")
    assert sv.adapter_names(model) == ["cat", "dog"]
    perturb(model)  # only the active ("cat") adapter is trainable
    with torch.no_grad():
        y_cat = model(x)
    sv.set_adapter(model, "dog")
    perturb(model, seed=2)
    with torch.no_grad():
        y_dog = model(x)
        assert (y_dog - y_cat).abs().max() > 1e-4
        sv.set_adapter(model, ["cat", "dog"])
        y_both = model(x)
        sv.disable_adapters(model)
        torch.testing.assert_close(model(x), y0)
        sv.enable_adapters(model)
        torch.testing.assert_close(model(x), y_both)
    layer = dict(sv.spectral_layers(model))["blocks.0.attn.qkv"]
    assert layer.adapters["cat"].columns.tolist() == [0, 1] and layer.adapters["dog"].columns.tolist() == [2, 3]
    sv.detach(model, "cat")
    assert sv.adapter_names(model) == ["dog"]


def test_trainable_parameters_count():
    model = create_model("tiny-vit")
    base = sum(p.numel() for p in model.parameters())
    sv.attach(model, sv.SpectralConfig(rank=2))
    count = sv.trainable_parameters(model)
    # ^A: r * (out + in) per layer; per block qkv (192,64), proj (64,64), fc1 (256,64), fc2 (64,256)
    per_block = 2 * ((192 + 64) + (64 + 64) + (256 + 64) + (64 + 256))
    assert count.trainable == 2 * per_block
    assert count.percent == pytest.approx(100 * count.trainable / base)
    assert "trainable%" in str(count)


def _open_clip_with_features():
    """A tiny open_clip model and ``feats(m)``: its image + text features on fixed inputs, ``(2, 2 * d)``."""
    model = create_model("tiny-open-clip")
    image, text = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 77))

    def feats(m):
        with torch.no_grad():
            return torch.cat([m.encode_image(image), m.encode_text(text)], 1)

    return model, feats


def test_open_clip_towers_and_mha_refusal(tmp_path):
    model, feats = _open_clip_with_features()

    f0 = feats(model)
    sv.attach(model, sv.SpectralConfig(method="spectral_r", rank=2, target_modules="open_clip"))
    assert len(list(sv.spectral_layers(model))) == 8  # 2 towers x 2 blocks x (c_fc, c_proj)
    assert (feats(model) - f0).abs().max() <= 1e-5
    perturb(model, std=0.3)
    f1 = feats(model)
    assert (f1 - f0).abs().max() > 1e-4
    sv.save_adapter(model, tmp_path / "clip")
    fresh = create_model("tiny-open-clip")
    sv.load_adapter(fresh, tmp_path / "clip")
    torch.testing.assert_close(feats(fresh), f1, atol=1e-5, rtol=1e-5)
    # out_proj inside nn.MultiheadAttention is never called as a module: refuse instead of silently doing nothing
    with pytest.raises(ValueError, match="MultiheadAttention"):
        sv.attach(create_model("tiny-open-clip"), sv.SpectralConfig(target_modules=["out_proj"]))


# ---- real conv nets (timm subclasses, grouped / depthwise convs) and attention -----------------------------------
def _tiny_bit():
    """timm ``resnetv2_50x1_bit`` configuration (StdConv2d eps 1e-8, fixed stem, GroupNorm), shrunk."""
    from functools import partial

    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[1, 1], channels=(32, 64), stem_chs=16, stem_type="fixed", num_classes=5,
                    conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=8))


def _tiny_tf_efficientnet():
    """timm ``tf_efficientnet_*`` configuration (pad_type 'same': Conv2dSame for strided convs, depthwise
    blocks with squeeze-excite), shrunk to three stages."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    arch = [["ds_r1_k3_s1_e1_c8_se0.25"], ["ir_r1_k3_s2_e6_c16_se0.25"], ["ir_r1_k5_s2_e6_c24_se0.25"]]
    return EfficientNet(block_args=decode_arch_def(arch), num_features=32, stem_size=8, pad_type="same",
                        num_classes=5)


CONV_NETS = {  # builder, targets, layer types that must be among the adapted ones
    "resnetv2_bit": (_tiny_bit, r"stem\.conv|.*\.(conv\d|downsample\.conv)", {"StdConv2d"}),
    "tf_efficientnet": (_tiny_tf_efficientnet, r"conv_stem|conv_head|.*\.(conv_dw|conv_pw|conv_pwl|se\.conv_\w+)",
                        {"Conv2dSame", "Conv2d"}),
}


@pytest.mark.parametrize("net", list(CONV_NETS))
@pytest.mark.parametrize("method", ["spectral_a", "spectral_r"])
def test_real_conv_nets_exact(net, method, tmp_path):
    build, targets, types = CONV_NETS[net]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)  # even size: TF "same" padding is asymmetric at stride 2
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = model(x)
    sv.attach(model, sv.SpectralConfig(method=method, rank=2, target_modules=targets))
    layers = dict(sv.spectral_layers(model))
    assert types <= {type(l.base_layer).__name__ for l in layers.values()}
    if net == "tf_efficientnet":
        assert any(l.base_layer.groups > 1 and type(l.base_layer).__name__ == "Conv2dSame" for l in layers.values())
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-5  # init equals base
    perturb(model, std=0.2)
    with torch.no_grad():
        y = model(x)
        assert (y - y0).abs().max() > 1e-3
        sv.merge(model)
        torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)  # merged == unmerged
        sv.unmerge(model)
    sv.save_adapter(model, tmp_path / "ad")
    torch.manual_seed(0)
    fresh = build().eval()
    sv.load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, atol=1e-5, rtol=1e-5)
    sv.detach(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state0[k]), k


def test_open_clip_attention_in_projection(tmp_path):
    model, feats = _open_clip_with_features()

    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    f0 = feats(model)
    sv.attach(model, sv.SpectralConfig(method="spectral_a", rank=2, target_modules=r".*resblocks\.\d+\.attn"))
    layers = dict(sv.spectral_layers(model))
    assert len(layers) == 4 and all(l.kind == "mha" for l in layers.values())  # 2 towers x 2 blocks
    assert (feats(model) - f0).abs().max() <= 1e-5
    perturb(model, std=0.3)
    f1 = feats(model)
    assert (f1 - f0).abs().max() > 1e-4
    sv.merge(model)
    torch.testing.assert_close(feats(model), f1, atol=1e-5, rtol=1e-5)
    sv.unmerge(model)
    sv.save_adapter(model, tmp_path / "attn")
    fresh = create_model("tiny-open-clip")
    sv.load_adapter(fresh, tmp_path / "attn")
    torch.testing.assert_close(feats(fresh), f1, atol=1e-5, rtol=1e-5)
    sv.detach(model)
    assert all(torch.equal(v, state0[k]) for k, v in model.state_dict().items())
    # out_proj inside nn.MultiheadAttention cannot be wrapped: matched ones are skipped with one warning
    with pytest.warns(UserWarning, match=r"skipped \d+ out_proj layers .*resblocks\.0\.attn\.out_proj"):
        sv.attach(create_model("tiny-open-clip"), sv.SpectralConfig(rank=2, target_modules=["c_fc", "out_proj"]))
