"""VTAB-1k tooling: task table, data validation, timm loading, train -> sweep -> report, resume after kill.

Runs on the offline fixture (real images from scikit-learn / scikit-image, 32 px) with the tiny timm
ViT from the zoo, 1-3 epochs per run.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import make_vtab_fixture  # noqa: E402
import vtab_report  # noqa: E402
import vtab_sweep  # noqa: E402
import vtab_train  # noqa: E402
from vtab_data import NORMALIZATIONS, VTABDataError, VTABDataset, validate_task  # noqa: E402
from vtab_tasks import GROUPS, TASKS, resolve_task, resolve_tasks  # noqa: E402

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is ~30x faster than oversubscribed threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = ["--model", "zoo:tiny-vit", "--image_size", "32", "--num_workers", "0", "--warmup_epochs", "0"]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vtab") / "data")
    make_vtab_fixture.main(make_vtab_fixture.parse_args(["--out", root, "--tasks", "svhn", "dtd", "--small",
                                                         "--size", "32"]))
    return root


def _copy_task(root, tmp_path, task="dtd", marker=True):
    dst = str(tmp_path / "broken")
    shutil.copytree(os.path.join(root, task), os.path.join(dst, task))
    if marker:
        shutil.copy(os.path.join(root, "vtab_fixture.json"), dst)
    return dst


def _rewrite(path, fn):
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(fn(lines)) + "\n")


def test_task_table():
    assert len(TASKS) == 19 and [len(GROUPS[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert sum(t.num_classes for t in TASKS.values()) == 100 + 102 + 47 + 102 + 37 + 10 + 397 + 2 + 10 + 45 + 5 + 8 + 6 \
        + 6 + 4 + 16 + 16 + 18 + 9
    for alias, name in [("cifar100", "cifar"), ("oxford_pet", "oxford_iiit_pet"), ("flowers102", "oxford_flowers102"),
                        ("pets", "oxford_iiit_pet"), ("Smallnorb-Azi", "smallnorb_azi")]:
        assert resolve_task(alias).name == name
    assert [t.name for t in resolve_tasks(["specialized", "eurosat"])] == GROUPS["specialized"]
    with pytest.raises(ValueError, match="did you mean"):
        resolve_task("cifar1000")


def test_validation_errors(fixture_root, tmp_path):
    validate_task(fixture_root, "dtd")  # the fixture passes (its marker allows the reduced splits)
    strict = _copy_task(fixture_root, tmp_path / "a", marker=False)
    with pytest.raises(VTABDataError, match=r"task 'dtd': split 'train800' has 24 images, VTAB-1k requires 800"):
        validate_task(strict, "dtd")
    with pytest.raises(VTABDataError, match=r"'dtd': the test split uses 18 of the 47 classes.*--custom"):
        validate_task(strict, "dtd", allow_small_splits=True)  # reduced splits pass; other data under a VTAB name not
    validate_task(strict, "dtd", splits=["train800", "val200"], allow_small_splits=True)

    wrong = _copy_task(fixture_root, tmp_path / "b")  # more lines than VTAB allows: never accepted
    _rewrite(os.path.join(wrong, "dtd", "val200.txt"), lambda ls: ls * 17)
    with pytest.raises(VTABDataError, match=r"'dtd': split 'val200' has 204 images, VTAB-1k requires 200"):
        validate_task(wrong, "dtd")

    label = _copy_task(fixture_root, tmp_path / "c")
    _rewrite(os.path.join(label, "dtd", "test.txt"), lambda ls: [ls[0].rsplit(" ", 1)[0] + " 47"] + ls[1:])
    with pytest.raises(VTABDataError, match=r"'dtd': split 'test' has 1 labels outside \[0, 46\] \(47 classes\)"):
        validate_task(label, "dtd")

    missing = _copy_task(fixture_root, tmp_path / "d")
    os.remove(os.path.join(missing, "dtd", "images", "train800", "000003.jpg"))
    with pytest.raises(VTABDataError, match=r"'dtd': split 'train800' lists 1 missing image files.*000003.jpg"):
        validate_task(missing, "dtd")
    with pytest.raises(VTABDataError, match="'dtd'.*missing image"):  # also via the dataset and the train script
        vtab_train.main(vtab_train.parse_args(["--data_root", missing, "--task", "dtd", "--epochs", "1", *TINY]))

    garbled = _copy_task(fixture_root, tmp_path / "e")
    _rewrite(os.path.join(garbled, "dtd", "train800.txt"), lambda ls: ["images/train800/000000.jpg"] + ls[1:])
    with pytest.raises(VTABDataError, match=r"'dtd': .*train800.txt:1: expected '<image path> <label>'"):
        validate_task(garbled, "dtd")
    os.remove(os.path.join(garbled, "dtd", "test.txt"))
    with pytest.raises(VTABDataError, match="'dtd': split file .*test.txt is missing"):
        validate_task(garbled, "dtd", splits=["test"])


def test_normalizations_exact(fixture_root):
    ds = {n: VTABDataset(fixture_root, "svhn", "val200", image_size=32, normalization=n) for n in NORMALIZATIONS}
    x0, y0 = ds["none"][5]
    assert x0.shape == (3, 32, 32) and 0 <= x0.min() and x0.max() <= 1 and x0.max() > 0.5
    torch.testing.assert_close(ds["half"][5][0], (x0 - 0.5) / 0.5, rtol=0, atol=1e-6)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    torch.testing.assert_close(ds["imagenet"][5][0], (x0 - mean) / std, rtol=0, atol=1e-6)
    assert ds["none"][5][1] == y0 == int(open(os.path.join(fixture_root, "svhn", "val200.txt")).read().split()[11])
    # direct bicubic resize, no crop: a streamed (not preloaded) test split gives the same pixels as preloading
    a, b = (VTABDataset(fixture_root, "svhn", "test", image_size=24, normalization="none", preload=p) for p in (0, 1))
    assert torch.equal(a[3][0], b[3][0]) and a[3][0].shape == (3, 24, 24)


def _save_jax_npz(model, path, num_heads=4, head_classes=21843):
    """Write ``model`` in the layout of Google's original ``ViT-B_16.npz`` (Flax names, HWIO / (D, H, hd) kernels)."""
    t = lambda x: x.detach().numpy()  # noqa: E731
    D = model.embed_dim
    w = {"embedding/kernel": t(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),  # (out,in,kh,kw) -> (kh,kw,in,out)
         "embedding/bias": t(model.patch_embed.proj.bias), "cls": t(model.cls_token),
         "Transformer/posembed_input/pos_embedding": t(model.pos_embed),
         "Transformer/encoder_norm/scale": t(model.norm.weight), "Transformer/encoder_norm/bias": t(model.norm.bias),
         "head/kernel": np.zeros((D, head_classes), np.float32), "head/bias": np.zeros(head_classes, np.float32),
         "pre_logits/kernel": np.zeros((D, D), np.float32), "pre_logits/bias": np.zeros(D, np.float32)}
    for i, blk in enumerate(model.blocks):
        b = f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)
        for n, wq, bq in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[b + f"MultiHeadDotProductAttention_1/{n}/kernel"] = t(wq.T.reshape(D, num_heads, -1))  # (D, H, hd)
            w[b + f"MultiHeadDotProductAttention_1/{n}/bias"] = t(bq.reshape(num_heads, -1))  # (H, hd)
        w[b + "MultiHeadDotProductAttention_1/out/kernel"] = t(blk.attn.proj.weight.reshape(D, num_heads, -1)
                                                               .permute(1, 2, 0))  # (D, H*hd) -> (H, hd, D)
        w[b + "MultiHeadDotProductAttention_1/out/bias"] = t(blk.attn.proj.bias)
        for ln, norm in (("LayerNorm_0", blk.norm1), ("LayerNorm_2", blk.norm2)):
            w[b + f"{ln}/scale"], w[b + f"{ln}/bias"] = t(norm.weight), t(norm.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[b + f"MlpBlock_3/Dense_{r}/kernel"], w[b + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.weight.T), t(fc.bias)
    np.savez(path, **w)


def test_load_vit_local_files(tmp_path):
    from safetensors.torch import save_file

    from spectral_vision.integrations.timm import load_vit

    src = load_vit("zoo:tiny-vit", num_classes=10, image_size=32)
    arch = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        m = load_vit("vit_base_patch16_224", num_classes=3, checkpoint_path=str(tmp_path / f), image_size=32, **arch)
        assert torch.equal(m.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
        assert m.head.out_features == 3 and m.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    _save_jax_npz(src, tmp_path / "ViT-B_16.npz")  # the file VTAB-1k papers start from, in miniature
    m = load_vit(checkpoint_path=str(tmp_path / "ViT-B_16.npz"), num_classes=3, image_size=32, **arch)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.eval().forward_features(x), src.eval().forward_features(x), rtol=1e-5, atol=1e-5)
    assert m.head.out_features == 3
    m = load_vit(str(tmp_path / "w.safetensors"), num_classes=5, image_size=48, **arch)  # a bare file path
    assert m.pos_embed.shape == (1, 1 + 6 * 6, 64)  # resampled from 4x4 to 6x6 patches
    with pytest.raises(ValueError, match="does not fit"):
        load_vit("vit_base_patch16_224", num_classes=3, checkpoint_path=str(tmp_path / "w.pth"), image_size=32,
                 patch_size=8, embed_dim=64, depth=3, num_heads=4)


def _load_runs(out):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "runs", "*.json")))]


@pytest.mark.slow  # 20 / 8 training runs
def test_train_sweep_report_cycle(fixture_root, tmp_path):
    out = str(tmp_path / "sweep")
    argv = ["--data_root", fixture_root, "--output_dir", out, "--tasks", "svhn", "dtd", "--methods",
            "spectral_a:rank=2", "lora:rank=2", "--grid", "lr=1e-3,3e-2", "--protocols", "honest", "legacy",
            "--normalization", "half", "--epochs", "2", *TINY]
    results = vtab_sweep.main(vtab_sweep.parse_args(argv))
    assert [r["status"] for r in results] == ["done"] * 20  # 2 tasks x 2 methods x (2 select + 1 final + 2 legacy)
    runs = _load_runs(out)
    assert len(runs) == 20 and {(r["protocol"], r["stage"]) for r in runs} == {
        ("honest", "select"), ("honest", "final"), ("legacy", "final")}
    for r in runs:
        assert r["normalization"] == r["config"]["normalization"] == "half" and r["data"]["fixture"]
        per_block = (3 * 64 + 64) + (64 + 64) + (256 + 64) + (64 + 256)  # qkv, proj, fc1, fc2: (out + in) per rank
        head = 64 * r["num_classes"] + r["num_classes"]
        assert r["params"] == {"trainable": 2 * 2 * per_block + head, "trainable_without_head": 2 * 2 * per_block,
                               "head": head, "total": r["params"]["total"]}
        assert r["time_s"] > 0 and r["peak_memory_mb"]["process_rss"] > 0
        want = {"select": ("train800", "val200", 24), "final": ("train800val200", "test", 36)}[r["stage"]]
        ph = r["phases"][r["stage"]]
        assert (ph["train_split"], ph["eval_split"], ph["train_size"]) == want
    honest_final = [r for r in runs if r["protocol"] == "honest" and r["stage"] == "final"]
    for r in honest_final:  # the selection picked the best val200 setting, and the final run used it
        cands = r["selection"]["candidates"]
        best = max(cands, key=lambda c: c["val200_acc"])
        assert r["selection"]["chosen"] == best["setting"] and r["config"]["lr"] == float(best["setting"]["lr"])
        assert r["reported"] == {"metric": "test_acc_last_epoch", "value": r["phases"]["final"]["last_acc"]}
        assert len(r["phases"]["final"]["curve"]) == 1  # honest: test is looked at once, after the last epoch
    for r in (r for r in runs if r["protocol"] == "legacy"):
        assert r["reported"]["metric"] == "test_acc_best_epoch" and len(r["phases"]["final"]["curve"]) == 2

    rep = str(tmp_path / "report")
    summaries = vtab_report.main(vtab_report.parse_args(["--results", out, "--out", rep]))
    by = {(s["protocol"], s["label"]): s for s in summaries if s["protocol"] != "published"}
    assert set(by) == {(p, m) for p in ("honest", "legacy") for m in ("spectral_a:rank=2", "lora:rank=2")}
    for (proto, label), s in by.items():
        mine = [r for r in runs if r["protocol"] == proto and r["label"] == label and r["stage"] == "final"]
        for task in ("svhn", "dtd"):
            vals = [r["reported"]["value"] for r in mine if r["task"] == task]
            assert s["tasks"][task]["mean"] == pytest.approx(max(vals))  # honest: one final; legacy: best setting
        assert s["averages"]["natural"] == (pytest.approx(np.mean([s["tasks"]["svhn"]["mean"],
                                                                   s["tasks"]["dtd"]["mean"]])), 2, 7)
        assert s["averages"]["mean_of_group_means"][1:] == (2, 19) and s["averages"]["structured"][0] is None
    md = open(os.path.join(rep, "results.md")).read()
    assert "FIXTURE DATA" in md and "| published | SpecLoRA |" in md and "76.7" in md and "| honest | lora:rank=2 |" in md
    header = md.split("\n| protocol")[1].split("\n")[0]
    assert header.count("|") == 2 + 19 + 3 + 2 + 4  # method, 19 tasks, 3 group means, 2 averages, 4 more
    csv_rows = open(os.path.join(rep, "results.csv")).read().splitlines()
    assert len(csv_rows) == 1 + 4 + 4 and csv_rows[1].startswith("honest,")
    assert os.path.getsize(os.path.join(rep, "acc_vs_params.png")) > 1000
    assert os.path.getsize(os.path.join(rep, "per_task.png")) > 1000


def _fake(task, seed, value, protocol="honest", stage="final", label="m", lr=1e-3, params=100):
    return {"schema": vtab_report.SCHEMA, "task": task, "seed": seed, "protocol": protocol, "stage": stage,
            "label": label, "reported": {"value": value}, "finished_at": f"2026-01-01T00:00:{seed:02d}",
            "params": {"trainable": params + 10, "trainable_without_head": params}, "normalization": "imagenet",
            "time_s": 1.0, "peak_memory_mb": {"gpu_allocated": None}, "data": {"fixture": False}, "config": {"lr": lr}}


def test_report_math_on_synthetic_results():
    """Group means, both averages and seed std, checked against hand-computed numbers."""
    rs = []
    for seed, shift in ((0, 0.0), (1, 2.0)):  # every task: seed 0 -> base, seed 1 -> base + 2
        for i, t in enumerate(TASKS):
            rs.append(_fake(t, seed, 50.0 + i + shift))
            rs.append(_fake(t, seed, 99.0, stage="select"))  # never reported
            rs += [_fake(t, seed, 40.0 + i + shift, "legacy", lr=lr) for lr in (1e-3, 1e-2)]
            rs[-1]["reported"]["value"] += 5  # legacy: the best setting counts
    s = {(x["protocol"], x["label"]): x for x in (vtab_report.summarize(k, r)
                                                  for k, r in vtab_report.collect(rs).items())}
    h, lg = s[("honest", "m")], s[("legacy", "m")]
    idx = {t: i for i, t in enumerate(TASKS)}
    nat, spe, stru = (np.mean([50.0 + idx[t] + 1 for t in GROUPS[g]]) for g in ("natural", "specialized", "structured"))
    assert h["averages"]["natural"] == (pytest.approx(nat), 7, 7)
    assert h["averages"]["mean_of_group_means"] == (pytest.approx((nat + spe + stru) / 3), 19, 19)
    assert h["averages"]["mean_of_19"] == (pytest.approx(50.0 + 9 + 1), 19, 19)
    assert h["tasks"]["dtd"] == {"mean": 53.0, "std": pytest.approx(np.sqrt(2.0)), "n": 2}
    assert h["averages_std"]["mean_of_19"] == pytest.approx(np.sqrt(2.0))
    assert lg["tasks"]["cifar"]["mean"] == 46.0 and lg["averages"]["mean_of_19"][0] == pytest.approx(55.0)
    assert h["params_without_head"] == 100 and h["params_with_head"] == 110 and h["seeds"] == [0, 1]


def test_published_rows_consistent():
    """The transcribed per-task numbers reproduce each paper's printed mean of group means (rounding only)."""
    rows = {s["label"]: s for s in vtab_report.published_summaries()}
    assert set(rows) == {"LoRA", "NOAH", "SSF", "SpecLoRA"}
    for name, s in rows.items():
        ref = vtab_report.PUBLISHED[name]
        groups = [np.mean([dict(zip(TASKS, ref["tasks"]))[t] for t in GROUPS[g]]) for g in GROUPS]
        assert len(ref["tasks"]) == 19 and abs(np.mean(groups) - ref["average"]) < 0.15, name
        assert s["averages"]["mean_of_group_means"][0] == ref["average"]
    assert [rows[n]["averages"]["mean_of_group_means"][0] for n in rows] == [74.5, 75.5, 75.7, 76.7]


def test_training_learns_and_hash(fixture_root, tmp_path):
    from accelerate import Accelerator

    from spectral_vision.zoo import create_model

    argv = ["--data_root", fixture_root, "--task", "svhn", "--method", "spectral_a", "--rank", "8", "--lr", "3e-3",
            "--epochs", "8", "--batch_size", "8", "--drop_path", "0", "--protocol", "legacy", "--output_dir",
            str(tmp_path), "--quiet", *TINY]
    args = vtab_train.parse_args(argv)
    phase, params, model = vtab_train.train_phase(args, resolve_task("svhn"), "train800val200", "test", True,
                                                  Accelerator())
    base = create_model("tiny-vit", img_size=32)  # the same seeded weights load_vit("zoo:tiny-vit") starts from
    assert torch.equal(model.blocks[1].attn.qkv.base_layer.weight, base.blocks[1].attn.qkv.weight)  # base frozen
    assert model.blocks[1].attn.qkv.adapters["default"].A_U.abs().max() > 0  # the adapter trained
    assert not any(p.requires_grad for n, p in model.named_parameters() if "adapters" not in n and "head" not in n)
    assert phase["train_loss"][-1] < phase["train_loss"][0], phase["train_loss"]
    r = vtab_train.main(args)
    assert r["protocol"] == "legacy" and r["stage"] == "final" and len(r["phases"]["final"]["curve"]) == 8
    assert r["phases"]["final"]["train_loss"] == phase["train_loss"]  # seeded: the same run again
    assert r["reported"]["value"] == max(acc for _, acc in r["phases"]["final"]["curve"])
    a = vtab_train.parse_args(argv)
    b = vtab_train.parse_args(argv + ["--output_dir", "/elsewhere", "--num_workers", "3", "--label", "x"])
    c = vtab_train.parse_args(argv + ["--normalization", "none"])
    assert vtab_train.config_hash(a) == vtab_train.config_hash(b) != vtab_train.config_hash(c)
    assert vtab_train.parse_args(argv[:2] + ["--task", "cifar100"] + argv[4:]).task == "cifar"


@pytest.mark.slow  # 20 / 8 training runs
def test_sweep_resumes_after_kill(fixture_root, tmp_path):
    out = str(tmp_path / "sweep")
    argv = ["--data_root", fixture_root, "--output_dir", out, "--tasks", "svhn", "dtd", "--methods", "spectral_a:rank=2",
            "linear", "--seeds", "0", "1", "--epochs", "3", *TINY]
    total = 2 * 2 * 2
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "training", "vtab_sweep.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    try:
        while not glob.glob(os.path.join(out, "runs", "*.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = {p: (os.stat(p).st_mtime_ns, open(p).read()) for p in glob.glob(os.path.join(out, "runs", "*.json"))}
    assert 1 <= len(before) < total, "the sweep must be killed mid-way for this test to mean anything"
    results = vtab_sweep.main(vtab_sweep.parse_args(argv))
    status = {r["path"]: r["status"] for r in results}
    assert len(status) == total and len(glob.glob(os.path.join(out, "runs", "*.json"))) == total
    assert all(status[p] == "skipped" for p in before) and sum(s == "done" for s in status.values()) == total - len(before)
    assert all((os.stat(p).st_mtime_ns, open(p).read()) == v for p, v in before.items())  # untouched
    log = [json.loads(line) for line in open(os.path.join(out, "sweep_log.jsonl"))]
    assert all(e["time_s"] > 0 and e["peak_memory_mb"]["process_rss"] > 0 for e in log if e["status"] == "done")
    assert all(s == "skipped" for s in (r["status"] for r in vtab_sweep.main(vtab_sweep.parse_args(argv))))


def test_zoo_tiny_vit_default_cfg_matches_input():
    """timm's data config of zoo:tiny-vit is what the model takes (it was 224 for a 32 px model)."""
    import timm

    from spectral_vision.zoo import create_model

    for kw, side in (({}, 32), ({"img_size": 48}, 48)):
        m = create_model("tiny-vit", **kw)
        cfg = timm.data.resolve_data_config({}, model=m)
        assert m.default_cfg["input_size"] == cfg["input_size"] == (3, side, side)
        assert m(torch.randn(1, *cfg["input_size"])).shape == (1, 10)
        assert not m.pretrained_cfg.get("hf_hub_id")  # random weights: nothing on the hub to point at


def _own_task(fixture_root, tmp_path, name, keep_classes=5):
    """A user's own task in the NOAH layout: the fixture's dtd images, labels folded to ``keep_classes``."""
    root = _copy_task(fixture_root, tmp_path, marker=False)
    if name != "dtd":
        os.rename(os.path.join(root, "dtd"), os.path.join(root, name))
    for split in ("train800", "val200", "train800val200", "test"):
        _rewrite(os.path.join(root, name, f"{split}.txt"),
                 lambda ls: [f"{p} {int(y) % keep_classes}" for p, y in (line.rsplit(" ", 1) for line in ls)])
    return root


def test_custom_task_train_and_report(fixture_root, tmp_path):
    from vtab_data import resolve_data_task

    root = _own_task(fixture_root, tmp_path / "own", "my_leaves")
    task = resolve_data_task(root, "my_leaves")
    assert (task.name, task.group, task.num_classes, task.custom) == ("my_leaves", "custom", 5, True)
    assert resolve_data_task(root, "my_leaves", num_classes=7).num_classes == 7
    with pytest.raises(VTABDataError, match=r"--num_classes 3 but its splits use labels up to 4"):
        resolve_data_task(root, "my_leaves", num_classes=3)
    with pytest.raises(VTABDataError, match=r"'my_leafs': no folder .*my_leafs"):
        resolve_data_task(root, "my_leafs")

    out = str(tmp_path / "runs")
    argv = ["--data_root", root, "--output_dir", out, "--tasks", "my_leaves", "--methods", "spectral_a:rank=2",
            "--epochs", "1", *TINY]
    res = vtab_sweep.main(vtab_sweep.parse_args(argv))
    assert [r["status"] for r in res] == ["done"]  # custom tasks take any split size (24/12/36/24 here)
    r = _load_runs(out)[0]
    assert (r["task"], r["group"], r["custom"], r["num_classes"]) == ("my_leaves", "custom", True, 5)
    assert r["params"]["head"] == 64 * 5 + 5  # a 5-way head, read from the labels

    # a VTAB result next to it: the report keeps the custom task out of every VTAB-1k average and published row
    vtab_train.main(vtab_train.parse_args(["--data_root", fixture_root, "--task", "svhn", "--output_dir", out,
                                           "--method", "spectral_a", "--rank", "2", "--epochs", "1",
                                           "--label", "spectral_a:rank=2", "--quiet", *TINY]))
    rep = str(tmp_path / "report")
    summaries = vtab_report.main(vtab_report.parse_args(["--results", out, "--out", rep, "--no_plots"]))
    vt = [s for s in summaries if not s.get("custom") and s["protocol"] != "published"]
    cu = [s for s in summaries if s.get("custom")]
    assert len(vt) == 1 and set(vt[0]["tasks"]) == {"svhn"} and vt[0]["averages"]["mean_of_19"][1] == 1
    assert len(cu) == 1 and set(cu[0]["tasks"]) == {"my_leaves"}
    assert cu[0]["tasks"]["my_leaves"]["mean"] == r["reported"]["value"]
    md = open(os.path.join(rep, "results.md")).read()
    table, custom = md.split("## Custom tasks")
    assert "my_leaves" not in table and "my_leaves (5 cl.)" in custom
    assert [row.split(" | ")[0] for row in custom.splitlines() if row.startswith("| honest")] == ["| honest"]
    assert "| published" not in custom
    assert "my_leaves" in open(os.path.join(rep, "custom.csv")).read()
    assert "my_leaves" not in open(os.path.join(rep, "results.csv")).read()


def test_own_data_under_a_vtab_name_is_refused(fixture_root, tmp_path):
    """A 5-class folder named 'dtd' is not VTAB-1k's 47-class dtd: refused (not silently given a 47-way head
    and mixed with published dtd numbers) unless --custom makes it a custom task."""
    from vtab_data import resolve_data_task

    root = _own_task(fixture_root, tmp_path / "own", "dtd")
    with pytest.raises(VTABDataError, match=r"'dtd': the test split uses 5 of the 47 classes.*--custom"):
        validate_task(root, "dtd", allow_small_splits=True)
    with pytest.raises(VTABDataError, match=r"VTAB-1k's dtd \(47 classes\), not 5; .*add --custom"):
        resolve_data_task(root, "dtd", num_classes=5)
    task = resolve_data_task(root, "dtd", custom=True)
    assert (task.group, task.num_classes) == ("custom", 5)
    validate_task(root, task)  # custom: any split sizes


def test_cli_exit_status_and_one_line_errors(fixture_root, tmp_path, capsys):
    missing = str(tmp_path / "no_such_root")
    assert vtab_sweep.cli(["--data_root", missing, "--tasks", "svhn", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data root" in err and "does not exist" in err and "Traceback" not in err
    assert vtab_train.cli(["--data_root", missing, "--task", "svhn", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err

    # every task folder is checked before anything trains: one line per problem
    assert vtab_sweep.cli(["--data_root", fixture_root, "--tasks", "svhn", "dtd", "eurosat", "cifar", *TINY]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("folder" in e and "does not exist" in e for e in err), err
    assert not os.path.exists("outputs")  # nothing was written

    # bad method / setting: refused up front, naming it
    assert vtab_sweep.cli(["--data_root", fixture_root, "--tasks", "svhn", "--methods", "lorax:rank=2",
                           "--output_dir", str(tmp_path / "o"), *TINY]) == 1
    assert "method 'lorax:rank=2'" in capsys.readouterr().err
    assert vtab_sweep.cli(["--data_root", fixture_root, "--tasks", "svhn", "--grid", "lr=0", "--output_dir",
                           str(tmp_path / "o"), *TINY]) == 1
    assert "--lr must be > 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "runs")

    # the script itself: exit status 1, one line, no traceback
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "training", "vtab_sweep.py"), "--data_root", missing],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_cli_success_prints_what_it_wrote(fixture_root, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert vtab_train.cli(["--data_root", fixture_root, "--task", "svhn", "--method", "linear", "--epochs", "1",
                           "--output_dir", out, *TINY]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out}/runs/svhn__linear__") and f"next: python training/vtab_report.py --results {out}" in last
