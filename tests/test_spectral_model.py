"""The PEFT-like entry: get_spectral_model / SpectralModel.from_pretrained on timm, diffusers and transformers."""
import json

import pytest
import torch

import spectral_vision as sv
from spectral_vision.zoo import create_model
from helpers import perturb

CASES = {  # zoo model, preset, inputs, attribute forwarded from the wrapped model
    "timm-vit": ("tiny-vit", "timm_vit", lambda: (torch.randn(2, 3, 32, 32),), "default_cfg"),
    "diffusers-unet": ("tiny-unet", "sd_unet",
                       lambda: (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)), "config"),
    "transformers-gpt2": ("tiny-gpt2", "gpt2", lambda: (torch.randint(0, 256, (2, 9)),), "generate"),
}


def run(model, inputs):
    out = model(*inputs)
    for attr in ("sample", "logits"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_one_call_entry_roundtrip(case, tmp_path, capsys):
    name, preset, make_inputs, attr = CASES[case]
    torch.manual_seed(0)
    inputs = make_inputs()
    with torch.no_grad():
        y_base = run(create_model(name), inputs)
    model = sv.get_spectral_model(create_model(name), sv.SpectralConfig(rank=2, target_modules=preset))
    assert isinstance(model, sv.SpectralModel) and hasattr(model, attr)  # forwarded to the wrapped model
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,} || all params: {total:,}" in capsys.readouterr().out
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    with torch.no_grad():
        assert torch.equal(run(model, inputs), y_base)  # zero init
        perturb(model)
        y = run(model, inputs)
        assert (y - y_base).abs().max() > 1e-4
        with model.disable_adapter():
            assert torch.allclose(run(model, inputs), y_base, atol=1e-6)
        assert torch.equal(run(model, inputs), y)
    model.save_pretrained(tmp_path / "ad")
    loaded = sv.SpectralModel.from_pretrained(create_model(name), tmp_path / "ad")
    assert loaded.active_adapter == "default" and loaded.spectral_config["default"].target_modules == preset
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default, as in PEFT
    with torch.no_grad():
        assert torch.allclose(run(loaded, inputs), y, atol=1e-5)
        plain = loaded.merge_and_unload()
        assert not isinstance(plain, sv.SpectralModel) and not list(sv.spectral_layers(plain))
        assert torch.allclose(run(plain, inputs), y, atol=1e-4)
    trainable = sv.SpectralModel.from_pretrained(create_model(name), tmp_path / "ad", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_add_set_delete_adapter_and_errors(tmp_path):
    model = sv.get_spectral_model(create_model("tiny-vit"), sv.SpectralConfig(rank=2))
    model.add_adapter("b", sv.SpectralConfig(rank=2, band=1))
    assert model.active_adapters == ["default"] and model.adapter_names == ["default", "b"]  # PEFT: no switch
    model.set_adapter("b")
    assert model.active_adapter == "b"
    assert all(p.requires_grad == ("adapters.b." in n) for n, p in model.named_parameters())
    with pytest.raises(KeyError, match=r"holds \['default', 'b'\]"):
        model.set_adapter("c")
    with pytest.raises(KeyError, match=r"holds \['default', 'b'\]"):
        model.delete_adapter("c")
    model.save_pretrained(tmp_path / "sel", selected_adapters=["b"])  # one selected adapter: the folder itself
    assert json.loads((tmp_path / "sel" / "adapter_config.json").read_text())["adapter_name"] == "b"
    with pytest.raises(KeyError, match="holds"):
        model.save_pretrained(tmp_path / "sel", selected_adapters=["zz"])
    model.delete_adapter("b")
    assert model.adapter_names == ["default"]
    model.save_pretrained(tmp_path / "one")
    with pytest.raises(sv.AdapterFileError, match="holds"):
        sv.SpectralModel.from_pretrained(create_model("tiny-vit"), tmp_path / "one" / "nothing")
    again = sv.SpectralModel.from_pretrained(create_model("tiny-vit"), tmp_path / "one", adapter_name="x")
    assert again.adapter_names == ["x"]
    with pytest.raises(TypeError, match="already a SpectralModel"):
        sv.get_spectral_model(again, sv.SpectralConfig(rank=2))
    base = again.unload()
    assert not list(sv.spectral_layers(base))
