"""Forward forms (spectral_vision.fastpath): every form is exact against ``delta_weight`` (values and grads), on
Linear / Conv2d / HF Conv1D, in bf16, compiled and checkpointed; the Cayley fast path; the cost model; CUDA."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral_vision as sv
from helpers import perturb
from spectral_vision import fastpath
from spectral_vision.methods.spectral_r import cayley, cayley_fast, skew_basis

FAST_METHODS = ["spectral_a", "spectral_r", "svdiff", "speclora", "lorsa"]
FAST_LAYERS = {"linear": lambda: nn.Linear(24, 40), "conv2d": lambda: nn.Conv2d(6, 20, 3, padding=1, stride=2),
               "conv1d": lambda: __import__("transformers").pytorch_utils.Conv1D(40, 24)}


def _fast_model(kind, method, **kw):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", FAST_LAYERS[kind]())
    opts = {"options": {"k": 8}} if method == "lorsa" else {}
    sv.attach(model, sv.SpectralConfig(method=method, rank=3, target_modules=["layer"], **opts, **kw))
    perturb(model, std=0.2)
    x = torch.randn(2, 6, 9, 9) if kind == "conv2d" else torch.randn(2, 5, 24)
    return model, x


def _reference(layer, x):
    """op(x, W + delta_weight()): the single source of truth, differentiable."""
    base = layer.base_layer
    w = base.weight + layer.to_base_layout(layer.delta_weight())
    if layer.kind == "conv2d":
        return F.conv2d(x, w, base.bias, base.stride, base.padding, base.dilation)
    return x @ w + base.bias if layer.kind == "conv1d" else F.linear(x, w, base.bias)


def _grads(model, fn, x):
    params = [p for p in model.parameters() if p.requires_grad]
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    out = [y.detach(), x.grad] + [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("form", ["delta", "weight"])
@pytest.mark.parametrize("kind", list(FAST_LAYERS))
@pytest.mark.parametrize("method", FAST_METHODS)
def test_forward_forms_match_delta_weight_values_and_grads(method, kind, form):
    model, x = _fast_model(kind, method)
    fastpath.set_forward_form(model, form)
    got = _grads(model, model, x)
    ref = _grads(model, lambda t: _reference(model.layer, t), x)
    assert ref[0].sub(model.layer.base_layer(x)).abs().max() > 1e-3  # the adapter does change the output
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("method", FAST_METHODS)
def test_weight_form_equals_merged_model_and_fast_factors_exact(method):
    model, x = _fast_model("linear", method)
    delta = model.layer.adapters["default"]
    with torch.no_grad():
        B, A = fastpath.fast_factors(delta)
        assert B.shape[1] == A.shape[0] == delta.factor_rank
        torch.testing.assert_close(B @ A, delta.delta_weight(), atol=2e-6, rtol=1e-5)
        fastpath.set_forward_form(model, "weight")
        y = model(x)
        sv.merge(model)
        torch.testing.assert_close(model(x), y, atol=2e-6, rtol=1e-6)  # merged inference = weight form


@pytest.mark.parametrize("r", [1, 2, 5])
@pytest.mark.parametrize("alpha", [0.3, 4.0])
def test_cayley_fast_is_cayley(r, alpha):
    params = torch.randn(3, r * (r - 1) // 2, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
    R = cayley_fast(params, skew_basis(r).double(), r, alpha)  # (3, r, r), one batched inverse
    for i in range(3):
        torch.testing.assert_close(R[i], cayley(params[i], r, alpha), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(R[i] @ R[i].T, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)


def test_spectral_r_step_reads_nothing_back_to_the_host():
    """The ^R training step (forward + backward, both forms) calls no op that reads a tensor back to the
    host (``item``: a device sync on CUDA, as ``linalg.solve``'s error check and ``lu_solve``'s pivot check do)."""
    model, x = _fast_model("linear", "spectral_r")
    from torch.profiler import profile

    for form in ("delta", "weight"):
        fastpath.set_forward_form(model, form)
        with profile() as prof:
            model(x).sum().backward()
        names = {e.key for e in prof.key_averages()}
        assert "aten::linalg_cholesky_ex" in names, sorted(names)
        assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::linalg_solve"}, sorted(names)


def test_auto_form_cost_model():
    gpu, cpu = fastpath.RATES["cuda"], fastpath.RATES["cpu"]
    vit_qkv = dict(out_f=2304, in_f=768, n=64 * 197, r=16, size=2, train=True)
    assert fastpath.form_costs(**vit_qkv, rates=gpu)[1] < fastpath.form_costs(**vit_qkv, rates=gpu)[0]
    llama_up = dict(out_f=11008, in_f=4096, n=4096, r=16, size=2, train=True)  # wide layers: thin passes win
    assert fastpath.form_costs(**llama_up, rates=gpu)[0] < fastpath.form_costs(**llama_up, rates=gpu)[1]
    cpu_vit = dict(out_f=2304, in_f=768, n=4 * 197, r=16, size=4, train=True)
    assert fastpath.form_costs(**cpu_vit, rates=cpu)[0] < fastpath.form_costs(**cpu_vit, rates=cpu)[1]
    decode = dict(out_f=768, in_f=768, n=1, r=16, size=2, train=False)  # one token: never rebuild the weight
    assert fastpath.form_costs(**decode, rates=gpu)[0] < fastpath.form_costs(**decode, rates=gpu)[1]
    model, x = _fast_model("linear", "spectral_a")
    assert fastpath.choose_form(model.layer, x, [model.layer.adapters["default"]]) in ("delta", "weight")
    with pytest.raises(ValueError, match="unknown forward form"):
        fastpath.set_forward_form(model, "fused")
    with pytest.raises(ValueError, match="no SpectralLayer"):
        fastpath.set_forward_form(nn.Linear(2, 2), "delta")


def test_weight_form_refused_for_custom_base_forward():
    """A Linear subclass whose forward is not F.linear (here it doubles the weight) is refused at attach
    (no registered geometry), so no form can silently bypass its forward; a registered non-plain kind
    (timm Conv2dSame) keeps the delta form even when the weight form is forced."""

    class Doubled(nn.Linear):
        def forward(self, x):
            return F.linear(x, 2 * self.weight, self.bias)

    model = nn.Sequential()
    model.add_module("layer", Doubled(24, 40))
    with pytest.raises(TypeError, match="overrides"):
        sv.attach(model, sv.SpectralConfig(method="spectral_a", rank=3, target_modules=["layer"]))
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", Conv2dSame(4, 8, 3, stride=2))
    sv.attach(model, sv.SpectralConfig(method="spectral_a", rank=3, target_modules=["layer"]))
    perturb(model)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        fastpath.set_forward_form(model, "delta")
        expected = model(x)
        fastpath.set_forward_form(model, "weight")
        assert fastpath.choose_form(model.layer, x, [model.layer.adapters["default"]]) == "delta"
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["delta", "weight"])
def test_bf16_autocast_and_bf16_base(form):
    model, x = _fast_model("linear", "spectral_a")
    fastpath.set_forward_form(model, form)
    with torch.no_grad():
        ref = _reference(model.layer, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)  # bf16 rounding of x and W only
        model.layer.base_layer.to(torch.bfloat16)  # a bf16 base: the weight form casts W + ΔW to bf16
        yb = model(x.bfloat16())
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.float(), ref, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("form", [pytest.param("delta", marks=pytest.mark.slow), "weight", "auto"])
def test_compile_and_checkpointing_every_method(form):
    """All five methods on one small MLP (one adapter each on alternating layers): torch.compile
    (fullgraph, so no graph break; aot_eager: dynamo + AOTAutograd without a C++ build) and
    non-reentrant gradient checkpointing give the eager loss and gradients; ``auto`` also under autocast."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(24, 24), nn.GELU())])
    for i, method in enumerate(FAST_METHODS):
        opts = {"options": {"k": 8}} if method == "lorsa" else {}
        sv.attach(model, sv.SpectralConfig(method=method, rank=3, target_modules=[str(2 * i)], **opts),
                  adapter_name=method, progress=False)
    perturb(model, std=0.2)
    fastpath.set_forward_form(model, None if form == "auto" else form)
    x = torch.randn(6, 24)
    ref = _grads(model, model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ckpt = lambda t: checkpoint(model, t, use_reentrant=False)  # noqa: E731
    for fn in (compiled, ckpt):
        for g, r in zip(_grads(model, fn, x), ref):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    if form == "auto":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(compiled(x), model(x))


# ---- CUDA (run on a GPU machine: pytest -m cuda) ----------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", FAST_METHODS)
def test_cuda_forms_bf16_and_inductor(method):
    model, x = _fast_model("linear", method)
    ref = _grads(model, lambda t: _reference(model.layer, t), x)  # fp32 on the CPU
    model, x = model.cuda(), x.cuda()
    for form in ("delta", "weight", "auto"):
        fastpath.set_forward_form(model, form)
        for g, r in zip(_grads(model, model, x), ref):
            torch.testing.assert_close(g.cpu(), r, atol=1e-4, rtol=1e-4)  # TF32 off by default: fp32 rounding
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        torch.testing.assert_close(y.float().cpu(), ref[0], atol=0.05, rtol=0.02)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # inductor
    for g, r in zip(_grads(model, compiled, x), ref):
        torch.testing.assert_close(g.cpu(), r, atol=1e-4, rtol=1e-4)
