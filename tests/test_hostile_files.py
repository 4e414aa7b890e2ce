"""Hostile and broken adapter folders: every variant raises AdapterFileError (or, when the change is benign,
loads the very same adapter), never hangs, and leaves the model exactly as it was."""
import json
import os
import shutil
import signal
import struct

import pytest
import torch

import spectral_vision as sv
from spectral_vision import adapter_file, io as svio
from spectral_vision.fileio import file_sha256
from spectral_vision.zoo import create_model
from helpers import perturb

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _no_hang():
    """Every case must finish within 60 s (a hostile file may never make load_adapter loop or block)."""
    def boom(*_):
        raise TimeoutError("load_adapter hung on a hostile file")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def base():
    """One base model for all cases (each case checks that a refused load left it exactly as it was)."""
    model = create_model("tiny-vit")
    return model, _snapshot(model)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid adapter folder (spectral_a r=2 on the tiny timm ViT) and its reference output."""
    model = create_model("tiny-vit")
    sv.attach(model, sv.SpectralConfig(method="spectral_a", rank=2, target_modules="timm_vit"), progress=False)
    perturb(model, std=0.05)
    folder = tmp_path_factory.mktemp("good") / "adapter"
    sv.save_adapter(model, folder)
    with torch.no_grad():
        ref = model(X)
    return folder, ref


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()}, {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_unchanged(model, snap):
    sd, types, grads = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    assert all(torch.equal(now[k], sd[k]) for k in sd)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert sv.adapter_names(model) == []


# ---- helpers that edit a copied folder ----------------------------------------------------------------
def cfg_path(d):
    return d / svio.CONFIG_NAME


def w_path(d):
    return d / svio.WEIGHTS_NAME


def edit_json(d, fn):
    meta = json.loads(cfg_path(d).read_text())
    fn(meta)
    cfg_path(d).write_text(json.dumps(meta))


def resign(d):
    """Make the config's SHA-256 match the (modified) tensor file, so that the deeper checks run."""
    edit_json(d, lambda m: m.__setitem__("weights_sha256", file_sha256(w_path(d))))


def edit_tensors(d, fn):
    from safetensors.torch import load_file, save_file

    t = load_file(str(w_path(d)))
    fn(t)
    save_file(t, str(w_path(d)))
    resign(d)


def set_cfg(field, value):
    return lambda d: edit_json(d, lambda m: m["config"].__setitem__(field, value))


def first_layer(meta_or_tensors):
    return sorted(k for k in meta_or_tensors if not k.startswith("__"))[0].rsplit(".", 1)[0]


def set_layer(field, value):
    def go(d):
        edit_json(d, lambda m: m["layers"][sorted(m["layers"])[0]].__setitem__(field, value))
    return go


def set_tensor(suffix, make):
    def go(d):
        def fn(t):
            key = sorted(k for k in t if k.endswith("." + suffix))[0]
            t[key] = make(t[key])
        edit_tensors(d, fn)
    return go


def raw_config(text: bytes):
    return lambda d: cfg_path(d).write_bytes(text)


def header_flip(pos, bit, sign=True):
    def go(d):
        b = bytearray(w_path(d).read_bytes())
        (n,) = struct.unpack("<Q", b[:8])
        i = 8 + pos % n
        b[i] ^= 1 << bit
        w_path(d).write_bytes(bytes(b))
        if sign:
            resign(d)
    return go


def truncate(frac, sign):
    def go(d):
        b = w_path(d).read_bytes()
        w_path(d).write_bytes(b[: int(len(b) * frac)])
        if sign:
            resign(d)
    return go


def header_length(n):
    def go(d):
        b = w_path(d).read_bytes()
        w_path(d).write_bytes(struct.pack("<Q", n) + b[8:])
        resign(d)
    return go


def replace_with_dir(which):
    def go(d):
        p = which(d)
        p.unlink()
        p.mkdir()
    return go


def symlink_to(target, which):
    def go(d):
        p = which(d)
        p.unlink()
        os.symlink(target, p)
    return go


def fifo(which):
    def go(d):
        p = which(d)
        p.unlink()
        os.mkfifo(p)
    return go


def drop_signature(all_layers):
    def go(d):
        def fn(t):
            keys = sorted(k for k in t if k.startswith(svio.SIG_PREFIX))
            for k in keys if all_layers else keys[:1]:
                del t[k]
        edit_tensors(d, fn)
    return go


def nested_json(d):
    cfg_path(d).write_text("[" * 100000 + "]" * 100000)


def set_signature(make):
    def go(d):
        def fn(t):
            k = sorted(x for x in t if x.startswith(svio.SIG_PREFIX))[0]
            t[k] = make(t[k])
        edit_tensors(d, fn)
    return go


def shuffle_signature(d):
    def fn(t):
        k = sorted(x for x in t if x.startswith(svio.SIG_PREFIX))[0]
        s = t[k].clone()
        s[:, 1:] = s[:, 1:].roll(3, dims=1)
        t[k] = s
    edit_tensors(d, fn)


BAD = {
    # the five malformed configs of issue 14 item 7
    "non-utf8": raw_config(b'{"config": "\xff\xfe"}'),
    "layers-empty-list": lambda d: edit_json(d, lambda m: m.__setitem__("layers", [])),
    "config-null": lambda d: edit_json(d, lambda m: m.__setitem__("config", None)),
    "rank-str": set_cfg("rank", "2"),
    "config-is-folder": replace_with_dir(cfg_path),
    # JSON / config fields
    "not-json": raw_config(b"{not json"),
    "json-array": raw_config(b"[1, 2]"),
    "deeply-nested": nested_json,
    "nan-literal": lambda d: cfg_path(d).write_text(cfg_path(d).read_text().replace('"alpha": 1.0', '"alpha": NaN')),
    "alpha-huge-literal": lambda d: cfg_path(d).write_text(cfg_path(d).read_text().replace('"alpha": 1.0', '"alpha": 1e999')),
    "alpha-str": set_cfg("alpha", "1"),
    "alpha-1e30": set_cfg("alpha", 1e30),
    "rank-float": set_cfg("rank", 2.5),
    "rank-zero": set_cfg("rank", 0),
    "rank-huge": set_cfg("rank", 10**9),
    "rank-bool": set_cfg("rank", True),
    "power-iters-dos": lambda d: edit_json(d, lambda m: m["config"].update(svd="randomized", svd_power_iters=10**9)),
    "oversample-negative": set_cfg("svd_oversample", -1),
    "svd-unknown": set_cfg("svd", "magic"),
    "svd-cache-str": set_cfg("svd_cache", "yes"),
    "method-unknown": set_cfg("method", "nope"),
    "method-null": set_cfg("method", None),
    "options-unknown": set_cfg("options", {"x": 1}),
    "options-list": set_cfg("options", [1]),
    "config-extra-field": set_cfg("evil", 1),
    "columns-negative-cfg": set_cfg("columns", [-1, -2]),
    "target-modules-int": set_cfg("target_modules", 5),
    "missing-config": lambda d: edit_json(d, lambda m: m.pop("config")),
    "missing-layers": lambda d: edit_json(d, lambda m: m.pop("layers")),
    "layers-empty": lambda d: edit_json(d, lambda m: m.__setitem__("layers", {})),
    "layer-not-object": lambda d: edit_json(d, lambda m: m["layers"].__setitem__(sorted(m["layers"])[0], 3)),
    "kind-unknown": set_layer("kind", "conv3d"),
    "kind-wrong": set_layer("kind", "conv2d"),
    "shape-wrong": set_layer("shape", [64, 65]),
    "shape-str": set_layer("shape", "64x64"),
    "base-shape-wrong": set_layer("base_shape", [64, 63]),
    "base-shape-negative": set_layer("base_shape", [-64, 64]),
    "sigma-empty": set_layer("sigma", []),
    "sigma-str": set_layer("sigma", ["a"]),
    "sigma-negative": set_layer("sigma", [-1.0]),
    "sigma-other-base": lambda d: edit_json(d, lambda m: [i.__setitem__("sigma", [2 * s for s in i["sigma"]])
                                                         for i in m["layers"].values()]),
    "layer-not-in-model": lambda d: edit_json(d, lambda m: m["layers"].__setitem__(
        "blocks.9.attn.qkv", m["layers"][sorted(m["layers"])[0]])),
    "adapter-name-path": lambda d: edit_json(d, lambda m: m.__setitem__("adapter_name", "../evil")),
    "adapter-name-int": lambda d: edit_json(d, lambda m: m.__setitem__("adapter_name", 5)),
    "reshape-convention": lambda d: edit_json(d, lambda m: m.__setitem__("reshape_convention", "in,out")),
    "library-peft": lambda d: edit_json(d, lambda m: m.__setitem__("library", "peft")),
    "sha-mismatch": lambda d: edit_json(d, lambda m: m.__setitem__("weights_sha256", "0" * 64)),
    "sha-int": lambda d: edit_json(d, lambda m: m.__setitem__("weights_sha256", 5)),
    "config-symlink-dev-zero": symlink_to("/dev/zero", cfg_path),
    "config-fifo": fifo(cfg_path),
    "weights-fifo": fifo(w_path),
    "weights-folder": replace_with_dir(w_path),
    "weights-missing": lambda d: w_path(d).unlink(),
    "config-missing": lambda d: cfg_path(d).unlink(),
    "config-dangling-symlink": symlink_to("/nonexistent/adapter_config.json", cfg_path),
    # tensor file (re-signed, so the deeper checks run)
    **{f"truncate-{f}-{'signed' if s else 'raw'}": truncate(f, s) for f in (0.0, 0.01, 0.5, 0.99) for s in (0, 1)},
    "header-length-huge": header_length(1 << 62),
    "header-length-100MB": header_length(100 << 20),
    "header-length-zero": header_length(0),
    "nan-tensor": set_tensor("A_U", lambda t: t.fill_(float("nan"))),
    "inf-tensor": set_tensor("A_V", lambda t: torch.full_like(t, float("inf"))),
    "huge-tensor": set_tensor("A_U", lambda t: torch.full_like(t, 1e30)),
    "int-tensor": set_tensor("A_U", lambda t: t.to(torch.int8)),
    "bool-tensor": set_tensor("A_U", lambda t: t > 0),
    "wrong-shape": set_tensor("A_U", lambda t: t.T.contiguous()),
    "wrong-shape-1d": set_tensor("A_V", lambda t: t.flatten()),
    "columns-negative": set_tensor("columns", lambda t: -1 - t),
    "columns-duplicate": set_tensor("columns", lambda t: torch.zeros_like(t)),
    "columns-out-of-range": set_tensor("columns", lambda t: t + 10**6),
    "columns-float": set_tensor("columns", lambda t: t.float()),
    "columns-2d": set_tensor("columns", lambda t: t[None]),
    "columns-other-band": set_tensor("columns", lambda t: t + 2),
    "missing-tensor": lambda d: edit_tensors(d, lambda t: t.pop(sorted(k for k in t if k.endswith(".A_U"))[0])),
    "missing-columns": lambda d: edit_tensors(d, lambda t: t.pop(sorted(k for k in t if k.endswith(".columns"))[0])),
    "extra-tensor": lambda d: edit_tensors(d, lambda t: t.__setitem__(first_layer(t) + ".evil", torch.zeros(2))),
    "tensor-of-unknown-layer": lambda d: edit_tensors(d, lambda t: t.__setitem__("nowhere.A_U", torch.zeros(2))),
    "empty-weights": lambda d: (w_path(d).write_bytes(b""), resign(d)),
    "signature-missing-one-layer": drop_signature(all_layers=False),
    "signature-shuffled": shuffle_signature,
    "signature-wrong-shape": set_signature(lambda s: torch.zeros(3, 3)),
    "signature-nan": set_signature(lambda s: torch.full_like(s, float("nan"))),
    "signature-int": set_signature(lambda s: s.long()),
    **{f"header-flip-{p}-{b}": header_flip(p * 89 + 11, b) for p in range(6) for b in (0, 5)},
    **{f"header-flip-raw-{p}": header_flip(p * 101 + 5, 1, sign=False) for p in range(2)},
}

MAY_LOAD = {c for c in BAD if c.startswith("header-flip")} | {"columns-other-band"}

BENIGN = {
    "extra-metadata": lambda d: edit_json(d, lambda m: m.__setitem__("extra", {"note": "hello"})),
    "pretty-json": lambda d: cfg_path(d).write_text(json.dumps(json.loads(cfg_path(d).read_text()), indent=4)),
    "reordered-json": lambda d: cfg_path(d).write_text(json.dumps(json.loads(cfg_path(d).read_text()), sort_keys=True)),
    "no-sha": lambda d: edit_json(d, lambda m: m.pop("weights_sha256")),
    "config-symlink-to-copy": lambda d: (shutil.copy(cfg_path(d), d.parent / "cfg_copy.json"), cfg_path(d).unlink(),
                                         os.symlink(d.parent / "cfg_copy.json", cfg_path(d))),
}


def _copy(good, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(good[0], folder)
    return folder


@pytest.mark.parametrize("case", list(BAD))
def test_hostile_file_is_refused_and_model_unchanged(case, good, base, tmp_path):
    folder = _copy(good, tmp_path)
    BAD[case](folder)
    model, snap = base
    try:
        sv.load_adapter(model, folder, progress=False)
    except sv.AdapterFileError as e:
        assert str(e)  # a message, never a raw KeyError / TypeError / UnicodeDecodeError
        _assert_unchanged(model, snap)
        return
    # accepted: only a change that does not alter the adapter may be (a header bit flip inside a metadata
    # string; another band whose singular values are within 5 % of the saved ones, matched by the signature)
    try:
        assert case in MAY_LOAD, f"{case} was accepted"
        with torch.no_grad():
            assert torch.allclose(model(X), good[1], atol=1e-5)
    finally:
        sv.detach(model)


@pytest.mark.parametrize("case", list(BENIGN))
def test_benign_change_loads_the_same_adapter(case, good, tmp_path):
    folder = _copy(good, tmp_path)
    BENIGN[case](folder)
    model = create_model("tiny-vit")
    sv.load_adapter(model, folder / svio.CONFIG_NAME if case == "pretty-json" else folder, progress=False)
    with torch.no_grad():
        assert torch.allclose(model(X), good[1], atol=1e-5)


def test_loading_onto_an_adapted_model_rolls_back_only_the_new_adapter(good, tmp_path):
    """A failure while another adapter is on (and merged into) the model leaves that adapter as it was."""
    folder = _copy(good, tmp_path)
    BAD["nan-tensor"](folder)
    model = create_model("tiny-vit")
    sv.load_adapter(model, good[0], adapter_name="first", progress=False)
    sv.merge(model)
    snap = ({k: v.clone() for k, v in model.state_dict().items()}, sv.adapter_names(model))
    with pytest.raises(sv.AdapterFileError, match="NaN or inf"):
        sv.load_adapter(model, folder, adapter_name="second", progress=False)
    assert sv.adapter_names(model) == snap[1]
    assert all(torch.equal(v, snap[0][k]) for k, v in model.state_dict().items())
    assert all(layer.merged_adapters == ["first"] for _, layer in sv.spectral_layers(model))


def test_config_file_size_is_bounded(good, tmp_path, monkeypatch):
    folder = _copy(good, tmp_path)
    monkeypatch.setattr(adapter_file, "MAX_CONFIG_BYTES", 1000)
    with pytest.raises(sv.AdapterFileError, match="larger than"):
        sv.read_adapter(folder)
