"""Fine-tune a timm ViT on one VTAB-1k task with any adapter method; every choice lands in the result JSON.

Protocols (labelled in every output):

* ``honest``: stage ``select`` trains on train800 and scores val200 (used to pick settings);
  stage ``final`` retrains on train800val200 and reports the **last** epoch's test accuracy.
  ``--stage both`` (default) runs the two in sequence and reports the final test accuracy.
* ``legacy``: trains on train800val200, evaluates test every ``--eval_every`` epochs and reports
  the **best test epoch**, as most VTAB-1k papers did (selection on the test set).

Custom tasks: ``--task NAME`` for any folder ``<data_root>/NAME`` in the same layout that is not one of the 19
(or any folder with ``--custom``) trains a custom task: classes read from its labels (or ``--num_classes``),
any split sizes, reported as ``custom`` and never averaged with VTAB-1k tasks or published numbers.

    accelerate launch training/vtab_train.py --data_root data/vtab-1k --task cifar --method spectral_a --rank 8
    python training/vtab_train.py --data_root /tmp/fx --task dtd --model zoo:tiny-vit --image_size 32 --epochs 1
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import sys
import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spectral_vision.fileio import atomic_write_json
from training.vtab_data import (NORMALIZATIONS, VTABDataError, VTABDataset, check_data_root, data_fingerprint,
                                fixture_info, resolve_data_task)
from training.vtab_tasks import TASKS, canonical_name

SCHEMA = "spectral-vision/vtab-result/1"
HEAD_ONLY, FULL = "linear", "full"  # no adapter: train the head only / train everything
# arguments that do not change the result (excluded from the config hash)
NOT_HASHED = ("data_root", "output_dir", "num_workers", "selection_json", "label", "quiet")


def known_methods() -> list[str]:
    """Spectral methods of this package, PEFT baselines, ``linear`` (head only) and ``full``."""
    from spectral_vision.baselines import BASELINES
    from spectral_vision.methods import available_methods

    return [*available_methods(), *BASELINES, HEAD_ONLY, FULL]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_root", required=True, help="folder with one sub-folder per task (VTAB-1k release layout)")
    g.add_argument("--task", required=True, help="task folder name or alias (cifar100, pets, flowers102, ...), or the "
                   "folder of a custom task in the same layout")
    g.add_argument("--num_classes", type=int, default=None, help="custom task: class count (default: 1 + largest label)")
    g.add_argument("--custom", action="store_true", help="treat --task as a custom task even if it has a VTAB-1k name")
    g.add_argument("--image_size", type=int, default=224, help="direct bicubic resize to this side (224)")
    g.add_argument("--normalization", choices=list(NORMALIZATIONS), default="imagenet")
    g.add_argument("--allow_small_splits", action="store_true", help="accept splits smaller than 800/200/1000")
    g.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="test-set loader workers")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_224.orig_in21k", help="timm name/hub id, weight file or zoo:<name>")
    g.add_argument("--checkpoint_path", default=None, help="local .npz/.safetensors/.pth weights for --model")
    g.add_argument("--no_pretrained", action="store_true", help="random init (smoke tests only)")
    g.add_argument("--drop_path", type=float, default=0.1)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="spectral_a", help="spectral method, PEFT baseline, 'linear' or 'full'")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=None, help="method strength (default: the method's own)")
    g.add_argument("--target_modules", default="timm_vit", help="preset name or regex")
    g.add_argument("--method_options", default="{}", help="JSON: SpectralConfig.options or PEFT config fields")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--warmup_epochs", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", choices=["honest", "legacy"], default="honest")
    g.add_argument("--stage", choices=["both", "select", "final"], default="both", help="honest protocol stages")
    g.add_argument("--eval_every", type=int, default=1, help="epochs between evaluations that are not reported")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="outputs/vtab")
    g.add_argument("--label", default=None, help="row name in reports (default: '<method> r<rank>')")
    g.add_argument("--selection_json", default=None, help="(sweep) how the settings were selected; stored as is")
    g.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    known = known_methods()
    if args.method not in known:
        p.error(f"--method {args.method!r} is not one of {known}")
    if canonical_name(args.task) in TASKS and not args.custom:
        args.task = canonical_name(args.task)  # aliases -> the release folder name
    for k in ("epochs", "batch_size", "rank"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        p.error(f"--warmup_epochs must be in [0, --epochs={args.epochs}], got {args.warmup_epochs}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    try:
        json.loads(args.method_options)
    except json.JSONDecodeError as e:
        p.error(f"--method_options is not JSON: {e}")
    if args.protocol == "legacy":
        args.stage = "final"
    return args


def data_task(args):
    """The :class:`VTABTask` trained: one of the 19, or a custom task read from its folder."""
    return resolve_data_task(args.data_root, args.task, args.num_classes, args.custom)


def run_config(args) -> dict:
    """Everything that determines the result, incl. the data's fingerprint (not its location)."""
    cfg = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_HASHED}
    cfg["data_fingerprint"] = data_fingerprint(args.data_root, data_task(args))
    cfg["method_options"] = json.loads(args.method_options)
    return cfg


def config_hash(args) -> str:
    return hashlib.sha256(json.dumps(run_config(args), sort_keys=True).encode()).hexdigest()[:12]


def result_path(args) -> str:
    """``<output_dir>/runs/<task>__<method>__<protocol>-<stage>__s<seed>__<hash>.json``."""
    name = f"{args.task}__{args.method}__{args.protocol}-{args.stage}__s{args.seed}__{config_hash(args)}.json"
    return os.path.join(args.output_dir, "runs", name)


def build_model(args, num_classes: int):
    """timm ViT with a new head + the adapter; only adapter and head parameters stay trainable."""
    from spectral_vision.integrations.timm import head_parameters, load_vit

    model = load_vit(args.model, num_classes=num_classes, drop_path_rate=args.drop_path,
                     pretrained=not args.no_pretrained, checkpoint_path=args.checkpoint_path,
                     image_size=args.image_size)
    opts = json.loads(args.method_options)
    if args.method == FULL:
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        if args.method != HEAD_ONLY:
            from spectral_vision.baselines import attach_adapter, is_peft_method

            kw = ({} if args.alpha is None else {"alpha": args.alpha})
            if is_peft_method(args.method):
                kw.update(opts)
            else:
                kw.update(progress=not args.quiet, **({"options": opts} if opts else {}))
            attach_adapter(model, args.method, args.rank, args.target_modules, **kw)
    head = head_parameters(model)
    for prm in head:
        prm.requires_grad_(True)
    trainable = sum(prm.numel() for prm in model.parameters() if prm.requires_grad)
    n_head = sum(prm.numel() for prm in head)
    params = {"trainable": trainable, "trainable_without_head": trainable - n_head, "head": n_head,
              "total": sum(prm.numel() for prm in model.parameters())}
    return model, params


def evaluate(model, loader, accelerator) -> float:
    """Top-1 accuracy in percent over the whole split (all processes)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).argmax(-1)
            pred, y = accelerator.gather_for_metrics((pred, y))
            correct += (pred == y).sum().item()
            total += y.numel()
    return 100.0 * correct / max(total, 1)


def train_phase(args, task, train_split: str, eval_split: str, every_epoch: bool, accelerator):
    """Train a fresh model on ``train_split``; evaluate ``eval_split`` each ``eval_every`` epochs or only at the end.

    Returns ``(phase record, parameter counts, trained model)``.
    """
    from accelerate.utils import set_seed

    set_seed(args.seed)
    ds = dict(image_size=args.image_size, normalization=args.normalization, allow_small_splits=args.allow_small_splits)
    train_ds = VTABDataset(args.data_root, task, train_split, **ds)
    eval_ds = VTABDataset(args.data_root, task, eval_split, **ds)
    g = torch.Generator().manual_seed(args.seed)
    pin = torch.cuda.is_available()
    train_dl = DataLoader(train_ds, args.batch_size, shuffle=True, generator=g, num_workers=0, pin_memory=pin)
    eval_dl = DataLoader(eval_ds, 2 * args.batch_size, num_workers=args.num_workers if eval_split == "test" else 0,
                         pin_memory=pin)  # the test split is decoded on the fly (it can be large), in workers
    model, params = build_model(args, task.num_classes)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    model, opt, train_dl, eval_dl = accelerator.prepare(model, opt, train_dl, eval_dl)
    steps, warmup = args.epochs * len(train_dl), args.warmup_epochs * len(train_dl)

    def lr_at(step):  # linear warmup to lr over `warmup` steps, then cosine to 0 (per optimizer step)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve, losses = [], []
    bar = tqdm(total=steps, desc=f"{task.name} {train_split}", unit="step",
               disable=args.quiet or not accelerator.is_main_process)
    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        for x, y in train_dl:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item()
            bar.update(1)
        losses.append(total / len(train_dl))
        bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
        if epoch == args.epochs or (every_epoch and epoch % args.eval_every == 0):
            curve.append([epoch, evaluate(model, eval_dl, accelerator)])
            if not args.quiet:
                bar.write(f"[{task.name} {train_split}->{eval_split}] epoch {epoch}/{args.epochs} "
                          f"loss {losses[-1]:.4f} acc {curve[-1][1]:.2f}")
    bar.close()
    best = max(curve, key=lambda e: e[1])
    phase = {"train_split": train_split, "eval_split": eval_split, "train_size": len(train_ds),
             "eval_size": len(eval_ds), "last_acc": curve[-1][1], "best_acc": best[1], "best_epoch": best[0],
             "curve": curve, "train_loss": losses}
    if torch.cuda.is_available():
        accelerator.free_memory()  # drop references + empty the CUDA cache between phases / sweep runs
    return phase, params, accelerator.unwrap_model(model)


def main(args) -> dict:
    from accelerate import Accelerator

    import spectral_vision
    import timm

    check_data_root(args.data_root)
    task = data_task(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0, phases = time.time(), {}
    if args.protocol == "legacy":
        phases["final"], params, _ = train_phase(args, task, "train800val200", "test", True, accelerator)
        reported = {"metric": "test_acc_best_epoch", "value": phases["final"]["best_acc"]}
    else:
        if args.stage in ("both", "select"):
            phases["select"], params, _ = train_phase(args, task, "train800", "val200", True, accelerator)
            reported = {"metric": "val200_acc_last_epoch", "value": phases["select"]["last_acc"]}
        if args.stage in ("both", "final"):
            phases["final"], params, _ = train_phase(args, task, "train800val200", "test", False, accelerator)
            reported = {"metric": "test_acc_last_epoch", "value": phases["final"]["last_acc"]}
    fx = fixture_info(args.data_root)
    result = {
        "schema": SCHEMA, "config_hash": config_hash(args), "config": run_config(args),
        "task": task.name, "group": task.group, "custom": task.custom, "num_classes": task.num_classes,
        "method": args.method,
        "label": args.label or (args.method if args.method in (HEAD_ONLY, FULL) else f"{args.method} r{args.rank}"),
        "rank": args.rank, "seed": args.seed, "protocol": args.protocol, "stage": args.stage,
        "normalization": args.normalization, "image_size": args.image_size, "reported": reported, "phases": phases,
        "params": params, "time_s": round(time.time() - t0, 2),
        "peak_memory_mb": {
            "gpu_allocated": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},  # Linux: KiB
        "device": str(accelerator.device), "num_processes": accelerator.num_processes,
        "data": {"fixture": fx is not None, "fixture_note": (fx or {}).get("note")},
        "selection": json.loads(args.selection_json) if args.selection_json else None,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "spectral_vision": spectral_vision.__version__},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if accelerator.is_main_process:
        atomic_write_json(result_path(args), result)
        if not args.quiet:
            kind = " (custom task)" if task.custom else ""
            print(f"{task.name}{kind} {args.method} [{args.protocol}] {reported['metric']} = {reported['value']:.2f}")
            print(f"wrote {result_path(args)}; next: python training/vtab_report.py --results {args.output_dir} "
                  f"--out {os.path.join(args.output_dir, 'report')}")
    return result


def cli(argv=None) -> int:
    """Command-line entry: 0 on success; bad data or settings print one line and return 1."""
    args = parse_args(argv)
    try:
        main(args)
    except (VTABDataError, ValueError, FileNotFoundError) as e:
        print(f"vtab_train.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
