"""Data for ``llm_finetune.py``: read the user's files, check columns, make train/validation/test, tokenise.

=====================================  ==========================================================
``load_records(args)``                 ``({"train", "validation", "test"}, classes)`` from bbc_news, files
                                       (``--encoding``) or a ``datasets`` name; columns checked
``carve_validation(labels, size)``     a stratified validation split of the training data (fixed seed)
``few_shot_split(labels, k, n_test)``  a fixed stratified test split + ``k`` training examples per class
``encode`` / ``collate``               tokenised examples / right-padded batches
=====================================  ==========================================================
"""
from __future__ import annotations

import json

import numpy as np
import torch


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
        if per_class is not None and per_class > len(pool):
            raise ValueError(f"class {c!r} has {len(pool)} training examples, fewer than --train_per_class {per_class}")
        train.append(pool if per_class is None else rs.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _read_records(path: str, encoding: str) -> list[dict]:
    """Rows of a ``.csv`` (header = column names), ``.json`` (a list of objects, or JSON lines) or ``.jsonl``."""
    import csv

    try:
        with open(path, newline="", encoding=encoding) as f:
            if path.endswith(".csv"):
                rows = list(csv.DictReader(f))
            else:
                text = f.read()
                rows = json.loads(text) if text.lstrip().startswith("[") else \
                    [json.loads(line) for line in text.splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid {encoding} text (byte {e.start}: {e.reason}); pass --encoding with "
                         f"the file's encoding, e.g. --encoding latin-1 or --encoding cp1252") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON / JSON lines: {e}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a non-empty list of rows with named columns")
    return rows


def _check_columns(rows: list, columns: list, split: str) -> None:
    """Clear errors for a column missing from a split, or a row without a value in it."""
    have = list(rows[0])
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(f"{split} data has no column(s) {missing}; its columns are {have}. Name yours with "
                         "--text_column / --label_column (classification) or --prompt_column / --response_column")
    for i, r in enumerate(rows):
        empty = [c for c in columns if r.get(c) is None]
        if empty:
            raise ValueError(f"{split} row {i} has no value for column(s) {empty}: {r}")


def carve_validation(labels, eval_size: float, seed: int = 0):
    """``(train_idx, val_idx)``: a validation split of ``eval_size`` (fraction < 1 or count), stratified by
    ``labels`` when given (sklearn's ``train_test_split``), with a fixed seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    size = int(eval_size) if eval_size >= 1 else float(eval_size)
    try:
        tr, va = train_test_split(idx, test_size=size, random_state=seed,
                                  stratify=None if labels is None or len(set(labels)) < 2 else labels)
    except ValueError as e:
        raise ValueError(f"cannot carve a validation split of --eval_size {eval_size} from {len(idx)} training "
                         f"examples: {e}. Pass --validation_file or another --eval_size") from None
    return np.sort(tr), np.sort(va)


def load_records(args) -> tuple[dict, list]:
    """``({"train": [...], "validation": [...], "test": [...]}, class_names)``; records are dicts.

    Classes are the sorted distinct training labels. Without a validation split, ``--eval_size``
    (default 0.1) of the training data becomes one, before any few-shot draw.
    """
    label = args.label_column if args.task == "classification" else None
    splits = {"train": [], "validation": [], "test": []}
    if args.dataset == "bbc_news":
        from spectral_vision.offline import load_bbc_news

        data = load_bbc_news()
        pool, te = few_shot_split(data.labels, None, args.test_per_class, 0)
        rec = [{"text": t, "label": data.classes[y]} for t, y in zip(data.texts, data.labels)]
        args.text_column, args.label_column, label = "text", "label", "label"
        splits["train"], splits["test"] = [rec[i] for i in pool], [rec[i] for i in te]
    elif args.dataset_name:
        try:
            import datasets
        except ImportError:
            raise ImportError("--dataset_name needs the PyPI package 'datasets': pip install datasets") from None
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        splits.update({k: list(ds[k]) for k in splits if k in ds})
    else:
        splits["train"] = _read_records(args.train_file, args.encoding)
        for k in ("validation", "test"):
            f = getattr(args, f"{k}_file")
            splits[k] = _read_records(f, args.encoding) if f else []
    columns = [args.text_column, label] if args.task == "classification" else [args.prompt_column,
                                                                                 args.response_column]
    for k, rows in splits.items():
        if rows:
            _check_columns(rows, columns, k)
    if not splits["train"]:
        raise ValueError("no training data")
    eval_size = 0.1 if args.eval_size is None else args.eval_size
    if not splits["validation"] and eval_size > 0:
        tr, va = carve_validation([str(r[label]) for r in splits["train"]] if label else None, eval_size)
        splits["train"], splits["validation"] = [splits["train"][i] for i in tr], [splits["train"][i] for i in va]
    classes = []
    if label:
        classes = sorted({str(r[label]) for r in splits["train"]})
        for k in ("validation", "test"):
            unknown = sorted({str(r[label]) for r in splits[k]} - set(classes))
            if unknown:
                raise ValueError(f"{k} labels {unknown[:5]} never occur in the training data (classes: {classes})")
        if args.train_per_class:
            labels = [classes.index(str(r[label])) for r in splits["train"]]
            tr, _ = few_shot_split(labels, args.train_per_class, 0, args.data_seed)
            splits["train"] = [splits["train"][i] for i in tr]
    return splits, classes


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
