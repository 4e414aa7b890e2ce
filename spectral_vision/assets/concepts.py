"""Built-in concept adapters for ``builtin:digits``: small (rank 4, < 300 kB), trained, on disjoint bands.

Each ``assets/concepts/<name>/`` is a concept folder as ``training/dreambooth_spectral.py`` writes it
(``unet/`` and, when the text encoder was adapted, ``text_encoder/``: ``adapter_config.json`` +
``adapter_model.safetensors``, spectral_vision's adapter format) plus ``concept.json``: the concept's
token, its prompts (``prompt_template``: ``"a handwritten digit {digit} <token>"``), the method, rank, band,
recipe and the solo metrics measured when it was trained.

Shipped: ``bold`` (band 0), ``slant`` (band 1) and ``faint`` (band 2). How they were trained
(``benchmarks/fusion_digits.py --methods spectral_a lora --concepts bold slant faint --export_assets ...``, on
the project's 2-core CPU):

* data: ``training/digit_concepts.write_instance_set(name, folder)``: 20 held-out digits per class (never
  seen by the base) transformed by the concept (``bold``: grey dilation radius 2, ``slant``: shear 0.45,
  ``faint``: ink x 0.5), each captioned with its digit (``"a handwritten digit 7 shill"``); prior preservation
  with the same digits untransformed (``"a handwritten digit 7"``);
* tokens ``shill`` (bold), ``olis`` (slant), ``spur`` (faint): alone and in every combination they leave the
  base's digit accuracy at 99-100 % with no adapter (``benchmarks/results/concept_token.md``);
* ``training/dreambooth_spectral.py --adapter spectral_a --rank 4 --band i`` (UNet only), min-SNR 5, batch
  8 + 8 prior images, AdamW, constant lr; bold: attention projections, lr 5e-4, 500 steps; slant and faint:
  attention projections and ResNet 3x3 convolutions (``--target_modules sd_unet_conv``), 1000 steps, lr 1e-3
  (slant) and 7e-4 (faint);
* measured (200 samples, 2 seeds; digit accuracy on its prompts, on plain prompts, share of the real shift):
  bold 97.5 %, 98.5 %, 1.07; slant 94.0 %, 99.0 %, 1.01; faint 95.0 %, 99.0 %, 0.91 (all meet the targets).
  Fused (spectral), all three: 90 % digit accuracy, but bold keeps 0.06, slant 0.15 and faint 0.38 of their
  solo shifts; bold+slant: 91.5 %, 0.50 and 0.39 (``benchmarks/results/fusion_digits.md``).

    from spectral_vision.assets.concepts import builtin_concepts, concept_info
    folders = builtin_concepts()            # {"bold": Path(...), "slant": Path(...), "faint": Path(...)}
    fusion.pipeline.fuse_pipeline(pipe, list(folders.values()), mode="spectral", names=list(folders))
    concept_info("bold")["prompt_template"].format(digit=7)   # "a handwritten digit 7 shill"
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["CONCEPTS_DIR", "builtin_concepts", "concept_info"]

CONCEPTS_DIR = Path(__file__).with_name("concepts")


def builtin_concepts() -> dict[str, Path]:
    """``{name: concept folder}`` of the shipped concepts in band order (band 0 first; empty if none are installed).
    The demo preloads the first two."""
    if not CONCEPTS_DIR.is_dir():
        return {}
    found = [p for p in sorted(CONCEPTS_DIR.iterdir()) if (p / "concept.json").is_file()]

    def band(p: Path) -> int:
        try:
            b = json.loads((p / "concept.json").read_text()).get("band")
        except (OSError, ValueError, AttributeError):
            b = None
        return b if isinstance(b, int) else 1 << 30

    return {p.name: p for p in sorted(found, key=band)}


def concept_info(name: str) -> dict:
    """The concept's ``concept.json``: ``token``, ``instance_prompt``, ``prompt_template``, ``method``, ``rank``,
    ``band``, ``recipe`` and ``measured`` (its solo metrics)."""
    folders = builtin_concepts()
    if name not in folders:
        raise KeyError(f"no built-in concept {name!r}; available: {sorted(folders)}")
    return json.loads((folders[name] / "concept.json").read_text())
