"""Adapter files: basis signatures (no silent basis drift across dtypes / noise / random inits), config
validation, save-all layout, and error messages that name what the model holds."""
import json
import warnings

import pytest
import torch
from torch import nn

import spectral_vision as sv
from spectral_vision import io as svio
from spectral_vision.fileio import file_sha256
from spectral_vision.svd import decompose
from spectral_vision.zoo import create_model
from helpers import perturb


class Head(nn.Module):
    """A projection whose weight is built from a chosen SVD (and a second, untouched layer)."""

    def __init__(self, W: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(W.shape[1], W.shape[0])
        self.out = nn.Linear(W.shape[0], 8)
        with torch.no_grad():
            self.proj.weight.copy_(W)

    def forward(self, x):
        return self.out(self.proj(x))


def _weight(seed, tie=True, degenerate=False, out=64, inn=48):
    """``W (out, in)`` with well separated singular values; ``tie``: the two largest entries of ``u_0`` have
    (almost) equal magnitude and opposite signs, so the sign rule "largest entry positive" is decided by
    rounding; ``degenerate``: σ_1 = σ_2 (to 1e-6), so their order / rotation is decided by rounding."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, out, generator=g)).Q
    V = torch.linalg.qr(torch.randn(inn, inn, generator=g)).Q
    if tie:
        u0 = torch.randn(out, generator=g) * 0.05
        u0[3], u0[7] = 0.6, -0.6 * (1 + 1e-5)
        U[:, 0] = u0 / u0.norm()
        Q, R = torch.linalg.qr(U)
        U = Q * torch.sign(R.diagonal())  # orthonormal, column 0 keeps its direction
    S = torch.linspace(4, 0.5, inn)
    if degenerate:
        S[2] = S[1] * (1 - 1e-6)
    return (U[:, :inn] * S) @ V.T


def _flipping_seed():
    """A seed whose top singular pair flips sign when the weight is rounded to bf16 and to fp16 (checked)."""
    for seed in range(50):
        W = _weight(seed)
        a = decompose(W, 1, cache=False).U[:, 0]
        if all(float(a @ decompose(W.to(dt).float(), 1, cache=False).U[:, 0]) < -0.99
               for dt in (torch.bfloat16, torch.float16)):
            return seed
    raise AssertionError("no sign-flipping weight found")


def _adapted(W, method="spectral_a", rank=4):
    model = Head(W)
    sv.attach(model, sv.SpectralConfig(method=method, rank=rank, target_modules=["proj"]), progress=False)
    perturb(model, std=0.1)
    return model


def _rel_err(model, ref):
    layer = dict(sv.spectral_layers(model))["proj"]
    return float((layer.delta_weight().detach() - ref).norm() / ref.norm())


def _strip_signature(folder):
    """Rewrite a folder as an older version wrote it: no basis signature."""
    from safetensors.torch import load_file, save_file

    t = {k: v for k, v in load_file(str(folder / svio.WEIGHTS_NAME)).items() if not k.startswith(svio.SIG_PREFIX)}
    save_file(t, str(folder / svio.WEIGHTS_NAME))
    meta = json.loads((folder / svio.CONFIG_NAME).read_text())
    meta.pop("basis_signature")
    meta["weights_sha256"] = file_sha256(folder / svio.WEIGHTS_NAME)
    (folder / svio.CONFIG_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("method", ["spectral_a", "spectral_r", "svdiff", "lorsa"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision_base_with_a_sign_flip_gives_the_same_adapter(method, dtype, tol, tmp_path):
    W = _weight(_flipping_seed())
    model = _adapted(W, method)
    ref = dict(sv.spectral_layers(model))["proj"].delta_weight().detach()
    sv.save_adapter(model, tmp_path / "a")
    low = Head(W).to(dtype)
    sv.load_adapter(low, tmp_path / "a", progress=False)
    assert _rel_err(low, ref) < tol  # the dtype's rounding, not a flipped singular pair
    _strip_signature(tmp_path / "a")  # what happened before: the sign rule silently flips the pair
    old = Head(W).to(dtype)
    with pytest.warns(UserWarning, match="without a basis signature"):
        sv.load_adapter(old, tmp_path / "a", progress=False)
    if method != "svdiff":  # (SVDiff's ΔW = U diag(shift) Vᵀ is invariant to a joint sign flip)
        assert _rel_err(old, ref) > 0.1


def test_swapped_or_rotated_degenerate_pair_is_undone(tmp_path):
    """σ_1 = σ_2 (to 1e-6): the same matrix has other valid SVDs (any rotation of the pair). A base whose
    decomposition returns a rotated pair must give the saved adapter back, in fp32 and in bf16."""
    W = _weight(0, tie=False, degenerate=True)
    model = _adapted(W, "spectral_a", rank=4)
    ref = dict(sv.spectral_layers(model))["proj"].delta_weight().detach()
    sv.save_adapter(model, tmp_path / "a")
    basis = decompose(W, 48, cache=False)
    U, S, V = basis.U.clone(), basis.S.clone(), basis.V.clone()
    R = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    U[:, 1:3], V[:, 1:3] = U[:, 1:3] @ R, V[:, 1:3] @ R
    S[1], S[2] = S[2], S[1]  # the rotated pair, in the other order (the matrix changes by 1e-6 relative)
    Wr = (U * S) @ V.T
    got = decompose(Wr, 3, cache=False).U
    assert abs(float(got[:, 1] @ basis.U[:, 1])) < 0.9  # the recomputed pair really is another one
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        other = Head(Wr).to(dtype)
        sv.load_adapter(other, tmp_path / "a", progress=False)
        assert _rel_err(other, ref) < tol


def test_same_spectrum_other_singular_vectors_is_refused(tmp_path):
    """Two weights with identical singular values (the σ fingerprint passes) but other vectors: refused."""
    W = _weight(1, tie=False)
    sv.save_adapter(_adapted(W), tmp_path / "a")
    g = torch.Generator().manual_seed(7)
    Q1 = torch.linalg.qr(torch.randn(64, 64, generator=g)).Q
    Q2 = torch.linalg.qr(torch.randn(48, 48, generator=g)).Q
    other = Head(Q1 @ W @ Q2.T)
    snap = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(sv.AdapterFileError, match="'proj'.*not in the span"):
        sv.load_adapter(other, tmp_path / "a", progress=False)
    assert sv.adapter_names(other) == [] and all(torch.equal(v, snap[k]) for k, v in other.state_dict().items())


def test_two_random_inits_of_a_head_are_told_apart(tmp_path):
    """Issue 18: a head's basis from one random init must not load onto another init (other process/RNG)."""
    def head(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 4))

    a = head(0)
    sv.attach(a, sv.SpectralConfig(rank=8, target_modules=["0"]), progress=False)
    sv.save_adapter(a, tmp_path / "a")
    for seed in range(1, 4):
        b = head(seed)
        with pytest.raises(sv.AdapterFileError, match="layer '0'"):
            sv.load_adapter(b, tmp_path / "a", progress=False)
        assert sv.adapter_names(b) == []


def test_weight_noise_is_matched_or_refused_never_silently_wrong(tmp_path):
    """1 % weight noise: either the adapter is reproduced (ΔW error bounded) or the load is refused."""
    model = create_model("tiny-vit")
    sv.attach(model, sv.SpectralConfig(rank=4, target_modules="timm_vit"), progress=False)
    perturb(model, std=0.05)
    ref = {n: l.delta_weight().detach() for n, l in sv.spectral_layers(model)}
    sv.save_adapter(model, tmp_path / "a")
    outcomes = []
    for seed in range(2):
        noisy = create_model("tiny-vit")
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for m in noisy.modules():
                if isinstance(m, nn.Linear):
                    m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.01 * m.weight.std())
        try:
            sv.load_adapter(noisy, tmp_path / "a", progress=False)
        except sv.AdapterFileError as e:
            assert "layer '" in str(e)
            assert sv.adapter_names(noisy) == []
            outcomes.append("refused")
            continue
        errs = [float((l.delta_weight().detach() - ref[n]).norm() / ref[n].norm()) for n, l in sv.spectral_layers(noisy)]
        assert max(errs) < 0.15, errs
        outcomes.append("matched")
    assert outcomes  # each seed was one of the two


@pytest.mark.slow
def test_builtin_digits_unet_bf16_fp16(tmp_path):
    """The reported case: spectral_a r=4 saved on the fp32 digits UNet, loaded on bf16 / fp16 copies."""
    import copy

    from spectral_vision.integrations.diffusers import load_pipeline

    unet = load_pipeline("builtin:digits").unet.float()
    base = copy.deepcopy(unet)
    sv.attach(unet, sv.SpectralConfig(method="spectral_a", rank=4, target_modules="sd_unet"), progress=False)
    perturb(unet, std=0.05)
    ref = {n: l.delta_weight().detach() for n, l in sv.spectral_layers(unet)}
    sv.save_adapter(unet, tmp_path / "a")
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        low = copy.deepcopy(base).to(dtype)
        sv.load_adapter(low, tmp_path / "a", progress=False)
        errs = {n: float((l.delta_weight().detach() - ref[n]).norm() / ref[n].norm()) for n, l in sv.spectral_layers(low)}
        assert max(errs.values()) < tol, max(errs.items(), key=lambda kv: kv[1])


# ---- config validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,err", [
    ("rank", 2.5, TypeError), ("rank", "2", TypeError), ("rank", True, TypeError), ("rank", 0, ValueError),
    ("svd_power_iters", 10**9, ValueError), ("svd_oversample", -1, ValueError), ("svd_oversample", 1.0, TypeError),
    ("alpha", float("nan"), ValueError), ("alpha", float("inf"), ValueError), ("alpha", "1", ValueError),
    ("columns", [0, 0], ValueError), ("columns", [-1], ValueError), ("columns", [0.5], TypeError),
    ("svd_cache", "yes", TypeError), ("options", [], TypeError), ("target_modules", 3, TypeError),
    ("method", None, TypeError),
])
def test_spectral_config_checks_types_and_bounds(field, value, err):
    with pytest.raises(err, match=field.rstrip("s") if field != "options" else "options"):
        sv.SpectralConfig(**{field: value})


def test_spectral_config_accepts_numpy_ints_and_roundtrips():
    np = pytest.importorskip("numpy")
    cfg = sv.SpectralConfig(rank=np.int64(3), columns=[np.int32(1), 4], alpha=2)
    assert cfg.rank == 3 and cfg.columns == [1, 4] and cfg.alpha == 2.0
    assert sv.SpectralConfig.from_dict(json.loads(cfg.to_json())) == cfg


# ---- saving every adapter, names in messages ------------------------------------------------------------
def test_save_adapter_without_name_saves_what_is_there(tmp_path):
    model = create_model("tiny-vit")
    sv.attach(model, sv.SpectralConfig(rank=2), "a", progress=False)
    perturb(model)
    sv.save_adapter(model, tmp_path / "one")  # the only adapter, named "a": saved at the root
    fresh = create_model("tiny-vit")
    sv.load_adapter(fresh, tmp_path / "one", progress=False)
    assert sv.adapter_names(fresh) == ["a"]
    sv.attach(model, sv.SpectralConfig(rank=2, band=1), "default", progress=False)
    sv.attach(model, sv.SpectralConfig(method="spectral_r", band=2, rank=2), "b", progress=False)
    sv.set_adapter(model, ["a", "default", "b"])
    perturb(model, seed=3)
    sv.save_adapter(model, tmp_path / "all")  # PEFT layout: "default" at the root, others in subfolders
    assert (tmp_path / "all" / svio.CONFIG_NAME).is_file()
    assert sorted(p.name for p in (tmp_path / "all").iterdir() if p.is_dir()) == ["a", "b"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    fresh = sv.SpectralModel.from_pretrained(create_model("tiny-vit"), tmp_path / "all")
    assert sorted(fresh.adapter_names) == ["a", "b", "default"]
    assert not any(p.requires_grad for p in fresh.parameters())  # inference: every loaded adapter frozen
    fresh.set_adapter(["a", "default", "b"])
    with torch.no_grad():
        assert torch.allclose(fresh(x), want, atol=1e-5)
    with pytest.raises(KeyError, match=r"holds spectral adapters \['a', 'default', 'b'\]"):
        sv.save_adapter(model, tmp_path / "x", "nope")


def test_messages_name_what_the_model_holds(tmp_path):
    """Issue 17: export after detach on a ViT must not talk about a 'unet' component."""
    model = create_model("tiny-vit")
    with pytest.raises(KeyError) as e:
        sv.export_lora(model, tmp_path / "l.safetensors")
    assert "unet" not in str(e.value) and "VisionTransformer" in str(e.value) and "[]" in str(e.value)
    with pytest.raises(KeyError, match="holds spectral adapters"):
        sv.save_adapter(model, tmp_path / "s")
    with pytest.raises(ValueError, match="holds no adapter"):
        sv.merge(model)
    with pytest.raises(ValueError, match="may not contain"):
        sv.attach(model, sv.SpectralConfig(rank=2), "../x", progress=False)


def test_load_with_a_basis_fix_under_meta_default_device(tmp_path):
    """Issue 13: every tensor load_adapter creates (signature matching, rebuilt adapter) lives on the base's
    device: under ``torch.device("meta")`` as the default device, a CPU model still gets CPU adapters."""
    W = _weight(_flipping_seed())
    model = _adapted(W)
    ref = dict(sv.spectral_layers(model))["proj"].delta_weight().detach()
    sv.save_adapter(model, tmp_path / "a")
    low = Head(W).to(torch.bfloat16)
    with torch.device("meta"):
        sv.load_adapter(low, tmp_path / "a", progress=False)
    layer = dict(sv.spectral_layers(low))["proj"]
    tensors = list(layer.adapters.parameters()) + list(layer.adapters.buffers())
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert _rel_err(low, ref) < 2e-2
