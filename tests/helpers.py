"""Helpers shared by the tests (``from helpers import perturb``; ``tests`` is on pytest's ``pythonpath``)."""
import hashlib
import os
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def perturb(model, std=0.05, seed=1):
    """Give every trainable adapter tensor a random non-zero value (so ΔW != 0), drawn on the CPU."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, device="cpu").to(p) * std)


def subprocess_env(**extra) -> dict:
    """``os.environ`` plus ``extra`` for a child process (a script run as ``python training/x.py``): this
    checkout's root first on ``PYTHONPATH``, so the child imports the ``training`` / ``spectral_vision`` under
    test whatever the environment has installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


# ---- DreamBooth (training/dreambooth_spectral.py) on the offline random-weight builtin:tiny-sd -------------------
DREAMBOOTH_SCRIPT = ROOT / "training" / "dreambooth_spectral.py"
# the random-weight tiny base (the script's default is the trained builtin:digits)
DB_BASE = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", "builtin:chelsea"]
# the same run everywhere (in process, killed + resumed, ...): text encoder too, accumulation, flips, warmup
DB_TRAIN = [*DB_BASE, "--max_train_steps", "10", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
            "--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--lr_scheduler", "linear",
            "--lr_warmup_steps", "2", "--seed", "0", "--band", "0", "--train_text_encoder", "--random_flip"]


def reset_accelerate():
    """Forget accelerate's process-wide state, so the next ``Accelerator`` in this process starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_dreambooth(argv):
    """``main(parse_args(DB_BASE + argv))`` in this process (a later ``--pretrained_model_name_or_path`` wins)."""
    from training import dreambooth_spectral as db

    reset_accelerate()
    try:
        return db.main(db.parse_args(DB_BASE + argv))
    finally:
        reset_accelerate()


def saved_adapter_hash(out: Path, components=("text_encoder", "unet")) -> str:
    """The script's ``adapter_hash`` recomputed from the saved adapter folders ``out/<component>``."""
    from safetensors.torch import load_file

    from spectral_vision.adapter_file import SIG_PREFIX

    h = hashlib.sha256()
    for comp in components:
        tensors = load_file(str(out / comp / "adapter_model.safetensors"))
        for k in sorted(tensors):
            if k.startswith(SIG_PREFIX):  # the basis signature beside the adapter's own tensors
                continue
            h.update(f"{comp}.{k}".encode())
            h.update(tensors[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- VTAB-1k (training/vtab_*.py) on the offline fixture (the ``vtab_root`` fixture in conftest.py) --------------
VTAB_TINY = ["--model", "zoo:tiny-vit", "--image_size", "32", "--num_workers", "0", "--warmup_epochs", "0"]


def rewrite_lines(path, fn):
    """Replace the lines of the text file ``path`` by ``fn(lines)``."""
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(fn(lines)) + "\n")


def copy_vtab_task(root, tmp_path, task="dtd", marker=True) -> str:
    """A new data root ``tmp_path/broken`` holding a copy of ``root``'s ``task`` (and the fixture marker, which
    allows the reduced splits, when ``marker``)."""
    dst = str(tmp_path / "broken")
    shutil.copytree(os.path.join(root, task), os.path.join(dst, task))
    if marker:
        shutil.copy(os.path.join(root, "vtab_fixture.json"), dst)
    return dst


def own_vtab_task(root, tmp_path, name, keep_classes=5) -> str:
    """A user's own task in the NOAH layout: the fixture's dtd images, labels folded to ``keep_classes``."""
    dst = copy_vtab_task(root, tmp_path, marker=False)
    if name != "dtd":
        os.rename(os.path.join(dst, "dtd"), os.path.join(dst, name))
    for split in ("train800", "val200", "train800val200", "test"):
        rewrite_lines(os.path.join(dst, name, f"{split}.txt"),
                      lambda ls: [f"{p} {int(y) % keep_classes}" for p, y in (line.rsplit(" ", 1) for line in ls)])
    return dst


# ---- fusion/ on tiny zoo models ----------------------------------------------------------------------------------
FUSION_CONCEPTS = ["c0", "c1", "c2"]


def fusion_concepts(model="tiny-clip-text", method="spectral_r", bands_=(0, 1, 2), rank=3, preset="clip_text",
                    std=0.3, alpha=1.0):
    """A tiny zoo model with one perturbed adapter per band, named ``FUSION_CONCEPTS[i]`` (all made active first,
    so all are perturbed)."""
    import spectral_vision as sv
    from spectral_vision.zoo import create_model

    m = create_model(model)
    for i, b in enumerate(bands_):
        sv.attach(m, sv.SpectralConfig(method=method, rank=rank, band=b, alpha=alpha, target_modules=preset),
                  FUSION_CONCEPTS[i], progress=False)
    sv.set_adapter(m, FUSION_CONCEPTS[: len(bands_)])
    perturb(m, std=std, seed=3)
    return m


def fusion_snapshot(m, names) -> dict:
    """Per layer name: the base ``W`` (out, in), the single-concept deltas ``d[name]`` (out, in) and their band
    columns ``cols[name]``."""
    import spectral_vision as sv

    out = {}
    for ln, layer in sv.spectral_layers(m):
        out[ln] = {"W": layer.weight_2d().clone(), "d": {n: layer.adapters[n].delta_weight().detach().clone()
                                                        for n in names if n in layer.adapters},
                   "cols": {n: layer.adapters[n].columns.tolist() for n in names if n in layer.adapters}}
    return out
