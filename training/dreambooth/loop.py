"""The run: ``setup`` (inputs, accelerator, band, models, adapter, data, optimizer, resume), ``train`` (the loop,
checkpoints, the non-finite guard) and ``main``."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from spectral_vision.bands import BandError
from training.common import cast_frozen_, checkpoint_info, list_checkpoints, save_accelerate_checkpoint, step_seed

from .args import InputError
from .data import check_band_free, prepare_inputs
from .dataset import StepBatchSampler, collate_fn, generate_class_images, make_dataset
from .models import (add_adapters, adapter_hash, compute_loss, encode_prompt, first_non_finite, load_models,
                     make_optimizer, num_bands, register_state_hooks)
from .outputs import check_hub, finish, log_validation
from .runinfo import check_output_dir, launch_warning, run_identity, summary_lines

logger = get_logger("dreambooth_spectral")  # accelerate's: logs on the main process only


class TrainingDiverged(FloatingPointError):
    """The loss or the adapter became non-finite; nothing of that step was saved."""


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = None if args.report_to in (None, "none") else args.report_to
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)))


def resolve_seed(args, resume) -> None:
    """The checkpoint's seed, else ``--seed``, else one drawn on the main process and shared (then recorded)."""
    from accelerate.utils import broadcast_object_list

    saved = checkpoint_info(resume)["info"].get("seed") if resume is not None else None
    if args.seed is None:
        args.seed = saved if saved is not None else broadcast_object_list([int.from_bytes(os.urandom(4), "little")])[0]


def allocate_band(args, accelerator, inputs, models):
    """The concept's band, taken in the registry under its lock by the main process and shared."""
    from accelerate.utils import broadcast_object_list

    if inputs.registry is None:
        return None
    n = num_bands(args, models)
    got = [None]
    if accelerator.is_main_process:
        band = None if args.band == "auto" else int(args.band)
        try:
            if band is not None:
                check_band_free(inputs.registry, inputs.concept, band, args.rank)
            got = [inputs.registry.allocate(inputs.concept, Path(args.output_dir).resolve() / "unet", args.adapter,
                                            args.rank, band, num_bands=n) if not args.no_register
                   else (band if band is not None else inputs.registry.next_free_band(args.rank, inputs.concept))]
        except BandError as e:
            got = [f"error: {e}"]
    if accelerator.num_processes > 1:
        got = broadcast_object_list(got)
    if isinstance(got[0], str):
        raise InputError(got[0][len("error: "):])
    return got[0]


def prepare_models(args, accelerator, ctx) -> None:
    """Load, allocate the band, attach, cast frozen weights, attention backend, gradient checkpointing."""
    m = ctx.models = load_models(args)
    args.resolution = args.resolution or m.unet.config.sample_size * m.vae_scale_factor
    if args.resolution % m.vae_scale_factor:
        raise InputError(f"--resolution {args.resolution} must be a multiple of {m.vae_scale_factor} (the VAE's)")
    ctx.band = allocate_band(args, accelerator, ctx.inputs, m)
    ctx.adapted = add_adapters(args, m, ctx.band, ctx.inputs.adapter_name)  # InputError on a rank/band too large
    ctx.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (m.unet, m.vae, m.text_encoder):  # frozen weights in weight_dtype, adapters fp32
        cast_frozen_(model, ctx.weight_dtype).to(accelerator.device)
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if is_xformers_available() and accelerator.device.type == "cuda":
            m.unet.enable_xformers_memory_efficient_attention()
        else:
            logger.info("--enable_xformers_memory_efficient_attention: not needed, diffusers already uses PyTorch's "
                        "memory-efficient scaled_dot_product_attention (SDPA)")
    if args.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            m.text_encoder.gradient_checkpointing_enable()


def prepare_data(args, accelerator, ctx) -> None:
    """Class images, the dataset (captions precomputed with ``--pre_compute_text_embeddings``)."""
    if args.with_prior_preservation:
        generate_class_images(args, accelerator, ctx.inputs.class_prompts)
    encode = None
    if args.pre_compute_text_embeddings:
        te = ctx.models.text_encoder

        @torch.no_grad()
        def encode(text):  # (L,) -> (L, D) in the frozen weights' dtype
            return encode_prompt(te, text["prompt_ids"][None], text["attention_mask"][None],
                                 args.text_encoder_use_attention_mask, accelerator.device)[0].cpu()
    ctx.dataset = make_dataset(args, ctx.models.tokenizer, ctx.inputs, encode)
    if args.pre_compute_text_embeddings:
        ctx.models.text_encoder.to("cpu")  # not needed during training (validation moves it back)


def prepare_optimization(args, accelerator, ctx) -> int:
    """Optimizer, schedule and ``accelerator.prepare``; returns the updates per epoch."""
    from diffusers.optimization import get_scheduler

    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate, args.text_encoder_lr = args.learning_rate * factor, args.text_encoder_lr * factor
    optimizer = make_optimizer(args, ctx.adapted)
    steps_per_epoch = math.ceil(math.ceil(len(ctx.dataset) / (args.train_batch_size * accelerator.num_processes))
                                / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    n = len(ctx.adapted)
    prepared = accelerator.prepare(*ctx.adapted.values(), optimizer, lr_scheduler)
    ctx.adapted = dict(zip(ctx.adapted, prepared[:n]))
    ctx.optimizer, ctx.lr_scheduler = prepared[n:]
    m = ctx.models
    m.unet, m.text_encoder = ctx.adapted["unet"], ctx.adapted.get("text_encoder", m.text_encoder)
    register_state_hooks(accelerator, {k: accelerator.unwrap_model(v) for k, v in ctx.adapted.items()},
                         ctx.inputs.adapter_name)
    return steps_per_epoch


def setup(args) -> tuple:
    """Everything before the first step; every input is checked before the first model is loaded."""
    inputs = prepare_inputs(args)
    ctx = SimpleNamespace(inputs=inputs, hub=check_hub(args), identity=run_identity(args, inputs), global_step=0,
                          last_loss=float("nan"), resumed_from=None, final_images=[], rank_hashes=[], band=None)
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    warning = launch_warning(accelerator.num_processes)
    if warning:
        logger.warning(warning)
    resume = check_output_dir(args, ctx.identity, accelerator.is_main_process, accelerator.wait_for_everyone)
    accelerator.wait_for_everyone()
    resolve_seed(args, resume)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    prepare_models(args, accelerator, ctx)
    prepare_data(args, accelerator, ctx)
    steps_per_epoch = prepare_optimization(args, accelerator, ctx)
    ctx.num_processes = accelerator.num_processes
    if resume is not None:
        accelerator.load_state(str(resume))  # adapter tensors (hook), optimizer, scheduler, RNG states
        ctx.global_step, ctx.resumed_from = checkpoint_info(resume)["step"], str(resume)
        logger.info(f"Resuming from checkpoint {resume} at step {ctx.global_step}")
    elif args.resume_from_checkpoint == "latest":
        logger.info(f"no complete checkpoint in {args.output_dir}: starting a new run")
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-spectral", config={k: v for k, v in vars(args).items()
                                                                 if isinstance(v, (int, float, str, bool))
                                                                 and k != "hub_token"})
    for line in summary_lines(args, ctx, accelerator.num_processes, steps_per_epoch):
        logger.info(line)
    return accelerator, ctx


def check_finite(args, ctx, accelerator) -> None:
    """Stop (nothing of this step saved) when the loss or an adapter tensor is NaN/inf."""
    finite = math.isfinite(ctx.last_loss)
    if accelerator.num_processes > 1:  # every rank decides alike (losses differ per rank; adapters do not)
        flags = accelerator.reduce(torch.tensor([0.0 if finite else 1.0], device=accelerator.device), "sum")
        finite = flags.item() == 0
    bad = None if finite else f"the loss is {ctx.last_loss} (on at least one process)"
    if bad is None:
        tensor = first_non_finite({k: accelerator.unwrap_model(v) for k, v in ctx.adapted.items()},
                                  ctx.inputs.adapter_name)
        bad = None if tensor is None else f"adapter tensor {tensor} is not finite after the optimizer step"
    if bad is not None:
        good = list_checkpoints(args.output_dir)
        last = f"the last good checkpoint is {good[-1][1]}" if good else "there is no earlier checkpoint"
        raise TrainingDiverged(f"training diverged at step {ctx.global_step}: {bad}. Nothing of this step was saved; "
                               f"{last}. Lower --learning_rate (now {args.learning_rate:g}) or use bf16 instead of "
                               "fp16, then resume from that checkpoint or start again")


def train(args, accelerator, ctx) -> None:
    """The loop: micro-steps ``[global_step*GA, max_train_steps*GA)``, checkpoints, validation, progress."""
    ga, rank = args.gradient_accumulation_steps, accelerator.process_index
    sampler = StepBatchSampler(len(ctx.dataset), args.train_batch_size, accelerator.num_processes, rank, args.seed,
                               ctx.global_step * ga, args.max_train_steps * ga)
    loader = DataLoader(ctx.dataset, batch_sampler=sampler, collate_fn=collate_fn,
                        num_workers=args.dataloader_num_workers)
    m, trained = ctx.models, list(ctx.adapted.values())
    for model in trained:
        model.train()
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=args.max_train_steps, initial=ctx.global_step, desc="Steps",
               disable=not accelerator.is_local_main_process)
    micro_losses = []
    for micro, batch in zip(range(sampler.start, sampler.stop), loader):
        generator = torch.Generator(accelerator.device).manual_seed(step_seed(args.seed, 1, micro, rank))
        with accelerator.accumulate(*trained):
            loss = compute_loss(args, batch, m.unet, m.text_encoder, m.vae, m.noise_scheduler, ctx.weight_dtype,
                                generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            ctx.optimizer.step()
            ctx.lr_scheduler.step()
            ctx.optimizer.zero_grad(set_to_none=True)  # --set_grads_to_none is always on
        micro_losses.append(loss.detach().item())
        if accelerator.sync_gradients:
            ctx.global_step += 1
            ctx.last_loss = sum(micro_losses) / len(micro_losses)
            micro_losses.clear()
            check_finite(args, ctx, accelerator)  # before anything of this step is saved
            logs = {"loss": ctx.last_loss, "lr": ctx.lr_scheduler.get_last_lr()[0]}
            bar.update(1)
            bar.set_postfix(**logs)
            accelerator.log(logs, step=ctx.global_step)
            if ctx.global_step % args.checkpointing_steps == 0:
                path = save_accelerate_checkpoint(accelerator, args.output_dir, ctx.global_step,
                                                  args.checkpoints_total_limit,
                                                  info={"seed": args.seed, "band": ctx.band, "config": ctx.identity})
                logger.info(f"Saved state to {path}")
        epoch, j = divmod(micro + 1, sampler.batches_per_epoch)
        if (j == 0 and args.validation_prompt and accelerator.is_main_process
                and (epoch - 1) % args.validation_epochs == 0):
            log_validation(args, accelerator, ctx, epoch - 1)
    bar.close()


def main(args) -> dict:
    """Train, then write the outputs; returns the run summary (also in ``training_args.json``)."""
    accelerator, ctx = setup(args)
    train(args, accelerator, ctx)
    accelerator.wait_for_everyone()
    own = adapter_hash({k: accelerator.unwrap_model(v) for k, v in ctx.adapted.items()}, ctx.inputs.adapter_name)
    ctx.rank_hashes = accelerator.gather_for_metrics([own], use_gather_object=True) \
        if accelerator.num_processes > 1 else [own]
    if len(set(ctx.rank_hashes)) > 1:
        raise RuntimeError(f"ranks ended with different adapters: {ctx.rank_hashes}")
    summary = finish(args, accelerator, ctx) if accelerator.is_main_process else {}
    accelerator.end_training()
    return summary
