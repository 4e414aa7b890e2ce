"""Method-specific exact checks: SVDiff, SpecLoRA (eq. 7-8), LoRSA (sec. 3) and Fisher importance scoring."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral_vision as sv
from helpers import perturb
from spectral_vision.importance import score_importance, select_components
from spectral_vision.methods.lorsa import projections
from spectral_vision.zoo import create_model


def _linear(method, rank=3, out_f=40, in_f=24, **kw):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(in_f, out_f))
    sv.attach(model, sv.SpectralConfig(method=method, rank=rank, target_modules=["layer"], **kw))
    return model, model.layer.adapters["default"], model.layer.base_layer.weight.detach().clone()


# ---- SVDiff ------------------------------------------------------------------------------------------
def test_svdiff_is_relu_shifted_spectrum():
    model, delta, W = _linear("svdiff", alpha=1.0)
    assert delta.delta.numel() == 24 and delta.columns.tolist() == list(range(24))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # independent of the core's decomposition
    shift = 0.01 * torch.randn(24, generator=torch.Generator().manual_seed(3))  # |shift| << σ_i
    shift[:4] = -2 * S[:4]  # these singular values are clipped to 0 by the ReLU
    with torch.no_grad():
        delta.delta.copy_(shift)
        expected = U @ torch.diag(torch.relu(S + shift)) @ Vh
        torch.testing.assert_close(W + delta.delta_weight(), expected, atol=2e-5, rtol=1e-4)
        assert torch.linalg.matrix_rank(W + delta.delta_weight(), atol=1e-4) == 20
        B, A = delta.factors()
        assert B.shape == (40, 24) and A.shape == (24, 24)


def test_svdiff_alpha_scales_delta():
    _, d1, _ = _linear("svdiff", alpha=1.0)
    _, d2, _ = _linear("svdiff", alpha=0.25)
    with torch.no_grad():
        d1.delta.fill_(0.3)
        d2.delta.fill_(0.3)
        torch.testing.assert_close(d2.delta_weight(), 0.25 * d1.delta_weight())


# ---- SpecLoRA ------------------------------------------------------------------------------------------
def test_speclora_equation_7_with_explicit_mask():
    model, delta, W = _linear("speclora", rank=2, options={"k": 5, "lora_alpha": 4})
    perturb(model, std=0.3)
    d, A, B = delta.d.detach(), delta.lora_A.detach(), delta.lora_B.detach()
    gamma = torch.ones_like(W)
    for i in range(5):
        for j in range(5):
            gamma[i, j] = d[i]  # eq. 8: k copies of d as the columns of the top-left block
    expected = gamma * W + (4 / 2) * B @ A  # eq. 7 with LoRA scaling alpha / r
    with torch.no_grad():
        torch.testing.assert_close(W + delta.delta_weight(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(delta.gamma(), gamma)
        Bf, Af = delta.factors()
        assert Bf.shape == (40, 5 + 2) and Af.shape == (5 + 2, 24)  # exact rank k + r
        x = torch.randn(3, 24)
        torch.testing.assert_close(model(x), F.linear(x, expected, model.layer.base_layer.bias), atol=1e-5, rtol=1e-5)


def test_speclora_needs_no_singular_vectors():
    model, delta, _ = _linear("speclora", rank=4)
    assert delta.columns.numel() == 0 and not hasattr(delta, "U")  # no basis kept, no band used
    assert delta.k == 24  # default k=32 capped at min(out, in)
    assert sv.trainable_parameters(model).trainable == 24 + 4 * (40 + 24)
    assert delta.scaling == 1.0  # lora_alpha defaults to r
    assert delta.lora_A.abs().sum() > 0 and delta.lora_B.abs().sum() == 0  # PEFT's LoRA init
    with pytest.raises(ValueError, match="no options"):
        _linear("speclora", options={"rank_k": 3})


def test_speclora_save_load_with_empty_columns(tmp_path):
    model, _, _ = _linear("speclora", rank=2, options={"k": 7})
    perturb(model)
    x = torch.randn(2, 24)
    with torch.no_grad():
        y = model(x)
    sv.save_adapter(model, tmp_path / "s")
    fresh = nn.Sequential()
    torch.manual_seed(0)
    fresh.add_module("layer", nn.Linear(24, 40))
    sv.load_adapter(fresh, tmp_path / "s")
    assert fresh.layer.adapters["default"].columns.numel() == 0
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


# ---- LoRSA ------------------------------------------------------------------------------------------
def _lorsa_loop(x, W, U_S, V_S, sigma_S, delta_sigma, p, q, P, Q):
    """The paper's sec. 3.4 reference forward (loop over components), verbatim apart from names."""
    y = x @ W.T
    for i in range(len(sigma_S)):
        u_i = U_S[:, i] + P @ p[i]
        v_i = V_S[:, i] + Q @ q[i]
        y = y + (x @ v_i).unsqueeze(-1) * u_i * (sigma_S[i] + delta_sigma[i])
        y = y - (x @ V_S[:, i]).unsqueeze(-1) * U_S[:, i] * sigma_S[i]
    return y


def test_lorsa_matches_paper_loop_and_factor_rank():
    model, delta, W = _linear("lorsa", rank=4, columns=[0, 2, 5, 9], options={"proj_rank": 3})
    perturb(model, std=0.2)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    d = delta
    x = torch.randn(6, 24)
    with torch.no_grad():
        # the core's basis equals the exact SVD up to the sign of each pair
        torch.testing.assert_close(d.S, S[[0, 2, 5, 9]])
        torch.testing.assert_close((d.U * d.S) @ d.V.T, U[:, [0, 2, 5, 9]] @ torch.diag(S[[0, 2, 5, 9]]) @ Vh[[0, 2, 5, 9]])
        ref = _lorsa_loop(x, W, d.U, d.V, d.S, d.delta_sigma, d.p.T, d.q.T, d.P, d.Q)
        torch.testing.assert_close(model(x) - model.layer.base_layer.bias, ref, atol=1e-5, rtol=1e-5)
        B, A = d.factors()
        assert B.shape == (40, 4 + 3) and A.shape == (4 + 3, 24)  # |S| + r_p, not 2|S|
        torch.testing.assert_close(B @ A, d.delta_weight(), atol=1e-5, rtol=1e-4)
    assert sv.trainable_parameters(model).trainable == 4 * (1 + 2 * 3)


def test_lorsa_projections_identical_after_load(tmp_path):
    model, delta, _ = _linear("lorsa", rank=3, options={"seed": 7})
    perturb(model)
    sv.save_adapter(model, tmp_path / "l")
    meta, tensors = sv.read_adapter(tmp_path / "l")
    assert not any(k.endswith((".P", ".Q")) for k in tensors)  # regenerated, not stored
    with torch.random.fork_rng():
        torch.manual_seed(12345)  # the global RNG state must not matter
        fresh = nn.Sequential()
        fresh.add_module("layer", nn.Linear(24, 40))
        fresh.layer.load_state_dict(model.layer.base_layer.state_dict())
        sv.load_adapter(fresh, tmp_path / "l")
    got = fresh.layer.adapters["default"]
    assert torch.equal(got.P, delta.P) and torch.equal(got.Q, delta.Q)
    assert torch.equal(got.delta_weight(), delta.delta_weight())
    _, other, _ = _linear("lorsa", rank=3, options={"seed": 8})
    assert not torch.equal(other.P, delta.P)
    P, Q = projections(7, 40, 24, 4)
    assert torch.equal(P, delta.P) and P.shape == (40, 4) and Q.shape == (24, 4)


def test_lorsa_columns_must_come_from_top_k():
    with pytest.raises(ValueError, match="top k=8"):
        _linear("lorsa", rank=2, columns=[3, 10], options={"k": 8})


# ---- Fisher importance scoring -------------------------------------------------------------------------
def _known_layer(sigma=(6.0, 5.0, 4.0, 3.0, 2.0, 1.0)):
    """A bias-free Linear(8 -> 6) with a known SVD W = U diag(σ) Vᵀ."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    V, _ = torch.linalg.qr(torch.randn(8, 6, generator=g))
    S = torch.tensor(sigma)
    lin = nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(U @ torch.diag(S) @ V.T)
    model = nn.Sequential()
    model.add_module("layer", lin)
    return model, U, S, V


def test_scoring_picks_the_directions_the_loss_depends_on():
    model, U, S, V = _known_layer()
    model.requires_grad_(False)  # a frozen base stays frozen
    a = U[:, 3] + 2 * U[:, 5]  # the loss only sees output directions u_3 and u_5 (small σ)

    def loss_fn(m, x):
        return ((m(x) @ a) ** 2).mean()

    X = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    loader = [X[:5], X[5:10], X[10:]]
    scores = score_importance(model, loader, loss_fn, num_samples=10, k=6, target_modules=["layer"], progress=False)
    I = scores["layer"]
    # closed form: per sample ∂L/∂σ_i = 2 (aᵀ W x)(u_iᵀ a)(v_iᵀ x); only the first 10 samples are used
    Xs = X[:10]
    g = 2 * (Xs @ model.layer.weight.detach().T @ a)[:, None] * (U.T @ a)[None] * (Xs @ V)  # (10, 6)
    expected = S**2 * g.square().mean(0)
    torch.testing.assert_close(I, expected, atol=1e-5, rtol=1e-4)
    assert I[[0, 1, 2, 4]].max() < 1e-6 * I.max()
    assert select_components(scores, 2) == {"layer": [3, 5]}
    assert model.layer.weight.grad is None and not model.layer.weight.requires_grad  # model left as it was


def test_scoring_micro_batches_keep_the_ranking():
    model, U, S, V = _known_layer()
    a = U[:, 1] + U[:, 4]

    def loss_fn(m, batch):
        return ((m(batch["x"]) @ a) ** 2).mean()

    X = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    loader = [{"x": X[:8]}, {"x": X[8:]}]
    s1 = score_importance(model, loader, loss_fn, num_samples=16, k=6, target_modules=["layer"], progress=False)
    s4 = score_importance(model, loader, loss_fn, num_samples=16, k=6, target_modules=["layer"], micro_batch=4,
                          progress=False)
    assert select_components(s1, 2) == select_components(s4, 2) == {"layer": [1, 4]}
    assert not torch.allclose(s1["layer"], s4["layer"])  # different estimators of the same ranking


def test_scoring_then_lorsa_on_tiny_vit(tmp_path):
    model = create_model("tiny-vit")
    X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    loader = [(X[:2], y[:2]), (X[2:], y[2:])]
    scores = score_importance(model, loader, lambda m, b: F.cross_entropy(m(b[0]), b[1]), num_samples=4, k=16,
                              progress=False)
    assert len(scores) == 8 and all(s.shape == (16,) and (s >= 0).all() and s.sum() > 0 for s in scores.values())
    cols = select_components(scores, 3)
    cfg = sv.SpectralConfig(method="lorsa", rank=3, target_modules="timm_vit", options={"k": 16})
    sv.attach(model, cfg, columns=cols, progress=False)
    for name, layer in sv.spectral_layers(model):
        assert layer.adapters["default"].columns.tolist() == cols[name]
    perturb(model)
    sv.save_adapter(model, tmp_path / "v")
    fresh = create_model("tiny-vit")
    sv.load_adapter(fresh, tmp_path / "v", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), atol=1e-6, rtol=1e-6)
