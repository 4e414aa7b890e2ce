#!/usr/bin/env python
"""DreamBooth with spectral adapters on the Stable Diffusion UNet (and CLIP text encoder).

Flags, defaults and outputs follow diffusers' ``examples/dreambooth/train_dreambooth_lora.py``; on top:
``--adapter spectral_a|spectral_r|svdiff|lorsa|speclora`` (or a PEFT baseline: ``lora``, ``dora``, ...),
``--band N|auto`` (disjoint singular bands per concept, allocated at start in the concepts folder's
``bands.json``), per-image captions (``metadata.jsonl`` / ``.txt``), exact LoRA export (diffusers/PEFT and
kohya keys), atomic checkpoints, a validation grid (base vs concept) and an exactly replayable run.

    # offline, on a CPU: the trained builtin:digits base learns "bold" digits (built-in captioned set)
    python training/dreambooth_spectral.py --instance_data_dir builtin:digits-bold --output_dir concepts/bold \\
      --with_prior_preservation --max_train_steps 200 --learning_rate 3e-4 --train_batch_size 8

    # real Stable Diffusion 1.5 (hub id or local folder)
    accelerate launch training/dreambooth_spectral.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --instance_data_dir ./dog --instance_prompt "a photo of sks dog" --output_dir concepts/dog \\
      --adapter spectral_a --rank 4 --band auto --resolution 512 --train_batch_size 1 \\
      --learning_rate 1e-4 --lr_warmup_steps 0 --max_train_steps 500 --mixed_precision fp16

Determinism: the data order (per epoch), augmentations, VAE sampling, noise and timesteps are pure
functions of ``(--seed, step, rank)``, so a run resumed from a checkpoint replays the uninterrupted run.
The code lives in ``training/dreambooth/`` (args, data, dataset, models, runinfo, loop, outputs).
"""
import sys

from training.dreambooth import *  # noqa: F401,F403
from training.dreambooth import InputError, TrainingDiverged, main, parse_args

if __name__ == "__main__":
    try:
        main(parse_args())
    except (InputError, TrainingDiverged) as e:
        sys.exit(f"error: {e}")
