"""Basis signatures: a few numbers per singular vector so that a reload can never silently use another basis.

An adapter is trained on the singular vectors ``u_i, v_i`` of its base weight. Reloading recomputes
them from the base, and the result can differ from the training-time vectors while the singular
values still agree: a sign flip (the sign rule "largest entry positive" flips under bf16 rounding
when two entries are nearly tied), a swap or rotation of columns with near-equal singular values,
or another base altogether (two random inits of a head have the same top σ to 1 %).

At save time we store, per layer and used column ``i``, ``σ_i`` and the projections of ``u_i`` and
``v_i`` on ``SIG_DIM`` fixed random directions (seeded by the vector length, drawn on the CPU):
``sig (c, 1 + 2·SIG_DIM) = [σ_i, Pᵤᵀu_i, Pᵥᵀv_i]``. At load, :func:`match_basis` compares them
with the recomputed columns and

* accepts them unchanged when every column agrees (the usual case; a few flops);
* otherwise writes each saved vector as a combination of the recomputed columns whose singular
  values lie within ``CLUSTER_RTOL`` of ``σ_i`` (at most ``MAX_CLUSTER`` of them): this undoes a
  sign flip (a = ±1), a swap (a = unit vector) or a rotation inside a near-degenerate cluster;
* refuses (``ValueError``, turned into ``AdapterFileError`` naming the layer) when a column cannot
  be expressed to ``RES_TOL`` (relative residual of the projections, ≈ the angle between the saved
  vector and the best reconstruction): the subspace is not the one the adapter was trained on.

The relative error of ΔW is at most of the order of that angle, so an accepted reload reproduces
the adapter to ``≈ RES_TOL`` (measured: bf16/fp16 copies of the base reproduce it to their
rounding), and a different base is refused.
"""
from __future__ import annotations

import torch

__all__ = ["SIG_DIM", "RES_TOL", "projection", "basis_signature", "direct_match", "match_basis"]

SIG_DIM = 6  # projections per singular vector (u and v each)
SIG_SEED = 20240229  # the fixed random directions depend only on this seed and the vector length
RES_TOL = 0.05  # largest accepted relative residual of a column's projections (≈ angle in radians)
CLUSTER_RTOL = 0.05  # recomputed columns with |σ_j − σ_i| <= this · σ_i may be mixed to rebuild column i
MAX_CLUSTER = 4  # at most this many recomputed columns per saved column (keeps the fit overdetermined)


def projection(n: int, m: int = SIG_DIM) -> torch.Tensor:
    """``(n, m)`` float32 Gaussian directions, identical on every machine for a given ``n``."""
    g = torch.Generator(device="cpu").manual_seed(SIG_SEED * 1_000_003 + int(n))
    return torch.randn(n, m, generator=g, device="cpu")


def _project(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``(c, 2m)``: ``[Pᵤᵀu_i, Pᵥᵀv_i]`` per column of ``U (out, c)``, ``V (in, c)``."""
    U, V = U.detach().float().cpu(), V.detach().float().cpu()
    return torch.cat([U.T @ projection(U.shape[0]), V.T @ projection(V.shape[0])], dim=1)


def basis_signature(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``(c, 1 + 2·SIG_DIM)`` float32 CPU signature ``[σ_i, Pᵤᵀu_i, Pᵥᵀv_i]`` of ``U (out, c)``, ``S (c,)``, ``V (in, c)``."""
    return torch.cat([S.detach().float().cpu()[:, None], _project(U, V)], dim=1).contiguous()


def _residual(target: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least-squares ``a`` with ``M a ≈ target`` (``M (2m, g)``) and the relative residual."""
    a = torch.linalg.lstsq(M.double(), target.double()[:, None]).solution[:, 0]
    res = float((M.double() @ a - target.double()).norm() / target.double().norm().clamp_min(1e-30))
    return a.float(), res


@torch.no_grad()
def direct_match(sig: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[bool, float]:
    """``(ok, worst residual)``: whether the columns ``U (out, c)``, ``V (in, c)`` are the saved ones, same sign."""
    if sig.dim() != 2 or sig.shape != (U.shape[1], 1 + 2 * SIG_DIM):
        raise ValueError(f"basis signature has shape {tuple(sig.shape)}, expected ({U.shape[1]}, {1 + 2 * SIG_DIM})")
    target, proj = sig[:, 1:].double(), _project(U, V).double()  # (c, 2m) each
    a = (target * proj).sum(1) / (proj * proj).sum(1).clamp_min(1e-30)  # (c,) per-column least squares
    res = (target - a[:, None] * proj).norm(dim=1) / target.norm(dim=1).clamp_min(1e-30)  # (c,)
    same_sign = bool((a > 0).all())
    worst = float(res.max()) if res.numel() else 0.0
    return worst <= RES_TOL and same_sign, worst


@torch.no_grad()
def match_basis(sig: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor,
                columns: list[int]) -> tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Match saved columns to a recomputed basis.

    Args:
        sig: ``(c, 1 + 2·SIG_DIM)`` saved signature of the used columns (in ``columns`` order).
        U, S, V: recomputed top-``k`` basis ``(out, k)``, ``(k,)``, ``(in, k)`` with ``k > max(columns)``
            (a few extra columns let a swap with the next column be undone).
        columns: the ``c`` singular indices the adapter uses.

    Returns:
        ``(unchanged, U_c (out, c), S_c (c,), V_c (in, c), worst residual)``: the columns to use.
    Raises:
        ValueError: a column is not in the recomputed subspace (message says which and why).
    """
    dev = U.device
    if sig.dim() != 2 or sig.shape[0] != len(columns) or sig.shape[1] != 1 + 2 * SIG_DIM:
        raise ValueError(f"basis signature has shape {tuple(sig.shape)}, expected ({len(columns)}, {1 + 2 * SIG_DIM})")
    sigma, target = sig[:, 0].float(), sig[:, 1:].float()  # (c,), (c, 2m)
    Uf, Sf, Vf = U.float().cpu(), S.float().cpu(), V.float().cpu()
    proj = _project(Uf, Vf)  # (k, 2m)
    cols = torch.tensor(columns, dtype=torch.long, device="cpu")
    ok, worst = direct_match(sig, Uf[:, cols], Vf[:, cols])
    if ok:
        return True, U[:, cols], S[cols], V[:, cols], worst
    out_u, out_s, out_v, worst = [], [], [], 0.0
    for i, c in enumerate(columns):
        s_i = float(sigma[i])
        if abs(float(Sf[c]) - s_i) > CLUSTER_RTOL * max(abs(s_i), 1e-12):
            raise ValueError(f"singular column {c} has σ={float(Sf[c]):.4g} here, saved {s_i:.4g}: not the column the "
                             "adapter was trained on (another base, or columns changed)")
        near = torch.nonzero((Sf - s_i).abs() <= CLUSTER_RTOL * max(abs(s_i), 1e-12)).flatten()
        if c not in near.tolist():
            near = torch.cat([near, torch.tensor([c], device="cpu")])
        near = near[torch.argsort((Sf[near] - s_i).abs())][:MAX_CLUSTER]  # the closest singular values
        a, res = _residual(target[i], proj[near].T)
        norm = float(a.norm())
        if res > RES_TOL or abs(norm - 1.0) > 2 * RES_TOL:
            raise ValueError(
                f"singular column {c} (σ={s_i:.4g}) is not in the span of this base's columns "
                f"{near.tolist()} (relative residual {res:.3f} > {RES_TOL}, norm {norm:.3f}): the base "
                "weights are not the ones the adapter was trained on")
        a = a / norm
        out_u.append(Uf[:, near] @ a)
        out_v.append(Vf[:, near] @ a)
        out_s.append((Sf[near] * a * a).sum())  # Rayleigh quotient of the rebuilt pair
        worst = max(worst, res)
    Uc, Vc = torch.stack(out_u, 1), torch.stack(out_v, 1)  # (out, c), (in, c)
    gram = Uc.T @ Uc
    if (gram - torch.eye(len(columns), device="cpu")).abs().max() > 4 * RES_TOL:
        raise ValueError("the rebuilt singular columns are not orthonormal: two saved columns matched the same "
                         "recomputed one (ambiguous basis)")
    return False, Uc.to(dev), torch.stack(out_s).to(dev), Vc.to(dev), worst
