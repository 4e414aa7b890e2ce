"""Device discipline of the layer wrapper, the geometries and every method.

Under ``with torch.device("meta"):`` every factory call without an explicit ``device=`` lands on
``meta``. A CPU model adapted, trained, merged, saved and reloaded there must keep every adapter
tensor on the CPU: a forgotten ``device=`` shows up as a meta tensor (or a crash), which on a GPU
would be the "cuda:0 and cpu" error of issue 13.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral_vision as sv
from helpers import perturb

METHODS = sv.available_methods()


class Net(nn.Module):
    """One layer of each geometry family: Linear, Conv2d, grouped Conv2d, timm StdConv2d /
    Conv2dSame (when timm is installed) and nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        try:
            from timm.layers import Conv2dSame, StdConv2d

            self.std = StdConv2d(8, 8, 3, padding=1)
            self.same = Conv2dSame(8, 8, 3, stride=2)
        except ImportError:  # pragma: no cover - timm is a dependency
            self.std, self.same = nn.Identity(), nn.Identity()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):  # (N, 4, 8, 8) -> (N, 6)
        h = self.same(self.std(self.dw(self.conv(x))))  # (N, 8, 4, 4)
        t = h.flatten(2).transpose(1, 2)  # (N, 16, 8)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.fc(t.mean(1))


TARGETS = ["conv", "dw", "std", "same", "attn", "fc"]


def _cfg(method):
    return sv.SpectralConfig(method=method, rank=2, target_modules=TARGETS)


def _all_on(model: nn.Module, device: str) -> list[str]:
    """Names of parameters / buffers (persistent or not) that are not on ``device``."""
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type != device]
    for n, layer in sv.spectral_layers(model):  # tensors kept as plain attributes
        if layer._original_weight is not None and layer._original_weight.device.type != device:
            bad.append(f"{n}._original_weight")
    return bad


@pytest.mark.parametrize("method", METHODS)
def test_meta_default_device_keeps_everything_on_cpu(method, tmp_path):
    torch.manual_seed(0)
    model = Net()
    x, target = torch.randn(2, 4, 8, 8), torch.randn(2, 6)
    with torch.no_grad():
        y0 = model(x)
    with torch.device("meta"):
        sv.attach(model, _cfg(method))
        assert not _all_on(model, "cpu"), _all_on(model, "cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        assert all(p.grad is not None and p.grad.device.type == "cpu" for p in params)
    perturb(model)  # a non-zero ΔW everywhere (the generator is CPU-only: outside the meta context)
    with torch.device("meta"):
        with torch.no_grad():
            y = model(x)
            assert y.device.type == "cpu" and (y - y0).abs().max() > 1e-4
            sv.merge(model)
            assert not _all_on(model, "cpu"), _all_on(model, "cpu")
            torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)
            sv.unmerge(model)
            for _, layer in sv.spectral_layers(model):
                assert layer.delta_weight().device.type == "cpu"
                assert sv.singular_values(layer).device.type == "cpu"
        sv.save_adapter(model, tmp_path / "ad")
    torch.manual_seed(0)
    fresh = Net()
    with torch.device("meta"):
        sv.load_adapter(fresh, tmp_path / "ad", progress=False)
        assert not _all_on(fresh, "cpu"), _all_on(fresh, "cpu")
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), y, atol=1e-5, rtol=1e-5)
        sv.detach(fresh)
    assert not list(sv.spectral_layers(fresh))


@pytest.mark.parametrize("method,mode", [("spectral_a", "spectral"), ("spectral_r", "spectral"), ("svdiff", "mean"),
                                         ("spectral_a", "least_squares")])
def test_meta_default_device_fuse_and_export_stay_on_cpu(method, mode, tmp_path):
    """Fusion (every adapter it builds) and LoRA export under a meta default device (issue 13)."""
    from fusion import add_fused_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(3, 12)
    for band, name in enumerate(["a", "b"]):
        sv.attach(model, sv.SpectralConfig(method=method, rank=2, band=band, target_modules=["0", "2"]),
                  adapter_name=name)
    perturb(model)
    inputs = {"a": [x], "b": [x + 1]}
    with torch.device("meta"):
        add_fused_adapter(model, ["a", "b"], mode=mode, inputs=inputs, progress=False)
        assert not _all_on(model, "cpu"), _all_on(model, "cpu")
        with torch.no_grad():
            y = model(x)
        assert y.device.type == "cpu" and torch.isfinite(y).all()
        if mode != "least_squares":  # its fused ΔW is dense (no exact low-rank file); the others export
            report = sv.export_lora(model, tmp_path / "fused.safetensors", adapter_name="fused")
            assert report["max_rel_error"] < 1e-5  # svdiff's fused factors are re-factored to min(out, in)
