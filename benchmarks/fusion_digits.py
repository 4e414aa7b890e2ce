#!/usr/bin/env python
"""Measured multi-concept fusion on the trained ``builtin:digits`` base.

    python benchmarks/fusion_digits.py            # full: 3 concepts x (^A, ^R, LoRA) x fusion modes
    python benchmarks/fusion_digits.py --quick    # a smoke run (used by tests/test_digits.py)

1. Concepts (``training/digit_concepts.py``): held-out digits transformed (``bold`` dilation, ``slant``
   shear, ``invert``), each trained with ``training/dreambooth_spectral.py`` on its own band with its own
   token (instance prompt ``"a handwritten digit sks"``), adapters on the UNet and the CLIP text encoder,
   prior preservation with the same digits untransformed (class prompt ``"a handwritten digit"``).
2. Fusion with ``fusion.pipeline.fuse_pipeline`` per mode (``spectral``, ``mean``, ``least_squares`` for
   the spectral methods; ``lora_sum``, ``mean``, ``least_squares`` for PEFT LoRA).
3. Generations for prompts with no token, each single token and all tokens (``"a handwritten digit 3
   sks zwx vvn"``), over digits and seeds, judged by:
   * digit accuracy: an SVM trained on held-out digits and their concept transforms (identity kept);
   * concept kept: the concept's signature shift over the base (plain prompts) divided by its
     single-concept model's shift (1 = as strong as alone), for the single-token and all-token prompts;
   * cross-talk: the same ratio on prompts WITHOUT the concept's token (0 = no leak);
   * fusion time (``FusionResult.seconds``).
Writes ``<output_dir>/fusion_digits.{md,json}`` and one PNG grid per adapter method.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
sys.path.insert(0, str(REPO))
import digit_concepts as dc  # noqa: E402
from eval_digits_base import DigitJudge, generate, load_digit_images, save_grid  # noqa: E402

MODES = {"spectral_a": ("spectral", "mean", "least_squares"), "spectral_r": ("spectral", "mean", "least_squares"),
         "lora": ("lora_sum", "mean", "least_squares")}
SINGLE_MODE = {"spectral_a": "spectral", "spectral_r": "spectral", "lora": "lora_sum"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("base and concepts")
    g.add_argument("--pretrained_model_name_or_path", default="builtin:digits")
    g.add_argument("--concepts", nargs="+", default=list(dc.CONCEPTS), choices=list(dc.CONCEPTS))
    g.add_argument("--methods", nargs="+", default=list(MODES), choices=list(MODES))
    g.add_argument("--modes", nargs="+", default=None, help="restrict the fusion modes (default: all of each method)")
    g.add_argument("--num_instance_images", type=int, default=50, help="held-out digits per concept (balanced)")
    g = p.add_argument_group("concept training (dreambooth_spectral.py)")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--max_train_steps", type=int, default=200)
    g.add_argument("--train_batch_size", type=int, default=8)
    g.add_argument("--learning_rate", type=float, nargs="+", default=[1e-3],
                   help="one value, or one per --methods entry")
    g.add_argument("--no_prior_preservation", action="store_true",
                   help="train without prior preservation (default: the untransformed instance digits are the class "
                        "images, prompt 'a handwritten digit', so the concept binds to its token)")
    g.add_argument("--unet_only", action="store_true",
                   help="adapt the UNet only (default: UNet and CLIP text encoder, which binds the token better)")
    g.add_argument("--text_encoder_lr", type=float, default=None, help="default: the method's learning rate")
    g.add_argument("--retrain", action="store_true", help="retrain concepts even if their folder is complete")
    g = p.add_argument_group("generation")
    g.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    g.add_argument("--guidance_scale", type=float, default=4.0)
    g.add_argument("--num_inference_steps", type=int, default=20)
    g = p.add_argument_group("run")
    g.add_argument("--quick", action="store_true",
                   help="smoke run: ^A only, 2 concepts, 4 training steps, 3 digits, 1 seed, 4 sampling steps")
    g.add_argument("--output_dir", default=str(REPO / "benchmarks/results"))
    g.add_argument("--work_dir", default=None, help="concept data and adapters (default: <output_dir>/tmp/fusion_digits)")
    g.add_argument("--num_threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.concepts = ["spectral_a"], ["bold", "invert"]
        args.modes = args.modes or ["spectral", "mean"]
        args.max_train_steps, args.num_instance_images, args.train_batch_size = 4, 10, 4
        args.digits, args.seeds, args.num_inference_steps = [0, 1, 7], [0], 4
    if len(args.learning_rate) not in (1, len(args.methods)):
        raise SystemExit(f"--learning_rate: give 1 value or {len(args.methods)} (one per method)")
    args.work_dir = args.work_dir or str(Path(args.output_dir) / "tmp" / "fusion_digits")
    return args


# ---- data, judge, concepts ----------------------------------------------------------------------------------
def setup_data(args) -> dict:
    from spectral_vision.assets import DIGITS_BASE, read_metadata

    recipe = read_metadata(DIGITS_BASE)["recipe"]
    images, labels = load_digit_images(recipe.get("resolution", 32))
    tr, ho = np.asarray(recipe["split"]["train"]), np.asarray(recipe["split"]["heldout"])
    combos = [[]] + [[c] for c in dc.CONCEPTS] + [list(dc.CONCEPTS)]
    # the judge sees held-out digits only, plain and transformed, as ink-up images
    xs = np.concatenate([dc.ink(dc.apply(c, images[ho])) for c in combos])
    judge = DigitJudge().fit(xs, np.tile(labels[ho], len(combos)))
    acc = {"+".join(c) or "plain": float((judge.predict(dc.ink(dc.apply(c, images[tr]))) == labels[tr]).mean())
           for c in combos}
    per_class = max(1, args.num_instance_images // 10)
    inst = np.concatenate([ho[labels[ho] == d][:per_class] for d in range(10)])
    return {"judge": judge, "judge_accuracy_on_train_digits": acc, "instance": images[inst]}


def train_concepts(args, method: str, lr: float, data: dict) -> dict[str, Path]:
    """One DreamBooth run per concept (own band via ``--band auto``, own token). The method's folder is reused
    when every concept in it was trained with the same settings, else it is rebuilt from scratch."""
    import shutil

    import dreambooth_spectral as db

    root = Path(args.work_dir) / method
    folders = {c: root / c for c in args.concepts}
    want = {c: {"adapter": method, "rank": args.rank, "max_train_steps": args.max_train_steps, "learning_rate": lr,
                "train_batch_size": args.train_batch_size, "instance_prompt": dc.concept_prompt([c]),
                "with_prior_preservation": not args.no_prior_preservation,
                "train_text_encoder": not args.unet_only}
            for c in args.concepts}

    def complete(c):
        done = folders[c] / "training_args.json"
        got = json.loads(done.read_text())["args"] if done.exists() else {}
        return all(got.get(k) == v for k, v in want[c].items())

    if not args.retrain and all(complete(c) for c in args.concepts):
        return folders
    shutil.rmtree(root, ignore_errors=True)  # stale concepts and their bands.json
    for c, out in folders.items():
        data_dir = dc.write_instance_set(c, data["instance"], Path(args.work_dir) / "data" / c)
        argv = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--instance_data_dir",
                str(data_dir), "--instance_prompt", want[c]["instance_prompt"], "--output_dir", str(out),
                "--adapter", method, "--rank", str(args.rank), "--band", "auto", "--resolution", "32",
                "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.max_train_steps),
                "--learning_rate", str(lr), "--lr_warmup_steps", "0", "--snr_gamma", "5", "--seed", "0",
                "--report_to", "none", "--lora_export", "--checkpointing_steps", "1000000"]
        if not args.unet_only:
            argv += ["--train_text_encoder", "--text_encoder_lr", str(args.text_encoder_lr or lr)]
        if not args.no_prior_preservation:
            class_dir = dc.write_instance_set([], data["instance"], Path(args.work_dir) / "data" / "plain")
            argv += ["--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt",
                     dc.concept_prompt([]), "--num_class_images", str(len(data["instance"]))]
        db.main(db.parse_args(argv))
    return folders


# ---- generation and metrics ----------------------------------------------------------------------------------
def sample(args, pipe, tokens: Sequence[str]) -> np.ndarray:
    """``(seeds * digits, H, W)`` gray images for ``"a handwritten digit d <tokens>"``."""
    prompts = [dc.concept_prompt(tokens, d) for d in args.digits]
    return np.concatenate([generate(pipe, prompts, args.guidance_scale, seed=s, steps=args.num_inference_steps,
                                    progress=False) for s in args.seeds])


def measure(args, pipe, judge, prompt_sets: Sequence[tuple]) -> dict:
    """``{set key: {"accuracy", "signature": {concept: mean}, "images"}}`` for each token set."""
    targets = np.tile(args.digits, len(args.seeds))
    out = {}
    for tokens in prompt_sets:
        imgs = sample(args, pipe, tokens)
        sig = dc.signatures(imgs)
        out["+".join(tokens) or "plain"] = {"accuracy": float((judge.predict(dc.ink(imgs)) == targets).mean()),
                                            "signature": {c: float(sig[c].mean()) for c in args.concepts},
                                            "images": imgs}
    return out


def fused_pipe(base, folders: dict[str, Path], mode: str):
    from fusion.pipeline import fuse_pipeline

    pipe = copy.deepcopy(base)
    res = fuse_pipeline(pipe, [str(f) for f in folders.values()], mode=mode, names=list(folders), metrics=False,
                        prompts=[dc.concept_prompt([c]) for c in folders], progress=False, seeds=(0, 1),
                        timesteps=(999, 700, 400, 100))
    return pipe, res.seconds


def summarise(args, base_m: dict, singles: dict, fused: dict) -> dict:
    """Ratios of signature shifts (see the module docstring)."""
    ref = base_m["plain"]["signature"]
    own = {c: singles[c][c]["signature"][c] - ref[c] for c in args.concepts}  # single model's own shift

    def ratio(m, key, c):
        return (m[key]["signature"][c] - ref[c]) / own[c] if abs(own[c]) > 1e-6 else float("nan")

    all_key = "+".join(args.concepts)
    kept_single = {c: ratio(fused, c, c) for c in args.concepts}
    kept_all = {c: ratio(fused, all_key, c) for c in args.concepts}
    cross = {c: float(np.mean([ratio(fused, k, c) for k in fused if c not in k.split("+")])) for c in args.concepts}
    return {"digit_accuracy": float(np.mean([v["accuracy"] for v in fused.values()])),
            "accuracy_all_tokens": fused[all_key]["accuracy"],
            "kept_single_token": kept_single, "kept_all_tokens": kept_all, "crosstalk": cross,
            "kept_single_mean": float(np.mean(list(kept_single.values()))),
            "kept_all_mean": float(np.mean(list(kept_all.values()))),
            "crosstalk_mean_abs": float(np.mean(np.abs(list(cross.values())))), "own_shift": own}


def main(args: argparse.Namespace) -> dict:
    from spectral_vision.integrations.diffusers import load_pipeline

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    t_start = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = setup_data(args)
    judge = data["judge"]
    base = load_pipeline(args.pretrained_model_name_or_path)
    base.set_progress_bar_config(disable=True)
    base_m = measure(args, base, judge, [()])
    results = {"args": {k: v for k, v in vars(args).items()}, "judge_accuracy_on_train_digits":
               data["judge_accuracy_on_train_digits"], "base": {"accuracy": base_m["plain"]["accuracy"],
               "signature": base_m["plain"]["signature"]}, "methods": {}}
    rows = []
    all_sets = [()] + [(c,) for c in args.concepts] + [tuple(args.concepts)]
    for mi, method in enumerate(args.methods):
        lr = args.learning_rate[mi if len(args.learning_rate) > 1 else 0]
        t0 = time.time()
        folders = train_concepts(args, method, lr, data)
        t_train = time.time() - t0
        singles, grid_rows = {}, [base_m["plain"]["images"][:len(args.digits)]]
        for c, f in folders.items():
            pipe, _ = fused_pipe(base, {c: f}, SINGLE_MODE[method])
            singles[c] = measure(args, pipe, judge, [(c,), ()])
            grid_rows.append(singles[c][c]["images"][:len(args.digits)])
        ref = {"single models": {c: {"accuracy": singles[c][c]["accuracy"], "signature": singles[c][c]["signature"],
                                     "plain_prompt_signature": singles[c]["plain"]["signature"]} for c in singles}}
        rows.append([method, "single concept (reference)",
                     float(np.mean([singles[c][c]["accuracy"] for c in singles])), 1.0, float("nan"),
                     float(np.mean([abs((singles[c]["plain"]["signature"][c] - base_m["plain"]["signature"][c])
                                        / max(abs(singles[c][c]["signature"][c] - base_m["plain"]["signature"][c]),
                                              1e-6)) for c in singles])), float("nan")])
        results["methods"][method] = {"train_seconds": round(t_train, 1), "learning_rate": lr, **ref, "modes": {}}
        for mode in MODES[method]:
            if args.modes and mode not in args.modes:
                continue
            pipe, secs = fused_pipe(base, folders, mode)
            fused = measure(args, pipe, judge, all_sets)
            s = summarise(args, base_m, singles, fused)
            s["fusion_seconds"] = secs
            results["methods"][method]["modes"][mode] = {
                **s, "sets": {k: {"accuracy": v["accuracy"], "signature": v["signature"]} for k, v in fused.items()}}
            rows.append([method, mode, s["digit_accuracy"], s["kept_single_mean"], s["kept_all_mean"],
                         s["crosstalk_mean_abs"], secs])
            grid_rows.append(fused["+".join(args.concepts)]["images"][:len(args.digits)])
        save_grid(np.concatenate(grid_rows), out / f"fusion_digits_{method}.png", cols=len(args.digits))
    results["total_seconds"] = round(time.time() - t_start, 1)
    head = ("| method | fusion mode | digit acc. | concept kept (1 token) | concept kept (all tokens) "
            "| cross-talk | fusion s |\n|---|---|---|---|---|---|---|")
    fmt = lambda v: "–" if isinstance(v, float) and np.isnan(v) else (f"{v:.2f}" if isinstance(v, float) else str(v))
    table = head + "\n" + "\n".join("| " + " | ".join(fmt(x) for x in r) + " |" for r in rows)
    results["table"] = table
    print(table)
    print(f"base digit accuracy {results['base']['accuracy']:.3f}; total {results['total_seconds']} s")
    (out / "fusion_digits.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "fusion_digits.md").write_text(
        f"# Fusion on builtin:digits\n\nconcepts {args.concepts}, rank {args.rank}, {args.max_train_steps} steps, "
        f"digits {args.digits}, seeds {args.seeds}, guidance {args.guidance_scale}, "
        f"{args.num_inference_steps} sampling steps; base digit accuracy {results['base']['accuracy']:.3f}; "
        f"total {results['total_seconds']} s.\n\n{table}\n\nGrids: rows = base, single-concept models (own token), "
        "fused models (all tokens), one row per mode; columns = digits.\n")
    return results


if __name__ == "__main__":
    main(parse_args())
