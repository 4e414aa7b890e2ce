"""Shared fixtures and the test tiers (markers registered in pyproject.toml).

Tiers: ``slow``, ``browser`` and ``ddp`` tests are deselected by the default ``addopts`` filter; ``-m ""``
runs everything (``.ci/run``), ``-m slow`` only the slow ones. Naming test files or node ids on the command
line without ``-m`` runs them whatever their tier. ``cuda`` tests are skipped when no CUDA device is visible.
"""
from pathlib import Path

import pytest
import torch


def _names_tests(args) -> bool:
    """True when the command line names test files / node ids (not just the ``tests`` folder)."""
    for a in args:
        if a.startswith("-"):
            continue
        p = Path(a.split("::")[0])
        if "::" in a or (p.suffix == ".py" and p.exists()):
            return True
    return False


def pytest_configure(config):
    args = list(config.invocation_params.args)
    if not any(a == "-m" or a.startswith("-m") for a in args) and _names_tests(args):
        config.option.markexpr = ""  # `pytest tests/test_demo_browser.py` runs the file, whatever its tier


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session uses its own SVD cache folder."""
    monkeypatch.setenv("SPECTRAL_VISION_CACHE", str(tmp_path_factory.getbasetemp() / "svcache"))
    torch.manual_seed(0)


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one torch thread is ~30x faster than oversubscribed threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> str:
    """A VTAB-1k data root with the offline fixture's svhn and dtd (reduced splits, 32 px), built once per module."""
    from training import make_vtab_fixture

    root = str(tmp_path_factory.mktemp("vtab") / "data")
    make_vtab_fixture.main(make_vtab_fixture.parse_args(["--out", root, "--tasks", "svhn", "dtd", "--small",
                                                         "--size", "32"]))
    return root
