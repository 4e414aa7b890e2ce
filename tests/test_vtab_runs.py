"""VTAB-1k runs: train -> sweep -> report, report math, resume after kill, custom tasks, the command lines.

Runs on the offline fixture (``vtab_root`` in conftest.py) with the tiny timm ViT from the zoo, 1-8 epochs per run.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import ROOT, VTAB_TINY, own_vtab_task, subprocess_env
from training import vtab_report, vtab_sweep, vtab_train
from training.vtab_data import VTABDataError
from training.vtab_tasks import GROUPS, TASKS, resolve_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load_runs(out):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "runs", "*.json")))]


@pytest.mark.slow  # 20 / 8 training runs
def test_train_sweep_report_cycle(vtab_root, tmp_path):
    out = str(tmp_path / "sweep")
    argv = ["--data_root", vtab_root, "--output_dir", out, "--tasks", "svhn", "dtd", "--methods",
            "spectral_a:rank=2", "lora:rank=2", "--grid", "lr=1e-3,3e-2", "--protocols", "honest", "legacy",
            "--normalization", "half", "--epochs", "2", *VTAB_TINY]
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


def test_training_learns_and_hash(vtab_root, tmp_path):
    from accelerate import Accelerator

    from spectral_vision.zoo import create_model

    argv = ["--data_root", vtab_root, "--task", "svhn", "--method", "spectral_a", "--rank", "8", "--lr", "3e-3",
            "--epochs", "8", "--batch_size", "8", "--drop_path", "0", "--protocol", "legacy", "--output_dir",
            str(tmp_path), "--quiet", *VTAB_TINY]
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
def test_sweep_resumes_after_kill(vtab_root, tmp_path):
    out = str(tmp_path / "sweep")
    argv = ["--data_root", vtab_root, "--output_dir", out, "--tasks", "svhn", "dtd", "--methods", "spectral_a:rank=2",
            "linear", "--seeds", "0", "1", "--epochs", "3", *VTAB_TINY]
    total = 2 * 2 * 2
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "training", "vtab_sweep.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(OMP_NUM_THREADS="1"))
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


def test_custom_task_train_and_report(vtab_root, tmp_path):
    from training.vtab_data import resolve_data_task

    root = own_vtab_task(vtab_root, tmp_path / "own", "my_leaves")
    task = resolve_data_task(root, "my_leaves")
    assert (task.name, task.group, task.num_classes, task.custom) == ("my_leaves", "custom", 5, True)
    assert resolve_data_task(root, "my_leaves", num_classes=7).num_classes == 7
    with pytest.raises(VTABDataError, match=r"--num_classes 3 but its splits use labels up to 4"):
        resolve_data_task(root, "my_leaves", num_classes=3)
    with pytest.raises(VTABDataError, match=r"'my_leafs': no folder .*my_leafs"):
        resolve_data_task(root, "my_leafs")

    out = str(tmp_path / "runs")
    argv = ["--data_root", root, "--output_dir", out, "--tasks", "my_leaves", "--methods", "spectral_a:rank=2",
            "--epochs", "1", *VTAB_TINY]
    res = vtab_sweep.main(vtab_sweep.parse_args(argv))
    assert [r["status"] for r in res] == ["done"]  # custom tasks take any split size (24/12/36/24 here)
    r = _load_runs(out)[0]
    assert (r["task"], r["group"], r["custom"], r["num_classes"]) == ("my_leaves", "custom", True, 5)
    assert r["params"]["head"] == 64 * 5 + 5  # a 5-way head, read from the labels

    # a VTAB result next to it: the report keeps the custom task out of every VTAB-1k average and published row
    vtab_train.main(vtab_train.parse_args(["--data_root", vtab_root, "--task", "svhn", "--output_dir", out,
                                           "--method", "spectral_a", "--rank", "2", "--epochs", "1",
                                           "--label", "spectral_a:rank=2", "--quiet", *VTAB_TINY]))
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


def test_cli_exit_status_and_one_line_errors(vtab_root, tmp_path, capsys):
    missing = str(tmp_path / "no_such_root")
    assert vtab_sweep.cli(["--data_root", missing, "--tasks", "svhn", *VTAB_TINY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data root" in err and "does not exist" in err and "Traceback" not in err
    assert vtab_train.cli(["--data_root", missing, "--task", "svhn", *VTAB_TINY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err

    # every task folder is checked before anything trains: one line per problem
    assert vtab_sweep.cli(["--data_root", vtab_root, "--tasks", "svhn", "dtd", "eurosat", "cifar", *VTAB_TINY]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("folder" in e and "does not exist" in e for e in err), err
    assert not os.path.exists("outputs")  # nothing was written

    # bad method / setting: refused up front, naming it
    assert vtab_sweep.cli(["--data_root", vtab_root, "--tasks", "svhn", "--methods", "lorax:rank=2",
                           "--output_dir", str(tmp_path / "o"), *VTAB_TINY]) == 1
    assert "method 'lorax:rank=2'" in capsys.readouterr().err
    assert vtab_sweep.cli(["--data_root", vtab_root, "--tasks", "svhn", "--grid", "lr=0", "--output_dir",
                           str(tmp_path / "o"), *VTAB_TINY]) == 1
    assert "--lr must be > 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "runs")

    # the script itself: exit status 1, one line, no traceback
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "training", "vtab_sweep.py"), "--data_root", missing],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_cli_success_prints_what_it_wrote(vtab_root, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert vtab_train.cli(["--data_root", vtab_root, "--task", "svhn", "--method", "linear", "--epochs", "1",
                           "--output_dir", out, *VTAB_TINY]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out}/runs/svhn__linear__") and f"next: python training/vtab_report.py --results {out}" in last
