"""DreamBooth with spectral adapters, in short modules; ``training/dreambooth_spectral.py`` is the entry point.

=============  ====================================================================================
``args``       ``parse_args(argv=None)`` / ``check_args``: diffusers' DreamBooth-LoRA flags + spectral ones
``data``       inputs checked before any model loads: images, per-image captions, built-in sets
``dataset``    the dataset (image + own caption), replayable batch order, class-image generation
``models``     components, the adapter (named after the concept), checkpoint hooks, optimizer, loss
``runinfo``    the run's recorded config, output-folder and resume checks, the start summary
``loop``       ``setup`` / ``train`` / ``main``
``outputs``    validation grid, adapter + LoRA files, model card, band registration, Hub upload
=============  ====================================================================================
"""
from .args import BUILTIN_PROMPTS, IMAGE_EXTENSIONS, LORA_FILES, InputError, check_args, parse_args
from .data import captions_for, list_images, load_rgb, prepare_inputs, read_metadata
from .dataset import DreamBoothDataset, StepBatchSampler, collate_fn, generate_class_images, make_dataset, tokenize
from .loop import TrainingDiverged, main, setup, train
from .models import (add_adapters, adapter_hash, adapter_state, compute_loss, encode_prompt, load_models,
                     make_optimizer)
from .outputs import GRID, log_validation
from .runinfo import RUN_CONFIG, launch_warning

__all__ = ["parse_args", "check_args", "InputError", "LORA_FILES", "BUILTIN_PROMPTS", "IMAGE_EXTENSIONS",
           "prepare_inputs", "list_images", "load_rgb", "read_metadata", "captions_for", "DreamBoothDataset",
           "StepBatchSampler", "collate_fn", "generate_class_images", "make_dataset", "tokenize", "setup", "train",
           "main", "TrainingDiverged", "load_models", "add_adapters", "adapter_state", "adapter_hash", "compute_loss",
           "encode_prompt", "make_optimizer", "log_validation", "GRID", "RUN_CONFIG", "launch_warning"]
