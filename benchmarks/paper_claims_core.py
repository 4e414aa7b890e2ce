"""The building blocks of ``benchmarks/paper_claims.py``: models with a cached frozen prefix, one training run,
the equal-budget rank match, the resumable results file and the markdown report.

=================================  =========================================================================
``TextModel`` / ``VisionModel``    MiniLM / DINOv2-S split into a cached frozen prefix and a trained tail
``run(net, data, method, ...)``    train adapter + head for ``steps``; val / test accuracy at the last step
``cached_budget`` / ``match_budget``  the rank per method closest to PEFT LoRA's size at ``--budget_rank``
``Store``                          ``<out>/<section>.json``, written after every run (resumable)
``write_markdown(out)``            ``<out>/paper_claims.md`` from the section JSONs
=================================  =========================================================================
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import spectral_vision as sv
from spectral_vision import offline
from spectral_vision.baselines import attach_adapter, is_peft_method
from spectral_vision.fileio import atomic_write_json, atomic_write_text

METHODS = ("spectral_a", "spectral_r", "speclora", "lorsa", "lora", "dora", "pissa", "linear")
LINEAR = "linear"  # reference row: the new head only, no adapter (not part of the budget match)
#: starting options; LoRSA's r_p is doubled while |S| <= k = 256 cannot reach the budget (see match_budget)
METHOD_OPTIONS = {"lorsa": {"proj_rank": 8}}


# ---- results file ------------------------------------------------------------------------------------------
class Store:
    """``<out>/<section>.json``: {"settings": ..., "runs": {key: result}}; written after every run."""

    SCOPE = ("shots", "seeds", "methods", "ranks", "budget", "lrs")  # runs are keyed by these: they may change

    def __init__(self, out: Path, section: str, settings: dict):
        self.path = out / f"{section}.json"
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        same = self._strip(old.get("settings")) == self._strip(settings)  # else: other settings, start afresh
        self.data = {"settings": settings, "runs": old.get("runs", {}) if same else {}, "extra": old.get("extra", {})}

    def _strip(self, settings) -> dict:
        return {k: v for k, v in (settings or {}).items() if k not in self.SCOPE}

    def get(self, key):
        return self.data["runs"].get(key)

    def put(self, key, value):
        """Add one run; runs written meanwhile by another process on the same section are kept."""
        if self.path.exists():
            disk = json.loads(self.path.read_text())
            if self._strip(disk.get("settings")) == self._strip(self.data["settings"]):
                self.data["runs"] = {**disk.get("runs", {}), **self.data["runs"]}
        self.data["runs"][key] = value
        atomic_write_json(self.path, self.data)


# ---- models with a cached frozen prefix --------------------------------------------------------------------
class TextModel:
    """MiniLM ``BertForSequenceClassification`` split at layer ``6 - L``: prefix cached, tail trained."""

    domain, head = "text", "classifier"

    def __init__(self, layers: int, num_classes: int):
        self.base, self.tok = offline.load_minilm(num_classes, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
        self.base.eval()
        n = len(self.base.bert.encoder.layer)
        self.split = n - layers
        idx = "|".join(str(i) for i in range(self.split, n))
        self.targets = (rf"bert\.encoder\.layer\.({idx})\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                        rf"intermediate\.dense|output\.dense)|bert\.pooler\.dense")

    @torch.no_grad()
    def prefix(self, texts, max_len, bs=64):
        """``(h (N, T, 384), mask (N, T))``: hidden states entering layer ``split``."""
        hs, ms = [], []
        for i in tqdm(range(0, len(texts), bs), desc="cache text prefix", leave=False):
            enc = self.tok(texts[i:i + bs], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
            h = self.base.bert.embeddings(input_ids=enc["input_ids"], token_type_ids=torch.zeros_like(enc["input_ids"]))
            h = self._layers(self.base, h, enc["attention_mask"], 0, self.split)
            hs.append(h)
            ms.append(enc["attention_mask"])
        return torch.cat(hs), torch.cat(ms)

    @staticmethod
    def _layers(model, h, mask, lo, hi):
        from transformers.masking_utils import create_bidirectional_mask

        m4 = create_bidirectional_mask(config=model.config, inputs_embeds=h, attention_mask=mask)  # (B, 1, T, T)
        for layer in model.bert.encoder.layer[lo:hi]:
            h = layer(h, m4)
            h = h[0] if isinstance(h, tuple) else h
        return h

    def tail(self, model, x):
        h, mask = x
        h = self._layers(model, h, mask, self.split, len(model.bert.encoder.layer))
        return model.classifier(model.bert.pooler(h))

    def full(self, model, texts, max_len):
        enc = self.tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        return model(**enc).logits


class VisionModel:
    """DINOv2-S (timm) split at block ``12 - L``: patch embedding + first blocks cached, tail trained."""

    domain, head = "vision", "head"

    def __init__(self, blocks: int, num_classes: int, image_size: int):
        self.base = offline.load_dinov2_small(image_size, num_classes=num_classes)
        torch.nn.init.normal_(self.base.head.weight, std=0.01)  # as timm's fresh-head init, seeded by the caller
        self.split = len(self.base.blocks) - blocks
        idx = "|".join(str(i) for i in range(self.split, len(self.base.blocks)))
        self.targets = rf"blocks\.({idx})\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"

    @torch.no_grad()
    def prefix(self, images, bs=64):
        m, out = self.base, []
        for i in tqdm(range(0, len(images), bs), desc="cache vision prefix", leave=False):
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images[i:i + bs]))))  # (B, 1 + N, 384)
            for blk in m.blocks[: self.split]:
                x = blk(x)
            out.append(x)
        return (torch.cat(out),)

    def tail(self, model, x):
        (h,) = x
        for blk in model.blocks[self.split:]:
            h = blk(h)
        return model.forward_head(model.norm(h))


def images_to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, size, size)`` (bicubic, antialiased)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (N, H, W, 3) -> (N, 3, H, W)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(offline.DINOV2_MEAN)[:, None, None], torch.tensor(offline.DINOV2_STD)[:, None, None]
    return (x - mean) / std


# ---- one training run -------------------------------------------------------------------------------------
def adapter_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def attach(net, model, method: str, rank: int, options=None):
    if method == LINEAR:
        model.requires_grad_(False)
        return 0
    kw = {} if is_peft_method(method) else {"progress": False}
    options = METHOD_OPTIONS.get(method) if options is None else options
    if options:
        kw["options"] = options
    attach_adapter(model, method, rank, net.targets, **kw)
    return adapter_params(model)


def orthogonality_error(model) -> float:
    """``max |RᵀR − I|`` over the ^R rotations of every layer (Cayley: rounding error only)."""
    err = 0.0
    with torch.no_grad():
        for _, layer in sv.spectral_layers(model):
            for delta in layer.adapters.values():
                if hasattr(delta, "rotations"):
                    for R in delta.rotations():
                        eye = torch.eye(R.shape[0])
                        err = max(err, (R.T @ R - eye).abs().max().item())
    return err


def run(net, data, method, rank, lr, seed, steps, bs, head_lr, track_orth=False, options=None) -> dict:
    """Train adapter + head on ``data["train"]`` for ``steps``; accuracies on val and test (last step)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(net.base)
    head = model.get_submodule(net.head)
    for prm in head.parameters():  # the same fresh head for every method of a seed
        torch.nn.init.normal_(prm, std=0.01) if prm.dim() > 1 else torch.nn.init.zeros_(prm)
    n_adapter = attach(net, model, method, rank, options)
    for prm in head.parameters():
        prm.requires_grad_(True)
    head_ids = {id(q) for q in head.parameters()}
    groups = [{"params": [q for q in model.parameters() if q.requires_grad and id(q) not in head_ids], "lr": lr},
              {"params": list(head.parameters()), "lr": head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(steps - warm, 1))))
    xs, y = data["train"]
    g = torch.Generator().manual_seed(seed)
    losses, orth, t0 = [], [], time.time()
    model.train()
    order = torch.randperm(len(y), generator=g)
    for step in range(steps):
        if len(order) < bs:
            order = torch.cat([order, torch.randperm(len(y), generator=g)])
        idx, order = order[:bs], order[bs:]
        loss = F.cross_entropy(net.tail(model, tuple(x[idx] for x in xs)), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if track_orth and (step % max(1, steps // 10) == 0 or step == steps - 1):
            orth.append([step + 1, orthogonality_error(model)])
    model.eval()
    res = {"method": method, "rank": rank, "lr": lr, "seed": seed, "adapter_params": n_adapter, "steps": steps,
           "train_loss_first": losses[0], "train_loss_last": float(np.mean(losses[-5:])),
           "time_s": round(time.time() - t0, 1)}
    with torch.no_grad():
        for split in ("val", "test"):
            if split in data:
                xs_s, y_s = data[split]
                pred = torch.cat([net.tail(model, tuple(x[i:i + 256] for x in xs_s)).argmax(-1)
                                  for i in range(0, len(y_s), 256)])
                res[f"{split}_acc"] = 100.0 * (pred == y_s).float().mean().item()
    if track_orth:
        res["orthogonality_error"] = orth
    return res


def cached_budget(out: Path, net, methods, budget_rank) -> dict:
    """:func:`match_budget`, remembered in ``<out>/budgets.json`` (keyed by the adapted layers and methods)."""
    path = out / "budgets.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    key = json.dumps([net.domain, net.targets, sorted(methods), budget_rank, METHOD_OPTIONS])
    if key not in known:
        known[key] = match_budget(net, methods, budget_rank)
        atomic_write_json(path, known)
    return known[key]


def match_budget(net, methods, budget_rank) -> dict:
    """Rank per method whose measured adapter size is closest to LoRA's at ``budget_rank``."""
    cache: dict = {}
    opts: dict = {m: METHOD_OPTIONS.get(m) for m in methods}

    def count(m, r):
        key = (m, r, json.dumps(opts[m]))
        if key not in cache:
            try:
                cache[key] = attach(net, copy.deepcopy(net.base), m, r, opts[m])
            except ValueError:  # rank too large for some layer
                cache[key] = None
        return cache[key]

    def closest(m):
        lo, hi = 1, 1
        while count(m, hi) is not None and count(m, hi) < budget and hi < 4096:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # smallest r with count >= budget, in (lo, hi]
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count(m, mid) is not None and count(m, mid) < budget else (lo, mid)
        return min([r for r in {lo, hi} if count(m, r) is not None], key=lambda r: (abs(count(m, r) - budget), r))

    budget = count("lora", budget_rank)
    out = {}
    for m in methods:
        if m == LINEAR:
            out[m] = {"rank": 0, "params": 0, "ratio_to_budget": 0.0}
            continue
        r = closest(m)
        while m == "lorsa" and count(m, r) < 0.95 * budget and opts[m]["proj_rank"] < 64:  # |S| <= k caps it
            opts[m] = {**opts[m], "proj_rank": 2 * opts[m]["proj_rank"]}
            r = closest(m)
        out[m] = {"rank": r, "params": count(m, r), "ratio_to_budget": round(count(m, r) / budget, 4)}
        if opts[m]:
            out[m]["options"] = opts[m]
        print(f"  budget {budget:,}: {m:11s} rank {r:4d} -> {count(m, r):,} params ({count(m, r) / budget:.3f}x)"
              + (f" options {opts[m]}" if opts[m] else ""))
    return {"budget": budget, "budget_rank": budget_rank, "methods": out}


def summarize(runs: list[dict], key="test_acc") -> str:
    """``mean ± std (n=N)`` of ``key`` over ``runs`` (``-`` when none has it)."""
    v = [r[key] for r in runs if key in r]
    return f"{np.mean(v):.2f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.2f} (n={len(v)})" if v else "-"


# ---- report -------------------------------------------------------------------------------------------------
def _groups(runs: dict) -> dict:
    """``{(prefix, method, rank): {lr: {seed: result}}}`` from run keys ``prefix|method|r<rank>|lr<lr>|s<seed>``."""
    out: dict = {}
    for key, r in runs.items():
        parts = key.split("|")
        prefix = "|".join(parts[:-4])
        out.setdefault((prefix, r["method"], r["rank"]), {}).setdefault(r["lr"], {})[r["seed"]] = r
    return out


def _pick(by_lr: dict) -> tuple[float, list]:
    """The LR whose first-seed run has the best val accuracy, and that LR's runs (all seeds)."""
    first = min(s for runs in by_lr.values() for s in runs)
    cands = {lr: runs for lr, runs in by_lr.items() if first in runs}
    lr = max(cands, key=lambda lr: (cands[lr][first]["val_acc"], -lr))
    return lr, [cands[lr][s] for s in sorted(cands[lr])]


def _table(runs: dict, budget: dict | None) -> list[str]:
    lines = ["| setting | method | rank | adapter params | × budget | LR (val-picked) | test acc (mean ± std, n) | "
             "val acc | max ‖RᵀR−I‖ |", "|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for (prefix, m, rank), by_lr in sorted(_groups(runs).items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99),
                                                                                  kv[0][2])):
        lr, rows = _pick(by_lr)
        orth = [e for r in rows for _, e in r.get("orthogonality_error", [])]
        ratio = f"{rows[0]['adapter_params'] / budget['budget']:.3f}" if budget else "-"
        lines.append(f"| {prefix.rstrip('|') or '-'} | {m} | {rank} | {rows[0]['adapter_params']:,} | {ratio} | {lr:g} | "
                     f"{summarize(rows)} | {summarize(rows, 'val_acc')} | {f'{max(orth):.1e}' if orth else '-'} |")
    return lines


def write_markdown(out: Path) -> Path:
    """``<out>/paper_claims.md`` from whatever section JSONs exist (partial runs included)."""
    lines = [f"# Paper claims: measured results ({time.strftime('%Y-%m-%d %H:%M')})", ""]
    for path in sorted(out.glob("*.json")):
        if path.stem == "budgets":
            continue
        data = json.loads(path.read_text())
        if path.stem == "analysis":
            lines += ["## analysis: full fine-tune of MiniLM on BBC News vs base (paper 001, sec. 3)", "",
                      "| quantity | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in data["summary"].items()]
            lines.append("")
            continue
        st = data["settings"]
        info = {k: v for k, v in st.items() if k not in ("budget",)}
        lines += [f"## {path.stem}", "", f"settings: `{json.dumps(info)}`", ""]
        lines += _table(data["runs"], st.get("budget")) + [""]
    md = out / "paper_claims.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    return md
