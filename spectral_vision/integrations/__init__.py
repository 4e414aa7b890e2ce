"""Integrations with other libraries: real model loading (hub ids and local folders) and offline built-ins.

    diffusers.py   load_pipeline / resolve_pretrained (Stable Diffusion 1.x/2.x, ``builtin:tiny-sd``),
                   bundled_instance_images (real photos shipped by scikit-image)

Submodules are imported lazily so that ``import spectral_vision`` never pulls in diffusers.
"""
