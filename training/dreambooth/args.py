"""Command line of ``dreambooth_spectral.py``: diffusers' DreamBooth-LoRA flags plus the spectral ones, and their checks.

``parse_args(argv=None)`` parses and checks (``argparse`` error, exit 2, on a bad combination);
:func:`check_args` raises :class:`InputError` and can be called on a namespace built in code.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from typing import Optional

import torch
from diffusers.optimization import SchedulerType

import spectral_vision as sv
from spectral_vision.baselines import BASELINES, is_peft_method
from spectral_vision.integrations.diffusers import SKIMAGE_PHOTOS

DESCRIPTION = "DreamBooth with spectral adapters on the Stable Diffusion UNet (and CLIP text encoder)."
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
BUILTIN_PROMPTS = {"chelsea": "a photo of sks cat", "coffee": "a photo of sks coffee cup",
                   "astronaut": "a photo of sks astronaut", "rocket": "a photo of sks rocket"}
LORA_FILES = {"peft": "pytorch_lora_weights.safetensors", "kohya": "pytorch_lora_weights_kohya.safetensors"}
DIGITS_PREFIX = "builtin:digits-"
DEFAULT_INSTANCE_DATA = DIGITS_PREFIX + "bold"
#: torchvision.transforms.InterpolationMode names, as diffusers' --image_interpolation_mode
INTERPOLATION_MODES = ["nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]


class InputError(ValueError):
    """A bad flag or input file, reported before any training."""


def _model_args(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default="builtin:digits",
                   help="hub id, local save_pretrained folder, builtin:digits (offline, trained on sklearn digits; the "
                        "default) or builtin:tiny-sd (offline, RANDOM weights)")
    g.add_argument("--revision", default=None, help="hub revision of the model")
    g.add_argument("--variant", default=None, help="weight variant, e.g. fp16")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer name or path if not the model's")

    g = p.add_argument_group("adapter")
    g.add_argument("--adapter", default="spectral_a", choices=sv.available_methods() + list(BASELINES),
                   help="spectral method (spectral_a, spectral_r, svdiff, lorsa, speclora) or a PEFT baseline")
    g.add_argument("--rank", type=int, default=4, help="singular triplets per layer (LoRA rank for baselines)")
    g.add_argument("--alpha", type=float, default=None,
                   help="adapter strength (spectral: SpectralConfig.alpha, default 1; LoRA: lora_alpha, default rank)")
    g.add_argument("--band", default="auto",
                   help="singular band N (columns [N*rank, (N+1)*rank)) or 'auto': the next band that no concept "
                        "registered in --concepts_dir uses (allocated under the registry's lock at start)")
    g.add_argument("--concepts_dir", default=None,
                   help="folder with the band registry bands.json (default: the parent of --output_dir)")
    g.add_argument("--concept_name", default=None,
                   help="name in the registry and adapter name (default: basename of --output_dir)")
    g.add_argument("--no_register", action="store_true", help="do not record the concept in bands.json")
    g.add_argument("--target_modules", default="sd_unet", help="UNet layers: preset name, regex or comma list")
    g.add_argument("--text_encoder_target_modules", default="clip_text", help="text encoder layers (same syntax)")
    g.add_argument("--adapter_options", default="{}", help="JSON dict of method options (SpectralConfig.options)")
    g.add_argument("--svd", default="auto", choices=["auto", "exact", "randomized"], help="decomposition algorithm")


def _data_args(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", default=DEFAULT_INSTANCE_DATA,
                   help="folder of instance images; builtin:digits-<concept> (held-out digits of builtin:digits "
                        "transformed by a concept of training/digit_concepts.py, captioned per image, with a "
                        f"captioned class set; the default) or builtin:<photo> ({', '.join(SKIMAGE_PHOTOS)}: photos "
                        "shipped by scikit-image)")
    g.add_argument("--instance_prompt", default=None,
                   help="prompt with the identifier of the instance, for images without a caption of their own "
                        "(required unless every image has one or the data is builtin)")
    g.add_argument("--caption_column", default="text",
                   help="per-image captions: this column of the folder's metadata.jsonl (the `datasets` imagefolder "
                        "layout, rows {\"file_name\": ..., \"<column>\": ...}), else <image>.txt beside the image, "
                        "else --instance_prompt / --class_prompt; 'none': one prompt for all images")
    g.add_argument("--class_prompt_column", default="class_prompt",
                   help="column of the instance metadata.jsonl with each image's class prompt (prior preservation: "
                        "class images are generated for these prompts)")
    g.add_argument("--class_data_dir", default=None,
                   help="folder of class images (generated when missing; builtin:digits-<concept> brings its own)")
    g.add_argument("--class_prompt", default=None,
                   help="prompt of the class, for prior preservation (class images without a caption)")
    g.add_argument("--resolution", type=int, default=None,
                   help="training image size (default: the model's native size: 512 for SD 1.5, 32 for the built-ins)")
    g.add_argument("--center_crop", action="store_true", help="center crop instead of random crop")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flips")
    g.add_argument("--image_interpolation_mode", default="bilinear", choices=INTERPOLATION_MODES,
                   help="resize filter (torchvision InterpolationMode)")
    g.add_argument("--tokenizer_max_length", type=int, default=None, help="default: the tokenizer's")
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true", help="add the prior preservation loss")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--num_class_images", type=int, default=100,
                   help="minimal number of class images; missing ones are sampled with --class_prompt")
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for sampling class images")
    g.add_argument("--class_inference_steps", type=int, default=50, help="denoising steps per class image")
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"])


def _training_args(p) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="spectral-dreambooth-model")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="train into an --output_dir that holds a different run (its checkpoints are deleted)")
    g.add_argument("--seed", type=int, default=None, help="seed of the whole run (default: drawn, then recorded)")
    g.add_argument("--train_text_encoder", action="store_true", help="also adapt the CLIP text encoder")
    g.add_argument("--pre_compute_text_embeddings", action="store_true",
                   help="encode every caption once before training and keep the text encoder off the device")
    g.add_argument("--text_encoder_use_attention_mask", action="store_true",
                   help="pass the tokenizer's attention mask to the text encoder")
    g.add_argument("--train_batch_size", type=int, default=4, help="batch size per device")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=5e-4)
    g.add_argument("--text_encoder_lr", type=float, default=5e-6, help="learning rate of the text encoder adapter")
    g.add_argument("--scale_lr", action="store_true", help="scale lr by GPUs x accumulation x batch size")
    g.add_argument("--lr_scheduler", default="constant", choices=[t.value for t in SchedulerType],
                   help="learning-rate schedule (diffusers.optimization.get_scheduler)")
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--lr_num_cycles", type=int, default=1)
    g.add_argument("--lr_power", type=float, default=1.0)
    g.add_argument("--snr_gamma", type=float, default=None, help="min-SNR loss weighting (5.0 recommended)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--set_grads_to_none", action="store_true",
                   help="accepted for diffusers compatibility: gradients are always set to None after a step")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="use xformers if installed on a GPU; otherwise PyTorch's SDPA (already the default) is used")

    g = p.add_argument_group("optimizer")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (needs bitsandbytes)")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-08)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="frozen weights in this dtype, adapter weights stay fp32 (default: accelerate config)")


def _output_args(p) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a checkpoint every N updates")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder, or "latest"')

    g = p.add_argument_group("validation and logging")
    g.add_argument("--validation_prompt", default=None,
                   help="prompt(s) sampled during and after training, '|'-separated (builtin:digits-<concept>: "
                        "default one per digit 0-9 with the concept's token)")
    g.add_argument("--num_validation_images", type=int, default=None,
                   help="images per validation prompt (default 4 for one prompt, 1 for several)")
    g.add_argument("--validation_epochs", type=int, default=50)
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none"')
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--lora_export", nargs="*", default=["peft", "kohya"], choices=sorted(LORA_FILES),
                   help="LoRA files written next to the adapter (exact)")

    g = p.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true", help="upload --output_dir to the Hugging Face Hub at the end "
                   "(checked before training: fails at once when offline)")
    g.add_argument("--hub_model_id", default=None, help="repository id (default: the --output_dir name)")
    g.add_argument("--hub_token", default=None, help="Hub token (default: the one `huggingface-cli login` saved)")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse and check the command line (``argv=None``: ``sys.argv``); exits with a usage error on bad input."""
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_model_args, _data_args, _training_args, _output_args):
        add(p)
    args = p.parse_args(argv)
    try:
        check_args(args)
    except InputError as e:
        p.error(str(e))
    return args


def _check_numbers(args) -> None:
    positive = ["rank", "train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                "validation_epochs", "sample_batch_size", "validation_inference_steps"]
    for name in positive + ["max_train_steps", "checkpoints_total_limit", "resolution", "num_validation_images"]:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise InputError(f"--{name} must be >= 1, got {v}")
    for name in ("learning_rate", "text_encoder_lr", "adam_epsilon"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            raise InputError(f"--{name} must be a finite number > 0, got {v}")
    for name in ("max_grad_norm", "prior_loss_weight", "adam_weight_decay", "lr_power"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 0):
            raise InputError(f"--{name} must be a finite number >= 0, got {v}")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(args, name)
        if not 0 <= v < 1:
            raise InputError(f"--{name} must be in [0, 1), got {v}")
    if args.alpha is not None and not math.isfinite(args.alpha):
        raise InputError(f"--alpha must be finite, got {args.alpha}")
    if args.snr_gamma is not None and not (math.isfinite(args.snr_gamma) and args.snr_gamma > 0):
        raise InputError(f"--snr_gamma must be a finite number > 0, got {args.snr_gamma}")


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations (diffusers' checks plus ours); raises :class:`InputError`."""
    _check_numbers(args)
    if args.band != "auto" and not args.band.isdigit():
        raise InputError(f"--band must be a non-negative integer or 'auto', got {args.band!r}")
    if args.with_prior_preservation and args.class_data_dir is None \
            and not args.instance_data_dir.startswith(DIGITS_PREFIX):  # builtin digit sets bring a class set
        raise InputError("--with_prior_preservation needs --class_data_dir (and --class_prompt or captions)")
    if not args.with_prior_preservation and (args.class_data_dir is not None or args.class_prompt is not None):
        warnings.warn("--class_data_dir/--class_prompt are only used with --with_prior_preservation")
    if args.caption_column.lower() == "none":
        args.caption_column = None
    if args.instance_prompt is None:  # builtin photos have one; folders may caption every image
        photo = args.instance_data_dir.split(":", 1)[1] if args.instance_data_dir.startswith("builtin:") else None
        args.instance_prompt = BUILTIN_PROMPTS.get(photo)
        if args.instance_prompt is None and args.caption_column is None:
            raise InputError("--instance_prompt is required (e.g. 'a photo of sks dog') with --caption_column none")
    if args.pre_compute_text_embeddings and args.train_text_encoder:
        raise InputError("--pre_compute_text_embeddings cannot be used with --train_text_encoder (the text encoder "
                         "changes during training)")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise InputError("--hub_token with --report_to wandb would expose the token in the logged config; use "
                         "`huggingface-cli login` instead")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        warnings.warn("--mixed_precision fp16 without a GPU: frozen weights run in float16 on the CPU (slow; "
                      "bf16 is the CPU choice). Adapter weights stay float32.")
    try:
        args.adapter_options = json.loads(args.adapter_options) if isinstance(args.adapter_options, str) \
            else dict(args.adapter_options)
    except json.JSONDecodeError as e:
        raise InputError(f"--adapter_options is not valid JSON: {e}") from None
    if is_peft_method(args.adapter):
        if args.adapter_options:
            raise InputError("--adapter_options is for spectral methods only")
        if args.band != "auto":
            warnings.warn(f"--band is ignored for the PEFT baseline {args.adapter!r} (it has no singular bands)")
    for name in ("target_modules", "text_encoder_target_modules"):  # "a,b" -> suffix list; presets/regex stay
        v = getattr(args, name)
        if isinstance(v, str) and "," in v:
            setattr(args, name, [t.strip() for t in v.split(",") if t.strip()])
