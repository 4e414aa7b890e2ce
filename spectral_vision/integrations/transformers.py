"""🤗 transformers models: prepare for training, Trainer / accelerate, gradient checkpointing, bf16, saving.

    from spectral_vision.integrations.transformers import prepare_model_for_training, save_pretrained, SpectralTrainer
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    prepare_model_for_training(model, method="spectral_a", rank=8, gradient_checkpointing=True)
    SpectralTrainer(model=model, args=TrainingArguments(..., bf16=True), train_dataset=ds).train()
    save_pretrained(model, "out/adapter")                       # adapter folder next to the model, like PEFT
    load_pretrained(AutoModelForSequenceClassification.from_pretrained(path, num_labels=5), "out/adapter")

Target presets come from the one table :data:`spectral_vision.presets.PRESETS`, picked from
``config.model_type`` (:func:`spectral_vision.presets.default_preset`): bert, roberta, mpnet, deberta_v2,
llama, mistral, qwen2, gpt2, t5. They hold the attention and MLP projections of the blocks only.
Task heads (``classifier``, ``score``, a top-level ``pooler``, ...) are new at fine-tuning time: their
singular basis would come from a random init, so they are **never adapted spectrally**; they are trained
in full and saved whole with the adapter (PEFT's ``modules_to_save``), also when ``target_modules`` would
match them. Adapter parameters stay float32 whatever the base dtype
(as PEFT's ``autocast_adapter_dtype``); the forward casts the factors to the activation dtype, so
bf16 bases and ``torch.autocast(dtype=torch.bfloat16)`` (``TrainingArguments(bf16=True)``) both work.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .. import SpectralConfig, adapter_names, load_adapter, read_adapter, save_adapter, spectral_layers
from ..baselines import attach_adapter
from ..fileio import atomic_write, atomic_write_json
from ..presets import MODEL_TYPE_PRESETS, default_preset, match_targets

__all__ = [
    "MODEL_TYPE_PRESETS", "default_target_modules", "head_modules", "prepare_model_for_training",
    "save_pretrained", "load_pretrained", "load_adapter_state", "SpectralTrainer",
]

#: top-level task heads new at fine-tuning time: *ForSequenceClassification / *ForTokenClassification
#: (classifier, score), DeBERTa's ContextPooler (pooler), T5ForSequenceClassification (classification_head),
#: *ForQuestionAnswering (qa_outputs). A base model's own pooler (bert.pooler) is not top-level.
HEAD_NAMES = ("classifier", "score", "pooler", "classification_head", "qa_outputs")
HEADS_FILE = "modules_to_save.safetensors"
TRAINABLE_FILE = "trainable_state.safetensors"  # PEFT baselines: every trainable tensor, model names


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / accelerate wrappers


def default_target_modules(model: nn.Module) -> str:
    """The preset for ``model.config.model_type`` (:func:`spectral_vision.presets.default_preset`)."""
    return default_preset(_unwrap(model))


def _head_exclude(heads: list[str], exclude):
    """``exclude`` (any target spec, or None) extended with every module inside ``heads``, as one regex."""
    parts = [rf"({'|'.join(map(re.escape, heads))})(\..*)?"] if heads else []
    if isinstance(exclude, str):
        from ..presets import PRESETS

        parts.append(PRESETS[exclude]["regex"] if exclude in PRESETS else exclude)
    elif exclude:
        parts += [rf"(.*\.)?{re.escape(t)}" for t in exclude]  # list: suffix match, as the list syntax
    return "|".join(f"(?:{p})" for p in parts) or None


def _inside(name: str, modules) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def head_modules(model: nn.Module, missing_keys: Optional[list[str]] = None) -> list[str]:
    """Modules to train whole and save with the adapter: the top-level task heads of :data:`HEAD_NAMES`
    present on ``model``, plus the modules holding ``missing_keys`` (as reported by
    ``from_pretrained(..., output_loading_info=True)``: newly initialised, e.g. ``bert.pooler.dense`` when
    the checkpoint has no pooler)."""
    model = _unwrap(model)
    heads = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key in sorted(missing_keys or []):
        owner = key.rpartition(".")[0]
        if key not in params or len(names[id(params[key])]) > 1:
            continue  # a buffer, or a weight tied to a loaded one (lm_head <- embeddings): not new
        if owner and not _inside(owner, heads):
            heads.append(owner)
    return heads


def prepare_model_for_training(
    model: nn.Module,
    cfg: Optional[SpectralConfig] = None,
    *,
    method: str = "spectral_a",
    rank: int = 8,
    target_modules=None,
    adapter_name: str = "default",
    modules_to_save: Union[str, list[str], None] = "auto",
    missing_keys: Optional[list[str]] = None,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: Optional[dict] = None,
    **method_kwargs,
) -> nn.Module:
    """Attach an adapter to a transformers model and make it ready for ``Trainer`` / accelerate, in place.

    Args:
        model: a ``PreTrainedModel``.
        cfg: a :class:`SpectralConfig`; when given, ``method``/``rank``/``target_modules``/``method_kwargs``
            are ignored. Otherwise ``method`` may be a spectral method or a PEFT baseline
            (``lora``, ``dora``, ``pissa``, ...; see :mod:`spectral_vision.baselines`).
        target_modules: default :func:`default_target_modules`.
        modules_to_save: modules trained in full and saved with the adapter; ``"auto"`` =
            :func:`head_modules` (the new task head + the modules of ``missing_keys``), ``None`` = none.
        missing_keys: ``from_pretrained(..., output_loading_info=True)[1]["missing_keys"]``: modules the
            checkpoint did not hold are newly initialised, so they are trained whole, not left random.
        gradient_checkpointing: enable the model's activation checkpointing (``use_cache`` off) and,
            as PEFT does, make the input embeddings' output require grad so that gradients reach
            adapters inside checkpointed blocks also with ``use_reentrant=True``.
        gradient_checkpointing_kwargs: for ``torch.utils.checkpoint`` (default ``{"use_reentrant": False}``).
        method_kwargs: more :func:`spectral_vision.baselines.attach_adapter` arguments (``alpha``, ``band``, ...).

    Modules inside ``modules_to_save`` are never adapted, whatever ``target_modules`` says (a warning
    names the ones excluded): a trained head is saved whole.

    Returns ``model``: base frozen; the adapter and ``modules_to_save`` trainable.
    """
    heads = head_modules(model, missing_keys) if modules_to_save == "auto" else list(modules_to_save or [])
    targets = cfg.target_modules if cfg is not None else target_modules
    if targets is None or targets == "auto":
        targets = default_target_modules(model)
    user_exclude = cfg.exclude_modules if cfg is not None else method_kwargs.pop("exclude_modules", None)
    exclude = _head_exclude(heads, user_exclude)
    if heads:
        try:
            hit = set(match_targets(_unwrap(model), targets, user_exclude)) - set(
                match_targets(_unwrap(model), targets, exclude))
        except ValueError:
            hit = set()
        if hit:
            warnings.warn(f"target_modules {targets!r} match {sorted(hit)} inside the task head(s) {heads}: "
                          "not adapted (heads are trained in full and saved whole, modules_to_save)", stacklevel=2)
    if cfg is not None:
        import dataclasses

        from .. import attach

        attach(model, dataclasses.replace(cfg, target_modules=targets, exclude_modules=exclude), adapter_name)
    else:
        attach_adapter(model, method, rank, targets, adapter_name=adapter_name, exclude_modules=exclude,
                       **method_kwargs)
    for name in heads:
        for p in _unwrap(model).get_submodule(name).parameters():
            p.requires_grad_(True)
    _unwrap(model).spectral_vision_modules_to_save = heads  # read by save_pretrained
    if gradient_checkpointing:
        inner = _unwrap(model)
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x name
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if getattr(inner.config, "use_cache", False):
            inner.config.use_cache = False  # caches are useless (and warned about) when recomputing
        inner.enable_input_require_grads()
    return model


def _meta(model: nn.Module, heads: list[str]) -> dict:
    config = getattr(model, "config", None)
    return {"base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
            "model_class": type(model).__name__, "modules_to_save": heads}


def _save_tensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda f: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, f,
                                           metadata={"format": "pt", **(metadata or {})}))


def save_pretrained(model: nn.Module, save_directory: Union[str, Path], adapter_name: str = "default",
                    tokenizer=None) -> Path:
    """Write the trained adapter (and new heads) to ``save_directory``, as PEFT's ``save_pretrained`` does.

    Spectral methods: :func:`spectral_vision.save_adapter` (``adapter_config.json`` +
    ``adapter_model.safetensors``, with the base model's name in ``extra``) plus
    ``modules_to_save.safetensors`` for the heads. PEFT baselines (no spectral layers): every trainable
    tensor in ``trainable_state.safetensors`` + ``adapter_meta.json``. Files are replaced atomically.
    """
    model = _unwrap(model)
    path = Path(save_directory)
    path.mkdir(parents=True, exist_ok=True)
    heads = list(getattr(model, "spectral_vision_modules_to_save", []))
    meta = _meta(model, heads)
    if any(True for _ in spectral_layers(model)):
        save_adapter(model, path, adapter_name, extra_metadata=meta)
        head_sd = {f"{h}.{k}": v for h in heads for k, v in model.get_submodule(h).state_dict().items()}
        if head_sd:
            _save_tensors(head_sd, path / HEADS_FILE, {"modules_to_save": json.dumps(heads)})
    else:  # PEFT baseline injected in place: save what was trained
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not state:
            raise ValueError("the model has no spectral adapter and no trainable parameter: nothing to save")
        _save_tensors(state, path / TRAINABLE_FILE)
        atomic_write_json(path / "adapter_meta.json", meta)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def _load_heads(model: nn.Module, path: Path) -> None:
    """Restore the heads saved whole; refuse a file that lacks a tensor of a saved head or has unknown ones."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not (path / HEADS_FILE).exists():
        return
    state = load_file(str(path / HEADS_FILE))
    with safe_open(str(path / HEADS_FILE), "pt") as f:
        listed = (f.metadata() or {}).get("modules_to_save")
    heads = json.loads(listed) if listed else sorted({k.split(".", 1)[0] for k in state})  # older files: top-level
    own = model.state_dict()
    unexpected = [k for k in state if k not in own or not _inside(k, heads)]
    if unexpected:
        raise ValueError(f"{path / HEADS_FILE}: tensors {unexpected[:5]} do not exist in {type(model).__name__}")
    missing = [k for k in own if _inside(k, heads) and k not in state]
    if missing:
        raise ValueError(f"{path / HEADS_FILE} lacks {missing[:5]}: the saved head(s) {sorted(heads)} are incomplete")
    model.load_state_dict(state, strict=False)  # shape mismatches raise


def load_pretrained(model: nn.Module, path: Union[str, Path], adapter_name: Optional[str] = None,
                    strict_base: bool = True) -> nn.Module:
    """Inverse of :func:`save_pretrained` for spectral adapters: attach the saved adapter, restore the heads.

    For a PEFT baseline folder, attach the same baseline first, then call :func:`load_adapter_state`.
    """
    path = Path(path)
    if (path / TRAINABLE_FILE).exists():
        raise ValueError(f"{path} holds a PEFT baseline: attach it with attach_adapter(...) and use load_adapter_state")
    load_adapter(model, path, adapter_name, strict_base=strict_base)
    _load_heads(model, path)
    return model


def load_adapter_state(model: nn.Module, path: Union[str, Path], adapter_name: Optional[str] = None) -> nn.Module:
    """Copy saved adapter (and head) tensors into the adapter already on ``model`` (resuming training)."""
    model, path = _unwrap(model), Path(path)
    if (path / TRAINABLE_FILE).exists():
        from safetensors.torch import load_file

        state = load_file(str(path / TRAINABLE_FILE))
        own = dict(model.named_parameters())
        bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
        if bad:
            raise ValueError(f"{path}: tensors {bad[:5]} do not fit this model (attach the same baseline first)")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
        return model
    meta, tensors = read_adapter(path)
    name = adapter_name or meta.get("adapter_name", "default")
    if name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r} on the model to load {path} into; present: {adapter_names(model)}")
    for lname, layer in spectral_layers(model):
        if lname not in meta["layers"]:
            continue
        delta = layer.adapters[name]
        own = {k[len(lname) + 1:]: v for k, v in tensors.items() if k.startswith(lname + ".")}
        delta.load_state_dict(own, strict=True)
    _load_heads(model, path)
    return model


def _trainer_base():
    from transformers import Trainer

    return Trainer


class SpectralTrainer(_trainer_base()):
    """``transformers.Trainer`` whose checkpoints and ``save_model`` hold only the adapter (+ heads).

    Works for spectral methods and for the PEFT baselines of :mod:`spectral_vision.baselines`;
    ``resume_from_checkpoint`` restores the adapter tensors (optimizer / scheduler as usual).
    """

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_pretrained(self.accelerator.unwrap_model(self.model), output_dir,
                        adapter_name=self._adapter_name(), tokenizer=self.processing_class)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        load_adapter_state(model if model is not None else self.model, resume_from_checkpoint, self._adapter_name())

    def _load_best_model(self) -> None:
        load_adapter_state(self.model, self.state.best_model_checkpoint, self._adapter_name())

    def _adapter_name(self) -> str:
        names = adapter_names(self.accelerator.unwrap_model(self.model))
        return names[0] if names else "default"
