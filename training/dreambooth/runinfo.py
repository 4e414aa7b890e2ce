"""What identifies a run: its recorded config (``run_config.json``), the output-folder and resume checks,
the start summary and the launch check."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from spectral_vision.bands import describe_columns
from spectral_vision.fileio import atomic_write_json
from training.common import checkpoint_info, list_checkpoints, resolve_resume

from .args import InputError

RUN_CONFIG = "run_config.json"
#: flags that do not change what a run computes (logging, saving, validation, length): not part of its identity
NOT_IDENTITY = {"output_dir", "logging_dir", "report_to", "resume_from_checkpoint", "overwrite_output_dir",
                "checkpointing_steps", "checkpoints_total_limit", "validation_prompt", "num_validation_images",
                "validation_epochs", "validation_inference_steps", "dataloader_num_workers", "push_to_hub",
                "hub_model_id", "hub_token", "max_train_steps", "num_train_epochs", "lora_export", "no_register",
                "concepts_dir", "seed", "sample_batch_size", "class_inference_steps", "prior_generation_precision",
                "enable_xformers_memory_efficient_attention", "set_grads_to_none", "allow_tf32",
                "gradient_checkpointing", "pre_compute_text_embeddings"}


def run_identity(args, inputs) -> dict:
    """The flags that decide the trained adapter, plus the instance data's digest (JSON-normalised)."""
    ident = {k: v for k, v in vars(args).items() if k not in NOT_IDENTITY}
    ident["instance_data_sha256"] = inputs.data_sha256
    return json.loads(json.dumps(ident, default=str, sort_keys=True))


def config_diff(old: dict, new: dict, old_seed=None, new_seed=None) -> list[str]:
    """``["learning_rate: 0.0005 -> 0.001", ...]``: what differs (seeds only when both are set)."""
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if old_seed is not None and new_seed is not None and old_seed != new_seed:
        diffs.append(f"seed: {old_seed} -> {new_seed}")
    return diffs


def check_output_dir(args, identity: dict, is_main: bool, barrier=lambda: None) -> Optional[Path]:
    """Refuse an ``--output_dir`` that holds a different run (unless ``--overwrite_output_dir``: its checkpoints
    are deleted) and a ``--resume_from_checkpoint`` of a different run. Records this run's config, removes
    stale temp files of a killed save. Returns the checkpoint to resume from (or ``None``)."""
    out = Path(args.output_dir)
    held = [p for p in out.iterdir() if p.name != args.logging_dir and not p.name.startswith(".")] \
        if out.is_dir() else []
    if held:
        diffs = _recorded_diff(out, identity, args.seed)
        if diffs and not args.overwrite_output_dir:
            raise InputError(f"--output_dir {out} holds a different run ({'; '.join(diffs[:6])}); pass "
                             "--overwrite_output_dir to replace it, or choose another --output_dir")
        if diffs and is_main:
            for _, path in list_checkpoints(out):
                shutil.rmtree(path)
    barrier()  # every process sees the folder after the deletion
    try:
        resume = resolve_resume(out, args.resume_from_checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    if resume is not None:
        info = checkpoint_info(resume)["info"]
        diffs = config_diff(info["config"], identity) if "config" in info else \
            ["the checkpoint records no run config (made by an older version)"]
        if diffs:
            raise InputError(f"checkpoint {resume} was made by a different run ({'; '.join(diffs[:6])}); resume "
                             "with that run's flags, or start a new run without --resume_from_checkpoint")
    if is_main:
        remove_stale_temp_files(out)
        atomic_write_json(out / RUN_CONFIG, {"config": identity, "seed": args.seed})
    return resume


def _recorded_diff(out: Path, identity: dict, seed) -> list[str]:
    path = out / RUN_CONFIG
    if not path.is_file():
        return [f"no {RUN_CONFIG}: not written by this script"]
    try:
        old = json.loads(path.read_text())
        return config_diff(old["config"], identity, old.get("seed"), seed)
    except (ValueError, KeyError, TypeError) as e:
        return [f"unreadable {RUN_CONFIG} ({type(e).__name__})"]


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete ``.*.tmp`` files an interrupted atomic save left in ``out`` and its adapter folders."""
    stale = [p for d in (out, out / "unet", out / "text_encoder", out / "validation") if d.is_dir()
             for p in d.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def launch_warning(num_processes: int) -> Optional[str]:
    """The warning for ``accelerate launch --num_processes N --cpu``, which starts ONE process (accelerate's
    simple launcher sets ``MASTER_ADDR`` for N > 1 but no ``WORLD_SIZE``)."""
    env = os.environ
    cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu and num_processes == 1 and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        return ("`accelerate launch --num_processes N --cpu` runs ONE process: accelerate's simple launcher ignores "
                "--num_processes with --cpu. For N CPU processes (gloo DDP) run `ACCELERATE_USE_CPU=1 accelerate "
                "launch --multi_gpu --num_processes N ...` without --cpu.")
    return None


def summary_lines(args, ctx, num_processes: int, steps_per_epoch: int) -> list[str]:
    """diffusers' "***** Running training *****" block, plus the concept, band, captions and outputs."""
    from .outputs import caption_summary

    total = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    band = "none (PEFT baseline)" if ctx.band is None else \
        f"{ctx.band} (singular columns {describe_columns(ctx.band, args.rank)})"
    lines = ["***** Running training *****",
             f"  Base model = {args.pretrained_model_name_or_path}",
             f"  Concept = {ctx.inputs.concept} (adapter {args.adapter} '{ctx.inputs.adapter_name}', rank {args.rank}, "
             f"band {band})",
             f"  Num examples = {len(ctx.dataset)}; {caption_summary(ctx.inputs)}",
             f"  Prior preservation = {args.with_prior_preservation}"
             + (f" ({len(ctx.dataset.class_images)} class images in {args.class_data_dir})"
                if args.with_prior_preservation else ""),
             f"  Num batches each epoch = {steps_per_epoch * args.gradient_accumulation_steps}",
             f"  Num Epochs = {args.num_train_epochs}",
             f"  Instantaneous batch size per device = {args.train_batch_size}",
             f"  Total train batch size (w. parallel, distributed & accumulation) = {total}",
             f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}",
             f"  Total optimization steps = {args.max_train_steps}",
             f"  Learning rate = {args.learning_rate:g}"
             + (f" (text encoder {args.text_encoder_lr:g})" if args.train_text_encoder else ""),
             f"  Output dir = {args.output_dir}"]
    if args.validation_prompt:
        prompts = args.validation_prompt.split("|")
        lines.append(f"  Validation = {len(prompts)} prompt(s), e.g. {prompts[0]!r} -> validation_grid.png")
    return lines
