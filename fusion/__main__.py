"""``python -m fusion``: fuse concept adapters into a Stable Diffusion pipeline.

Example (offline built-in base)::

    python -m fusion --base builtin:tiny-sd --adapters out/cat out/dog --mode spectral --weights 1 0.8 --out fused/

writes ``fused/`` (a merged pipeline folder, ``pipe.save_pretrained``; or with ``--format adapter`` one
fused spectral adapter per component in ``fused/unet`` and ``fused/text_encoder``), plus
``fusion_report.json``, ``interference.json`` and ``interference.png``, and prints the interference table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .fuse import MODES

__all__ = ["parse_args", "main"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusion", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--base", required=True, help="pipeline: hub id, local folder or builtin:tiny-sd")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)
    g.add_argument("--adapters", nargs="+", required=True, help="concept folders (one per concept)")
    g.add_argument("--names", nargs="+", default=None, help="concept names (default: folder names)")
    g.add_argument("--prompts", nargs="+", default=None,
                   help="one prompt per concept (default: instance_prompt from the concept files)")
    g = p.add_argument_group("fusion")
    g.add_argument("--mode", choices=MODES, default="spectral")
    g.add_argument("--weights", nargs="+", type=float, default=None, help="per-concept weight (default 1 each)")
    g.add_argument("--allow-overlap", action="store_true", help="fuse concepts whose bands overlap (spectral mode)")
    g.add_argument("--ridge", type=float, default=1e-3, help="least_squares ridge (relative)")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="recording: latent seeds per prompt")
    g.add_argument("--timesteps", nargs="+", type=int, default=[999, 500, 100], help="recording: UNet timesteps")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--format", choices=("pipeline", "adapter"), default="pipeline",
                   help="merged pipeline folder, or one fused spectral adapter per component (spectral mode)")
    g.add_argument("--no-metrics", action="store_true", help="skip the interference metrics")
    g.add_argument("--table-layers", type=int, default=12, help="layers shown in the printed table")
    args = p.parse_args(argv)
    if args.weights is not None and len(args.weights) != len(args.adapters):
        p.error(f"--weights has {len(args.weights)} values for {len(args.adapters)} adapters")
    if args.prompts is not None and len(args.prompts) != len(args.adapters):
        p.error(f"--prompts has {len(args.prompts)} values for {len(args.adapters)} adapters")
    if args.format == "adapter" and args.mode != "spectral":
        p.error("--format adapter is the exact composition of spectral mode; other modes write a merged pipeline")
    return args


def _write_json(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> dict:
    import spectral_vision as sv
    from spectral_vision.integrations.diffusers import load_pipeline

    from .compose import fused_adapter
    from .pipeline import COMPONENTS, concept_prompt, fuse_pipeline, load_pipeline_concepts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.base, revision=args.revision, variant=args.variant)
    saved = {}
    if args.format == "adapter":
        names = load_pipeline_concepts(pipe, args.adapters, args.names)
        for comp in COMPONENTS:
            model = getattr(pipe, comp)
            present = [n for n in names if n in sv.adapter_names(model)]
            if not present:
                continue
            w = None if args.weights is None else [args.weights[names.index(n)] for n in present]
            cfg = fused_adapter(model, present, w)
            saved[comp] = str(sv.save_adapter(model, out / comp, "fused", extra_metadata={
                "fusion": {"concepts": present, "weights": w or [1.0] * len(present), "sources": args.adapters}}))
            sv.detach(model, "fused")
            print(f"fused {comp} adapter: {cfg.method}, {len(present)} concepts -> {out / comp}")
        folders, names_arg = names, None  # already loaded: fuse by name for the metrics
        if args.prompts is None:
            found = [concept_prompt(f) for f in args.adapters]
            args.prompts = found if all(found) else None
    else:
        folders, names_arg = args.adapters, args.names
    res = fuse_pipeline(pipe, folders, args.weights, args.mode, names_arg, args.prompts, args.allow_overlap,
                        args.ridge, metrics=not args.no_metrics, seeds=args.seeds, timesteps=args.timesteps)
    if args.format == "pipeline":
        pipe.save_pretrained(str(out), safe_serialization=True)
        saved["pipeline"] = str(out)
    print(res.overlap.explain())
    print(f"mode {res.mode}: fused {len(res.concepts)} concepts {res.concepts} (weights {res.weights}) "
          f"in {res.seconds:.2f} s over {len(res.layers)} layers")
    if res.info.get("objective") is not None:
        print(f"least-squares objective {res.info['objective']:.4g} (naive sum: {res.info['objective_naive_sum']:.4g})")
    report = {"base": args.base, "mode": res.mode, "concepts": res.concepts, "weights": res.weights,
              "adapters": [str(a) for a in args.adapters], "seconds_fuse": res.seconds,
              "seconds_total": time.perf_counter() - t0, "layers": len(res.layers), "overlap_ok": res.overlap.ok,
              "info": {k: v for k, v in res.info.items()}, "outputs": saved}
    if res.metrics is not None:
        print(res.metrics.table(args.table_layers))
        report["interference_overall"] = res.metrics.overall
        res.metrics.save_json(out / "interference.json")
        res.metrics.plot(out / "interference.png")
    _write_json(out / "fusion_report.json", report)
    return report


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
