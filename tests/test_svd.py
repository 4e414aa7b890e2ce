import torch

import spectral_vision as sv
from spectral_vision.svd import cache_dir, canonicalize_signs, decompose


def test_exact_svd_reconstructs_and_is_fp32():
    W = torch.randn(24, 40, dtype=torch.float16)
    b = decompose(W, method="exact")
    assert b.U.dtype == torch.float32 and b.U.shape == (24, 24) and b.V.shape == (40, 24)
    rec = (b.U * b.S) @ b.V.T
    assert torch.allclose(rec, W.float(), atol=1e-4)
    assert torch.all(b.S[:-1] >= b.S[1:])


def test_randomized_matches_exact_top_triplets():
    g = torch.Generator().manual_seed(0)
    # spectrum with a clear decay so the top triplets are well separated
    U, _ = torch.linalg.qr(torch.randn(300, 300, generator=g))
    V, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    S = 10.0 * torch.arange(1, 201, dtype=torch.float32) ** -1.0
    W = (U[:, :200] * S) @ V.T
    ex = decompose(W, 8, method="exact", cache=False)
    rnd = decompose(W, 8, method="randomized", cache=False)
    assert torch.allclose(ex.S, rnd.S, rtol=1e-4)
    # canonical signs make the vectors themselves comparable
    assert (ex.U - rnd.U).abs().max() < 1e-3 and (ex.V - rnd.V).abs().max() < 1e-3
    # randomized is deterministic
    again = decompose(W, 8, method="randomized", cache=False)
    assert torch.equal(again.U, rnd.U)


def test_sign_flipped_decomposition_is_canonicalized_identically():
    W = torch.randn(16, 12)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    flips = torch.tensor([1, -1, -1, 1, -1, 1, 1, -1, 1, -1, -1, 1], dtype=torch.float32)
    U1, V1 = canonicalize_signs(U, Vh.T)
    U2, V2 = canonicalize_signs(U * flips, Vh.T * flips)
    assert torch.equal(U1, U2) and torch.equal(V1, V2)
    assert torch.allclose((U2 * S) @ V2.T, W, atol=1e-5)
    # the rule: largest-magnitude entry of each u_i is positive
    assert torch.all(U1.gather(0, U1.abs().argmax(0, keepdim=True)) > 0)


def test_disk_cache_is_used_for_the_same_weight(monkeypatch):
    W = torch.randn(20, 30)
    b1 = decompose(W, 5, method="exact")
    files = list(cache_dir().glob(f"{b1.weight_hash}-exact.safetensors"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("SVD recomputed despite the cache")

    monkeypatch.setattr(torch.linalg, "svd", boom)
    b2 = decompose(W, 3, method="exact")  # fewer columns: served from the cache
    assert torch.equal(b2.U, b1.U[:, :3]) and torch.equal(b2.S, b1.S[:3])


def test_decompose_rejects_bad_input():
    import pytest

    with pytest.raises(ValueError, match="2-D"):
        decompose(torch.randn(3, 3, 3))
    with pytest.raises(ValueError, match="out of range"):
        decompose(torch.randn(4, 6), k=5)
    with pytest.raises(ValueError, match="unknown SVD method"):
        decompose(torch.randn(4, 6), method="qr")


def test_randomized_bands_come_from_one_computation():
    """Concepts on bands 0 and 1 of a wide layer must get the same, mutually orthogonal vectors."""
    W = torch.randn(300, 1100)
    a = decompose(W, 4, method="randomized", cache=False)
    b = decompose(W, 8, method="randomized", cache=False)
    assert torch.equal(a.U, b.U[:, :4]) and torch.equal(a.V, b.V[:, :4])
    assert (b.U.T @ b.U - torch.eye(8)).abs().max() < 1e-5
    auto = decompose(torch.randn(1100, 1300), 8)  # above EXACT_MAX_DIM: randomized, one block
    assert auto.method == "randomized" and auto.k == 8
