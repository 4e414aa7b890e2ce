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


class _Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def test_cache_serves_a_later_higher_k_without_recomputing(monkeypatch, tmp_path):
    """Issue 18.7: an exact entry keeps every triplet, so k=3 then k=17 decomposes once, and the served
    result equals a fresh decomposition bit for bit."""
    import spectral_vision.svd as svd

    monkeypatch.setenv("SPECTRAL_VISION_CACHE", str(tmp_path))
    W = torch.randn(20, 30, generator=torch.Generator().manual_seed(3))
    count = _Counter(torch.linalg.svd)
    monkeypatch.setattr(torch.linalg, "svd", count)
    b3 = decompose(W, 3, method="exact")
    assert count.calls == 1 and b3.k == 3
    b17 = decompose(W, 17, method="exact")  # higher k, within the stored 20: served from the file
    full = decompose(W, method="exact")
    assert count.calls == 1 and b17.k == 17 and full.k == 20
    fresh = decompose(W, 17, method="exact", cache=False)
    assert count.calls == 2
    for a, b in ((b17, fresh), (full.select(torch.arange(17)), fresh)):
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V)
    assert torch.equal(b3.U, fresh.U[:, :3])
    # the file holds all min(out, in) triplets
    from safetensors.torch import load_file

    (entry,) = svd.cache_dir().glob(f"{b3.weight_hash}-exact.safetensors")
    assert load_file(str(entry))["S"].numel() == 20


def test_cache_randomized_block_serves_any_k_inside_it(monkeypatch, tmp_path):
    """A randomized entry holds the whole 256-block: k=4 then k=200 compute once and equal a fresh run;
    k=258 is another block (another computation) and gets its own entry."""
    import spectral_vision.svd as svd

    monkeypatch.setenv("SPECTRAL_VISION_CACHE", str(tmp_path))
    W = torch.randn(260, 600, generator=torch.Generator().manual_seed(4))
    count = _Counter(svd._randomized)
    monkeypatch.setattr(svd, "_randomized", count)
    a = decompose(W, 4, method="randomized")
    b = decompose(W, 200, method="randomized")
    assert count.calls == 1 and b.k == 200
    fresh = decompose(W, 200, method="randomized", cache=False)
    assert torch.equal(b.U, fresh.U) and torch.equal(b.S, fresh.S) and torch.equal(b.V, fresh.V)
    assert torch.equal(a.U, fresh.U[:, :4])
    c = decompose(W, 258, method="randomized")
    assert count.calls == 3 and c.k == 258
    assert len(list(svd.cache_dir().glob(f"{a.weight_hash}-rsvd*.safetensors"))) == 2


def test_old_small_or_corrupt_entries_are_recomputed(monkeypatch, tmp_path):
    """An entry with fewer triplets than asked (written by an older version), of the wrong shape, with NaN,
    or truncated is recomputed and replaced by a full entry, never served."""
    import spectral_vision.svd as svd
    from safetensors.torch import save_file

    monkeypatch.setenv("SPECTRAL_VISION_CACHE", str(tmp_path))
    W = torch.randn(12, 9, generator=torch.Generator().manual_seed(5))
    ref = decompose(W, method="exact", cache=False)
    path = svd.cache_dir() / f"{ref.weight_hash}-exact.safetensors"
    path.parent.mkdir(parents=True)
    count = _Counter(torch.linalg.svd)
    monkeypatch.setattr(torch.linalg, "svd", count)
    bad_entries = [
        {"U": ref.U[:, :2].contiguous(), "S": ref.S[:2].contiguous(), "V": ref.V[:, :2].contiguous()},  # old: k=2
        {"U": ref.U.T.contiguous()[:9, :9], "S": ref.S, "V": ref.V},  # wrong shape
        {"U": ref.U * float("nan"), "S": ref.S, "V": ref.V},  # non-finite
    ]
    for i, entry in enumerate(bad_entries):
        save_file({k: v.contiguous() for k, v in entry.items()}, str(path))
        got = decompose(W, 5, method="exact")
        assert count.calls == i + 1 and torch.equal(got.U, ref.U[:, :5]) and torch.equal(got.S, ref.S[:5])
    path.write_bytes(path.read_bytes()[:50])  # truncated
    assert torch.equal(decompose(W, 9, method="exact").V, ref.V) and count.calls == 4
    assert torch.equal(decompose(W, 9, method="exact").U, ref.U) and count.calls == 4  # now served
