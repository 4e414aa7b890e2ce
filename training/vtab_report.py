"""VTAB-1k results table: 19-task layout, group means, both averages, mean ± std over seeds, plots.

Reads the result JSONs written by ``vtab_train.py`` / ``vtab_sweep.py``. One row per
(protocol, label). Per task and seed the number is: ``honest`` -> the final stage's last-epoch test
accuracy (settings chosen on val200); ``legacy`` -> the best test epoch of the best setting. Columns:
the 19 tasks by group, each group's mean, the mean of the three group means (what papers report),
the mean of the 19 tasks, and trainable parameters without / with the classification head.
Published results (per task, from the SpecLoRA paper's table) are added as reference rows (not measured here). Averages over fewer tasks than
the full table are marked ``(n/N)``. Custom tasks (a user's own folders, ``"custom": true`` in the result) get
their own table: per task only, never in a VTAB-1k average and never next to published numbers.

    python training/vtab_report.py --results outputs/vtab --out outputs/vtab/report
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
from collections import defaultdict
from typing import Sequence

import numpy as np

from spectral_vision.fileio import atomic_write, atomic_write_text
from training.vtab_tasks import CUSTOM, GROUPS, PUBLISHED, TASKS

SCHEMA = "spectral-vision/vtab-result/1"
AVERAGES = ("mean_of_group_means", "mean_of_19")


def load_results(paths: list[str]) -> list[dict]:
    """All result JSONs in the given files / folders (searched recursively)."""
    files = []
    for p in paths:
        files += [p] if os.path.isfile(p) else glob.glob(os.path.join(p, "**", "*.json"), recursive=True)
    out = []
    for f in sorted(files):
        with open(f) as fh:
            try:
                r = json.load(fh)
            except json.JSONDecodeError:
                continue
        if isinstance(r, dict) and r.get("schema") == SCHEMA:
            out.append(r)
    return out


def collect(results: list[dict]) -> dict:
    """``{(protocol, label): {"acc": {task: {seed: value}}, "runs": [...]}}`` following the module's rules."""
    rows: dict = defaultdict(lambda: {"acc": defaultdict(dict), "runs": []})
    for r in sorted(results, key=lambda r: r["finished_at"]):
        if r["protocol"] == "honest" and r["stage"] == "select":
            continue  # selection runs are inputs to the final run, never reported
        row = rows[(r["protocol"], r["label"])]
        row["runs"].append(r)
        seeds = row["acc"][r["task"]]
        v = r["reported"]["value"]
        if r["protocol"] == "legacy":  # best over settings (and epochs), as the papers' tables did
            seeds[r["seed"]] = max(v, seeds.get(r["seed"], -1.0))
        else:  # honest: the latest final run for this seed
            seeds[r["seed"]] = v
    return rows


def _averages(acc: dict[str, float]) -> dict:
    """Group means, mean of group means and mean of 19 over the tasks present in ``acc``."""
    out, gmeans = {}, []
    for g, tasks in GROUPS.items():
        vals = [acc[t] for t in tasks if t in acc]
        out[g] = (float(np.mean(vals)) if vals else None, len(vals), len(tasks))
        if vals:
            gmeans.append(out[g][0])
    # coverage of the averages is counted in tasks: a mean of partial group means is itself partial
    out["mean_of_group_means"] = (float(np.mean(gmeans)) if gmeans else None, len(acc), len(TASKS))
    out["mean_of_19"] = (float(np.mean(list(acc.values()))) if acc else None, len(acc), len(TASKS))
    return out


def summarize(key, row) -> dict:
    """Per-task mean/std over seeds; averages as mean/std over seeds that cover all of the row's tasks."""
    tasks = {t: {"mean": float(np.mean(list(s.values()))), "std": float(np.std(list(s.values()), ddof=1)) if len(s) > 1
                 else None, "n": len(s)} for t, s in row["acc"].items()}
    avg = _averages({t: v["mean"] for t, v in tasks.items()})
    seeds = set.intersection(*[set(s) for s in row["acc"].values()]) if row["acc"] else set()
    per_seed = [_averages({t: s[seed] for t, s in row["acc"].items()}) for seed in sorted(seeds)]
    std = {k: float(np.std([p[k][0] for p in per_seed], ddof=1)) if len(per_seed) > 1 else None for k in avg}
    runs = row["runs"]
    return {
        "protocol": key[0], "label": key[1], "tasks": tasks, "averages": avg, "averages_std": std,
        "seeds": sorted({r["seed"] for r in runs}),
        "params_without_head": float(np.mean([r["params"]["trainable_without_head"] for r in runs])),
        "params_with_head": float(np.mean([r["params"]["trainable"] for r in runs])),
        "normalizations": sorted({r["normalization"] for r in runs}),
        "time_s": float(sum(r["time_s"] for r in runs)),
        "peak_gpu_mb": max([r["peak_memory_mb"]["gpu_allocated"] or 0 for r in runs]) or None,
        "fixture": any(r["data"]["fixture"] for r in runs),
    }


def _fmt(mean, std=None, n=None, total=None) -> str:
    if mean is None:
        return "—"
    s = f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")
    return s + (f" ({n}/{total})" if n is not None and n != total else "")


def columns() -> list[tuple[str, str]]:
    """``(key, header)`` in the 19-task layout: each group's tasks followed by its mean, then the averages."""
    cols = []
    for g, tasks in GROUPS.items():
        cols += [(t, t) for t in tasks] + [(g, f"**{g.capitalize()}**")]
    return cols + [("mean_of_group_means", "**Mean (groups)**"), ("mean_of_19", "**Mean (19)**")]


def _cell(s: dict, key: str) -> str:
    if key in s["tasks"]:
        return _fmt(s["tasks"][key]["mean"], s["tasks"][key]["std"])
    if key in s["averages"]:
        m, n, tot = s["averages"][key]
        return _fmt(m, s["averages_std"].get(key), n, tot)
    return "—"


def published_summaries() -> list[dict]:
    """Reference rows from :data:`vtab_tasks.PUBLISHED`: per-task numbers as printed, group means and the mean of
    19 computed from them, the mean of group means as printed by the paper."""
    out = []
    for name, ref in PUBLISHED.items():
        acc = dict(zip(TASKS, ref["tasks"]))
        avg = _averages(acc)
        avg["mean_of_group_means"] = (ref["average"], len(TASKS), len(TASKS))
        out.append({"protocol": "published", "label": name, "published": ref,
                    "tasks": {t: {"mean": v, "std": None, "n": 1} for t, v in acc.items()},
                    "averages": avg, "averages_std": {}, "seeds": [], "normalizations": [], "fixture": False})
    return out


def _params(s: dict) -> list[str]:
    if s.get("published"):
        return [f"{s['published']['params_M']:.2f}†", "—"]
    return [f"{s['params_without_head'] / 1e6:.4f}", f"{s['params_with_head'] / 1e6:.4f}"]


def is_custom(r: dict) -> bool:
    """A result of a custom task (a user's own folder), or of a task name that is not one of the 19."""
    return bool(r.get("custom")) or r.get("group") == CUSTOM or r["task"] not in TASKS


def summarize_custom(key, row) -> dict:
    """Per-task mean/std over seeds of a custom-task row; no averages across tasks."""
    runs = row["runs"]
    return {"protocol": key[0], "label": key[1], "seeds": sorted({r["seed"] for r in runs}),
            "tasks": {t: {"mean": float(np.mean(list(s.values()))), "n": len(s),
                          "std": float(np.std(list(s.values()), ddof=1)) if len(s) > 1 else None}
                      for t, s in row["acc"].items()},
            "num_classes": {r["task"]: r.get("num_classes") for r in runs},
            "params_without_head": float(np.mean([r["params"]["trainable_without_head"] for r in runs])),
            "params_with_head": float(np.mean([r["params"]["trainable"] for r in runs])),
            "fixture": any(r["data"]["fixture"] for r in runs)}


def custom_markdown(custom: list[dict]) -> list[str]:
    """The ``## Custom tasks`` section (empty list without custom results)."""
    if not custom:
        return []
    tasks = sorted({t for s in custom for t in s["tasks"]})
    classes = {t: c for s in custom for t, c in s["num_classes"].items()}
    head = ["protocol", "method", *[f"{t} ({classes.get(t)} cl.)" for t in tasks], "params w/o head (M)", "seeds"]
    lines = ["", "## Custom tasks", "", "Your own tasks in the VTAB-1k folder layout: NOT VTAB-1k, not comparable to "
             "the published rows, never part of the averages above. Cells: test accuracy, mean ± std over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in custom:
        cells = [_fmt(s["tasks"][t]["mean"], s["tasks"][t]["std"]) if t in s["tasks"] else "—" for t in tasks]
        lines.append("| " + " | ".join([s["protocol"], s["label"], *cells, f"{s['params_without_head'] / 1e6:.4f}",
                                        ",".join(map(str, s["seeds"]))]) + " |")
    return lines


def write_markdown(summaries: list[dict], path: str, custom: Sequence[dict] = ()) -> str:
    cols = columns()
    lines = ["# VTAB-1k results", ""]
    if not summaries:
        text = "\n".join(lines + ["No VTAB-1k task in these results."] + custom_markdown(list(custom))) + "\n"
        atomic_write_text(path, text)
        return text
    if any(s["fixture"] for s in summaries):
        lines += ["> **FIXTURE DATA** — some runs used the offline fixture (scikit-learn / scikit-image images), "
                  "not VTAB-1k. Those numbers only show that the pipeline runs.", ""]
    lines += ["Protocols: `honest` = settings chosen on val200 after training on train800, retrained on "
              "train800val200, last-epoch test accuracy; `legacy` = best test epoch (best setting), as most papers "
              "reported. Cells: mean ± std over seeds; averages over fewer tasks are marked (n/N).", ""]
    head = ["protocol", "method", *[h for _, h in cols], "params w/o head (M)", "params with head (M)", "seeds",
            "normalization"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s["protocol"], s["label"], *[_cell(s, k) for k, _ in cols], *_params(s),
                 ",".join(map(str, s["seeds"])) or "—", ",".join(s["normalizations"]) or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    refs = sorted({s["published"]["source"] for s in summaries if s.get("published")})
    if refs:
        lines += ["", f"`published` rows: NOT measured here; per-task numbers and the mean of group means as printed "
                      f"in {'; '.join(refs)} (group means and mean of 19 computed from the printed per-task numbers). "
                      "† parameter count as printed (the papers do not all say whether the head is counted)."]
    lines += ["", "## Cost", "", "| protocol | method | runs | train+eval time (min) | peak GPU memory (GB) |",
              "|---|---|---|---|---|"]
    for s in summaries:
        if s.get("published"):
            continue
        gpu = "— (CPU)" if s["peak_gpu_mb"] is None else f"{s['peak_gpu_mb'] / 1024:.2f}"
        n = sum(v["n"] for v in s["tasks"].values())
        lines.append(f"| {s['protocol']} | {s['label']} | {n} | {s['time_s'] / 60:.2f} | {gpu} |")
    text = "\n".join(lines + custom_markdown(list(custom))) + "\n"
    atomic_write_text(path, text)
    return text


def write_custom_csv(custom: list[dict], path: str) -> None:
    """One row per (protocol, method, custom task)."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["protocol", "label", "task", "num_classes", "mean", "std", "n", "params_without_head", "seeds"])
            for s in custom:
                for t, v in sorted(s["tasks"].items()):
                    w.writerow([s["protocol"], s["label"], t, s["num_classes"].get(t), v["mean"],
                                "" if v["std"] is None else v["std"], v["n"], int(s["params_without_head"]),
                                " ".join(map(str, s["seeds"]))])

    atomic_write(path, write)


def write_csv(summaries: list[dict], path: str) -> None:
    atomic_write(path, lambda tmp: _write_csv(summaries, tmp))


def _write_csv(summaries: list[dict], path: str) -> None:
    keys = [k for k, _ in columns()]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["protocol", "label", *[c for k in keys for c in (k, f"{k}_std", f"{k}_n")],
                    "params_without_head", "params_with_head", "published_params_M", "seeds", "normalization",
                    "time_s", "fixture"])
        for s in summaries:
            vals = []
            for k in keys:
                if k in s["tasks"]:
                    vals += [s["tasks"][k]["mean"], s["tasks"][k]["std"], s["tasks"][k]["n"]]
                elif k in s["averages"]:
                    vals += [s["averages"][k][0], s["averages_std"].get(k), s["averages"][k][1]]
                else:
                    vals += [None, None, 0]
            pub = s.get("published")
            w.writerow([s["protocol"], s["label"], *["" if v is None else v for v in vals],
                        "" if pub else int(s["params_without_head"]), "" if pub else int(s["params_with_head"]),
                        pub["params_M"] if pub else "", " ".join(map(str, s["seeds"])), " ".join(s["normalizations"]),
                        "" if pub else s["time_s"], s["fixture"]])


def plot(summaries: list[dict], out: str) -> list[str]:
    """``acc_vs_params.png`` (mean of group means vs trainable params w/o head) and ``per_task.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = [s for s in summaries if s.get("published")]
    summaries = [s for s in summaries if not s.get("published")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summaries:
        m = s["averages"]["mean_of_group_means"][0]
        ax.scatter(max(s["params_without_head"], 1) / 1e6, m, label=f"{s['label']} [{s['protocol']}]")
    for r in refs:
        ax.scatter(r["published"]["params_M"], r["published"]["average"], marker="x", color="gray")
        ax.annotate(f"{r['label']} (published)", (r["published"]["params_M"], r["published"]["average"]), fontsize=7,
                    color="gray", xytext=(3, 3), textcoords="offset points")
    tag = " — FIXTURE DATA" if any(s["fixture"] for s in summaries) else ""
    ax.set(xscale="log", xlabel="trainable parameters without head (M)", ylabel="mean of group means (%)",
           title=f"VTAB-1k: accuracy vs trainable parameters{tag}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [os.path.join(out, "acc_vs_params.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    tasks = [t for t in TASKS if any(t in s["tasks"] for s in summaries)]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(tasks) * max(len(summaries), 1)), 4))
    width = 0.8 / max(len(summaries), 1)
    for i, s in enumerate(summaries):
        x = np.arange(len(tasks)) + i * width
        y = [s["tasks"][t]["mean"] if t in s["tasks"] else 0.0 for t in tasks]
        err = [(s["tasks"][t]["std"] or 0.0) if t in s["tasks"] else 0.0 for t in tasks]
        ax.bar(x, y, width, yerr=err, label=f"{s['label']} [{s['protocol']}]")
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="top-1 accuracy (%)", title=f"VTAB-1k per task{tag}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out, "per_task.png"))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--results", nargs="+", required=True, help="result JSON files or folders (searched recursively)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="folder for results.md, results.csv and the plots")
    g.add_argument("--no_plots", action="store_true")
    g.add_argument("--no_published", action="store_true", help="leave out the published reference rows")
    return p.parse_args(argv)


def main(args) -> list[dict]:
    """Write the report; returns the VTAB-1k summaries then the custom-task summaries (``"custom": True``)."""
    missing = [p for p in args.results if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"vtab_report.py: error: {', '.join(missing)}: no such file or folder")
    results = load_results(args.results)
    if not results:
        raise SystemExit(f"vtab_report.py: error: no VTAB result JSONs found in {' '.join(args.results)} "
                         f"(vtab_train.py / vtab_sweep.py write them under <output_dir>/runs)")
    vtab = [r for r in results if not is_custom(r)]
    custom = [dict(summarize_custom(k, row), custom=True)
              for k, row in sorted(collect([r for r in results if is_custom(r)]).items())]
    summaries = [summarize(k, row) for k, row in sorted(collect(vtab).items())]
    summaries += [] if args.no_published or not summaries else published_summaries()
    os.makedirs(args.out, exist_ok=True)
    written = [os.path.join(args.out, "results.md")]
    text = write_markdown(summaries, written[0], custom)
    if summaries:
        written.append(os.path.join(args.out, "results.csv"))
        write_csv(summaries, written[-1])
        if not args.no_plots:
            written += plot(summaries, args.out)
    if custom:
        written.append(os.path.join(args.out, "custom.csv"))
        write_custom_csv(custom, written[-1])
    print(text)
    print(f"wrote {', '.join(written)}")
    return summaries + custom


if __name__ == "__main__":
    main(parse_args())
