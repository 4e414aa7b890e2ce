"""Resumable VTAB-1k sweep: tasks x methods x seeds x settings (x protocols), one result JSON per run.

A run is skipped when its result JSON (named by the config hash of ``vtab_train.py``) exists, so a
killed sweep restarts where it stopped; results are written atomically. Each finished run appends a
line (status, time, peak memory) to ``<output_dir>/sweep_log.jsonl``. Unknown arguments go to
``vtab_train.py`` unchanged (``--model``, ``--epochs``, ``--normalization``, ...).

Settings: ``--grid lr=1e-3,5e-3 weight_decay=1e-4`` is a grid of ``vtab_train.py`` options.
With ``--protocols honest`` every grid point is trained on train800 and scored on val200, the best
is retrained on train800val200 and its last-epoch test accuracy reported (with a one-point grid the
trivial selection is skipped unless ``--select_always``). With ``legacy`` every grid point is run on
train800val200 and the report takes the best test epoch of the best point, as most papers did.

Methods: ``name[:key=value,...]`` with ``vtab_train.py`` option names, e.g. ``spectral_a:rank=8``,
``lora:rank=8,alpha=8``, ``linear`` (head only) or ``full``.

Before anything trains, the data root, every task folder (split files, labels, image files) and every
method / setting are checked; a problem stops the sweep with one line per problem and exit status 1.
Tasks not among the 19 (folders of your own in the same layout) are custom tasks (see ``vtab_train.py``).
A run that fails later is logged with its traceback in ``sweep_log.jsonl`` and printed as one line; the sweep
goes on and exits with status 1 at the end.

    python training/vtab_sweep.py --data_root data/vtab-1k --output_dir outputs/vtab --tasks all \\
        --methods spectral_a:rank=8 lora:rank=8 --seeds 0 1 2 --mixed_precision bf16
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import subprocess
import sys
import time
import traceback

from tqdm.auto import tqdm

from training import vtab_train
from training.vtab_data import VTABDataError, check_data_root, resolve_data_task, validate_task
from training.vtab_tasks import GROUPS, TASKS

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vtab_train.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--data_root", required=True)
    g.add_argument("--output_dir", default="outputs/vtab")
    g.add_argument("--tasks", nargs="+", default=["all"], help="task names/aliases, group names or 'all'")
    g.add_argument("--methods", nargs="+", default=["spectral_a:rank=8"], help="name[:key=value,...]")
    g.add_argument("--seeds", nargs="+", type=int, default=[0])
    g.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 (vtab_train options) selected on val200")
    g.add_argument("--protocols", nargs="+", choices=["honest", "legacy"], default=["honest"])
    g.add_argument("--select_always", action="store_true", help="honest: run the selection stage for one point too")
    g = p.add_argument_group("execution")
    g.add_argument("--launcher", choices=["inprocess", "subprocess", "accelerate"], default="inprocess",
                   help="inprocess: one Python process; subprocess/accelerate: one (accelerate launch) process per run")
    g.add_argument("--shard", default="0/1", help="i/n: run every n-th unit starting at i (one shard per GPU)")
    g.add_argument("--stop_on_error", action="store_true")
    g.add_argument("--dry_run", action="store_true", help="print the plan and which runs are done")
    args, train_args = p.parse_known_args(argv)
    args.train_args = train_args
    try:
        i, n = (int(x) for x in args.shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        p.error(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}")
    return args


def _flags(d: dict) -> list[str]:
    return [tok for k, v in d.items() for tok in (f"--{k}", str(v))]


def parse_method(spec: str) -> tuple[str, dict]:
    """``"lora:rank=8,alpha=8"`` -> ``("lora", {"rank": "8", "alpha": "8"})``."""
    name, _, rest = spec.partition(":")
    opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv) if rest else {}
    return name, {"method": name, **opts}


def grid_points(grid: list[str]) -> list[dict]:
    """``["lr=1e-3,5e-3", "weight_decay=1e-4"]`` -> ``[{"lr": "1e-3", ...}, {"lr": "5e-3", ...}]``."""
    axes = [(k, v.split(",")) for k, v in (item.split("=", 1) for item in grid)]
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


class Sweep:
    def __init__(self, args):
        self.args = args
        self.log_path = os.path.join(args.output_dir, "sweep_log.jsonl")

    def train_argv(self, task, method, seed, protocol, stage, point, extra=()) -> list[str]:
        a = self.args
        return ["--data_root", a.data_root, "--output_dir", a.output_dir, "--task", task, "--seed", str(seed),
                "--protocol", protocol, "--stage", stage, "--label", method[0], "--quiet",
                *a.train_args, *_flags(method[1]), *_flags(point), *extra]

    def run(self, argv: list[str]) -> dict:
        """Result of one ``vtab_train.py`` run: read if its JSON exists, else trained now."""
        targs = vtab_train.parse_args(argv)
        path = vtab_train.result_path(targs)
        if os.path.exists(path):
            with open(path) as f:
                return {"status": "skipped", "path": path, "result": json.load(f)}
        t0 = time.time()
        try:
            if self.args.launcher == "inprocess":
                vtab_train.main(targs)
            else:
                head = ["accelerate", "launch"] if self.args.launcher == "accelerate" else [sys.executable]
                subprocess.run([*head, TRAIN_SCRIPT, *argv], check=True)
            with open(path) as f:
                res = json.load(f)
            status = "done"
        except Exception as e:
            if self.args.stop_on_error:
                raise
            res, status = None, f"failed: {type(e).__name__}: {e}"
            tqdm.write(f"FAILED {targs.task} {targs.label} s{targs.seed} {targs.protocol}-{targs.stage}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (traceback in {self.log_path})")
        entry = {"status": status, "path": path, "task": targs.task, "label": targs.label, "seed": targs.seed,
                 "protocol": targs.protocol, "stage": targs.stage, "wall_s": round(time.time() - t0, 2),
                 "time_s": res and res["time_s"], "peak_memory_mb": res and res["peak_memory_mb"]}
        if res is None:
            entry["traceback"] = traceback.format_exc()
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(self.log_path, "a") as f:  # one short line per run (append is atomic enough for a log)
            f.write(json.dumps(entry) + "\n")
        return {"status": status, "path": path, "result": res}

    def unit(self, task, method, seed, protocol, points) -> list[dict]:
        """All runs of one (task, method, seed, protocol): selection + final for honest, the grid for legacy."""
        if protocol == "legacy":
            return [self.run(self.train_argv(task, method, seed, protocol, "final", p)) for p in points]
        if len(points) == 1 and not self.args.select_always:
            sel = {"candidates": points, "chosen": points[0], "skipped": "single candidate, nothing to select"}
            return [self.run(self.train_argv(task, method, seed, protocol, "final", points[0],
                                             ["--selection_json", json.dumps(sel)]))]
        runs = [self.run(self.train_argv(task, method, seed, protocol, "select", p)) for p in points]
        done = [(r["result"]["reported"]["value"], i) for i, r in enumerate(runs) if r["result"]]
        if not done:
            return runs
        best = max(done, key=lambda t: (t[0], -t[1]))[1]  # highest val200 accuracy, first on ties
        sel = {"selected_on": "val200 (last epoch)", "chosen": points[best],
               "candidates": [{"setting": p, "val200_acc": r["result"] and r["result"]["reported"]["value"],
                               "config_hash": r["result"] and r["result"]["config_hash"]}
                              for p, r in zip(points, runs)]}
        return runs + [self.run(self.train_argv(task, method, seed, protocol, "final", points[best],
                                                ["--selection_json", json.dumps(sel)]))]


def plan_tasks(args) -> list[str]:
    """Task folder names: ``all`` / group names expand to VTAB-1k tasks; other names are tasks or custom folders."""
    names: dict[str, None] = {}
    custom = "--custom" in args.train_args
    for n in args.tasks:
        expanded = list(TASKS) if n == "all" else GROUPS.get(n, [n])
        for t in expanded:
            names[resolve_data_task(args.data_root, t, custom=custom and t == n).name] = None
    return list(names)


def check_inputs(args, tasks, methods, points) -> None:
    """Data root, every task folder and every (method, setting) checked before training: raises
    :class:`VTABDataError` listing every problem, one per line."""
    small = "--allow_small_splits" in args.train_args
    custom = "--custom" in args.train_args
    problems = []
    for t in tasks:
        try:
            validate_task(args.data_root, resolve_data_task(args.data_root, t, custom=custom), allow_small_splits=small)
        except VTABDataError as e:
            problems.append(str(e))
    sweep = Sweep(args)
    for (spec, method), point in itertools.product(methods, points):
        argv = sweep.train_argv(tasks[0], (spec, method), args.seeds[0], args.protocols[0], "final", point)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                vtab_train.parse_args(argv)
            except SystemExit:
                msg = err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
                problems.append(f"method {spec!r}" + (f", setting {point}" if point else "") + f": {msg}")
    if problems:
        raise VTABDataError("\n".join(problems))


def main(args) -> list[dict]:
    check_data_root(args.data_root)
    tasks = plan_tasks(args)
    methods = [(spec, parse_method(spec)[1]) for spec in args.methods]
    points = grid_points(args.grid)
    check_inputs(args, tasks, methods, points)
    units = list(itertools.product(tasks, methods, args.seeds, args.protocols))
    i, n = (int(x) for x in args.shard.split("/"))
    units = units[i::n]
    sweep = Sweep(args)
    if args.dry_run:
        for task, m, seed, proto in units:
            print(task, m[0], f"seed={seed}", proto, f"{len(points)} setting(s)")
        return []
    print(f"sweep: {len(units)} units ({len(tasks)} tasks x {len(methods)} methods x {len(args.seeds)} seeds x "
          f"{len(args.protocols)} protocols, shard {args.shard}), {len(points)} setting(s) each -> {args.output_dir}")
    out = []
    bar = tqdm(units, desc="vtab sweep", unit="unit")
    for task, m, seed, proto in bar:
        bar.set_postfix_str(f"{task} {m[0]} s{seed} {proto}")
        out += sweep.unit(task, m, seed, proto, points)
    counts = {s: sum(r["status"] == s for r in out) for s in ("done", "skipped")}
    failed = len(out) - sum(counts.values())
    print(f"sweep finished: {counts['done']} trained, {counts['skipped']} already done, {failed} failed; "
          f"log: {sweep.log_path}")
    print(f"wrote {os.path.join(args.output_dir, 'runs')}; next: python training/vtab_report.py --results "
          f"{args.output_dir} --out {os.path.join(args.output_dir, 'report')}")
    return out


def cli(argv=None) -> int:
    """Command-line entry: 0 when every run finished (or was already done), 1 on bad input or a failed run."""
    args = parse_args(argv)
    try:
        out = main(args)
    except VTABDataError as e:
        for line in str(e).splitlines():
            print(f"vtab_sweep.py: error: {line}", file=sys.stderr)
        return 1
    return int(any(r["status"] not in ("done", "skipped") for r in out))


if __name__ == "__main__":
    sys.exit(cli())
