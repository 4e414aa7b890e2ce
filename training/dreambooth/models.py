"""Models of a run: components, the adapter (spectral or PEFT baseline, named after the concept), its tensors,
checkpoint hooks, the optimizer and the DreamBooth loss."""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import spectral_vision as sv
from spectral_vision.baselines import attach_adapter, is_peft_method
from spectral_vision.bands import layer_band_count
from spectral_vision.integrations.diffusers import resolve_pretrained
from spectral_vision.layers import layer_kind
from spectral_vision.presets import match_targets
from training.common import param_groups

from .args import InputError


def load_models(args) -> SimpleNamespace:
    """Tokenizer, DDPM noise scheduler, text encoder, VAE and UNet, loaded component by component."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_pretrained(args.pretrained_model_name_or_path)
    kw = dict(revision=args.revision, variant=args.variant)
    tok = (CLIPTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision) if args.tokenizer_name
           else CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=args.revision))
    m = SimpleNamespace(path=path, tokenizer=tok,
                        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=args.revision),
                        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
                        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
                        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw))
    for model in (m.text_encoder, m.vae, m.unet):
        model.requires_grad_(False)
    m.vae_scale_factor = 2 ** (len(m.vae.config.block_out_channels) - 1)
    return m


def targets(args, models) -> dict[str, tuple[nn.Module, object]]:
    """``{component: (model, target spec)}`` of the adapted components."""
    out = {"unet": (models.unet, args.target_modules)}
    if args.train_text_encoder:
        out["text_encoder"] = (models.text_encoder, args.text_encoder_target_modules)
    return out


def num_bands(args, models) -> int:
    """Bands of ``--rank`` every targeted layer holds (the band registry's ``num_bands``)."""
    layers = []
    for name, (model, spec) in targets(args, models).items():
        try:
            names = match_targets(model, spec, supported=lambda m: layer_kind(m) is not None)
        except ValueError as e:
            raise InputError(f"--{'text_encoder_' if name == 'text_encoder' else ''}target_modules: {e}") from None
        layers += [model.get_submodule(n) for n in names]
    n = layer_band_count(layers, args.rank)
    if n == 0:
        raise InputError(f"--rank {args.rank} is too large: the smallest adapted layer has only "
                         f"{min(min(m.weight.shape[0], m.weight[0].numel()) for m in layers)} singular values")
    return n


def add_adapters(args, models, band: Optional[int], adapter_name: str = "default") -> dict[str, nn.Module]:
    """Attach ``--adapter`` as ``adapter_name`` to the UNet (and text encoder); returns ``{"unet": unet,
    "text_encoder": te}`` of the adapted components. Raises :class:`InputError` (rank/band too large, no
    matching layer) before training."""
    adapted = targets(args, models)
    for name, (model, spec) in adapted.items():
        if is_peft_method(args.adapter):
            kw = {"alpha": args.alpha} if args.alpha is not None else {}
            if args.adapter == "lora":
                kw["init_lora_weights"] = "gaussian"  # as diffusers' LoRA scripts
        else:
            kw = dict(band=band, alpha=1.0 if args.alpha is None else args.alpha, svd=args.svd,
                      options=dict(args.adapter_options), progress=False)
        try:
            attach_adapter(model, args.adapter, args.rank, spec, adapter_name=adapter_name, **kw)
        except (ValueError, TypeError) as e:
            raise InputError(f"cannot attach --adapter {args.adapter} --rank {args.rank}"
                             f"{'' if band is None else f' --band {band}'} to the {name}: {e}") from None
    return {name: model for name, (model, _) in adapted.items()}


def is_spectral(model: nn.Module) -> bool:
    return any(True for _ in sv.spectral_layers(model))


def adapter_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's persistent tensors (what a checkpoint stores), for hashing and comparisons."""
    if is_spectral(model):
        return {f"{n}.{k}": t for n, layer in sv.spectral_layers(model)
                for k, t in layer.adapters[adapter_name].state_dict().items()}
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def first_non_finite(adapted: dict[str, nn.Module], adapter_name: str) -> Optional[str]:
    """Name of the first adapter tensor holding NaN/inf (``None``: all finite)."""
    for comp, model in adapted.items():
        for k, t in adapter_state(model, adapter_name).items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                return f"{comp}.{k}"
    return None


def adapter_hash(adapted: dict[str, nn.Module], adapter_name: str) -> str:
    """SHA-256 of all adapter tensors (component, name order): equal on every rank after DDP training."""
    h = hashlib.sha256()
    for comp, model in sorted(adapted.items()):
        for k, t in sorted(adapter_state(model, adapter_name).items()):
            h.update(f"{comp}.{k}".encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_component(model: nn.Module, folder: Path, adapter_name: str, extra: Optional[dict] = None) -> None:
    """Adapter tensors only: ``sv.save_adapter`` (spectral) or PEFT's state dict as safetensors (atomic)."""
    if is_spectral(model):
        sv.save_adapter(model, folder, adapter_name, extra_metadata=extra)
        return
    from safetensors.torch import save_file

    from spectral_vision.fileio import atomic_write

    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state(model, adapter_name).items()}
    atomic_write(folder / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp))


def load_component_(model: nn.Module, folder: Path, adapter_name: str) -> None:
    """Load adapter tensors saved by :func:`save_component` into the already attached adapter, in place
    (the optimizer keeps its parameter references)."""
    if not is_spectral(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")), adapter_name=adapter_name)
        return
    _, tensors = sv.read_adapter(folder)
    for name, layer in sv.spectral_layers(model):
        delta = layer.adapters[adapter_name]
        keys = {k: f"{name}.{k}" for k in delta.state_dict()}
        missing = [v for v in keys.values() if v not in tensors]
        if missing or not torch.equal(tensors[keys["columns"]].to(delta.columns), delta.columns):
            raise sv.AdapterFileError(f"checkpoint {folder} does not match this run's adapter at layer {name!r} "
                                      f"(another --adapter/--rank/--band/--target_modules?)")
        delta.load_state_dict({k: tensors[v] for k, v in keys.items()})


def register_state_hooks(accelerator, adapted: dict[str, nn.Module], adapter_name: str) -> None:
    """Checkpoints store adapter tensors only (``<ckpt>/unet``, ``<ckpt>/text_encoder``), never the base."""
    def component(model):
        model = accelerator.unwrap_model(model)
        return next(name for name, m in adapted.items() if m is model)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_component(accelerator.unwrap_model(model), Path(output_dir) / component(model), adapter_name)
        weights.clear()  # nothing else of the models goes into the checkpoint

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            load_component_(accelerator.unwrap_model(model), Path(input_dir) / component(model), adapter_name)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def make_optimizer(args, adapted: dict[str, nn.Module]):
    specs = [(adapted["unet"], args.learning_rate)]
    if "text_encoder" in adapted:
        specs.append((adapted["text_encoder"], args.text_encoder_lr))
    groups = param_groups(specs)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
               eps=args.adam_epsilon)


def encode_prompt(text_encoder, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], use_mask: bool,
                  device: torch.device) -> torch.Tensor:
    """``(B, L, D)`` text-encoder hidden states of ``input_ids (B, L)`` (with the mask when ``use_mask``)."""
    mask = attention_mask.to(device) if use_mask and attention_mask is not None else None
    return text_encoder(input_ids.to(device), attention_mask=mask)[0]


def compute_loss(args, batch: dict, unet, text_encoder, vae, noise_scheduler, weight_dtype, generator) -> torch.Tensor:
    """DreamBooth loss of one batch: noise prediction MSE (min-SNR weighted with ``--snr_gamma``), plus
    ``--prior_loss_weight`` x the class half's MSE with prior preservation. All randomness from ``generator``."""
    device = generator.device
    pixels = batch["pixel_values"].to(device, weight_dtype)  # (B', 3, H, W)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor  # (B', 4, h, w)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator,
                              device=device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if "prompt_embeds" in batch:  # --pre_compute_text_embeddings
        hidden = batch["prompt_embeds"].to(device, weight_dtype)
    else:
        with torch.set_grad_enabled(args.train_text_encoder and torch.is_grad_enabled()):
            hidden = encode_prompt(text_encoder, batch["input_ids"], batch.get("attention_mask"),
                                   args.text_encoder_use_attention_mask, device)  # (B', L, D)
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0].float()
    kind = noise_scheduler.config.prediction_type
    target = noise if kind == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    target = target.float()
    prior = None
    if args.with_prior_preservation:  # first half instance, second half class (see collate_fn)
        pred, pred_prior = pred.chunk(2)
        target, target_prior = target.chunk(2)
        timesteps = timesteps.chunk(2)[0]
        prior = F.mse_loss(pred_prior, target_prior)
    if args.snr_gamma is None:
        loss = F.mse_loss(pred, target)
    else:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)  # (B,)
        weight = torch.clamp(snr, max=args.snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
    return loss if prior is None else loss + args.prior_loss_weight * prior
