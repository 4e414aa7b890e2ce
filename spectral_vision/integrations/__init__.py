"""Integrations with other libraries: real model loading (hub ids and local folders) and offline built-ins.

    diffusers.py     load_pipeline / resolve_pretrained (Stable Diffusion 1.x/2.x, ``builtin:tiny-sd``,
                     ``builtin:digits``), bundled_instance_images (real photos shipped by scikit-image)
    timm.py          load_vit (hub id, .npz / .safetensors / .pth file, ``zoo:`` names) with a new head
    transformers.py  prepare_model_for_training, SpectralTrainer, save/load_pretrained (HF Trainer, accelerate)

open_clip needs no module of its own: use the ``open_clip`` preset (MLPs of both towers).

Submodules are imported lazily so that ``import spectral_vision`` never pulls in diffusers.
"""
