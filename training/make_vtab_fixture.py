"""Write a VTAB-1k-format folder from real images shipped inside Python packages (no download).

Sources: scikit-learn's handwritten digits (8x8, 10 classes; used for svhn and the structured tasks)
and scikit-image's bundled photos and textures (astronaut, coffee, brick, grass, ...; one class per
photo, random crops; used for the natural and specialized tasks). Labels stay below each task's
class count, so the folder passes the same validation as the real release. It is NOT VTAB data:
a ``vtab_fixture.json`` marker at the root makes every result and report say so.

    python training/make_vtab_fixture.py --out data/vtab_fixture                      # 19 tasks, 800/200/1000
    python training/make_vtab_fixture.py --out /tmp/fx --tasks svhn dtd --small --size 32  # for tests
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from spectral_vision.fileio import atomic_write_json
from training.vtab_tasks import resolve_tasks

SMALL_SIZES = {"train800": 24, "val200": 12, "test": 24}
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "coins", "moon", "page",
          "hubble_deep_field", "immunohistochemistry", "text", "clock", "retina", "cell", "microaneurysms")


def _rgb(a: np.ndarray) -> np.ndarray:
    """Any skimage image -> (H, W, 3) uint8."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (255 * (a.astype(np.float64) / max(float(a.max()), 1e-8))).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    return a[:, :, :3]


def load_sources() -> dict[str, list[np.ndarray]]:
    """``{"digits": [10 lists of (8, 8) uint8], "photos": [(H, W, 3) uint8 per photo]}``."""
    import skimage.data
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8) in [0, 255]
    digits = [imgs[d.target == c] for c in range(10)]
    photos = [_rgb(getattr(skimage.data, n)()) for n in PHOTOS]
    return {"digits": digits, "photos": photos}


def _sample(src: dict, source: str, label: int, size: int, rng: np.random.Generator) -> Image.Image:
    if source == "digits":
        pool = src["digits"][label]
        a = pool[rng.integers(len(pool))]
        a = np.pad(a, 2)[(s := rng.integers(0, 5)):s + 8, (t := rng.integers(0, 5)):t + 8]  # jitter by <= 2 px
        return Image.fromarray(a).convert("RGB").resize((size, size), Image.BICUBIC)
    photo = src["photos"][label]
    h, w = photo.shape[:2]
    c = int(min(h, w) * rng.uniform(0.3, 0.7))
    y, x = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
    crop = photo[y:y + c, x:x + c]  # (c, c, 3)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC)


def make_fixture(out: str, tasks=("all",), small: bool = False, size: int = 64, test_size: int = 500,
                 seed: int = 0) -> dict:
    """Write the fixture under ``out``; returns the marker dict (also saved as ``out/vtab_fixture.json``)."""
    src = load_sources()
    sizes = dict(SMALL_SIZES) if small else {"train800": 800, "val200": 200, "test": test_size}
    written = {}
    for ti, task in enumerate(tqdm(resolve_tasks(tasks), desc="fixture tasks")):
        rng = np.random.default_rng([seed, ti])
        source = "digits" if task.name == "svhn" or task.group == "structured" else "photos"
        n_cls = min(task.num_classes, len(src[source]))
        lines = {}
        for split, n in sizes.items():
            os.makedirs(os.path.join(out, task.name, "images", split), exist_ok=True)
            labels = rng.permutation(np.arange(n) % n_cls)
            lines[split] = []
            for i, y in enumerate(labels):
                rel = f"images/{split}/{i:06d}.jpg"
                _sample(src, source, int(y), size, rng).save(os.path.join(out, task.name, rel), quality=95)
                lines[split].append(f"{rel} {int(y)}")
        lines["train800val200"] = lines["train800"] + lines["val200"]  # the union, as in the release
        for split, ls in lines.items():
            with open(os.path.join(out, task.name, f"{split}.txt"), "w") as f:
                f.write("\n".join(ls) + "\n")
        written[task.name] = {"source": source, "classes_used": n_cls, "sizes": {k: len(v) for k, v in lines.items()}}
    info = {"fixture": True, "small": small, "image_size": size, "seed": seed, "tasks": written,
            "note": "NOT VTAB data: images from scikit-learn digits / scikit-image photos, for tests and dry runs"}
    atomic_write_json(os.path.join(out, "vtab_fixture.json"), info)
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="folder to write <out>/<task>/{train800,val200,train800val200,test}.txt")
    g.add_argument("--tasks", nargs="+", default=["all"], help="task names, group names or 'all'")
    g = p.add_argument_group("size")
    g.add_argument("--small", action="store_true", help=f"reduced splits {SMALL_SIZES} (tests); marked in the folder")
    g.add_argument("--size", type=int, default=64, help="stored image side in pixels")
    g.add_argument("--test_size", type=int, default=500, help="test images per task (without --small)")
    g.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(args) -> dict:
    info = make_fixture(args.out, args.tasks, args.small, args.size, args.test_size, args.seed)
    print(f"wrote {len(info['tasks'])} fixture tasks to {args.out}; next: python training/vtab_sweep.py "
          f"--data_root {args.out} --tasks {' '.join(info['tasks'])} --model zoo:tiny-vit --image_size 32 ...")
    return info


if __name__ == "__main__":
    main(parse_args())
