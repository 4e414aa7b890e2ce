"""The training data: images with their own captions, a replayable batch order, class-image generation."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from spectral_vision.fileio import atomic_write, atomic_write_text
from spectral_vision.integrations.diffusers import load_pipeline
from training.common import step_seed

from .data import METADATA, captions_for, list_images, load_rgb, read_metadata

Text = dict  # {"prompt_ids": (L,), "attention_mask": (L,)[, "prompt_embeds": (L, D)]}


class DreamBoothDataset(Dataset):
    """Instance images (and class images for prior preservation) with their tokenized captions.

    Items are fetched with a key ``(index, aug_seed)``: the crop and flip are drawn from
    ``torch.Generator().manual_seed(aug_seed)``, so an item is a pure function of its key. Returns
    ``{"instance_images": (3, size, size) in [-1, 1], "instance_prompt_ids": (L,), "instance_attention_mask": (L,),
    ["instance_prompt_embeds": (L, D)], ...class_*}``. ``instance_texts`` / ``class_texts``: one :data:`Text`
    for every image or a list with one per image.
    """

    def __init__(self, instance_images, instance_texts: Union[Text, list[Text]], size: int, center_crop=False,
                 random_flip=False, class_images=None, class_texts=None, interpolation: str = "bilinear"):
        self.instance_images, self.instance_texts = list(instance_images), instance_texts
        self.class_images, self.class_texts = list(class_images or []), class_texts
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.interpolation = TF.InterpolationMode(interpolation)

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def _load(self, path: Path, g: torch.Generator) -> torch.Tensor:
        image = TF.resize(load_rgb(path), self.size, interpolation=self.interpolation)  # short side = size
        w, h = image.size
        if self.center_crop:
            top, left = (h - self.size) // 2, (w - self.size) // 2
        else:
            top = int(torch.randint(0, h - self.size + 1, (1,), generator=g))
            left = int(torch.randint(0, w - self.size + 1, (1,), generator=g))
        image = TF.crop(image, top, left, self.size, self.size)
        if self.random_flip and torch.rand((), generator=g) < 0.5:
            image = TF.hflip(image)
        return TF.to_tensor(image) * 2.0 - 1.0  # (3, size, size) in [-1, 1]

    def __getitem__(self, key) -> dict:
        index, aug_seed = key
        g = torch.Generator().manual_seed(int(aug_seed))
        i = index % len(self.instance_images)
        ex = {"instance_images": self._load(self.instance_images[i], g)}
        ex.update({f"instance_{k}": v for k, v in _pick(self.instance_texts, i).items()})
        if self.class_images:
            j = index % len(self.class_images)
            ex["class_images"] = self._load(self.class_images[j], g)
            ex.update({f"class_{k}": v for k, v in _pick(self.class_texts, j).items()})
        return ex


def _pick(texts, i: int) -> Text:
    return texts[i] if isinstance(texts, (list, tuple)) else texts


def collate_fn(examples: list[dict]) -> dict:
    """Instance then class examples in one batch (one UNet pass): ``pixel_values (B', 3, H, W)``,
    ``input_ids (B', L)``, ``attention_mask (B', L)`` and, when precomputed, ``prompt_embeds (B', L, D)``."""
    parts = ["instance"] + (["class"] if "class_images" in examples[0] else [])
    batch = {"pixel_values": torch.stack([e[f"{p}_images"] for p in parts for e in examples]).contiguous().float()}
    for key, out in (("prompt_ids", "input_ids"), ("attention_mask", "attention_mask"),
                     ("prompt_embeds", "prompt_embeds")):
        if f"instance_{key}" in examples[0]:
            batch[out] = torch.stack([e[f"{p}_{key}"] for p in parts for e in examples])
    return batch


class StepBatchSampler:
    """Batches for micro-steps ``[start, stop)``: a pure function of ``(seed, micro-step, rank)``.

    Epoch ``e`` visits the dataset in the order ``randperm(n)`` seeded with ``step_seed(seed, e)``; a global
    batch of ``batch_size * num_processes`` positions is split between the processes (positions past the end
    wrap around, as accelerate's even batches do). Yields lists of ``(index, aug_seed)``.
    """

    def __init__(self, n: int, batch_size: int, num_processes: int, rank: int, seed: int, start: int, stop: int):
        self.n, self.bs, self.world, self.rank, self.seed = n, batch_size, num_processes, rank, seed
        self.start, self.stop = start, stop
        self.batches_per_epoch = math.ceil(n / (batch_size * num_processes))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self):
        perm, perm_epoch = None, -1
        for m in range(self.start, self.stop):
            epoch, j = divmod(m, self.batches_per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(step_seed(self.seed, epoch))
                perm, perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
            first = j * self.bs * self.world + self.rank * self.bs
            yield [(perm[(first + i) % self.n], step_seed(self.seed, epoch, first + i)) for i in range(self.bs)]


def tokenize(tokenizer, prompt: str, max_length: Optional[int] = None, mask: bool = False):
    """``(L,)`` token ids padded to ``max_length`` (default: the tokenizer's, 77 for CLIP); with ``mask``
    ``(ids, attention_mask)``."""
    enc = tokenizer(prompt, truncation=True, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                    return_tensors="pt")
    return (enc.input_ids[0], enc.attention_mask[0]) if mask else enc.input_ids[0]


def make_dataset(args, tokenizer, inputs, encode: Optional[Callable[[Text], torch.Tensor]] = None) -> DreamBoothDataset:
    """The dataset of a run: every image with its own caption tokenized once per distinct caption;
    ``encode(text) -> (L, D)`` (``--pre_compute_text_embeddings``) adds each caption's text-encoder output."""
    cache: dict[str, Text] = {}

    def texts(captions: list[str]) -> list[Text]:
        for c in captions:
            if c not in cache:
                ids, mask = tokenize(tokenizer, c, args.tokenizer_max_length, mask=True)
                cache[c] = {"prompt_ids": ids, "attention_mask": mask}
                if encode is not None:
                    cache[c]["prompt_embeds"] = encode(cache[c])
        return [cache[c] for c in captions]

    class_images = class_texts = None
    if args.with_prior_preservation:
        folder = Path(args.class_data_dir)
        class_images = list_images(folder, "class")[:args.num_class_images]
        class_texts = texts(captions_for(class_images, read_metadata(folder), folder, args.caption_column,
                                         args.class_prompt, "class", "--class_prompt"))
    return DreamBoothDataset(inputs.instance_images, texts(inputs.instance_captions), args.resolution,
                             args.center_crop, args.random_flip, class_images, class_texts,
                             args.image_interpolation_mode)


@torch.no_grad()
def generate_class_images(args, accelerator, prompts: Optional[list[str]] = None) -> None:
    """Sample ``--num_class_images`` minus the present ones (seeded per image). ``prompts``: per-image class
    prompts (cycled; their captions go to the folder's ``metadata.jsonl``), else ``--class_prompt``."""
    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    have = len(list_images(class_dir, "class"))
    if have >= args.num_class_images:
        return
    captioned, prompts = prompts is not None, prompts or [args.class_prompt]
    dtype = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.prior_generation_precision, torch.float16 if accelerator.device.type == "cuda" else torch.float32)
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, torch_dtype=dtype)
    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    todo, rows = list(range(have, args.num_class_images)), []
    with accelerator.split_between_processes(todo) as mine:
        chunks = [mine[i:i + args.sample_batch_size] for i in range(0, len(mine), args.sample_batch_size)]
        for chunk in tqdm(chunks, desc="Generating class images", disable=not accelerator.is_local_main_process):
            gens = [torch.Generator(accelerator.device).manual_seed(step_seed(args.seed, 7, i)) for i in chunk]
            texts = [prompts[i % len(prompts)] for i in chunk]
            images = pipe(texts, num_inference_steps=args.class_inference_steps,
                          height=args.resolution, width=args.resolution, generator=gens).images
            for i, text, image in zip(chunk, texts, images):
                name = f"{i}-{hashlib.sha1(image.tobytes()).hexdigest()}.jpg"
                atomic_write(class_dir / name, lambda tmp, im=image: im.save(tmp, format="JPEG"))
                rows.append({"file_name": name, args.caption_column or "text": text})
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    if accelerator.is_main_process and captioned and args.caption_column:
        old = list(read_metadata(class_dir).values())
        atomic_write_text(class_dir / METADATA, "".join(json.dumps(r) + "\n" for r in old + rows))
    accelerator.wait_for_everyone()
    del pipe
