"""PEFT baselines through spectral_vision.baselines: attach, init, freezing, one training step."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import spectral_vision as sv
from spectral_vision.baselines import BASELINES, attach_adapter, attach_peft, is_peft_method, peft_target_modules
from spectral_vision.zoo import create_model

# methods whose adapted model equals the base at initialisation, exactly by construction
IDENTITY_AT_INIT = {"lora", "dora", "oft", "vera"}


def _vit():
    model = create_model("tiny-vit")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = model(x)
    return model, x, y0


@pytest.mark.parametrize("method", BASELINES)
def test_attach_init_freeze_and_step(method):
    model, x, y0 = _vit()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attach_peft(model, method, rank=4, target_modules="timm_vit")
    with torch.no_grad():
        y = model(x)
    err = (y - y0).abs().max().item()
    # PiSSA re-splits W into residual + top-r factors: equal up to fp32 rounding only
    assert err <= (1e-6 if method in IDENTITY_AT_INIT else 1e-4), err

    params = {n.replace(".base_layer", ""): p for n, p in model.named_parameters()}  # base names again
    assert set(base) <= set(params)
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    assert trainable, "no trainable parameters"
    assert all(n not in base for n in trainable), "a base parameter is trainable"
    assert all(".blocks." in "." + n for n in trainable)  # only the targeted layers of the blocks

    target = y0 + torch.randn_like(y0, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    wrapped = {n.replace(".base_layer", "") for n, _ in model.named_parameters() if ".base_layer." in n}
    assert wrapped
    for n, p in base.items():
        if method != "pissa" or n not in wrapped:  # PiSSA replaced W by its residual at init, by design
            assert torch.equal(params[n], p), f"base parameter {n} changed"


def test_lora_parameter_count_and_alpha():
    model, x, _ = _vit()
    attach_peft(model, "lora", rank=4, target_modules="timm_vit")
    # per block: qkv 4*(64+192) + proj 4*(64+64) + fc1 4*(64+256) + fc2 4*(256+64); 2 blocks
    assert sv.trainable_parameters(model).trainable == 2 * 4 * (256 + 128 + 320 + 320)
    layer = model.blocks[0].attn.qkv
    assert layer.scaling["default"] == 1.0  # lora_alpha defaults to rank
    model2, _, _ = _vit()
    attach_peft(model2, "lora", rank=4, target_modules="timm_vit", alpha=8)
    assert model2.blocks[0].attn.qkv.scaling["default"] == 2.0


def test_target_translation_and_errors():
    assert peft_target_modules("timm_vit") == sv.PRESETS["timm_vit"]["regex"]
    assert peft_target_modules(["qkv"]) == ["qkv"]
    assert peft_target_modules(r".*\.fc1") == r".*\.fc1"
    assert is_peft_method("LoRA") and not is_peft_method("spectral_a")
    model, _, _ = _vit()
    attach_peft(model, "lora", rank=2, target_modules=["fc1"])
    names = {n.rsplit(".lora_", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    with pytest.raises(ValueError, match="unknown PEFT baseline"):
        attach_peft(model, "adalora", 2, "timm_vit")
    with pytest.raises(ValueError, match="no alpha"):
        attach_peft(_vit()[0], "vera", 2, "timm_vit", alpha=4)
    with pytest.raises(ValueError):
        attach_peft(_vit()[0], "lora", 2, ["no_such_layer"])


def test_attach_adapter_dispatch():
    model, x, y0 = _vit()
    attach_adapter(model, "spectral_a", 2, "timm_vit", adapter_name="a", alpha=0.5, progress=False)
    assert isinstance(model.blocks[0].attn.qkv, sv.SpectralLayer)
    assert sv.adapter_config(model, "a").alpha == 0.5
    model2, _, _ = _vit()
    attach_adapter(model2, "dora", 2, "timm_vit")
    assert hasattr(model2.blocks[0].attn.qkv, "lora_magnitude_vector")
    with pytest.raises(ValueError, match="unknown method"):
        attach_adapter(_vit()[0], "nope", 2, "timm_vit")


@pytest.mark.parametrize("method", ["lora", "dora", "oft", "vera", "pissa"])
def test_sv_merge_on_peft_model_merges_exactly(method, tmp_path):
    """Issue 18: sv.merge / unmerge / merge_and_unload act on PEFT baselines (never a silent no-op)."""
    model, x, _ = _vit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attach_peft(model, method, rank=4, target_modules="timm_vit")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        y = model(x)
        w = model.blocks[0].attn.qkv.get_base_layer().weight.clone()
        sv.merge(model)
        assert model.blocks[0].attn.qkv.merged and not torch.equal(model.blocks[0].attn.qkv.get_base_layer().weight, w)
        assert torch.allclose(model(x), y, atol=1e-4)
        sv.unmerge(model)
        assert torch.allclose(model.blocks[0].attn.qkv.get_base_layer().weight, w, atol=1e-6)
        plain = sv.merge_and_unload(model)
        assert type(plain.blocks[0].attn.qkv) is torch.nn.Linear and not hasattr(plain, "peft_config")
        assert torch.allclose(plain(x), y, atol=1e-4)
    with pytest.raises(ValueError, match="holds no adapter"):
        sv.merge(plain)


def test_peft_names_in_messages(tmp_path):
    """save_adapter / export_lora / merge on a PEFT model name the PEFT adapters that are there."""
    model, _, _ = _vit()
    attach_peft(model, "lora", 2, "timm_vit", adapter_name="mine")
    with pytest.raises(KeyError, match=r"PEFT adapters \['mine'\]"):
        sv.save_adapter(model, tmp_path / "a")
    with pytest.raises(KeyError, match=r"PEFT adapters \['mine'\]") as e:
        sv.export_lora(model, tmp_path / "l.safetensors")
    assert "unet" not in str(e.value)
    with pytest.raises(KeyError, match=r"PEFT \['mine'\]"):
        sv.merge(model, ["other"])


def test_failed_peft_attach_rolls_back():
    """Issue 18: a PEFT injection that fails on a later layer (LoRA rank not divisible by a grouped conv's
    groups) leaves the model exactly as it was: same module objects, weights, requires_grad, no peft_config."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=8))
    model[1].weight.requires_grad_(False)
    before = dict(model.named_modules())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="groups"):
            attach_peft(model, "lora", 2, ["0", "1"])
    assert dict(model.named_modules()) == before
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items()) and list(model.state_dict()) == list(sd)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not hasattr(model, "peft_config")
