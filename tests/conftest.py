import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session uses its own SVD cache folder."""
    monkeypatch.setenv("SPECTRAL_VISION_CACHE", str(tmp_path_factory.getbasetemp() / "svcache"))
    torch.manual_seed(0)


def perturb(model, std=0.05, seed=1):
    """Give every trainable adapter tensor a random non-zero value (so ΔW != 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * std)
