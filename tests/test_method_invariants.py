"""The same exact checks for every registered method, on every supported layer kind.

Every test runs on the CPU and, when ``torch.cuda.is_available()``, again on CUDA (marker ``cuda``:
``pytest -m cuda tests/test_method_invariants.py`` on a GPU machine).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral_vision as sv
from spectral_vision.adapter_file import SIG_PREFIX
from helpers import perturb

METHODS = sv.available_methods()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _conv1d(i, o):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(o, i)


LAYERS = {
    "linear": lambda: nn.Linear(24, 40),
    "conv2d_3x3": lambda: nn.Conv2d(6, 20, 3, padding=1, stride=2),
    "conv2d_1x1": lambda: nn.Conv2d(12, 16, 1),
    "conv2d_depthwise": lambda: nn.Conv2d(12, 12, 3, padding=1, groups=12),
    "conv1d": lambda: _conv1d(24, 40),
}


def _inputs(kind, device="cpu"):
    if kind.startswith("conv2d"):
        return torch.randn(2, 6 if kind == "conv2d_3x3" else 12, 9, 9).to(device)
    return torch.randn(2, 5, 24).to(device)


def _model(kind, method, device="cpu", **cfg_kw):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", LAYERS[kind]())
    model.to(device)
    cfg = sv.SpectralConfig(method=method, rank=3, target_modules=["layer"], **cfg_kw)
    base = [t.clone() for t in model.state_dict().values()]
    x = _inputs(kind, device)
    with torch.no_grad():
        y0 = model(x)
    sv.attach(model, cfg)
    return model, x, y0, base


def _reference_forward(layer: sv.SpectralLayer, x, delta2d):
    """Forward with the full weight W + ΔW (ΔW from delta_weight, the single source of truth)."""
    base = layer.base_layer
    w = base.weight.float() + layer.to_base_layout(delta2d)
    if layer.kind == "conv2d":
        return F.conv2d(x, w, base.bias, base.stride, base.padding, base.dilation, base.groups)
    if layer.kind == "conv1d":
        return x @ w + base.bias
    return F.linear(x, w, base.bias)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("method", METHODS)
def test_init_equals_base(method, kind, device):
    model, x, y0, _ = _model(kind, method, device)
    if not sv.get_method(method).zero_init:
        pytest.skip(f"{method} does not define ΔW = 0 at init")
    with torch.no_grad():
        assert (model(x) - y0).abs().max() <= 1e-5
        assert model.layer.delta_weight().abs().max() <= 1e-6


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("method", METHODS)
def test_fast_path_matches_delta_weight(method, kind, device):
    model, x, _, _ = _model(kind, method, device)
    perturb(model)
    layer = model.layer
    delta = layer.adapters["default"]
    with torch.no_grad():
        dw = delta.delta_weight()
        assert dw.abs().max() > 1e-4, "perturbation should change the weight"
        B, A = delta.factors()
        assert B.shape[0] == dw.shape[0] and A.shape[1] == dw.shape[1] and B.shape[1] == A.shape[0]
        torch.testing.assert_close(B @ A, dw, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(x), _reference_forward(layer, x, dw), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_detach(method, kind, device):
    model, x, y0, base = _model(kind, method, device)
    base_module = model.layer.base_layer
    perturb(model)
    with torch.no_grad():
        y = model(x)
        sv.merge(model)
        assert model.layer.merged_adapters == ["default"]
        torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)
        sv.unmerge(model)
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
        sv.merge(model)
        sv.detach(model)
    assert model.layer is base_module
    for a, b in zip(base, model.state_dict().values()):
        assert torch.equal(a, b)  # bit for bit


@pytest.mark.parametrize("method", METHODS)
def test_save_load_roundtrip(method, tmp_path, device):
    model, x, _, _ = _model("conv2d_3x3", method, device)
    perturb(model)
    with torch.no_grad():
        y = model(x)
    sv.save_adapter(model, tmp_path / "a")
    fresh, _, y0, _ = _model("conv2d_3x3", method, device)
    sv.detach(fresh)
    sv.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, atol=1e-6, rtol=1e-6)
    # the file holds only the adapter's own tensors
    meta, tensors = sv.read_adapter(tmp_path / "a")
    tensors = {k: t for k, t in tensors.items() if not k.startswith(SIG_PREFIX)}  # + the basis signature
    assert all(k.startswith("layer.") for k in tensors)
    n_saved = sum(t.numel() for k, t in tensors.items() if not k.endswith(".columns"))
    assert n_saved == sv.trainable_parameters(fresh).trainable


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_steps_reduce_loss(method, device):
    model, x, _, _ = _model("linear", method, device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    perturb(model, std=0.3)  # a reachable target: the output of the same method at other parameters
    with torch.no_grad():
        target = model(x)
    model.load_state_dict(init)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    assert all(p.grad is None for p in model.layer.base_layer.parameters())


BAND_COLUMNS = {  # literal expectations for band 0 and band 1 at rank 3 on a (40, 24) weight
    "spectral_a": ([0, 1, 2], [3, 4, 5]),
    "spectral_r": ([0, 1, 2], [3, 4, 5]),
    "lorsa": ([0, 1, 2], [3, 4, 5]),
    "speclora": ([], []),  # Γ ⊙ W uses no singular columns
    "lowrank": ([], []),  # plain low-rank B A: no singular columns
    "svdiff": (list(range(24)), list(range(24))),  # all singular values, whatever the band
}


@pytest.mark.parametrize("method", METHODS)
def test_bands_select_disjoint_columns(method, device):
    model, *_ = _model("linear", method, device, band=0)
    sv.attach(model, sv.SpectralConfig(method=method, rank=3, band=1, target_modules=["layer"]), adapter_name="b1")
    got = tuple(model.layer.adapters[n].columns.tolist() for n in ("default", "b1"))
    if method not in BAND_COLUMNS:
        pytest.fail(f"add the expected band columns of new method {method!r} to BAND_COLUMNS")
    assert got == BAND_COLUMNS[method]
    if method in ("spectral_a", "spectral_r", "lorsa"):
        assert not set(got[0]) & set(got[1])
