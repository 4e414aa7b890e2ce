"""Layer geometries: every registered method on every layer kind of real conv nets and attention.

The reference for each check is the base module itself run with its stored weight replaced by
``W + ΔW`` (``ΔW`` from ``delta_weight``, the single source of truth): what a merge computes.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral_vision as sv
from spectral_vision import geometry
from helpers import perturb

timm_layers = pytest.importorskip("timm.layers")
METHODS = sv.available_methods()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


class Attn(nn.Module):
    """open_clip's use of ``nn.MultiheadAttention``: self-attention, batch first, weights not needed."""

    def __init__(self):
        super().__init__()
        self.layer = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.layer(x, x, x, need_weights=False)[0]


def _scaled_std():
    m = timm_layers.ScaledStdConv2d(6, 12, 3, padding=1)
    with torch.no_grad():
        m.gain.uniform_(0.5, 2.0)  # a non-trivial gain
    return m


LAYERS = {  # name: (module factory, input shape)
    "std_conv": (lambda: timm_layers.StdConv2d(6, 12, 3, stride=2, eps=1e-8), (2, 6, 10, 10)),
    "scaled_std_conv": (_scaled_std, (2, 6, 9, 9)),
    "std_conv_same": (lambda: timm_layers.StdConv2dSame(6, 12, 3, stride=2), (2, 6, 10, 10)),
    "conv2d_same": (lambda: timm_layers.Conv2dSame(6, 12, 3, stride=2), (2, 6, 10, 10)),  # asymmetric pad
    "depthwise_same": (lambda: timm_layers.create_conv2d(8, 8, 3, stride=2, padding="same", depthwise=True),
                       (2, 8, 10, 10)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 9, 9)),
    "depthwise_x2": (lambda: nn.Conv2d(4, 8, 3, groups=4, bias=False), (2, 4, 9, 9)),  # channel multiplier 2
    "grouped": (lambda: nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4), (2, 8, 9, 9)),
    "reflect": (lambda: nn.Conv2d(6, 12, 3, padding=1, padding_mode="reflect"), (2, 6, 9, 9)),
    "mha": (lambda: Attn().layer, (2, 5, 16)),
}


def _model(kind, method, device="cpu"):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    if kind == "mha":
        model = Attn()
    else:
        model = nn.Sequential()
        model.add_module("layer", make())
    model.to(device)
    x = torch.randn(*shape).to(device)
    with torch.no_grad():
        y0 = model(x)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sv.attach(model, sv.SpectralConfig(method=method, rank=2, target_modules=["layer"]))
    return model, x, y0, base


def _reference(layer: sv.SpectralLayer, x, dw):
    """The base module, copied, with its stored weight replaced by ``W + ΔW`` (merge semantics)."""
    ref = copy.deepcopy(layer.base_layer)
    w = getattr(ref, layer.geometry.weight_name)
    with torch.no_grad():
        w.copy_(w + layer.to_base_layout(dw))
    out = ref(x, x, x, need_weights=False)[0] if layer.kind == "mha" else ref(x)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("method", METHODS)
def test_layer_kind_exact(method, kind, device):
    model, x, y0, base = _model(kind, method, device)
    layer = model.layer
    base_module = layer.base_layer
    with torch.no_grad():
        if sv.get_method(method).zero_init:
            assert (model(x) - y0).abs().max() <= 1e-5  # (MHA picks other kernels once weights are frozen)
        perturb(model)
        delta = layer.adapters["default"]
        dw = delta.delta_weight()
        assert dw.abs().max() > 1e-4
        B, A = delta.factors()
        torch.testing.assert_close(B @ A, dw, atol=1e-5, rtol=1e-4)  # factors == delta_weight
        y = model(x)
        assert (y - y0).abs().max() > 1e-4
        torch.testing.assert_close(y, _reference(layer, x, dw), atol=1e-4, rtol=1e-4)  # forward == W + ΔW
        sv.merge(model)
        torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)  # merged == unmerged
        sv.unmerge(model)
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
        sv.merge(model)
        sv.detach(model)
    assert model.layer is base_module
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k  # bit for bit


@pytest.mark.parametrize("kind", ["std_conv", "mha"])
def test_weight_forward_kinds_train_and_merge_bit_exactly(kind):
    """Kinds run through the base's own forward on W + ΔW: the merged model is bit-identical, and
    the gradient reaches the adapter through the standardisation / attention."""
    model, x, _, _ = _model(kind, "spectral_a")
    perturb(model)
    loss = model(x).pow(2).mean()
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
    with torch.no_grad():
        y = model(x)
        sv.merge(model)
        assert torch.equal(model(x), y)


def test_std_conv_effective_weight_is_what_the_forward_applies():
    m = _scaled_std()
    x = torch.randn(2, 6, 9, 9)
    g = geometry.geometry_for(m)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, g.effective_weight(), m.bias, padding=1), m(x))
    assert not g.additive and g.kind == "conv2d"


def test_real_conv_subclasses_on_today_code_paths_are_recognised():
    assert geometry.layer_kind(timm_layers.Conv2dSame(3, 4, 3)) == "conv2d"
    assert type(geometry.geometry_for(timm_layers.Conv2dSame(3, 4, 3))) is geometry.Conv2dSameGeometry
    assert type(geometry.geometry_for(timm_layers.StdConv2d(3, 4, 3))) is geometry.StdConv2dGeometry
    assert type(geometry.geometry_for(nn.MultiheadAttention(8, 2))) is geometry.MultiheadAttentionGeometry
    assert type(geometry.geometry_for(nn.MultiheadAttention(8, 2).out_proj)) is geometry.LinearGeometry


class OverridingLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class PlainLinear(nn.Linear):
    pass


def test_overriding_subclass_is_refused_with_name_and_type_and_nothing_changes():
    model = nn.Sequential(nn.Linear(8, 8), OverridingLinear(8, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"layer '1'.*OverridingLinear.*overrides OverridingLinear\.forward"):
        sv.attach(model, sv.SpectralConfig(rank=2, target_modules=r"\d"))
    assert not list(sv.spectral_layers(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # a subclass that keeps nn.Linear's forward is a Linear
    model = nn.Sequential(PlainLinear(8, 8))
    sv.attach(model, sv.SpectralConfig(rank=2, target_modules=["0"]))
    assert model[0].kind == "linear"


def test_registering_a_kind_makes_it_adaptable():
    class DoubledLinear(nn.Linear):  # forward 2 x W x: linear in W, so the Linear delta form times 2
        def forward(self, x):
            return F.linear(x, 2 * self.weight, self.bias)

    @geometry.register_geometry(DoubledLinear)
    class DoubledGeometry(geometry.LinearGeometry):
        def adapter_forward(self, x, delta):
            return 2 * delta.forward_linear(x)

    try:
        model = nn.Sequential(DoubledLinear(8, 6))
        x = torch.randn(3, 8)
        sv.attach(model, sv.SpectralConfig(rank=2, target_modules=["0"]))
        perturb(model)
        with torch.no_grad():
            y = model(x)
            sv.merge(model)
            torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    finally:
        geometry._REGISTRY.pop(DoubledLinear)


def test_mha_with_separate_kv_dims_is_refused_clearly():
    with pytest.raises(TypeError, match="kdim/vdim"):
        sv.SpectralLayer(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))


@pytest.mark.parametrize("kind", ["std_conv", "grouped", "mha"])
def test_singular_values_and_weight_2d(kind):
    model, x, _, _ = _model(kind, "spectral_a")
    layer = model.layer
    W0 = layer.weight_2d()
    torch.testing.assert_close(sv.singular_values(layer.base_layer), torch.linalg.svdvals(W0))
    perturb(model)
    with torch.no_grad():
        W = W0 + layer.delta_weight()
    torch.testing.assert_close(geometry.weight_2d(layer), W)
    torch.testing.assert_close(sv.singular_values(layer, k=3), torch.linalg.svdvals(W)[:3])
    torch.testing.assert_close(sv.singular_values(layer, adapters=False), torch.linalg.svdvals(W0))
    sv.merge(model)  # merged adapters are in the base weight: counted once
    torch.testing.assert_close(geometry.weight_2d(layer), W, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["std_conv", "conv2d_same", "grouped", "reflect", "mha"])
def test_lora_export_refuses_kinds_a_standard_lora_cannot_express(kind, tmp_path):
    model, *_ = _model(kind, "spectral_a")
    assert not model.layer.geometry.plain_lora
    with pytest.raises(ValueError, match=r"layers \['layer \(\w+\)'\] cannot be written as a standard LoRA"):
        sv.export_lora(model, tmp_path / "lora.safetensors", prefix="")
    assert not (tmp_path / "lora.safetensors").exists()


def test_importance_scores_on_weight_forward_kinds():
    """Fisher scores on kinds whose forward is not linear in W: ``∂L/∂σ_i = u_iᵀ (∂L/∂W) v_i`` of the raw W."""
    from spectral_vision.importance import score_importance

    for kind in ("std_conv", "mha"):
        torch.manual_seed(0)
        model, x, _, _ = _model(kind, "spectral_a")
        sv.detach(model)
        loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
        scores = score_importance(model, [x[:1]], loss_fn, num_samples=1, k=4, target_modules=["layer"],
                                  progress=False)["layer"]
        g = geometry.geometry_for(model.layer)
        g.weight.requires_grad_(True)
        loss_fn(model, x[:1]).backward()
        G = g.to_2d(g.weight.grad)
        U, S, Vh = torch.linalg.svd(g.to_2d())
        want = S[:4] ** 2 * torch.einsum("oi,ok,ki->k", G, U[:, :4], Vh[:4]) ** 2
        torch.testing.assert_close(scores, want, atol=1e-8, rtol=1e-3)
