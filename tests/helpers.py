"""Helpers shared by the tests (``from helpers import perturb``; ``tests`` is on pytest's ``pythonpath``)."""
import torch


def perturb(model, std=0.05, seed=1):
    """Give every trainable adapter tensor a random non-zero value (so ΔW != 0), drawn on the CPU."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, device="cpu").to(p) * std)
