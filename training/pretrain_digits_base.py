#!/usr/bin/env python
"""Pretrain ``builtin:digits``: a real (tiny) Stable Diffusion pipeline trained on handwritten digits.

    python training/pretrain_digits_base.py                      # all stages, resumes if interrupted
    python training/pretrain_digits_base.py --stage vae          # one stage: vae | unet | export | all

Recipe (fixed seeds, everything recorded in ``<output_dir>/recipe.json`` and the shipped file):

1. data: scikit-learn's 1797 bundled 8x8 digits, upscaled to 32x32 RGB, stratified train / held-out
   split (the held-out digits train the judge classifier and the concept instance sets, never the base);
   captions ``"a handwritten digit 3"``, dropped to ``""`` with ``--caption_dropout`` for CFG.
2. VAE: ``AutoencoderKL`` (16, 32, 64), 32x32x3 -> 8x8x4 latents; MSE + tiny KL; ``scaling_factor`` set
   to 1 / std of the training latents.
3. text encoder: a frozen, randomly initialised ``CLIPTextModel`` (hidden 64, 2 layers) with a
   ``CLIPTokenizer`` rebuilt from the CLIP BPE file ``open_clip_torch`` ships.
4. UNet: ``UNet2DConditionModel`` (32, 64), epsilon prediction, DDPM scaled-linear betas (SD's), min-SNR
   loss weighting, EMA; the EMA weights are shipped.
5. export: one fp16 safetensors file (``spectral_vision/assets/digits_base.safetensors``) + evaluation.

Checkpoints are atomic (``fileio.atomic_write``) and the UNet stage resumes from the last one (optimizer,
scheduler, EMA and RNG state) with ``--resume_from_checkpoint latest`` (the default).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spectral_vision.fileio import atomic_write
from training.eval_digits_base import PROMPT, evaluate, load_digit_images, save_grid, split_indices

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain the builtin:digits Stable Diffusion base on CPU.")
    g = p.add_argument_group("run")
    g.add_argument("--stage", choices=["all", "vae", "unet", "export"], default="all")
    g.add_argument("--output_dir", default="outputs/digits_base")
    g.add_argument("--asset", default=str(REPO / "spectral_vision/assets/digits_base.safetensors"),
                   help="where the export stage writes the shipped fp16 pipeline file")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume_from_checkpoint", choices=["latest", "none"], default="latest")
    g.add_argument("--checkpointing_steps", type=int, default=200)
    g.add_argument("--num_threads", type=int, default=0,
                   help="torch threads (0: torch's default; 1 is faster on a CPU shared with other jobs)")
    g = p.add_argument_group("data")
    g.add_argument("--resolution", type=int, default=32)
    g.add_argument("--heldout_fraction", type=float, default=0.3)
    g.add_argument("--split_seed", type=int, default=0)
    g.add_argument("--caption_dropout", type=float, default=0.1)
    g = p.add_argument_group("vae")
    g.add_argument("--vae_channels", type=int, nargs="+", default=[16, 32, 64])
    g.add_argument("--vae_steps", type=int, default=400)
    g.add_argument("--vae_batch_size", type=int, default=32)
    g.add_argument("--vae_lr", type=float, default=1e-3)
    g.add_argument("--kl_weight", type=float, default=1e-6)
    g = p.add_argument_group("text encoder (frozen, random)")
    g.add_argument("--text_hidden", type=int, default=64)
    g.add_argument("--text_layers", type=int, default=2)
    g = p.add_argument_group("unet")
    g.add_argument("--unet_channels", type=int, nargs="+", default=[32, 64])
    g.add_argument("--layers_per_block", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=2000)
    g.add_argument("--train_batch_size", type=int, default=64)
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--lr_warmup_steps", type=int, default=100)
    g.add_argument("--snr_gamma", type=float, default=5.0)
    g.add_argument("--ema_decay", type=float, default=0.998)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_samples", type=int, default=500, help="0 skips the evaluation after export")
    return p.parse_args(argv)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through :func:`spectral_vision.fileio.atomic_write` (read back with ``weights_only=True``)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))  # a half-written checkpoint is never visible


def data(args) -> dict:
    images, labels = load_digit_images(args.resolution)  # (N, R, R) in [0, 1], (N,)
    tr, ho = split_indices(labels, args.heldout_fraction, args.split_seed)
    x = torch.tensor(images[tr])[:, None].expand(-1, 3, -1, -1) * 2 - 1  # (n, 3, R, R) in [-1, 1]
    return {"x": x.contiguous(), "y": torch.tensor(labels[tr]), "train": tr.tolist(), "heldout": ho.tolist()}


def build_vae(args):
    from diffusers import AutoencoderKL

    n = len(args.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(args.vae_channels),
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=8, sample_size=args.resolution)


def build_text(args):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from spectral_vision.integrations.diffusers import build_clip_tokenizer_files

    cfg = CLIPTextConfig(hidden_size=args.text_hidden, intermediate_size=2 * args.text_hidden,
                         num_hidden_layers=args.text_layers, num_attention_heads=4, vocab_size=49408,
                         max_position_embeddings=77, projection_dim=args.text_hidden)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed + 1)
        text_encoder = CLIPTextModel(cfg).eval().requires_grad_(False)
    tok_dir = Path(args.output_dir) / "tokenizer_bpe"
    tokenizer = CLIPTokenizer.from_pretrained(str(build_clip_tokenizer_files(tok_dir)), model_max_length=77)
    return text_encoder, tokenizer


def build_unet(args):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=args.resolution // 2 ** (len(args.vae_channels) - 1), in_channels=4, out_channels=4,
        layers_per_block=args.layers_per_block, block_out_channels=tuple(args.unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(args.unet_channels) - 1),
        up_block_types=("UpBlock2D",) * (len(args.unet_channels) - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=args.text_hidden, attention_head_dim=8, norm_num_groups=8)


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ---- stage 1: VAE ------------------------------------------------------------------------------------------
def train_vae(args, d: dict, out: Path) -> dict:
    torch.manual_seed(args.seed)
    vae = build_vae(args).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.vae_steps, eta_min=args.vae_lr * 0.05)
    gen = torch.Generator().manual_seed(args.seed)
    t0, bar = time.time(), tqdm(range(args.vae_steps), desc="vae")
    for _ in bar:
        idx = torch.randint(len(d["x"]), (args.vae_batch_size,), generator=gen)
        x = d["x"][idx]  # (B, 3, R, R)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(generator=gen)).sample  # (B, 3, R, R)
        mse = F.mse_loss(rec, x)
        loss = mse + args.kl_weight * dist.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    with torch.no_grad():
        dist = vae.encode(d["x"]).latent_dist
        rec = vae.decode(dist.mean).sample
        std = float(dist.sample(generator=gen).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    info = {"vae_seconds": round(time.time() - t0, 1), "vae_recon_mse_train": float(F.mse_loss(rec, d["x"])),
            "vae_params": sum(p.numel() for p in vae.parameters()), "latent_std": std}
    atomic_save({"state_dict": vae.state_dict(), "config": dict(vae.config), "info": info}, out / "vae.pt")
    print(json.dumps(info))
    return info


def load_vae(args, out: Path):
    ckpt = torch.load(out / "vae.pt", map_location="cpu", weights_only=True)
    vae = build_vae(args)
    vae.load_state_dict(ckpt["state_dict"])
    vae.register_to_config(scaling_factor=ckpt["config"]["scaling_factor"])
    return vae.eval().requires_grad_(False), ckpt["info"]


# ---- stage 2: UNet -----------------------------------------------------------------------------------------
@torch.no_grad()
def caption_embeddings(text_encoder, tokenizer) -> torch.Tensor:
    """``(11, 77, hidden)``: rows 0-9 the digit captions, row 10 the empty (unconditional) caption."""
    prompts = [PROMPT.format(i) for i in range(10)] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # (11, 77)
    return text_encoder(ids)[0]  # exactly what StableDiffusionPipeline.encode_prompt computes


def lr_lambda(args):
    def f(step):
        if step < args.lr_warmup_steps:
            return (step + 1) / args.lr_warmup_steps
        t = (step - args.lr_warmup_steps) / max(1, args.max_train_steps - args.lr_warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))  # cosine to 10%
    return f


def train_unet(args, d: dict, out: Path) -> dict:
    from diffusers.training_utils import compute_snr

    vae, _ = load_vae(args, out)
    text_encoder, tokenizer = build_text(args)
    emb = caption_embeddings(text_encoder, tokenizer)  # (11, 77, hidden)
    with torch.no_grad():  # latent distribution of every training digit, sampled fresh each step
        dist = vae.encode(d["x"]).latent_dist
        lat_mean, lat_std = dist.mean, dist.std  # (n, 4, h, w) each
    sf = vae.config.scaling_factor
    torch.manual_seed(args.seed)
    unet = build_unet(args).train()
    ema = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=1e-2)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    noise_sched = noise_scheduler()
    gen = torch.Generator().manual_seed(args.seed + 100)
    step, elapsed, ckpt_path = 0, 0.0, out / "unet_checkpoint.pt"
    resumed_from = None
    if args.resume_from_checkpoint == "latest" and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(ck["unet"]), opt.load_state_dict(ck["optimizer"]), lr_sched.load_state_dict(ck["lr"])
        ema = ck["ema"]
        gen.set_state(ck["generator"]), torch.set_rng_state(ck["torch_rng"])
        step, elapsed = ck["step"], ck["elapsed"]
        resumed_from = step
        print(f"resumed from {ckpt_path} at step {step}")

    def checkpoint():
        atomic_save({"unet": unet.state_dict(), "optimizer": opt.state_dict(), "lr": lr_sched.state_dict(),
                     "ema": ema, "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                     "elapsed": elapsed + time.time() - t0}, ckpt_path)

    t0, losses = time.time(), []
    bar = tqdm(total=args.max_train_steps, initial=step, desc="unet")
    while step < args.max_train_steps:
        idx = torch.randint(len(lat_mean), (args.train_batch_size,), generator=gen)
        eps_lat = torch.randn(lat_mean[idx].shape, generator=gen)
        latents = (lat_mean[idx] + lat_std[idx] * eps_lat) * sf  # (B, 4, h, w)
        caps = d["y"][idx].clone()
        caps[torch.rand(len(idx), generator=gen) < args.caption_dropout] = 10  # -> "" (CFG)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(noise_sched.add_noise(latents, noise, t), t, emb[caps]).sample
        snr = compute_snr(noise_sched, t)
        w = torch.clamp(snr, max=args.snr_gamma) / snr  # min-SNR-gamma, epsilon prediction
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * w).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
        opt.step(), lr_sched.step(), opt.zero_grad(set_to_none=True)
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))  # EMA with warm-up
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        bar.update(1), bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{lr_sched.get_last_lr()[0]:.1e}")
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            checkpoint()
    bar.close()
    elapsed += time.time() - t0
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    unet.eval()
    info = {"unet_seconds": round(elapsed, 1), "unet_params": sum(p.numel() for p in unet.parameters()),
            "final_loss_50": float(np.mean(losses[-50:])) if losses else None, "unet_steps": step,
            "resumed_from_step": resumed_from}
    atomic_save({"state_dict": unet.state_dict(), "info": info}, out / "unet_ema.pt")
    print(json.dumps(info))
    return info


# ---- stage 3: export + evaluation ----------------------------------------------------------------------------
def export(args, d: dict, out: Path, recipe: dict) -> dict:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from spectral_vision.assets import pack_pipeline, pipeline_from_asset

    vae, vae_info = load_vae(args, out)
    text_encoder, tokenizer = build_text(args)
    unet = build_unet(args)
    ck = torch.load(out / "unet_ema.pt", map_location="cpu", weights_only=True)
    unet.load_state_dict(ck["state_dict"])
    # SD 1.x's scheduler betas; DPM-Solver++ gives clean samples in 20 steps
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    recipe = {**recipe, **vae_info, **ck["info"]}
    size = pack_pipeline(pipe, args.asset, recipe)
    info = {"asset": str(args.asset), "asset_bytes": size}
    print(json.dumps(info))
    if args.eval_samples:
        shipped = pipeline_from_asset(args.asset)  # judge what ships (fp16 round trip)
        shipped.set_progress_bar_config(disable=True)
        res = evaluate(shipped, recipe, num_samples=args.eval_samples)
        save_grid(res.pop("samples"), out / "samples_g4.png")
        info["eval"] = res
        print(json.dumps(res, indent=1))
        pack_pipeline(pipe, args.asset, {**recipe, "eval": res})  # same tensors; the measured numbers recorded
    return info


def main(args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    d = data(args)
    recipe_path = out / "recipe.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.exists() else {}
    recipe.update({"args": vars(args), "resolution": args.resolution, "prompt": PROMPT,
                   "split": {"train": d["train"], "heldout": d["heldout"], "heldout_fraction": args.heldout_fraction,
                             "seed": args.split_seed},
                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    if args.stage in ("all", "vae"):
        recipe.update(train_vae(args, d, out))
        recipe_path.write_text(json.dumps(recipe))
    if args.stage in ("all", "unet"):
        recipe.update(train_unet(args, d, out))
        recipe_path.write_text(json.dumps(recipe))
    if args.stage in ("all", "export"):
        info = export(args, d, out, recipe)
        recipe.update(info)
        recipe_path.write_text(json.dumps(recipe, indent=1))
    return recipe


if __name__ == "__main__":
    main(parse_args())
