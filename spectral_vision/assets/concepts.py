"""Built-in concept adapters for ``builtin:digits``: small, trained, on disjoint singular bands.

Each ``assets/concepts/<name>/`` is a concept folder as ``training/dreambooth_spectral.py`` writes it
(``unet/`` and, when the text encoder was adapted, ``text_encoder/``: ``adapter_config.json`` +
``adapter_model.safetensors``, spectral_vision's adapter format) plus ``concept.json``: the concept's
token, its prompts (``prompt_template``: ``"a handwritten digit {digit} <token>"``), the method, rank, band,
recipe and the solo metrics measured when it was trained.

How they were trained (``benchmarks/fusion_digits.py --sweep --export_assets ...``, on one GPU):

* data: ``training/digit_concepts.write_instance_set(name, folder)``: 20 held-out digits per class (never
  seen by the base) transformed by the concept (``bold``: grey dilation, ``slant``: shear 0.45, ``invert``:
  dark ink on a light page), each captioned with its digit (``"a handwritten digit 7 <token>"``); prior
  preservation with the same digits untransformed (``"a handwritten digit 7"``);
* the token of each concept: the candidates that lower the base's digit accuracy least when appended with
  no adapter (``benchmarks/results/concept_token.md``);
* ``--adapter spectral_a --rank 4 --band i`` (concept ``i`` on singular columns ``[4i, 4i+4)`` of every
  adapted layer, so the three fuse in ``spectral`` mode with no overlap), min-SNR 5, batch 8 + 8 prior
  images, AdamW; the learning rate, steps and whether the text encoder is adapted were picked by the
  sweep (recorded per concept in ``concept.json``, table in ``benchmarks/results/fusion_digits_sweep.md``).

    from spectral_vision.assets.concepts import builtin_concepts, concept_info
    folders = builtin_concepts()            # {"bold": Path(...), "invert": Path(...), "slant": Path(...)}
    fusion.pipeline.fuse_pipeline(pipe, list(folders.values()), mode="spectral", names=list(folders))
    concept_info("bold")["prompt_template"].format(digit=7)   # "a handwritten digit 7 <token>"
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["CONCEPTS_DIR", "builtin_concepts", "concept_info"]

CONCEPTS_DIR = Path(__file__).with_name("concepts")


def builtin_concepts() -> dict[str, Path]:
    """``{name: concept folder}`` of the shipped concepts, sorted by name (empty if none are installed)."""
    if not CONCEPTS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(CONCEPTS_DIR.iterdir()) if (p / "concept.json").is_file()}


def concept_info(name: str) -> dict:
    """The concept's ``concept.json``: ``token``, ``instance_prompt``, ``prompt_template``, ``method``, ``rank``,
    ``band``, ``recipe`` and ``measured`` (its solo metrics)."""
    folders = builtin_concepts()
    if name not in folders:
        raise KeyError(f"no built-in concept {name!r}; available: {sorted(folders)}")
    return json.loads((folders[name] / "concept.json").read_text())
