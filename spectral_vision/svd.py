"""Decomposition: the one place where singular value decompositions are computed.

Every weight is decomposed in float32, whatever the model dtype, as ``W = U diag(S) Vᵀ`` with
``W`` the layer's 2-D weight matrix of shape ``(out, in)`` (see :mod:`spectral_vision.layers`
for the reshape convention of convolutions). Two algorithms:

* ``exact``: :func:`torch.linalg.svd` (thin), then truncated to the top ``k`` triplets;
* ``randomized``: the Halko et al. range finder with oversampling and power iterations, with a
  fixed CPU-drawn probe so that it is deterministic on every device; it computes the top
  ``RSVD_BLOCK`` (256) triplets, or whole multiples of it, in ``O(out·in·block)`` and slices them.

``auto`` (the default) is exact when ``min(out, in) <= 1024`` (ViT-B, SD's 320-768 layers) or
many columns are needed, randomized otherwise (computed over whole blocks of ``RSVD_BLOCK`` top
triplets, so the result does not depend on which band inside a block was asked for). Guarantees
that need exact singular vectors (^R keeping every singular value of the base to rounding) hold
exactly with ``svd="exact"`` and, with ``randomized``, to the accuracy of the top triplets.

Results are **sign-canonical** (:func:`canonicalize_signs`) and cached on disk keyed by a hash of
the weight's bytes, so decomposing the same base a second time costs a file read. A cache entry holds
every triplet the computation produced (all ``min(out, in)`` for ``exact``, the whole block(s) for
``randomized``), so any later ``k`` up to that is served by reading the first ``k`` columns, equal bit
for bit to a fresh decomposition; a randomized request in a further block is a different computation
(another probe size) and gets its own entry.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .fileio import atomic_write, cache_root

__all__ = ["Basis", "decompose", "canonicalize_signs", "weight_hash", "cache_dir", "sigma_fingerprint"]

#: Up to this smaller dimension, ``auto`` always uses the exact SVD.
EXACT_MAX_DIM = 1024
#: The randomized SVD always computes a whole block of this many top triplets (or all) and slices
#: it, so every band inside one block comes from the very same computation: concepts trained
#: separately on bands 0 and 1 get exactly the same (hence orthogonal) singular vectors.
RSVD_BLOCK = 256


@dataclass
class Basis:
    """Top-``k`` singular triplets of a weight matrix ``W (out, in)``.

    Attributes:
        U: ``(out, k)`` left singular vectors, float32.
        S: ``(k,)`` singular values, descending, float32.
        V: ``(in, k)`` right singular vectors, float32.
        method: ``"exact"`` or ``"randomized"``.
        weight_hash: hex digest of the weight bytes it was computed from (the cache key).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    method: str
    weight_hash: str

    @property
    def k(self) -> int:
        return self.S.numel()

    def select(self, columns: torch.Tensor) -> "Basis":
        """The triplets at ``columns`` (a 1-D long tensor of indices < k), same order."""
        return Basis(self.U[:, columns], self.S[columns], self.V[:, columns], self.method, self.weight_hash)


def cache_dir() -> Path:
    """Folder of the on-disk SVD cache: ``$SPECTRAL_VISION_CACHE/svd`` or ``~/.cache/spectral_vision/svd``."""
    return cache_root("svd")


def weight_hash(weight: torch.Tensor) -> str:
    """Hex digest (blake2b, 20 hex chars) of a tensor's dtype, shape and bytes."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=10)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sigma_fingerprint(S: torch.Tensor, n: int = 8) -> list[float]:
    """The top ``n`` singular values as plain floats: a dtype- and device-robust basis fingerprint."""
    return [float(s) for s in S[:n].tolist()]


def canonicalize_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the sign ambiguity of singular pairs with one rule.

    For each pair ``(u_i, v_i)`` the sign is chosen so that the entry of ``u_i`` with the largest
    absolute value is positive (ties: the first such index). ``u_i`` and ``v_i`` flip together, so
    ``U diag(S) Vᵀ`` is unchanged. Shapes: ``U (out, k)``, ``V (in, k)``.
    """
    idx = U.abs().argmax(dim=0)  # (k,) first index of the max magnitude in each column
    signs = torch.sign(U.gather(0, idx[None, :])).squeeze(0)  # (k,)
    signs[signs == 0] = 1.0
    return U * signs, V * signs


def _exact(W: torch.Tensor):
    """All ``min(out, in)`` triplets (the thin SVD computes them all anyway; they are all cached)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U, S, Vh.T


def _randomized(W: torch.Tensor, k: int, oversample: int, power_iters: int):
    """Halko-Martinsson-Tropp range finder with power iterations. The Gaussian probe is drawn on the
    CPU from a fixed seed, so the result does not depend on the device's random generator."""
    m, n = W.shape
    q = min(k + oversample, min(m, n))
    probe = torch.randn(n, q, generator=torch.Generator().manual_seed(0)).to(W.device)  # (in, q)
    Q = torch.linalg.qr(W @ probe).Q  # (out, q) orthonormal basis of the sampled range
    for _ in range(power_iters):
        Q = torch.linalg.qr(W @ torch.linalg.qr(W.T @ Q).Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (q, q), (q,), (q, in)
    return (Q @ Ub)[:, :k], S[:k], Vh[:k].T


def _load_cached(path: Path, k: int, shape: tuple, device) -> Optional[tuple]:
    """The first ``k`` cached triplets (only those columns are read), or None when the entry is missing,
    smaller than ``k``, of the wrong shape, non-finite or unreadable (then the caller recomputes)."""
    out, inp = shape
    try:  # torch.device("cpu"): slices are built by factory calls, which a default meta device would capture
        with torch.device("cpu"), safe_open(str(path), "pt", device="cpu") as f:
            n = f.get_slice("S").get_shape()
            u, v = f.get_slice("U").get_shape(), f.get_slice("V").get_shape()
            if len(n) != 1 or n[0] < k or list(u) != [out, n[0]] or list(v) != [inp, n[0]]:
                return None
            got = (f.get_slice("U")[:, :k], f.get_slice("S")[:k], f.get_slice("V")[:, :k])
    except Exception:  # missing, truncated or corrupt: recompute
        return None
    if not all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in got):
        return None
    return tuple(t.to(device) for t in got)


def _store_cached(path: Path, U, S, V) -> None:
    """Write all the computed triplets atomically (a reader never sees half a file)."""
    tensors = {"U": U.contiguous().cpu(), "S": S.contiguous().cpu(), "V": V.contiguous().cpu()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


@torch.no_grad()
def decompose(
    weight: torch.Tensor,
    k: Optional[int] = None,
    method: str = "auto",
    oversample: int = 10,
    power_iters: int = 4,
    cache: bool = True,
) -> Basis:
    """Top-``k`` sign-canonical SVD of a 2-D weight, in float32.

    Args:
        weight: ``(out, in)`` matrix of any float dtype and device.
        k: number of top triplets (default: all, ``min(out, in)``).
        method: ``"exact"``, ``"randomized"`` or ``"auto"`` (exact when ``min(out, in) <= 1024`` or
            the block of ``k`` is over a quarter of it, else randomized over whole blocks of 256).
        oversample, power_iters: randomized SVD settings (extra probe columns, subspace iterations).
        cache: read/write the on-disk cache keyed by the weight's hash.

    Returns:
        :class:`Basis` with ``U (out, k)``, ``S (k,)``, ``V (in, k)`` on the weight's device.
    """
    if weight.dim() != 2:
        raise ValueError(f"decompose expects a 2-D weight, got shape {tuple(weight.shape)}")
    full = min(weight.shape)
    k = full if k is None else int(k)
    if not 1 <= k <= full:
        raise ValueError(f"k={k} is out of range for a weight of shape {tuple(weight.shape)} (1..{full})")
    block = min(full, RSVD_BLOCK * -(-k // RSVD_BLOCK))  # k rounded up to whole blocks
    if method == "auto":
        method = "exact" if (full <= EXACT_MAX_DIM or 4 * block > full) else "randomized"
    if method not in ("exact", "randomized"):
        raise ValueError(f"unknown SVD method {method!r}: use 'exact', 'randomized' or 'auto'")
    key = weight_hash(weight)
    tag = "exact" if method == "exact" else f"rsvd{block}-o{oversample}-p{power_iters}"
    path = cache_dir() / f"{key}-{tag}.safetensors"
    got = _load_cached(path, k, tuple(weight.shape), weight.device) if cache else None
    if got is None:
        W = weight.detach().float()
        U, S, V = _exact(W) if method == "exact" else _randomized(W, block, oversample, power_iters)
        U, V = canonicalize_signs(U, V)
        if cache:
            _store_cached(path, U, S, V)
        got = (U[:, :k], S[:k], V[:, :k])
    U, S, V = got
    return Basis(U.contiguous(), S.contiguous(), V.contiguous(), method, key)
