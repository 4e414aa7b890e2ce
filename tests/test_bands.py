"""spectral_vision.bands: the band rule, the registry, the locked allocator (concurrent runs), the full folder."""
import json
import multiprocessing as mp
import os

import pytest
import torch
from torch import nn

import fusion.bands
from spectral_vision import SpectralConfig
from spectral_vision.bands import BandError, BandRegistry, band_columns, band_count, layer_band_count


def test_band_rule_is_the_configs():
    for band, rank in [(0, 4), (3, 2), (1, 7)]:
        assert band_columns(band, rank) == SpectralConfig(rank=rank, band=band).band_columns() == \
            list(range(band * rank, (band + 1) * rank))
    assert band_count(32, 4) == 8 and band_count(31, 4) == 7 and band_count(3, 4) == 0
    with pytest.raises(ValueError):
        band_columns(-1, 4)


def test_layer_band_count_uses_the_2d_sides():
    from transformers.pytorch_utils import Conv1D

    layers = [nn.Linear(40, 24), nn.Conv2d(3, 64, 3), Conv1D(50, 30)]  # 2-D sides: (24, 40), (64, 27), (30, 50) -> 24
    assert layer_band_count(layers, 4) == 6 and layer_band_count(layers[1:], 4) == 6  # min(64, 27) = 27 -> 6
    with torch.device("meta"):
        assert layer_band_count([nn.Linear(1024, 8)], 2) == 4


def test_allocate_keeps_own_band_and_refuses_a_full_folder(tmp_path):
    reg = BandRegistry(tmp_path)
    assert reg.allocate("a", tmp_path / "a", "spectral_a", 4, num_bands=2) == 0
    assert reg.allocate("b", tmp_path / "b", "spectral_a", 4, num_bands=2) == 1
    assert reg.allocate("a", tmp_path / "a", "spectral_a", 4, num_bands=2) == 0  # re-running a concept: its band
    with pytest.raises(BandError, match=r"all 2 bands of this folder .* are taken at rank 4"):
        reg.allocate("c", tmp_path / "c", "spectral_a", 4, num_bands=2)
    with pytest.raises(BandError, match="overlaps 'b'"):
        reg.allocate("c", tmp_path / "c", "spectral_a", 4, band=1)
    with pytest.raises(BandError, match="band 5 does not exist at rank 4"):
        reg.allocate("c", tmp_path / "c", "spectral_a", 4, band=5, num_bands=2)
    assert reg.allocate("c", tmp_path / "c", "spectral_a", 2, num_bands=8) == 4  # columns 8, 9: free at rank 2
    assert set(reg.concepts()) == {"a", "b", "c"}
    assert oct(os.stat(reg.path).st_mode & 0o777) == "0o644"


def _allocate(folder, name, q):
    q.put((name, BandRegistry(folder).allocate(name, f"{folder}/{name}", "spectral_a", 4)))


def test_concurrent_runs_get_distinct_bands(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_allocate, args=(str(tmp_path), f"c{i}", q)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = dict(q.get(timeout=5) for _ in procs)
    assert sorted(got.values()) == list(range(6))  # every run its own band, none lost
    data = json.loads((tmp_path / "bands.json").read_text())["concepts"]
    assert {n: e["band"] for n, e in data.items()} == got


def test_fusion_bands_is_the_core():
    assert fusion.bands.BandRegistry is BandRegistry and fusion.bands.band_columns is band_columns
    assert fusion.bands.find_overlaps.__module__ == "spectral_vision.bands"
