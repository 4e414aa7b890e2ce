#!/usr/bin/env python
"""Measured concepts and multi-concept fusion on the trained ``builtin:digits`` base.

    python benchmarks/fusion_digits.py --workers 8                 # full run (a GPU: minutes; 2 CPU cores: hours)
    python benchmarks/fusion_digits.py --methods spectral_a lora --concepts bold slant --workers 2   # 16 min, 2 CPU cores
    python benchmarks/fusion_digits.py --sweep --workers 8         # also pick the training recipe per method
    python benchmarks/fusion_digits.py --quick                     # smoke run (tests/test_digits.py)

1. Concept data (``training/digit_concepts.py``): ``bold`` / ``slant`` / ``faint`` transforms of the base's
   HELD-OUT digits, captioned per image ``"a handwritten digit 7 <token>"``; class images (prior preservation)
   the same digits untransformed, ``"a handwritten digit 7"``.
2. One ``training/dreambooth_spectral.py`` run per (method, recipe, concept): concept ``i`` on band ``i``
   (disjoint singular columns), rank ``--rank``; PEFT LoRA (``--adapter lora``) as the usual baseline.
3. Solo metrics per concept: digit accuracy (the judge below) on concept prompts and on plain prompts, and
   the concept's signature shift over the base divided by the REAL concept's shift (transformed vs plain
   held-out digits). Targets: >= 0.90, >= 0.97, >= 0.80. ``--sweep`` trains every recipe of the grid and keeps,
   per method, the first recipe meeting all targets on all concepts (else the best worst-case margin).
4. Fusion of every pair and of all concepts per mode (spectral / mean / weighted / lora_sum / least_squares
   for the spectral methods; lora_sum, the usual way, and the others for PEFT LoRA): digit accuracy on
   all-token prompts and, per concept, its shift in the fused model / its solo shift ("kept"; target >= 0.80
   with accuracy >= 0.85).

Judge: ``eval_digits_base.DigitJudge`` (RBF-SVM) fitted on held-out digits, plain and concept-transformed,
as ink-up images (polarity-aware), so a bold, slanted or faint digit is still read as its digit.
Writes ``<output_dir>/fusion_digits.{md,json,png}`` (and ``fusion_digits_sweep.md`` with ``--sweep``).
"""
from __future__ import annotations

import argparse
import itertools
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from training import digit_concepts as dc
from training.eval_digits_base import DigitJudge, generate, load_digit_images, save_grid

from fusion_digits_report import export, markdown, strip, sweep_markdown

REPO = Path(__file__).resolve().parents[1]

MODES = {"spectral_a": ("spectral", "mean", "weighted", "lora_sum", "least_squares"),
         "spectral_r": ("spectral", "mean", "weighted", "lora_sum", "least_squares"),
         "lora": ("lora_sum", "mean", "weighted", "least_squares")}
TARGETS = {"acc_concept": 0.90, "acc_plain": 0.97, "shift_ratio": 0.80, "fused_acc": 0.85, "kept": 0.80}
# (UNet learning rate, steps, text-encoder learning rate or None: UNet only, LAYERS key), and the methods it is tried on
SWEEP = [((3e-4, 300, 3e-4, "attn"), MODES), ((3e-4, 600, 3e-4, "attn"), MODES), ((1e-3, 300, 1e-3, "attn"), MODES),
         ((1e-3, 300, None, "attn"), MODES), ((1e-3, 600, 1e-4, "attn"), ("spectral_a", "lora")),
         ((2e-3, 600, None, "attn"), ("spectral_a", "lora")), ((1e-3, 1000, 1e-4, "attn"), ("spectral_a", "lora")),
         ((1e-3, 1000, 1e-4, "conv"), ("spectral_a", "lora"))]
# adapted UNet layers of a recipe (a preset): the attention projections, those and the ResNet 3x3 convolutions, or the
# ResNet convolutions alone (an ablation in docs/concepts.md)
LAYERS = {"attn": "sd_unet", "conv": "sd_unet_conv", "resnet": "sd_unet_resnet"}
# the default recipe per concept (the built-in concepts' recipes, chosen by the runs described in docs/concepts.md)
RECIPES = {"bold": (5e-4, 500, None, "attn"), "slant": (1e-3, 1000, None, "conv"), "faint": (7e-4, 1000, None, "conv")}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("concepts and training")
    g.add_argument("--pretrained_model_name_or_path", default="builtin:digits")
    g.add_argument("--concepts", nargs="+", default=list(dc.CONCEPTS), choices=list(dc.CONCEPTS))
    g.add_argument("--methods", nargs="+", default=list(MODES), choices=list(MODES))
    g.add_argument("--tokens", nargs="+", default=[], metavar="CONCEPT=TOKEN",
                   help="override concept tokens, e.g. bold=ohwx (default: digit_concepts.CONCEPTS)")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--num_per_digit", type=int, default=20, help="held-out instance images per digit class")
    g.add_argument("--context", type=float, default=0.0,
                   help="fraction of captions with a context word (digit_concepts.with_context; an ablation)")
    g.add_argument("--train_batch_size", type=int, default=8)
    g.add_argument("--recipe", nargs="+", default=[], metavar="[CONCEPT=]LR,STEPS,TE_LR|unet[,attn|conv|resnet]",
                   help="training recipe for every concept, or per concept (default: RECIPES); unet: UNet only; "
                        "attn: attention only (preset sd_unet), conv: also the ResNet 3x3 convolutions (sd_unet_conv), "
                        "resnet: the ResNet convolutions only (sd_unet_resnet)")
    g.add_argument("--sweep", action="store_true",
                   help="train every recipe of SWEEP and pick one per method and concept")
    g = p.add_argument_group("measurement")
    g.add_argument("--samples_per_seed", type=int, default=100, help="samples per cell and seed (digits 0-9 equally)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    g.add_argument("--sweep_seeds", type=int, nargs="+", default=[0], help="seeds of the sweep's solo measurements")
    g.add_argument("--guidance_scale", type=float, default=4.0)
    g.add_argument("--num_inference_steps", type=int, default=20)
    g.add_argument("--modes", nargs="+", default=None, help="restrict the fusion modes")
    g = p.add_argument_group("run")
    g.add_argument("--quick", action="store_true", help="smoke run: ^A, bold+faint, 2 steps, 10 samples, 4 steps")
    g.add_argument("--workers", type=int, default=1, help="parallel processes (each its own pipeline)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--output_dir", default=str(REPO / "benchmarks/results"))
    g.add_argument("--work_dir", default=None, help="data and adapters (default: <output_dir>/tmp/fusion_digits)")
    g.add_argument("--export_assets", default=None, help="copy the chosen ^A concepts' adapters to DIR/<concept>")
    g.add_argument("--export_method", default="spectral_a")
    args = p.parse_args(argv)
    if not 0.0 <= args.context <= 1.0:
        raise SystemExit(f"--context must be in [0, 1], got {args.context}")
    if args.quick:
        args.methods, args.concepts, args.modes = ["spectral_a"], ["bold", "faint"], args.modes or ["spectral", "mean"]
        args.recipe, args.num_per_digit, args.train_batch_size = ["1e-3,2,1e-3"], 2, 2
        args.samples_per_seed, args.seeds, args.num_inference_steps = 10, [0], 4
    try:
        args.tokens = dict(t.split("=", 1) for t in args.tokens)
    except ValueError:
        raise SystemExit(f"--tokens: expected CONCEPT=TOKEN entries, got {args.tokens}") from None
    recipes = dict(RECIPES)
    for entry in args.recipe:
        concept, _, r = entry.rpartition("=")
        if concept and concept not in dc.CONCEPTS:
            raise SystemExit(f"--recipe {entry!r}: unknown concept {concept!r} (concepts: {list(dc.CONCEPTS)})")
        recipes.update({concept: parse_recipe(r)} if concept else {c: parse_recipe(r) for c in dc.CONCEPTS})
    args.recipe = recipes
    args.work_dir = args.work_dir or str(Path(args.output_dir) / "tmp" / "fusion_digits")
    return args


def parse_recipe(s: str) -> tuple:
    """``"1e-3,1000,1e-4,conv"`` -> ``(1e-3, 1000, 1e-4, "conv")`` (UNet lr, steps, text-encoder lr or None, layers)."""
    try:
        lr, steps, te, *layers = s.split(",")
        layers = layers[0] if layers else "attn"
        if len(s.split(",")) > 4 or layers not in LAYERS:
            raise ValueError
        return float(lr), int(steps), None if te == "unet" else float(te), layers
    except ValueError:
        raise SystemExit(f"--recipe {s!r}: expected 'lr,steps,text_encoder_lr|unet' with an optional "
                         f"',attn', ',conv' or ',resnet'") from None


def recipe_id(r: tuple) -> str:
    te = "unet" if r[2] is None else "te" if r[2] == r[0] else f"te{r[2]:g}"
    return f"lr{r[0]:g}_s{r[1]}_{te}" + ("" if r[3] == "attn" else f"_{r[3]}")


# ---- worker side: one pipeline per process ------------------------------------------------------------------
_W: dict = {}


def _init(cfg: dict) -> None:
    import torch

    torch.set_num_threads(cfg["threads"])
    dc.set_tokens(cfg["tokens"])
    _W.update(cfg)


def _base():
    """The base pipeline on the CPU (fusion, including least_squares' recording, runs there; it is cheap)."""
    if "pipe" not in _W:
        from spectral_vision.integrations.diffusers import load_pipeline

        pipe = load_pipeline(_W["model"])
        pipe.set_progress_bar_config(disable=True)
        _W["pipe"] = pipe
    return _W["pipe"]


def _fused(folders: Sequence[str], names: Sequence[str], mode: str):
    """A copy of the base with ``folders`` fused in ``mode`` (on the CPU), moved to the device; and the seconds."""
    import copy

    from fusion.pipeline import fuse_pipeline

    pipe = copy.deepcopy(_base())
    r = fuse_pipeline(pipe, list(folders), mode=mode, names=list(names), metrics=False,
                      prompts=[dc.concept_prompt([c]) for c in names], progress=False, seeds=(0, 1),
                      timesteps=(999, 700, 400, 100))
    return pipe.to(_W["device"]), r.seconds


def _measure(pipe, tokens: Sequence[str], seeds: Sequence[int]) -> dict:
    """Accuracy and mean signatures on ``"a handwritten digit d <tokens>"``, ``samples_per_seed`` per seed."""
    n = _W["samples_per_seed"]
    targets = np.arange(n) % 10
    prompts = [dc.concept_prompt(tokens, d) for d in targets]
    imgs = np.concatenate([generate(pipe, prompts, _W["guidance"], seed=1000 * s, steps=_W["steps"], batch_size=500,
                                    progress=False) for s in seeds])
    pred = _W["judge"].predict(dc.ink(imgs))
    sig = dc.signatures(imgs)
    return {"accuracy": float((pred == np.tile(targets, len(seeds))).mean()), "n": len(imgs),
            "signature": {c: float(v.mean()) for c, v in sig.items()}, "grid": imgs[:10]}


def task_train(method: str, recipe: tuple, concept: str, band: int, out: str, data: dict, seeds) -> dict:
    """Train one concept (skipped when ``out`` holds a finished run) and measure it solo."""
    from training import dreambooth_spectral as db

    t0 = time.time()
    lr, steps, te_lr, layers = recipe
    if not (Path(out) / "training_args.json").exists():
        argv = ["--pretrained_model_name_or_path", _W["model"], "--instance_data_dir", data["instance_dir"],
                "--caption_column", "text", "--output_dir", out, "--adapter", method, "--rank", str(_W["rank"]),
                "--band", str(band), "--no_register", "--resolution", "32", "--train_batch_size",
                str(_W["batch"]), "--max_train_steps", str(steps), "--learning_rate", str(lr), "--lr_warmup_steps",
                "0", "--snr_gamma", "5", "--seed", "0", "--report_to", "none", "--lora_export",
                "--checkpointing_steps", "1000000", "--with_prior_preservation", "--class_data_dir",
                data["class_dir"], "--num_class_images", str(data["num_images"]), "--target_modules", LAYERS[layers]]
        if te_lr is not None:
            argv += ["--train_text_encoder", "--text_encoder_lr", str(te_lr)]
        db.main(db.parse_args(argv))
    t_train = time.time() - t0
    pipe, _ = _fused([out], [concept], "lora_sum" if method == "lora" else "spectral")
    res = {"method": method, "recipe": recipe_id(recipe), "concept": concept, "train_seconds": round(t_train, 1),
           "concept_prompt": _measure(pipe, [concept], seeds), "plain_prompt": _measure(pipe, [], seeds)}
    return res


def task_fuse(method: str, mode: str, folders: dict, sets: list, seeds) -> list:
    """Fuse each concept set in ``mode`` and measure it on all-token prompts (and plain prompts)."""
    out = []
    for names in sets:
        pipe, secs = _fused([folders[c] for c in names], names, mode)
        out.append({"method": method, "mode": mode, "set": "+".join(names), "fusion_seconds": secs,
                    "all_tokens": _measure(pipe, names, seeds), "plain_prompt": _measure(pipe, [], seeds)})
    return out


# ---- driver --------------------------------------------------------------------------------------------------
def setup(args) -> dict:
    """Concept data sets, the judge, the real concepts' shifts, and how much of each real shift survives in the
    real combinations (``real_kept``: shearing a dilated stroke thins it, so even real bold+slant digits keep only
    part of bold's stroke-width shift; a fused model is read against that, not against 1)."""
    from spectral_vision.assets import DIGITS_BASE, read_metadata

    recipe = read_metadata(DIGITS_BASE)["recipe"]
    images, labels = load_digit_images(recipe.get("resolution", 32))
    ho = np.asarray(recipe["split"]["heldout"])
    combos = [[]] + [[c] for c in dc.CONCEPTS] + [list(dc.CONCEPTS)]
    xs = np.concatenate([dc.ink(dc.apply(c, images[ho])) for c in combos])
    judge = DigitJudge().fit(xs, np.tile(labels[ho], len(combos)))
    plain = dc.signatures(images[ho])
    real = {c: float(dc.signatures(dc.apply([c], images[ho]))[c].mean() - plain[c].mean()) for c in args.concepts}
    real_kept = {}
    for k in range(2, len(args.concepts) + 1):
        for names in itertools.combinations(args.concepts, k):
            sig = dc.signatures(dc.apply(list(names), images[ho]))
            real_kept["+".join(names)] = {c: _ratio(float(sig[c].mean() - plain[c].mean()), real[c]) for c in names}
    data = {}
    for c in args.concepts:
        s = dc.write_instance_set(c, Path(args.work_dir) / "data" / f"{c}{_ctx(args)}", num_per_digit=args.num_per_digit,
                                  context=args.context)
        data[c] = {"instance_dir": str(s.instance_dir), "class_dir": str(s.class_dir), "num_images": s.num_images}
    return {"judge": judge, "real_shift": real, "real_kept": real_kept, "data": data}


def _ctx(args) -> str:
    """Suffix of the data and run folders of a ``--context`` ablation ("" without one)."""
    return f"_ctx{args.context:g}" if args.context else ""


def _ratio(a: float, b: float) -> float:
    return a / b if abs(b) > 1e-9 else float("nan")


def solo_summary(r: dict, base_sig: dict, real: dict) -> dict:
    c = r["concept"]
    shift = r["concept_prompt"]["signature"][c] - base_sig[c]
    s = {"acc_concept": r["concept_prompt"]["accuracy"], "acc_plain": r["plain_prompt"]["accuracy"],
         "shift": shift, "shift_ratio": _ratio(shift, real[c]),
         "leak_plain": _ratio(r["plain_prompt"]["signature"][c] - base_sig[c], real[c])}
    s["margin"] = min(s[k] / TARGETS[k] for k in ("acc_concept", "acc_plain", "shift_ratio"))
    return s


def worker_config(args) -> dict:
    import torch

    return {"model": args.pretrained_model_name_or_path, "device": args.device, "rank": args.rank,
            "batch": args.train_batch_size, "samples_per_seed": args.samples_per_seed, "tokens": args.tokens,
            "guidance": args.guidance_scale, "steps": args.num_inference_steps, "judge": args.judge,
            "threads": max(1, (os.cpu_count() or 2) // args.workers) if args.workers > 1 else torch.get_num_threads()}


def run_pool(args, fn, jobs: list) -> list:
    """Run ``fn(*job)`` over jobs in ``--workers`` processes (in this process with 1 worker)."""
    cfg = worker_config(args)
    if args.workers <= 1:
        _init(cfg)
        return [fn(*j) for j in jobs]
    import multiprocessing as mp

    out = []
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(cfg,)) as ex:
        futs = [ex.submit(fn, *j) for j in jobs]
        for f in as_completed(futs):
            out.append(f.result())
            print(f"[{time.strftime('%H:%M:%S')}] {len(out)}/{len(jobs)} {fn.__name__} done", flush=True)
    return out


def main(args: argparse.Namespace) -> dict:
    import torch

    from spectral_vision.fileio import atomic_write_json, atomic_write_text
    from spectral_vision.integrations.diffusers import load_pipeline

    t_start = time.time()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dc.set_tokens(args.tokens)
    out, work = Path(args.output_dir), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_pipeline(args.pretrained_model_name_or_path)  # materialise the cache once, before the workers
    s = setup(args)
    args.judge = s["judge"]
    _init(worker_config(args))  # the base is measured in this process
    base = {"plain": _measure(_base().to(args.device), [], args.seeds)}
    _W.pop("pipe", None)
    base_sig = base["plain"]["signature"]
    tried = {(m, c): [r for r, ms in SWEEP if m in ms] if args.sweep else [args.recipe[c]]
             for m in args.methods for c in args.concepts}
    band = {c: i for i, c in enumerate(args.concepts)}

    def folder(m, r, c):
        return str(work / m / f"{recipe_id(r)}{_ctx(args)}_b{band[c]}" / c)

    # 1. solo concepts (every recipe with --sweep, measured on --sweep_seeds), then the chosen ones on --seeds
    seeds = args.sweep_seeds if args.sweep else args.seeds
    jobs = [(m, r, c, band[c], folder(m, r, c), s["data"][c], seeds) for (m, c), rs in tried.items() for r in rs]
    jobs.sort(key=lambda j: -j[1][1])  # longest runs first
    solo = run_pool(args, task_train, jobs)
    for r in solo:
        r["summary"] = solo_summary(r, base_sig, s["real_shift"])
    chosen = {}  # (method, concept) -> recipe: meets all targets first, then the worst-case margin
    for m in args.methods:
        for c in args.concepts:
            rows = {x["recipe"]: x["summary"] for x in solo if x["method"] == m and x["concept"] == c}
            chosen[m, c] = max(tried[m, c], key=lambda r: (rows[recipe_id(r)]["margin"] >= 1.0,
                                                        rows[recipe_id(r)]["margin"]))
    if args.sweep:
        atomic_write_json(out / "fusion_digits_sweep.json", {"targets": TARGETS, "real_shift": s["real_shift"],
                          "base": strip(base), "solo": [strip(x) for x in solo], "device": args.device,
                          "chosen": {f"{m}/{c}": recipe_id(r) for (m, c), r in chosen.items()}})
        atomic_write_text(out / "fusion_digits_sweep.md", sweep_markdown(args, solo, {k: recipe_id(r) for k, r in chosen.items()}))
        jobs = [(m, chosen[m, c], c, band[c], folder(m, chosen[m, c], c), s["data"][c], args.seeds)
                for m in args.methods for c in args.concepts]
        solo = run_pool(args, task_train, jobs)  # trained already: re-measured on --seeds
        for r in solo:
            r["summary"] = solo_summary(r, base_sig, s["real_shift"])
    solo_by = {(x["method"], x["concept"]): x for x in solo
               if x["recipe"] == recipe_id(chosen[x["method"], x["concept"]])}
    if args.export_assets and args.export_method in args.methods:
        export(args, {c: folder(args.export_method, chosen[args.export_method, c], c) for c in args.concepts},
               solo_by, band)

    # 2. fusion: every pair and all concepts, per mode
    sets = [list(p) for p in itertools.combinations(args.concepts, 2)]
    sets += [list(args.concepts)] if len(args.concepts) > 2 else []
    jobs = [(m, mode, {c: folder(m, chosen[m, c], c) for c in args.concepts}, sets, args.seeds)
            for m in args.methods for mode in MODES[m] if not args.modes or mode in args.modes]
    fused = [row for rows in run_pool(args, task_fuse, jobs) for row in rows]
    fused.sort(key=lambda f: (args.methods.index(f["method"]), MODES[f["method"]].index(f["mode"])))
    for f in fused:
        names = f["set"].split("+")
        f["kept"] = {c: _ratio(f["all_tokens"]["signature"][c] - base_sig[c], solo_by[(f["method"], c)]["summary"]["shift"])
                     for c in names}
        f["real_kept"] = s["real_kept"][f["set"]]
        # what a perfect fusion can keep is what REAL combined digits keep (shearing a dilated stroke thins it):
        # kept / real_kept is the fraction of that reached
        f["kept_vs_real"] = {c: _ratio(v, f["real_kept"][c]) for c, v in f["kept"].items()}
        acc_ok = f["all_tokens"]["accuracy"] >= TARGETS["fused_acc"]
        f["meets"] = bool(acc_ok and min(f["kept"].values()) >= TARGETS["kept"])
        f["meets_vs_real"] = bool(acc_ok and min(f["kept_vs_real"].values()) >= TARGETS["kept"])
    res = {"args": {k: v for k, v in vars(args).items() if k != "judge"}, "targets": TARGETS,
           "real_shift": s["real_shift"], "base": strip(base),
           "chosen_recipe": {f"{m}/{c}": recipe_id(r) for (m, c), r in chosen.items()},
           "solo": [strip(x) for x in solo_by.values()], "fused": [strip(x) for x in fused],
           "tokens": {c: dc.CONCEPTS[c].token for c in args.concepts},
           "total_seconds": round(time.time() - t_start, 1), "device": args.device}
    res["table"] = markdown(args, res)
    atomic_write_json(out / "fusion_digits.json", res)
    atomic_write_text(out / "fusion_digits.md", res["table"])
    grid = [base["plain"]["grid"]] + [solo_by[(m, c)]["concept_prompt"]["grid"] for m in args.methods
                                      for c in args.concepts]
    grid += [f["all_tokens"]["grid"] for f in fused if f["set"] == "+".join(sets[-1])]
    save_grid(np.concatenate(grid), out / "fusion_digits.png", cols=10)
    print(res["table"])
    return res


if __name__ == "__main__":
    main(parse_args())
