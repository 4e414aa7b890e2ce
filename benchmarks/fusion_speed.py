"""Time to fuse 3 concepts into an SD1.5-shaped UNet + CLIP text encoder, for every fusion mode, in one run.

Random weights with the real SD 1.5 shapes (``UNet2DConditionModel`` with SD 1.5's config, 860M
parameters; ``CLIPTextModel`` with SD 1.5's text-encoder config, 123M). Three concepts per method:
spectral ^R adapters (rank 4, bands 0, 1, 2, attention layers of both models: presets ``sd_unet`` and
``clip_text``) for ``spectral``/``mean``/``weighted``/``least_squares``, and PEFT LoRA adapters
(rank 4, same layers) for ``lora_sum``. Adapter parameters are random (as if trained).

Timed: ``fusion.fuse`` itself (``FusionResult.seconds``: for least_squares this includes recording
the layer inputs of each concept: one prompt, ``--seeds`` x ``--timesteps`` UNet passes at
``--latent`` x ``--latent`` latents). Loading the adapter folders (reading files + SVD, warm cache,
as after training) is timed separately, and once with a cold SVD cache.

    python benchmarks/fusion_speed.py            # SD1.5 shapes
    python benchmarks/fusion_speed.py --quick    # tiny models, seconds (used by the tests)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


import spectral_vision as sv  # noqa: E402
from fusion.fuse import fuse, load_concepts  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CONCEPTS = ("cat", "dog", "car")
PRESETS = {"unet": "sd_unet", "text_encoder": "clip_text"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("models")
    g.add_argument("--quick", action="store_true", help="tiny-unet + tiny-clip-text instead of SD 1.5 shapes")
    g.add_argument("--rank", type=int, default=4)
    g = p.add_argument_group("least_squares recording")
    g.add_argument("--latent", type=int, default=32, help="latent size of the recording passes (64 = 512 px)")
    g.add_argument("--seeds", type=int, default=1, help="latent seeds per concept prompt")
    g.add_argument("--timesteps", type=int, nargs="+", default=[500])
    g = p.add_argument_group("output")
    g.add_argument("--modes", nargs="+", default=["spectral", "mean", "weighted", "lora_sum", "least_squares"])
    g.add_argument("--repeat", type=int, default=3,
                   help="timed runs of each closed-form mode (median reported; least_squares runs once)")
    g.add_argument("--cold", action="store_true", help="also time loading the concepts with an empty SVD cache")
    g.add_argument("--workdir", default=None,
                   help="keep the concept folders and SVD cache here; a second run reuses them (same seeds)")
    g.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def build(quick: bool) -> nn.ModuleDict:
    torch.manual_seed(0)
    if quick:
        from spectral_vision.zoo import create_model

        return nn.ModuleDict({"unet": create_model("tiny-unet"), "text_encoder": create_model("tiny-clip-text")})
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return nn.ModuleDict({"unet": UNet2DConditionModel(**SD15_UNET).eval(),
                          "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval()})


def perturb_trainable(model: nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def make_concepts(models: nn.ModuleDict, folder: Path, rank: int) -> list[Path]:
    """Three spectral ^R concepts on disjoint bands, saved as concept folders (unet/, text_encoder/).

    The highest band is attached first, so each layer is decomposed once (top 3·rank triplets) and the
    other concepts read the same basis from the SVD cache.
    """
    out = []
    for i, c in reversed(list(enumerate(CONCEPTS))):
        for comp, model in models.items():
            sv.attach(model, sv.SpectralConfig(method="spectral_r", rank=rank, band=i, target_modules=PRESETS[comp]),
                      c, progress=False)
            sv.set_adapter(model, c)
            perturb_trainable(model, seed=i)
            sv.save_adapter(model, folder / c / comp, c)
            sv.detach(model, c)
        out.append(folder / c)
    return out[::-1]


def run_fn(container: nn.ModuleDict, batch) -> None:
    """One recording pass: random prompt tokens -> text encoder -> UNet at one timestep."""
    seed, t, latent = batch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49407, (1, 77), generator=g)
    emb = container["text_encoder"](ids)[0]  # (1, 77, d)
    container["unet"](torch.randn(1, 4, latent, latent, generator=g), torch.tensor([t]), encoder_hidden_states=emb)


def run_mode(models: nn.ModuleDict, folders: list[Path], mode: str, args):
    """Load the 3 concepts (PEFT LoRA ones for lora_sum) and fuse them; returns ``(FusionResult, load seconds)``."""
    t = time.perf_counter()
    if mode == "lora_sum":
        from spectral_vision.baselines import attach_peft

        for i, c in enumerate(CONCEPTS):
            for comp, model in models.items():
                attach_peft(model, "lora", args.rank, PRESETS[comp], adapter_name=c)
                perturb_trainable(model, seed=10 + i)
    else:
        for comp, model in models.items():
            load_concepts(model, [f / comp for f in folders], list(CONCEPTS))
    load_s = time.perf_counter() - t
    inputs = None
    if mode == "least_squares":
        inputs = {c: [(s, ts, args.latent) for s in range(args.seeds) for ts in args.timesteps] for c in CONCEPTS}
    with torch.no_grad():
        res = fuse(models, list(CONCEPTS), mode=mode, inputs=inputs, run_fn=run_fn, progress=False)
    return res, load_s


def main(args: argparse.Namespace) -> dict:
    t = time.perf_counter()
    models = build(args.quick)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(f"built {'tiny' if args.quick else 'SD1.5-shaped'} UNet + text encoder {n_params} in "
          f"{time.perf_counter() - t:.1f} s; torch threads {torch.get_num_threads()}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fusion_speed"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["SPECTRAL_VISION_CACHE"] = str(work / "cache_warm")
    t = time.perf_counter()
    from safetensors.torch import load_file, save_file

    if all((work / c / comp / "adapter_config.json").exists() for c in CONCEPTS for comp in PRESETS) \
            and (work / "base.safetensors").exists():
        models.load_state_dict(load_file(str(work / "base.safetensors")))  # the base the concepts were made on
        folders = [work / c for c in CONCEPTS]
        print(f"reusing the concepts and base weights in {work}")
    else:
        save_file({k: v.contiguous() for k, v in models.state_dict().items()}, str(work / "base.safetensors"))
        folders = make_concepts(models, work, args.rank)
        print(f"made {len(folders)} concepts (attach + SVD + save) in {time.perf_counter() - t:.1f} s")
    originals = {n: p.detach().clone() for n, p in models.state_dict().items()}
    t = time.perf_counter()  # untimed warm-up (first-touch allocations, BLAS thread start): not charged to a mode
    for comp, model in models.items():
        load_concepts(model, [f / comp for f in folders], list(CONCEPTS))
    fuse(models, list(CONCEPTS), mode="mean", progress=False)
    models.load_state_dict(originals)
    print(f"warm-up (load + mean fusion, untimed) {time.perf_counter() - t:.1f} s")
    results = {}
    for mode in args.modes:
        times, loads = [], []
        for _ in range(1 if mode == "least_squares" else args.repeat):
            res, load_s = run_mode(models, folders, mode, args)
            times.append(res.seconds)
            loads.append(load_s)
            models.load_state_dict(originals)  # back to the base for the next run
        med = statistics.median(times)
        results[mode] = {"fuse_s": med, "fuse_runs_s": times, "load_s": statistics.median(loads),
                         "layers": len(res.layers),
                         "record_s": res.info.get("seconds_record", 0.0) if mode == "least_squares" else 0.0}
        print(f"{mode:>14}: fuse {med:8.2f} s median of {len(times)} {[round(x, 2) for x in times]}  "
              f"(load adapters {results[mode]['load_s']:6.2f} s, {len(res.layers)} layers)", flush=True)
    base = results.get("spectral", {}).get("fuse_s")
    if base:
        print("\nratios (mode fuse time / spectral fuse time):")
        for mode, r in results.items():
            r["x_spectral"] = r["fuse_s"] / base
            print(f"  {mode:>14}: {r['x_spectral']:9.1f}x")
        print(f"target: spectral <= 10 s -> {base:.2f} s; least_squares >= 50x slower -> "
              f"{results.get('least_squares', {}).get('x_spectral', float('nan')):.1f}x")
    if args.cold and "spectral" in args.modes:  # cold SVD cache: loading includes every decomposition
        os.environ["SPECTRAL_VISION_CACHE"] = str(work / "cache_cold")
        t = time.perf_counter()
        for comp, model in models.items():
            load_concepts(model, [f / comp for f in folders], list(CONCEPTS))
        cold = time.perf_counter() - t
        res = fuse(models, list(CONCEPTS), progress=False)
        results["spectral"]["load_cold_s"] = cold
        results["spectral"]["fuse_after_cold_s"] = res.seconds
        print(f"spectral with a cold SVD cache: load {cold:.2f} s + fuse {res.seconds:.2f} s")
    summary = {"models": "tiny" if args.quick else "SD1.5-shaped (random weights)", "params": n_params,
               "rank": args.rank, "concepts": len(CONCEPTS), "recording": {"latent": args.latent, "seeds": args.seeds,
                                                                         "timesteps": args.timesteps},
               "torch_threads": torch.get_num_threads(), "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(parse_args())
