"""The logic of the fusion demo (``demos/fusion_app.py``), as plain functions testable without a browser.

One :class:`Session` per browser session (kept in ``gr.State``):

* the **base pipeline** is loaded once per name into a process-wide :class:`PipelineCache` and is never
  modified; a session works on its own deep **copy** of the UNet and text encoder (plus its own
  tokenizer and scheduler), so fusing in one session cannot change what another session generates;
* concepts are concept folders as ``training/dreambooth_spectral.py`` writes them (``unet/`` and/or
  ``text_encoder/`` spectral_vision adapter folders, or one adapter folder); they are loaded onto the
  copy with :func:`fusion.fuse.load_concepts` (all checks of :func:`spectral_vision.load_adapter`: a
  corrupt file or an adapter of another base raises :class:`spectral_vision.AdapterFileError`);
* :func:`generate` fuses with :func:`fusion.fuse` (``unload=False``: the copy's wrappers stay, so
  ``sv.unmerge`` restores the base exactly) and samples the fused model, each concept alone at its
  strength, and the base, for the same seeds.

Every user mistake raises ``ValueError`` (or a subclass) with a message meant for the UI.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
import shutil
import tempfile
import threading
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

import spectral_vision as sv
from fusion.bands import find_overlaps, OverlapReport
from fusion.fuse import MODES, fuse, load_concepts
from fusion.pipeline import COMPONENTS, concept_parts, concept_prompt, diffusion_inputs

__all__ = ["AppConfig", "PipelineCache", "Session", "Concept", "GenerateResult", "default_model", "check_allowed",
           "check_base", "list_concept_folders", "stage_upload", "parse_seeds", "for_display", "MODES", "MAX_CONCEPTS"]

MAX_CONCEPTS = 6  # strength sliders in the UI
_SHORT = {"unet": "unet", "text_encoder": "text"}
Progress = Callable[[float, str], None]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _no_progress(frac: float, desc: str = "") -> None:
    pass


def default_model() -> str:
    """``builtin:digits`` (the trained offline base) when this install has it, else ``builtin:tiny-sd``."""
    from spectral_vision.integrations.diffusers import BUILTIN_PIPELINES

    try:
        from spectral_vision.assets import DIGITS_BASE
    except ImportError:
        return "builtin:tiny-sd"
    return "builtin:digits" if "builtin:digits" in BUILTIN_PIPELINES and DIGITS_BASE.exists() else "builtin:tiny-sd"


@dataclass
class AppConfig:
    """What the app may load: ``concepts_dirs`` (+ ``upload_dir``) bound every adapter path; ``model_dirs``
    bound local base folders (besides ``model`` itself, built-ins and hub ids)."""

    model: str
    concepts_dirs: list[Path]
    upload_dir: Path
    model_dirs: list[Path] = field(default_factory=list)
    max_seeds: int = 4
    max_steps: int = 100
    max_upload_bytes: int = 200 * 2 ** 20
    record_seeds: tuple = (0,)  # latent seeds / timesteps of the recorded inputs (interference metrics)
    record_timesteps: tuple = (999, 500, 100)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self):
        self.concepts_dirs = [Path(d).resolve() for d in self.concepts_dirs]
        self.upload_dir = Path(self.upload_dir).resolve()
        self.model_dirs = [Path(d).resolve() for d in self.model_dirs]

    @property
    def adapter_roots(self) -> list[Path]:
        return self.concepts_dirs + [self.upload_dir]


# ---- paths and inputs ---------------------------------------------------------------------------------------
def check_allowed(path: Union[str, Path], roots: Sequence[Path]) -> Path:
    """``path`` resolved (symlinks and ``..`` followed) if it lies inside one of ``roots``, else ``ValueError``."""
    p = Path(path).expanduser().resolve()
    if not any(p.is_relative_to(r) for r in roots):
        raise ValueError(f"{path} is outside the allowed adapter folders (--concepts_dir and this session's uploads)")
    return p


def check_base(name: str, config: AppConfig) -> str:
    """A base the app may load: built-ins, ``--model``, hub ids, or local folders inside ``model_dirs``."""
    name = name.strip()
    if name.startswith("builtin:"):
        from spectral_vision.integrations.diffusers import BUILTIN_PIPELINES

        if name not in BUILTIN_PIPELINES:
            raise ValueError(f"unknown built-in {name!r}; available: {sorted(BUILTIN_PIPELINES)}")
        return name
    if name == config.model:
        return name
    if Path(name).expanduser().exists() or not _HUB_ID.match(name):
        if not config.model_dirs:
            raise ValueError(f"{name!r}: local base folders are not allowed here (start the app with --model "
                             "PATH or --model_dirs)")
        return str(check_allowed(name, config.model_dirs))
    return name


def list_concept_folders(config: AppConfig) -> list[str]:
    """Concept folders (their direct ``unet/``, ``text_encoder/`` or own ``adapter_config.json``) in the
    concepts dirs, one level deep."""
    out = []
    for root in config.concepts_dirs:
        for d in sorted(p for p in root.glob("*") if p.is_dir()):
            if any((d / c / "adapter_config.json").exists() for c in ("", *COMPONENTS)):
                out.append(str(d))
    return out


def stage_upload(files: Sequence[Union[str, Path]], root: Path, max_bytes: int, name: Optional[str] = None) -> Path:
    """Copy uploaded files into a fresh folder under ``root``; returns the concept folder.

    Accepted: a ``.zip`` of a concept folder (extracted; members escaping the folder are refused), or an
    adapter's ``adapter_config.json`` + ``adapter_model.safetensors``. Nothing is validated here beyond the
    layout; loading does the rest.
    """
    files = [Path(f) for f in files or []]
    if not files:
        raise ValueError("no file uploaded")
    total = sum(f.stat().st_size for f in files)
    if total > max_bytes:
        raise ValueError(f"upload too large ({total / 2**20:.1f} MB > {max_bytes / 2**20:.0f} MB)")
    stem = re.sub(r"[^\w.-]", "_", name or (files[0].stem if files[0].suffix == ".zip" else "uploaded"))[:40]
    dest = Path(root) / f"{stem}-{uuid.uuid4().hex[:8]}"  # a fresh name: never overwrites
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        if len(files) == 1 and files[0].suffix == ".zip":
            _extract_zip(files[0], tmp, max_bytes)
            entries = list(tmp.iterdir())
            # a zip of the folder itself (cat/unet/...): its single top folder is the concept
            (entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp).rename(dest)
            return dest
        wanted = {"adapter_config.json", "adapter_model.safetensors"}
        got = {f.name: f for f in files}
        if set(got) != wanted:
            raise ValueError(f"upload a .zip of a concept folder, or exactly {sorted(wanted)} "
                             f"(got {[f.name for f in files]})")
        for n, f in got.items():
            shutil.copyfile(f, tmp / n)
        tmp.rename(dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _json(path: Path) -> Optional[dict]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _extract_zip(path: Path, dest: Path, max_bytes: int) -> None:
    dest = dest.resolve()
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            if sum(m.file_size for m in members) > max_bytes:
                raise ValueError(f"{path.name}: uncompressed content larger than {max_bytes / 2**20:.0f} MB")
            for m in members:
                target = (dest / m.filename).resolve()
                if target != dest and not target.is_relative_to(dest):
                    raise ValueError(f"{path.name}: member {m.filename!r} points outside the folder")
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path.name} is not a valid zip file: {e}") from None


def parse_seeds(text: str, max_seeds: int) -> list[int]:
    """``"0, 1 5"`` -> ``[0, 1, 5]`` (distinct non-negative ints, at most ``max_seeds``)."""
    try:
        seeds = [int(s) for s in re.split(r"[,\s]+", str(text).strip()) if s]
    except ValueError:
        raise ValueError(f"seeds must be integers separated by commas, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"give 1 to {max_seeds} distinct non-negative seeds, got {text!r}")
    if len(seeds) > max_seeds:
        raise ValueError(f"at most {max_seeds} seeds per run, got {len(seeds)}")
    return seeds


def for_display(img, min_size: int = 192):
    """Upscale a small PIL image (nearest neighbour, integer factor) so the browser shows its pixels."""
    from PIL import Image

    f = max(1, -(-min_size // max(img.size)))
    return img if f == 1 else img.resize((img.size[0] * f, img.size[1] * f), Image.NEAREST)


# ---- base pipelines -----------------------------------------------------------------------------------------
class PipelineCache:
    """Base pipelines by name, loaded once per process and shared read-only by all sessions."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._pipes: dict[str, object] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, name: str):
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._pipes:
                from spectral_vision.integrations.diffusers import load_pipeline

                try:
                    pipe = load_pipeline(name).to(self.device)
                except (OSError, EnvironmentError) as e:  # hub id unreachable, missing files
                    raise ValueError(f"cannot load base {name!r}: {str(e).splitlines()[0]}") from None
                pipe.set_progress_bar_config(disable=True)
                for m in (pipe.unet, pipe.text_encoder, pipe.vae):
                    m.requires_grad_(False).eval()
                self._pipes[name] = pipe
            return self._pipes[name]


# ---- concepts and sessions ---------------------------------------------------------------------------------
def _ranges(cols: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out = []
    for _, grp in itertools.groupby(enumerate(sorted(set(cols))), key=lambda t: t[1] - t[0]):
        g = [c for _, c in grp]
        out.append(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]))
    return ", ".join(out)


@dataclass
class Concept:
    """A concept loaded on a session's copy as adapter ``key`` (one per component in ``parts``)."""

    name: str
    key: str
    folder: Path
    parts: dict[str, Path]
    method: str
    rank: int
    columns: dict[str, list[int]]  # "<component>.<layer>" -> singular columns
    prompt: Optional[str]
    strength: float = 1.0

    @property
    def band(self) -> str:
        return _ranges([c for cols in self.columns.values() for c in cols])


@dataclass
class GenerateResult:
    gallery: list  # (PIL image, caption), row-major: per seed [fused, each concept alone, base]
    columns: int
    mode: str
    overlap: OverlapReport
    interference: Optional[object]  # fusion.metrics.InterferenceReport (concept names, not adapter keys)
    layers: list[str]  # fused layers, most interfering first
    seconds_fuse: float  # fusion.fuse's own time (least_squares: with its input recording)
    seconds_metrics: float  # recording the concepts' inputs + interference metrics
    seconds_total: float


class Session:
    """One user's state: a private copy of the base's UNet and text encoder with the concepts on it."""

    def __init__(self, config: AppConfig, cache: PipelineCache, base: Optional[str] = None):
        self.config, self.cache = config, cache
        self.id = uuid.uuid4().hex[:12]
        self.upload_dir = config.upload_dir / self.id
        self.lock = threading.RLock()
        self.concepts: dict[str, Concept] = {}
        self._counter = itertools.count()
        self.last: Optional[tuple] = None  # (names, weights, mode, allow_overlap) of the last generation
        self.fused: Optional[tuple] = None  # what the copy's weights hold now (None: the base)
        self.set_base(base or config.model)

    @property
    def roots(self) -> list[Path]:
        return self.config.concepts_dirs + [self.upload_dir]

    def close(self) -> None:
        """Free the uploads of this session (gr.State's delete_callback)."""
        shutil.rmtree(self.upload_dir, ignore_errors=True)

    # ---- base -------------------------------------------------------------------------------------
    def set_base(self, name: str) -> None:
        """Switch to base ``name`` (loaded once per process); the concepts are removed (they fit one base)."""
        name = check_base(name, self.config)
        base = self.cache.get(name)
        with self.lock:
            self.base_name, self.base = name, base
            self.work = nn.ModuleDict({c: copy.deepcopy(getattr(base, c)) for c in COMPONENTS})
            self.tokenizer = copy.deepcopy(base.tokenizer)  # fast tokenizers are not safe across threads
            self.concepts.clear()
            self.last = self.fused = None

    def pipeline(self):
        """A pipeline on this session's copies (shared read-only VAE, own scheduler state)."""
        from diffusers import StableDiffusionPipeline

        b = self.base
        scheduler = type(b.scheduler).from_config(b.scheduler.config)  # set_timesteps() mutates a scheduler
        pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=self.work["text_encoder"], tokenizer=self.tokenizer,
                                       unet=self.work["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def resolution(self) -> int:
        return self.base.unet.config.sample_size * self.base.vae_scale_factor

    # ---- concepts ---------------------------------------------------------------------------------
    def add_concept(self, folder: Union[str, Path], name: Optional[str] = None) -> Concept:
        """Validate and load a concept folder (inside the allowed folders) onto the copy."""
        folder = check_allowed(folder, self.roots)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        name = (name or folder.name).strip()
        if not re.fullmatch(r"[\w][\w .+-]{0,39}", name):
            raise ValueError(f"concept name {name!r}: use up to 40 letters, digits, spaces, '.', '+', '-' or '_'")
        if name in self.concepts or any(c.folder == folder for c in self.concepts.values()):
            raise ValueError(f"concept {name!r} ({folder}) is already added")
        if len(self.concepts) >= MAX_CONCEPTS:
            raise ValueError(f"at most {MAX_CONCEPTS} concepts; remove one first")
        for cfg_file in [folder / "adapter_config.json"] + [folder / c / "adapter_config.json" for c in COMPONENTS]:
            if cfg_file.exists() and _json(cfg_file) is None:
                raise sv.AdapterFileError(f"{cfg_file.relative_to(folder.parent)} is not valid JSON: not an adapter "
                                          "config (expected the adapter_config.json that save_adapter writes)")
        parts = concept_parts(self.base, folder)
        if "lora_file" in parts:
            raise ValueError(f"{folder} holds only LoRA .safetensors files; the demo fuses spectral_vision adapter "
                             "folders (unet/, text_encoder/). For LoRA files use `python -m fusion --mode lora_sum`.")
        metas = {}
        for comp, p in parts.items():
            if "peft_type" in (_json(p / "adapter_config.json") or {}):
                raise ValueError(f"{p} is a PEFT adapter; the demo fuses spectral_vision adapters only "
                                 "(use `python -m fusion --mode lora_sum` for PEFT LoRA concepts)")
            metas[comp], _ = sv.read_adapter(p)  # AdapterFileError: corrupt / truncated / not an adapter
        key = f"c{next(self._counter)}:{name}"
        with self.lock:
            self._reset()
            loaded = []
            try:
                for comp, p in parts.items():
                    load_concepts(self.work[comp], [p], [key])  # AdapterFileError: another base
                    loaded.append(comp)
            except BaseException:
                for comp in loaded:
                    sv.detach(self.work[comp], key)
                raise
            cfg = next(iter(metas.values()))["config"]
            cols = {f"{comp}.{ln}": layer.adapters[key].columns.tolist()
                    for comp in parts for ln, layer in sv.spectral_layers(self.work[comp]) if key in layer.adapters}
            concept = Concept(name, key, folder, dict(parts), cfg["method"], int(cfg["rank"]), cols,
                              concept_prompt(folder))
            self.concepts[name] = concept
        return concept

    def add_upload(self, files: Sequence[Union[str, Path]], name: Optional[str] = None) -> Concept:
        """:func:`stage_upload` into this session's upload folder, then :meth:`add_concept` (staged files are
        deleted again when the concept is refused)."""
        folder = stage_upload(files, self.upload_dir, self.config.max_upload_bytes, name)
        try:
            return self.add_concept(folder, name or folder.name.rsplit("-", 1)[0])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def remove_concept(self, name: str) -> None:
        if name not in self.concepts:
            raise ValueError(f"no concept {name!r}; present: {list(self.concepts)}")
        with self.lock:
            self._reset()
            c = self.concepts.pop(name)
            for comp in c.parts:
                sv.detach(self.work[comp], c.key)
            self.last = None

    def overlap(self) -> OverlapReport:
        """Layer-by-layer shared singular columns between the concepts."""
        return find_overlaps({n: c.columns for n, c in self.concepts.items()})

    def concept_rows(self) -> tuple[list[str], list[list]]:
        """``(headers, rows)`` of the concepts table, with the concepts each one overlaps."""
        rep = self.overlap()
        rows = []
        for n, c in self.concepts.items():
            clash = sorted({o.b if o.a == n else o.a for o in rep.overlaps if n in (o.a, o.b)})
            rows.append([n, c.method, c.rank, c.band, ", ".join(_SHORT.get(p, p) for p in c.parts), c.prompt or "",
                         ("overlaps " + ", ".join(clash)) if clash else "disjoint"])
        return ["concept", "method", "rank", "columns", "parts", "prompt", "bands"], rows

    # ---- fusion and sampling ------------------------------------------------------------------------
    def _reset(self) -> None:
        """Base weights back (exactly) and no adapter active: the copy computes the base model."""
        for m in self.work.values():
            sv.unmerge(m)
            if sv.adapter_names(m):
                sv.set_adapter(m, [])
        self.fused = None

    def _fuse(self, names: Sequence[str], weights: Sequence[float], mode: str, allow_overlap: bool,
              metrics: bool, pipe=None):
        """Fuse ``names`` into the copy's weights (adapters kept, see ``fusion.fuse(unload=False)``)."""
        self._reset()
        keys = [self.concepts[n].key for n in names]
        inputs = run = None
        prompts = [self.concepts[n].prompt for n in names]
        if (metrics or mode == "least_squares") and all(prompts):
            inputs, run = diffusion_inputs(pipe or self.pipeline(), {k: [p] for k, p in zip(keys, prompts)},
                                           seeds=self.config.record_seeds, timesteps=self.config.record_timesteps)
        elif mode == "least_squares":
            missing = [n for n, p in zip(names, prompts) if not p]
            raise ValueError(f"least_squares needs each concept's instance prompt; none found for {missing}")
        res = fuse(self.work, keys, weights, mode, allow_overlap, inputs=inputs, run_fn=run, metrics=metrics,
                   unload=False, progress=False)
        self.fused = (tuple(names), tuple(weights), mode, allow_overlap)
        return res

    def generate(self, prompt: str, seeds: Sequence[int], steps: int = 25, guidance: float = 7.5,
                 mode: str = "spectral", strengths: Optional[dict[str, float]] = None, allow_overlap: bool = False,
                 include_base: bool = True, progress: Progress = _no_progress) -> GenerateResult:
        """Fuse all concepts (``strengths`` per concept, default their current ones) with ``mode`` and sample
        it, each concept alone (spectral mode at its strength: ``W₀ + ΔWᵢ(wᵢ)``) and the base, per seed."""
        import time

        t0 = time.perf_counter()
        if not self.concepts:
            raise ValueError("add at least one concept first")
        if mode not in MODES:
            raise ValueError(f"unknown fusion mode {mode!r}; available: {list(MODES)}")
        if not str(prompt).strip():
            raise ValueError("write a prompt")
        if not 1 <= int(steps) <= self.config.max_steps:
            raise ValueError(f"steps must be in 1..{self.config.max_steps}, got {steps}")
        if not 0 <= float(guidance) <= 30:
            raise ValueError(f"guidance must be in 0..30, got {guidance}")
        seeds = list(seeds)
        if not seeds or len(seeds) > self.config.max_seeds:
            raise ValueError(f"give 1 to {self.config.max_seeds} seeds")
        with self.lock:
            for n, w in (strengths or {}).items():
                if n not in self.concepts:
                    raise ValueError(f"no concept {n!r}")
                self.concepts[n].strength = float(w)
            names = list(self.concepts)
            weights = [self.concepts[n].strength for n in names]
            pipe = self.pipeline()
            runs = len(seeds) * (len(names) + 1 + int(include_base))
            done = [0]

            def sample(label: str) -> list:
                out = []
                for s in seeds:
                    progress(done[0] / runs, f"sampling {label}, seed {s}")
                    g = torch.Generator(self.config.device).manual_seed(int(s))
                    out.append(pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance),
                                    generator=g, height=self.resolution, width=self.resolution).images[0])
                    done[0] += 1
                return out

            progress(0.0, f"fusing {len(names)} concepts ({mode})")
            t1 = time.perf_counter()
            res = self._fuse(names, weights, mode, allow_overlap, metrics=True, pipe=pipe)
            seconds_metrics = time.perf_counter() - t1 - res.seconds  # input recording + interference metrics
            columns = [(f"fused ({mode})", sample(f"fused ({mode})"))]
            self.last = self.fused
            for n, w in zip(names, weights):
                self._fuse([n], [w], "spectral", False, metrics=False)
                columns.append((f"{n} alone (w={w:g})", sample(f"{n} alone")))
            if include_base:
                self._reset()
                columns.append(("base", sample("base")))
            self._fuse(*self.last, metrics=False)  # leave the copy fused (spectrum plot)
        progress(1.0, "done")
        gallery = [(for_display(col[1][i]), f"{col[0]}, seed {s}") for i, s in enumerate(seeds) for col in columns]
        report = _rename_report(res.metrics, {c.key: n for n, c in self.concepts.items()})
        layers = res.layers
        if report is not None:
            layers = sorted(report.layers, key=lambda ln: -max(report.layers[ln]["own_change"].values(), default=0))
        return GenerateResult(gallery, len(columns), mode, self.overlap(), report, layers, res.seconds,
                              seconds_metrics, time.perf_counter() - t0)

    # ---- spectrum ----------------------------------------------------------------------------------
    @torch.no_grad()
    def spectrum(self, layer: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[int]]]:
        """``(σ before, σ after, {concept: band columns on this layer})`` of ``layer`` (a name such as
        ``"unet.down_blocks.0...to_q"``) for the last generation's fusion."""
        from spectral_vision.layers import SpectralLayer

        with self.lock:
            if self.last is None:
                raise ValueError("generate first: the spectrum is the one of the last fusion")
            if self.fused != self.last:
                self._fuse(*self.last, metrics=False)
            try:
                module = self.work.get_submodule(layer)
            except AttributeError:
                module = None
            if not isinstance(module, SpectralLayer):
                raise ValueError(f"{layer!r} is not an adapted layer")
            after = module.base_layer.weight.detach()
            before = module._original_weight if module._original_weight is not None else after
            # singular values do not depend on the (out, in) vs (in, out) layout of conv1d weights
            sv0 = torch.linalg.svdvals(before.reshape(before.shape[0], -1).float().cpu())  # (min(out, in),)
            sv1 = torch.linalg.svdvals(after.reshape(after.shape[0], -1).float().cpu())
            bands = {n: c.columns[layer] for n, c in self.concepts.items() if layer in c.columns}
        return sv0, sv1, bands


def _rename_report(report, names: dict[str, str]):
    """The interference report with adapter keys replaced by concept names."""
    if report is None:
        return None
    ren = lambda d: {names.get(k, k): v for k, v in d.items()}  # noqa: E731
    report.concepts = [names.get(c, c) for c in report.concepts]
    for d in list(report.layers.values()) + [report.overall]:
        for k in ("own_change", "own_dir_change"):
            if k in d:
                d[k] = ren(d[k])
        if "pairs" in d:
            d["pairs"] = {"|".join(names.get(x, x) for x in p.split("|", 1)): v for p, v in d["pairs"].items()}
    return report


def interference_rows(report, max_layers: int = 8) -> tuple[list[str], list[list]]:
    """``(headers, rows)``: the overall row, then the ``max_layers`` most interfering layers. Per concept the
    own-output change ``‖(fused − alone) X‖ / ‖ΔW X‖`` (0: fusion leaves the concept's layer output as alone)
    and the same projected on the concept's own output directions (see :mod:`fusion.metrics`)."""
    cs = report.concepts
    headers = ["layer", "col overlap", "row overlap", "min angle (deg)"] + [
        f"{c}: {k}" for c in cs for k in ("own change", "own-dir change")]

    def row(name, d):
        return [name, round(d["col_overlap"], 4), round(d["row_overlap"], 4), round(d["min_angle"], 2)] + [
            round(d[k].get(c, float("nan")), 4) for c in cs for k in ("own_change", "own_dir_change")]

    worst = sorted(report.layers.items(), key=lambda kv: -max(kv[1]["own_change"].values(), default=0))
    return headers, [row("OVERALL", report.overall)] + [row(n, d) for n, d in worst[:max_layers]]


def spectrum_figure(sv0: torch.Tensor, sv1: torch.Tensor, bands: dict[str, list[int]], layer: str, top: int = 48):
    """Figure: the first ``top`` singular values before/after fusion (:func:`spectral_vision.analysis.plot_spectrum`,
    index from 1) with each concept's band shaded, and their relative change. No pyplot (thread-safe)."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    from spectral_vision.analysis import plot_spectrum

    k = min(len(sv0), max(top, max((max(c) + 8 for c in bands.values() if c), default=0)))
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    a, b = fig.subplots(1, 2)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    x = torch.arange(1, k + 1)  # singular index i (from 1, as plot_spectrum)
    for j, (n, cols) in enumerate(bands.items()):
        for c in cols:
            for ax in (a, b):
                ax.axvspan(c + 0.5, c + 1.5, color=colors[(j + 2) % len(colors)], alpha=0.25,
                           label=f"band of {n}" if c == cols[0] and ax is a else None)
    plot_spectrum({"before (base)": sv0, "after fusion": sv1}, ax=a, top=k, loglog=False)
    a.set_yscale("log")
    a.legend(fontsize=7)
    rel = ((sv1[:k] - sv0[:k]) / sv0[:k].clamp_min(1e-12)).numpy()
    b.bar(x.numpy(), rel, color=colors[1])
    b.set_xlabel("index i")
    b.set_ylabel("relative change of σ_i")
    b.set_title(f"max |Δσ/σ| = {abs(rel).max():.2e}", fontsize=9)
    fig.suptitle(layer[-70:], fontsize=9)
    return fig
