"""Demo sessions: one shared frozen base per process, per-session adapters, cached fusions, bounded sessions.

* :class:`PipelineCache` loads each base pipeline once per process; it is never modified.
* A :class:`Session` works on a **structural copy** of the base's UNet and text encoder whose
  parameters and buffers *are* the base's tensors (no weight is copied: a session costs its module
  objects and its adapters, not a model). Adapters run in the delta form, the base weights are never
  merged into, so sessions cannot change what another session generates.
* Concepts are loaded with :func:`fusion.fuse.load_concepts` (all checks of ``load_adapter``); a
  fusion is a named adapter (:func:`fusion.add_fused_adapter`) cached per selection (concepts,
  strengths, mode), so one Generate fuses at most once, and a second click with the same selection not at all.
* :class:`demos.store.SessionStore` bounds the number of live sessions and expires idle ones.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

import spectral_vision as sv
from fusion.backends import backends
from fusion.bands import OverlapReport, find_overlaps
from fusion.fuse import MODES, FusionResult, add_fused_adapter, load_concepts
from fusion.pipeline import COMPONENTS, concept_parts, concept_prompt, diffusion_inputs
from fusion.record import activate

from .uploads import check_allowed, check_base, stage_upload
from .views import Concept, GenerateResult, for_display, rename_report

__all__ = ["AppConfig", "PipelineCache", "Session", "shared_copy", "MAX_CONCEPTS", "MODES"]

MAX_CONCEPTS = 6  # strength sliders in the UI
Progress = Callable[[float, str], None]


def _no_progress(frac: float, desc: str = "") -> None:
    pass


@dataclass
class AppConfig:
    """What the app may load and how much it may hold. ``concepts_dirs`` (+ uploads) bound every adapter path;
    ``model_dirs`` bound local base folders; ``preload`` are concept folders every new session starts with."""

    model: str
    concepts_dirs: list[Path]
    upload_dir: Path
    model_dirs: list[Path] = field(default_factory=list)
    preload: list[Path] = field(default_factory=list)
    max_seeds: int = 4
    max_steps: int = 100
    max_upload_bytes: int = 200 * 2 ** 20
    max_sessions: int = 16  # live sessions; the least recently used is closed beyond this
    session_ttl_s: float = 3600.0  # idle sessions are closed after this
    max_cached_fusions: int = 6  # fused adapters kept per session (one per selection)
    record_seeds: tuple = (0,)  # latent seeds / timesteps of the recorded inputs (interference metrics)
    record_timesteps: tuple = (999, 500, 100)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self):
        self.concepts_dirs = [Path(d).resolve() for d in self.concepts_dirs]
        self.upload_dir = Path(self.upload_dir).resolve()
        self.model_dirs = [Path(d).resolve() for d in self.model_dirs]
        self.preload = [Path(d).resolve() for d in self.preload]


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


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure whose parameters and buffers are ``module``'s own tensors (no weight is
    copied): wrappers and adapters attached to the copy leave ``module`` untouched."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


@dataclass
class _Fusion:
    adapter: str  # the fused adapter on the session's modules
    result: FusionResult
    keys: tuple  # the concept adapters it fuses


class Session:
    """One user's state: per-session adapters on a weight-sharing copy of the base's UNet and text encoder."""

    def __init__(self, config: AppConfig, cache: PipelineCache, base: Optional[str] = None):
        self.config, self.cache = config, cache
        self.id = uuid.uuid4().hex[:12]
        self.upload_dir = config.upload_dir / self.id
        self.lock = threading.RLock()
        self.concepts: dict[str, Concept] = {}
        self._counter = itertools.count()
        self.fusions: OrderedDict[tuple, _Fusion] = OrderedDict()
        self.last: Optional[tuple] = None  # selection of the last generation (spectrum)
        self.notes: list[str] = []
        self.set_base(base or config.model)

    @property
    def roots(self) -> list[Path]:
        return self.config.concepts_dirs + [self.upload_dir]

    def close(self) -> None:
        """Free this session's uploads and adapters."""
        shutil.rmtree(self.upload_dir, ignore_errors=True)
        self.fusions.clear()
        self.concepts.clear()
        self.work = None

    # ---- base -------------------------------------------------------------------------------------
    def set_base(self, name: str) -> None:
        """Switch to base ``name`` (loaded once per process); concepts are reloaded from ``config.preload``."""
        name = check_base(name, self.config.model, self.config.model_dirs)
        base = self.cache.get(name)
        with self.lock:
            self.base_name, self.base = name, base
            self.work = nn.ModuleDict({c: shared_copy(getattr(base, c)) for c in COMPONENTS})
            self.tokenizer = copy.deepcopy(base.tokenizer)  # fast tokenizers are not safe across threads
            self.concepts.clear()
            self.fusions.clear()
            self.last = None
            self.notes = []
            for folder in self.config.preload:
                try:
                    self.add_concept(folder)
                except (ValueError, FileNotFoundError) as e:  # e.g. a concept of another base
                    self.notes.append(f"built-in concept {folder.name} not loaded: {str(e).splitlines()[0]}")

    def pipeline(self):
        """A pipeline on this session's modules (shared read-only VAE, own scheduler state)."""
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
        """Validate and load a concept folder (inside the allowed folders)."""
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
        for f in [folder / "adapter_config.json"] + [folder / c / "adapter_config.json" for c in COMPONENTS]:
            try:
                f.is_file() and json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise sv.AdapterFileError(f"{f.relative_to(folder.parent)} is not a valid spectral_vision adapter "
                                          f"config (not JSON: {e})") from None
        parts = concept_parts(self.base, folder)
        if "lora_file" in parts:
            raise ValueError(f"{folder} holds only LoRA .safetensors files; the demo fuses spectral_vision adapter "
                             "folders (unet/, text_encoder/). For LoRA files use `python -m fusion --mode lora_sum`.")
        metas = {}
        for comp, p in parts.items():
            if '"peft_type"' in (p / "adapter_config.json").read_text(errors="replace"):
                raise ValueError(f"{p} is a PEFT adapter; the demo fuses spectral_vision adapters only "
                                 "(use `python -m fusion --mode lora_sum` for PEFT LoRA concepts)")
            metas[comp], _ = sv.read_adapter(p)  # AdapterFileError: corrupt / truncated / not an adapter
        key = f"c{next(self._counter)}:{name}"
        with self.lock:
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
            activate(self.work, [])
        return concept

    def add_upload(self, files: Sequence[Union[str, Path]], name: Optional[str] = None,
                   consume: bool = False) -> Concept:
        """:func:`demos.uploads.stage_upload` into this session's upload folder, then :meth:`add_concept`
        (staged files are deleted again when the concept is refused; ``consume`` deletes ``files``)."""
        folder = stage_upload(files, self.upload_dir, self.config.max_upload_bytes, name, consume=consume)
        try:
            return self.add_concept(folder, name or folder.name.rsplit("-", 1)[0])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def remove_concept(self, name: str) -> None:
        if name not in self.concepts:
            raise ValueError(f"no concept {name!r}; present: {list(self.concepts)}")
        with self.lock:
            c = self.concepts.pop(name)
            for sel in [s for s, f in self.fusions.items() if c.key in f.keys]:
                self._drop(sel)
            for comp in c.parts:
                sv.detach(self.work[comp], c.key)
            self.last = None

    def overlap(self) -> OverlapReport:
        """Layer-by-layer shared singular columns between the concepts."""
        return find_overlaps({n: c.columns for n, c in self.concepts.items()})

    # ---- fusions (cached per selection) ------------------------------------------------------------
    def _drop(self, sel: tuple) -> None:
        f = self.fusions.pop(sel)
        for b in backends(self.work):
            b.remove([f.adapter])

    def fusion(self, names: Sequence[str], weights: Sequence[float], mode: str, allow_overlap: bool = False,
               metrics: bool = False) -> _Fusion:
        """The fused adapter of this selection, made once (then cached; least recently used dropped)."""
        keys = tuple(self.concepts[n].key for n in names)
        sel = (keys, tuple(float(w) for w in weights), mode, bool(allow_overlap))
        with self.lock:
            f = self.fusions.get(sel)
            if f is not None and (f.result.metrics is not None or not metrics):
                self.fusions.move_to_end(sel)
                return f
            if f is not None:
                self._drop(sel)
            inputs = run = None
            prompts = [self.concepts[n].prompt for n in names]
            if (metrics or mode == "least_squares") and all(prompts):
                inputs, run = diffusion_inputs(self.pipeline(), {k: [p] for k, p in zip(keys, prompts)},
                                               seeds=self.config.record_seeds, timesteps=self.config.record_timesteps)
            elif mode == "least_squares":
                missing = [n for n, p in zip(names, prompts) if not p]
                raise ValueError(f"least_squares needs each concept's instance prompt; none found for {missing}")
            name = f"fused{next(self._counter)}"
            res = add_fused_adapter(self.work, list(keys), list(weights), mode, name, allow_overlap, inputs=inputs,
                                    run_fn=run, metrics=metrics, progress=False)
            while len(self.fusions) >= self.config.max_cached_fusions:
                self._drop(next(iter(self.fusions)))
            self.fusions[sel] = f = _Fusion(name, res, keys)
            return f

    def generate(self, prompt: str, seeds: Sequence[int], steps: int = 25, guidance: float = 7.5,
                 mode: str = "spectral", strengths: Optional[dict[str, float]] = None, allow_overlap: bool = False,
                 include_base: bool = True, progress: Progress = _no_progress) -> GenerateResult:
        """Sample the fusion of all concepts (``strengths`` per concept, default their current ones) with ``mode``,
        each concept alone at its strength (``W₀ + ΔWᵢ(wᵢ)``) and the base, for the same seeds."""
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
            progress(0.0, f"fusing {len(names)} concepts ({mode})")
            t1 = time.perf_counter()
            fused = self.fusion(names, weights, mode, allow_overlap, metrics=True)
            singles = [self.concepts[n].key if w == 1 else self.fusion([n], [w], "spectral").adapter
                       for n, w in zip(names, weights)]
            seconds_fusion = time.perf_counter() - t1
            runs = [(f"fused ({mode})", [fused.adapter])] + [
                (f"{n} alone (w={w:g})", [a]) for n, w, a in zip(names, weights, singles)]
            if include_base:
                runs.append(("base", []))
            pipe, images, total = self.pipeline(), [], len(runs) * len(seeds)
            for i, (label, active) in enumerate(runs):
                activate(self.work, active)
                col = []
                for j, s in enumerate(seeds):
                    progress((i * len(seeds) + j) / total, f"sampling {label}, seed {s}")
                    g = torch.Generator(self.config.device).manual_seed(int(s))
                    col.append(pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance),
                                    generator=g, height=self.resolution, width=self.resolution).images[0])
                images.append((label, col))
            activate(self.work, [fused.adapter])
            self.last = (tuple(names), tuple(weights), mode, bool(allow_overlap))
        progress(1.0, "done")
        gallery = [(for_display(col[i]), f"{label}, seed {s}") for i, s in enumerate(seeds) for label, col in images]
        report = rename_report(fused.result.metrics, {c.key: n for n, c in self.concepts.items()})
        layers = fused.result.layers
        if report is not None:
            layers = [n for n, _ in report.worst_layers()]
        return GenerateResult(gallery, len(images), mode, self.overlap(), report, layers, fused.result.seconds,
                              seconds_fusion, time.perf_counter() - t0)

    # ---- spectrum ----------------------------------------------------------------------------------
    @torch.no_grad()
    def spectrum(self, layer: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[int]]]:
        """``(σ before, σ after, {concept: band columns on this layer})`` of ``layer`` (e.g.
        ``"unet.down_blocks.0...to_q"``) for the last generation's fusion (the core's SVD of the 2-D weights)."""
        from fusion.backends import all_layers
        from spectral_vision.svd import decompose

        with self.lock:
            if self.last is None:
                raise ValueError("generate first: the spectrum is the one of the last fusion")
            names, weights, mode, allow = self.last
            f = self.fusion(names, weights, mode, allow)
            h = next((h for h, _ in all_layers(self.work, [f.adapter]) if h.name == layer), None)
            if h is None:
                raise ValueError(f"{layer!r} is not an adapted layer")
            W0 = h.base_2d()
            sv0 = decompose(W0, method="exact", cache=False).S  # (min(out, in),)
            sv1 = decompose(W0 + h.delta(f.adapter), method="exact", cache=False).S
            bands = {n: c.columns[layer] for n, c in self.concepts.items() if layer in c.columns}
        return sv0.cpu(), sv1.cpu(), bands
