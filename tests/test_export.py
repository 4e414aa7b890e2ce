"""Exact LoRA export: re-applied with peft and loaded by a diffusers pipeline, the outputs are ours."""
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import spectral_vision as sv
from spectral_vision.zoo import create_model
from helpers import perturb

peft = pytest.importorskip("peft")

METHODS = sv.available_methods()
TOL = 1e-4

CASES = {  # model, preset, inputs, component prefix
    "tiny-vit": ("tiny-vit", "timm_vit", lambda: (torch.randn(2, 3, 32, 32),)),
    "tiny-unet-conv": ("tiny-unet", "sd_unet_conv",
                       lambda: (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32))),
    "tiny-gpt2": ("tiny-gpt2", "gpt2", lambda: (torch.randint(0, 256, (2, 9)),)),
}


def run(model, inputs):
    out = model(*inputs)
    for attr in ("sample", "logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out


def _adapted(name, preset, method, rank=2):
    model = create_model(name)
    sv.attach(model, sv.SpectralConfig(method=method, rank=rank, target_modules=preset), progress=False)
    perturb(model, std=0.05)
    return model


def _check_rank(info):
    """Exported rank = the method's factor rank (^A: 2r, ^R: r, ...); an SVD fallback only where the factor
    rank is above min(out, in), i.e. where truncating to min(out, in) loses nothing."""
    if info["exact"]:
        assert info["rank"] >= info["factor_rank"]  # kohya may zero-pad
    else:
        assert info["factor_rank"] > min(info["shape"]) and info["truncated_to"] == min(info["shape"])


def _peft_apply(base, tensors, cfg, prefix):
    """Inject a plain peft LoRA into ``base`` from the exported tensors and the reported config."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    lcfg = LoraConfig(**cfg)
    model = inject_adapter_in_model(lcfg, base)
    sd = {k[len(prefix) + 1:] if prefix else k: v for k, v in tensors.items()}
    res = set_peft_model_state_dict(model, sd)
    assert not [k for k in res.unexpected_keys if "lora" in k]
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_peft_format_reapplied_with_peft(method, case, tmp_path):
    name, preset, make_inputs = CASES[case]
    torch.manual_seed(0)
    inputs = make_inputs()
    model = _adapted(name, preset, method)
    with torch.no_grad():
        ours = run(model, inputs)
        base_out = run(create_model(name), inputs)
    assert (ours - base_out).abs().max() > 1e-3, "the adapter should change the output"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lossless min(out, in) fallback warns (checked in _check_rank)
        rep = sv.export_lora(model, tmp_path / "lora.safetensors", format="peft", prefix="")
    assert rep["max_rel_error"] < 1e-4  # rounding level (fp32)
    layers = dict(sv.spectral_layers(model))
    for key, info in rep["layers"].items():
        R = layers[info["module"]].adapters["default"].factors()[0].shape[1]
        assert info["factor_rank"] == R
        _check_rank(info)
    tensors = load_file(str(tmp_path / "lora.safetensors"))
    assert len(tensors) == 2 * len(layers)
    peft_model = _peft_apply(create_model(name), tensors, rep["peft_config"][""], "")
    with torch.no_grad():
        theirs = run(peft_model, inputs)
    err = (theirs - ours).abs().max().item()
    assert err <= TOL, f"{method} {case}: peft re-application differs by {err:.2e}"


def test_conv_layout_and_metadata(tmp_path):
    model = _adapted("tiny-unet", "sd_unet_conv", "spectral_a", rank=2)
    rep = sv.export_lora(model, tmp_path / "k.safetensors", format="kohya")
    t = load_file(str(tmp_path / "k.safetensors"))
    down = t["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    up = t["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    conv = model.down_blocks[0].resnets[0].conv1.base_layer
    assert down.shape == (4, conv.in_channels, 3, 3) and up.shape == (conv.out_channels, 4, 1, 1)  # ^A: R = 2r
    assert t["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 4.0
    # the exported pair rebuilds ΔW of the layer exactly (the core's "out, in*kh*kw" convention)
    dw = model.down_blocks[0].resnets[0].conv1.delta_weight()
    torch.testing.assert_close(up.flatten(1) @ down.flatten(1), dw, atol=1e-6, rtol=1e-5)
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and json.loads(meta["spectral_vision.adapter_config"])["method"] == "spectral_a"
    assert json.loads(meta["spectral_vision.rank_pattern"]) == {k: v["rank"] for k, v in rep["layers"].items()}


def test_max_rank_truncation_is_reported(tmp_path):
    model = _adapted("tiny-vit", "timm_vit", "spectral_a", rank=3)  # R = 6
    with pytest.warns(UserWarning, match="truncated by SVD"):
        rep = sv.export_lora(model, tmp_path / "t.safetensors", prefix="", max_rank=2)
    assert not rep["exact"]
    name, layer = next(iter(sv.spectral_layers(model)))
    with torch.no_grad():
        S = torch.linalg.svdvals(layer.delta_weight())
    expected = float(S[2:].norm() / S.norm())  # Eckart–Young: the optimal rank-2 error
    info = rep["layers"][name]
    assert info["rank"] == 2 and info["factor_rank"] == 6
    assert abs(info["rel_error"] - expected) < 1e-4 and info["rel_error"] > 1e-3


def test_uniform_rank_padding_is_exact():
    from spectral_vision.export import _pad

    B, A = torch.randn(5, 2), torch.randn(2, 7)
    Bp, Ap = _pad(B, A, 4)
    assert Bp.shape == (5, 4) and Ap.shape == (4, 7) and torch.equal(Bp @ Ap, B @ A)


def test_bad_input(tmp_path):
    model = _adapted("tiny-vit", "timm_vit", "spectral_a")
    with pytest.raises(ValueError, match="format"):
        sv.export_lora(model, tmp_path / "x.safetensors", format="ckpt")
    with pytest.raises(KeyError, match="no adapter"):
        sv.export_lora(model, tmp_path / "x.safetensors", adapter_name="other")
    assert not (tmp_path / "x.safetensors").exists()


# ---- the key test: a diffusers StableDiffusionPipeline loads the exported file --------------------------
def _pipeline():
    from spectral_vision.integrations.diffusers import load_pipeline

    return load_pipeline("builtin:tiny-sd")


def _sd_outputs(pipe, inputs):
    latents, t, ids = inputs
    with torch.no_grad():
        emb = pipe.text_encoder(ids).last_hidden_state  # (2, 7, 32)
        unet = pipe.unet(latents, t, encoder_hidden_states=emb).sample  # (2, 4, h, w): uses the adapted text too
        unet_only = pipe.unet(latents, t, encoder_hidden_states=inputs_emb(ids)).sample
    return emb, unet, unet_only


def inputs_emb(ids):
    g = torch.Generator().manual_seed(3)
    return torch.randn(ids.shape[0], ids.shape[1], 32, generator=g)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("method", METHODS)
def test_diffusers_pipeline_load_lora_weights(method, fmt, tmp_path):
    pipe = _pipeline()
    size = pipe.unet.config.sample_size
    torch.manual_seed(0)
    inputs = (torch.randn(2, 4, size, size), torch.tensor([10, 500]), torch.randint(0, 49408, (2, 7)))
    base = _sd_outputs(pipe, inputs)
    sv.attach(pipe.unet, sv.SpectralConfig(method=method, rank=2, target_modules="sd_unet_conv"), progress=False)
    sv.attach(pipe.text_encoder, sv.SpectralConfig(method=method, rank=2, target_modules="clip_text"), progress=False)
    perturb(pipe.unet, seed=1)
    perturb(pipe.text_encoder, std=0.2, seed=2)
    ours = _sd_outputs(pipe, inputs)
    for a, b in zip(ours, base):
        assert (a - b).abs().max() > 1e-3, "the adapters should change every output"
    path = tmp_path / f"{method}_{fmt}.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = sv.export_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, path, format=fmt)
    assert rep["max_rel_error"] < 1e-4
    for info in rep["layers"].values():
        _check_rank(info)
    n_layers = len(list(sv.spectral_layers(pipe.unet))) + len(list(sv.spectral_layers(pipe.text_encoder)))
    assert len(rep["layers"]) == n_layers

    fresh = _pipeline()
    fresh.load_lora_weights(str(path))
    n_lora = sum(1 for n, _ in fresh.unet.named_modules() if n.endswith("lora_A"))
    n_lora += sum(1 for n, _ in fresh.text_encoder.named_modules() if n.endswith("lora_A"))
    assert n_lora == n_layers, "diffusers should have injected a LoRA on every exported layer"
    theirs = _sd_outputs(fresh, inputs)
    for what, a, b in zip(("text encoder", "unet (adapted text)", "unet"), theirs, ours):
        err = (a - b).abs().max().item()
        assert err <= TOL, f"{method}/{fmt}: diffusers' {what} output differs by {err:.2e}"


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_diffusers_nonuniform_ranks(fmt, tmp_path):
    """Different ranks per layer (explicit per-layer columns): peft needs rank/alpha patterns, kohya is padded."""
    pipe = _pipeline()
    size = pipe.unet.config.sample_size
    torch.manual_seed(0)
    inputs = (torch.randn(2, 4, size, size), torch.tensor([10, 500]), torch.randint(0, 49408, (2, 7)))
    for i, (comp, preset) in enumerate(((pipe.unet, "sd_unet_conv"), (pipe.text_encoder, "clip_text"))):
        names = [n for n, m in comp.named_modules() if sv.presets._compile(preset)(n) and hasattr(m, "weight")]
        cols = {n: list(range(1 + j % 3)) for j, n in enumerate(names)}  # ^A ranks 2, 4, 6, 2, ...
        sv.attach(comp, sv.SpectralConfig(method="spectral_a", target_modules=preset), columns=cols, progress=False)
        perturb(comp, std=0.05 + 0.15 * i, seed=i + 1)
    ours = _sd_outputs(pipe, inputs)
    path = tmp_path / f"{fmt}.safetensors"
    rep = sv.export_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, path, format=fmt)
    factor_ranks = {v["factor_rank"] for v in rep["layers"].values()}
    assert factor_ranks == {2, 4, 6}
    if fmt == "kohya":  # zero-padded to one rank (alpha = rank) per component
        assert {v["rank"] for v in rep["layers"].values()} == {6}
    else:
        assert rep["peft_config"]["unet"]["rank_pattern"]
    fresh = _pipeline()
    fresh.load_lora_weights(str(path))
    theirs = _sd_outputs(fresh, inputs)
    for what, a, b in zip(("text encoder", "unet (adapted text)", "unet"), theirs, ours):
        err = (a - b).abs().max().item()
        assert err <= TOL, f"{fmt}: diffusers' {what} output differs by {err:.2e}"
