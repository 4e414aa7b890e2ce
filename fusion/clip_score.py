"""CLIP quality metric of fused generations (open_clip).

* **image alignment** of concept ``c``: mean cosine similarity between the CLIP image embeddings
  of the generated images and of ``c``'s reference (instance) images (DreamBooth's "CLIP-I");
* **text alignment**: mean cosine similarity between each generated image and its prompt ("CLIP-T").

Scores are averaged over several seeds (mean and standard deviation reported). A real checkpoint
is loaded by open_clip name + pretrained tag (``"ViT-B-32", "openai"``: downloads once into the
open_clip cache), a ``hf-hub:`` id, or a local checkpoint file (``pretrained="/path/model.bin"``).
Custom architectures: pass ``config=`` a JSON model config (registered with
``open_clip.add_model_config``). The tokenizer is open_clip's, whose BPE vocabulary ships with
``open_clip_torch`` (no download).
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

__all__ = ["ClipScorer", "evaluate_generations"]


class ClipScorer:
    """Embeds images and texts with an open_clip model; all embeddings are L2-normalised."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: Optional[str] = "openai",
                 config: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu"):
        """Args:
            model_name: open_clip architecture name (``open_clip.list_models()``), ``hf-hub:org/repo``,
                or the stem of ``config``.
            pretrained: pretrained tag, local checkpoint path, or ``None`` for random weights (tests).
            config: optional JSON model config file for an architecture open_clip does not list.
        """
        import open_clip

        if config is not None:
            config = Path(config)
            tmp = Path(tempfile.mkdtemp(prefix="clip_cfg"))
            shutil.copy(config, tmp / f"{model_name}.json")  # open_clip names configs by file stem
            open_clip.add_model_config(tmp)
        self.device = torch.device(device)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                              device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.name = f"{model_name}:{pretrained}"

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        """``(n, d)`` normalised embeddings of PIL images."""
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)  # (n, 3, H, W)
        f = self.model.encode_image(x).float()
        return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """``(n, d)`` normalised embeddings of texts."""
        f = self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float()
        return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def image_alignment(self, generated: Sequence, references: Sequence) -> float:
        """Mean cosine similarity over all (generated, reference) pairs."""
        return float((self.image_features(generated) @ self.image_features(references).T).mean())

    def text_alignment(self, images: Sequence, prompt: str) -> float:
        """Mean cosine similarity of the images to ``prompt``."""
        return float((self.image_features(images) @ self.text_features([prompt]).T).mean())


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


@torch.no_grad()
def evaluate_generations(pipe, scorer: ClipScorer, prompt: str, references: dict[str, Sequence],
                         seeds: Sequence[int] = (0, 1, 2, 3), num_inference_steps: int = 25,
                         guidance_scale: float = 7.5, height: Optional[int] = None, width: Optional[int] = None,
                         progress: bool = True) -> dict:
    """Generate ``prompt`` once per seed with ``pipe`` and score it.

    Returns ``{"prompt", "clip_model", "text": stats, "image": {concept: stats}, "per_seed": [...],
    "images": [PIL]}`` where stats are ``{"mean", "std", "n"}`` over seeds.
    """
    per_seed, images = [], []
    for seed in tqdm(list(seeds), desc="CLIP score", disable=not progress):
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        im = pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                  width=width, generator=g, output_type="pil").images[0]
        images.append(im)
        row = {"seed": int(seed), "text": scorer.text_alignment([im], prompt),
               "image": {c: scorer.image_alignment([im], refs) for c, refs in references.items()}}
        per_seed.append(row)
    return {"prompt": prompt, "clip_model": scorer.name, "text": _stats([r["text"] for r in per_seed]),
            "image": {c: _stats([r["image"][c] for r in per_seed]) for c in references},
            "per_seed": per_seed, "images": images}
