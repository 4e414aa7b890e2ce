#!/usr/bin/env python
"""Judge the ``builtin:digits`` base: prompted-digit accuracy and a memorisation check.

    python training/eval_digits_base.py                       # 500 samples at guidance 4 and 2
    python training/eval_digits_base.py --num_samples 100 --guidance 4
    python training/eval_digits_base.py --tokens sks ohwx zwx --num_samples 100 --guidance 4 \\
        --output benchmarks/results/concept_token.json   # base accuracy on "a handwritten digit N <token>"

* Data: scikit-learn's bundled 8x8 handwritten digits (1797 images), upscaled bilinearly to 32x32,
  split once (stratified, seeded) into the generator's training set and held-out digits.
* Judge: an RBF-SVM trained on the HELD-OUT digits only (the generator never saw them), on the 8x8
  average-pooled image; its accuracy is measured on the generator's training digits.
* Memorisation: for each generated image, the L2 distance to its nearest training digit, compared
  with the same distance for held-out digits (a memorising model sits much closer than held-out data).

The helpers here (data, split, judge, generation) are shared by the pretraining script, the digit
concepts and ``benchmarks/fusion_digits.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PROMPT = "a handwritten digit {}"


# ---- data -----------------------------------------------------------------------------------------------
def load_digit_images(resolution: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits as ``(N, resolution, resolution)`` float32 in [0, 1] (ink = 1) and labels ``(N,)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, size=resolution, mode="bilinear", align_corners=False)  # (N, 1, R, R)
    return x[:, 0].clamp(0, 1).numpy(), d.target.astype(np.int64)


def split_indices(labels: np.ndarray, heldout_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train_idx, heldout_idx)``, sorted."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, ho = train_test_split(idx, test_size=heldout_fraction, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(ho)


def to_gray(images) -> np.ndarray:
    """PIL images, or arrays ``(N, H, W[, C])`` in [0, 1], -> ``(N, H, W)`` float32 in [0, 1] (channel mean)."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    a = np.asarray(images, dtype=np.float32)
    return a.mean(-1) if a.ndim == 4 else a


class DigitJudge:
    """RBF-SVM digit classifier on 8x8 average-pooled images (the digits' native resolution)."""

    def __init__(self, C: float = 10.0):
        from sklearn.svm import SVC

        self.svm = SVC(C=C, gamma="scale")

    @staticmethod
    def features(gray: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(gray, dtype=np.float32))[:, None]  # (N, 1, H, W)
        return F.adaptive_avg_pool2d(x, 8).flatten(1).numpy()  # (N, 64)

    def fit(self, gray: np.ndarray, labels: np.ndarray) -> "DigitJudge":
        self.svm.fit(self.features(gray), labels)
        return self

    def predict(self, gray: np.ndarray) -> np.ndarray:
        return self.svm.predict(self.features(gray))


def judge_from_recipe(recipe: dict) -> tuple[DigitJudge, dict]:
    """The judge trained on the held-out digits of ``recipe``'s split; also returns the data dict."""
    images, labels = load_digit_images(recipe.get("resolution", 32))
    tr, ho = np.asarray(recipe["split"]["train"]), np.asarray(recipe["split"]["heldout"])
    judge = DigitJudge().fit(images[ho], labels[ho])
    acc = float((judge.predict(images[tr]) == labels[tr]).mean())
    return judge, {"images": images, "labels": labels, "train": tr, "heldout": ho, "judge_accuracy": acc}


# ---- generation and metrics ------------------------------------------------------------------------------
@torch.no_grad()
def generate(pipe, prompts: Sequence[str], guidance: float, seed: int = 0, steps: int = 20,
             batch_size: int = 250, progress: bool = True) -> np.ndarray:
    """Images for ``prompts`` as ``(N, H, W)`` gray in [0, 1]; one seeded generator per batch."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"generate g={guidance}", disable=not progress):
        g = torch.Generator().manual_seed(seed + i)
        res = pipe(list(prompts[i:i + batch_size]), guidance_scale=guidance, num_inference_steps=steps,
                   generator=g, output_type="np")
        out.append(to_gray(res.images))
    return np.concatenate(out)


def nearest_distance(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """L2 distance (per image, on 32x32 gray in [0, 1]) from each query image to its nearest reference image."""
    q = torch.as_tensor(query.reshape(len(query), -1), dtype=torch.float32)  # (Q, H*W)
    r = torch.as_tensor(reference.reshape(len(reference), -1), dtype=torch.float32)  # (R, H*W)
    return torch.cdist(q, r).min(1).values.numpy()


def evaluate(pipe, recipe: dict, num_samples: int = 500, guidances: Sequence[float] = (4.0, 2.0),
             steps: int = 20, seed: int = 0, progress: bool = True) -> dict:
    """Prompted-digit accuracy per guidance scale and the memorisation check (distances at the first scale)."""
    judge, data = judge_from_recipe(recipe)
    targets = np.arange(num_samples) % 10
    prompts = [PROMPT.format(d) for d in targets]
    train_imgs, ho_imgs = data["images"][data["train"]], data["images"][data["heldout"]]
    result = {"judge_accuracy_on_train_digits": data["judge_accuracy"], "num_samples": num_samples,
              "steps": steps, "accuracy": {}}
    for i, g in enumerate(guidances):
        t0 = time.time()
        imgs = generate(pipe, prompts, g, seed=seed, steps=steps, progress=progress)
        pred = judge.predict(imgs)
        result["accuracy"][str(g)] = float((pred == targets).mean())
        result.setdefault("per_digit", {})[str(g)] = [float((pred[targets == d] == d).mean()) for d in range(10)]
        result.setdefault("seconds", {})[str(g)] = round(time.time() - t0, 1)
        if i == 0:
            gen_d, ho_d = nearest_distance(imgs, train_imgs), nearest_distance(ho_imgs, train_imgs)
            result["memorisation"] = {
                "guidance": g, "generated_to_train_median": float(np.median(gen_d)),
                "heldout_to_train_median": float(np.median(ho_d)),
                "ratio": float(np.median(gen_d) / np.median(ho_d)),
                "generated_closer_than_0.5x_heldout_median": float((gen_d < 0.5 * np.median(ho_d)).mean())}
            result["samples"] = imgs[:100]
    return result


def token_table(pipe, recipe: dict, tokens: Sequence[str], num_samples: int = 100, guidance: float = 4.0,
                steps: int = 20, seed: int = 0, progress: bool = True) -> dict:
    """Digit accuracy of the base (no adapter) on ``"a handwritten digit N <token>"`` per candidate token.

    ``""`` (no token) is always measured first as the reference. Returns ``{"rows": [{"token", "pieces",
    "accuracy", "per_digit", "drop"}], ...}`` sorted by accuracy (best first): the token that wrecks the base
    least is ``rows[0]`` (among the candidates; the reference row is kept apart).
    """
    judge, _ = judge_from_recipe(recipe)
    targets = np.arange(num_samples) % 10
    rows = []
    for tok in [""] + [t for t in tokens if t]:
        prompts = [(PROMPT.format(d) + " " + tok).strip() for d in targets]
        pred = judge.predict(generate(pipe, prompts, guidance, seed=seed, steps=steps, progress=progress))
        rows.append({"token": tok, "pieces": pipe.tokenizer.tokenize(tok) if tok else [],
                     "accuracy": float((pred == targets).mean()),
                     "per_digit": [float((pred[targets == d] == d).mean()) for d in range(10)]})
    ref = rows.pop(0)
    for r in rows:
        r["drop"] = ref["accuracy"] - r["accuracy"]
    rows.sort(key=lambda r: -r["accuracy"])
    return {"reference": ref, "rows": rows, "num_samples": num_samples, "guidance": guidance, "steps": steps,
            "seed": seed}


def token_markdown(t: dict) -> str:
    head = (f"Base `builtin:digits` with no adapter, prompts \"a handwritten digit N <token>\", {t['num_samples']} "
            f"samples per row (N = 0..9 equally), guidance {t['guidance']}, {t['steps']} steps, seed {t['seed']}; "
            "judge: the project's digit classifier (eval_digits_base.DigitJudge).\n\n"
            "| token | BPE pieces | digit accuracy | drop vs no token | worst digit |\n|---|---|---|---|---|\n")
    ref = t["reference"]
    lines = [f"| (none) | – | {ref['accuracy']:.3f} | – | {int(np.argmin(ref['per_digit']))}: "
             f"{min(ref['per_digit']):.2f} |"]
    for r in t["rows"]:
        lines.append(f"| `{r['token']}` | {' '.join(r['pieces'])} | {r['accuracy']:.3f} | {r['drop']:+.3f} | "
                     f"{int(np.argmin(r['per_digit']))}: {min(r['per_digit']):.2f} |")
    return head + "\n".join(lines) + "\n"


# ---- CLI ---------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default="builtin:digits")
    g.add_argument("--asset", default=None, help="read the pipeline straight from this .safetensors file")
    g = p.add_argument_group("evaluation")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--num_samples", type=int, default=500)
    g.add_argument("--guidance", type=float, nargs="+", default=[4.0, 2.0])
    g.add_argument("--num_inference_steps", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tokens", nargs="+", default=None,
                   help="measure the token table instead: base accuracy on 'a handwritten digit N <token>' "
                        "(first --guidance value); writes <output>.json and .md")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="JSON file for the results (and a PNG grid next to it)")
    return p.parse_args(argv)


def save_grid(images: np.ndarray, path, cols: int = 10) -> None:
    """``(N, H, W)`` gray in [0, 1] -> one PNG grid."""
    from PIL import Image

    n, h, w = images.shape
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * (h + 2), cols * (w + 2)), dtype=np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = im
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)


def main(args: argparse.Namespace) -> dict:
    from spectral_vision.assets import DIGITS_BASE, pipeline_from_asset, read_metadata

    asset = args.asset or DIGITS_BASE
    if args.asset:
        pipe = pipeline_from_asset(asset)
    else:
        from spectral_vision.integrations.diffusers import load_pipeline

        pipe = load_pipeline(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = read_metadata(asset)["recipe"]
    if args.tokens:
        from spectral_vision.fileio import atomic_write_json, atomic_write_text

        t = token_table(pipe, recipe, args.tokens, args.num_samples, args.guidance[0], args.num_inference_steps,
                        args.seed)
        print(token_markdown(t))
        if args.output:
            atomic_write_json(Path(args.output).with_suffix(".json"), t)
            atomic_write_text(Path(args.output).with_suffix(".md"), "# Concept token\n\n" + token_markdown(t))
        return t
    res = evaluate(pipe, recipe, args.num_samples, args.guidance, args.num_inference_steps, args.seed)
    samples = res.pop("samples")
    print(json.dumps(res, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=1))
        save_grid(samples, Path(args.output).with_suffix(".png"))
    return res


if __name__ == "__main__":
    sys.exit(main(parse_args()) is None)
