"""``python -m fusion``: fuse concept adapters into a Stable Diffusion pipeline.

Example (offline built-in base)::

    python -m fusion --base builtin:digits --adapters out/bold out/slant --weights 1 0.8 --out fused/

writes ``fused/`` (a merged pipeline folder, ``pipe.save_pretrained``; or with ``--format adapter`` one
fused adapter per component in ``fused/unet`` and ``fused/text_encoder``), plus ``fusion_report.json``,
``interference.json`` and ``interference.png``, prints the interference table and how to load the result.
Exit status: 0 on success, 2 for bad input (nothing written), 1 for any other failure.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from .fuse import MODES

__all__ = ["parse_args", "main", "cli"]

MODE_HELP = ("spectral: W0 + sum of the concepts' deltas, bands must be disjoint (exact, keeps every singular "
             "value for ^R); lora_sum: the same sum without the band check (PEFT LoRA concepts too); mean: "
             "W0 + sum / N (official Spectral Adapter average); weighted: W0 + sum / sum(weights); least_squares: "
             "Mix-of-Show fusion in closed form on each concept's recorded layer inputs (needs its prompt)")


class _Help(argparse.HelpFormatter):
    """Adds "(default: X)" only where there is a default to show and the help does not mention it."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in h and action.option_strings:
            h += " (default: %(default)s)"
        return h


def _strength(text: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(w) or w < 0:
        raise argparse.ArgumentTypeError(f"weights must be finite and >= 0, got {text}")
    return w


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusion", description=__doc__.split("\n\n")[0], formatter_class=_Help)
    g = p.add_argument_group("inputs")
    g.add_argument("--base", required=True, help="base pipeline: builtin:digits, builtin:tiny-sd, a local folder "
                   "or a hub id")
    g.add_argument("--revision", help="hub revision of --base")
    g.add_argument("--variant", help="weights variant of --base (e.g. fp16)")
    g.add_argument("--adapters", nargs="+", required=True, help="concept folders (one per concept)")
    g.add_argument("--names", nargs="+", help="concept names (default: the folder names)")
    g.add_argument("--prompts", nargs="+", help="one prompt per concept (default: the instance prompt stored with "
                   "each concept); used by least_squares and the metrics")
    g = p.add_argument_group("fusion")
    g.add_argument("--mode", choices=MODES, default="spectral", help=MODE_HELP)
    g.add_argument("--weights", nargs="+", type=_strength, help="per-concept strength w >= 0, the same meaning in "
                   "every mode (default: 1 each)")
    g.add_argument("--allow-overlap", action="store_true", help="spectral mode: fuse concepts whose bands overlap")
    g.add_argument("--ridge", type=float, default=1e-3, help="least_squares ridge, relative to the inputs' energy")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="recording: latent seeds per prompt")
    g.add_argument("--timesteps", nargs="+", type=int, default=[999, 500, 100], help="recording: UNet timesteps")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--format", choices=("pipeline", "adapter"), default="pipeline",
                   help="pipeline: a merged pipeline folder (save_pretrained); adapter: the fused adapter of each "
                        "component (load it with spectral_vision.load_adapter)")
    g.add_argument("--no-metrics", action="store_true", help="skip the interference metrics")
    g.add_argument("--table-layers", type=int, default=12, help="layers shown in the printed table")
    args = p.parse_args(argv)
    for opt in ("weights", "names", "prompts"):
        v = getattr(args, opt)
        if v is not None and len(v) != len(args.adapters):
            p.error(f"--{opt} has {len(v)} values for {len(args.adapters)} adapters")
    if args.mode == "weighted" and args.weights is not None and sum(args.weights) == 0:
        p.error("--mode weighted needs --weights with a non-zero sum")
    if not math.isfinite(args.ridge) or args.ridge < 0:
        p.error(f"--ridge must be finite and >= 0, got {args.ridge}")
    return args


def main(args: argparse.Namespace) -> dict:
    """Fuse, write ``args.out`` and return the report (``fusion_report.json``)."""
    import spectral_vision as sv
    from spectral_vision.fileio import atomic_write_json
    from spectral_vision.integrations.diffusers import load_pipeline

    from .fuse import is_finite_model
    from .pipeline import COMPONENTS, fuse_pipeline

    out = Path(args.out)
    for a in args.adapters:  # up-front input check: one clear line before anything is loaded
        if not Path(a).is_dir():
            raise FileNotFoundError(f"concept folder {a} does not exist")
    t0 = time.perf_counter()
    pipe = load_pipeline(args.base, revision=args.revision, variant=args.variant)
    adapter = args.format == "adapter"
    res = fuse_pipeline(pipe, args.adapters, args.weights, args.mode, args.names, args.prompts, args.allow_overlap,
                        args.ridge, metrics=not args.no_metrics, unload=not adapter, seeds=args.seeds,
                        timesteps=args.timesteps)
    for comp in COMPONENTS:  # never write non-finite tensors
        if not is_finite_model(getattr(pipe, comp)):
            raise ValueError(f"the fused {comp} holds non-finite values: nothing written")
    out.mkdir(parents=True, exist_ok=True)
    saved = {}
    if adapter:
        for comp in COMPONENTS:
            model = getattr(pipe, comp)
            if res.adapter in sv.adapter_names(model):
                saved[comp] = str(sv.save_adapter(model, out / comp, res.adapter, extra_metadata={
                    "fusion": {"mode": res.mode, "concepts": res.concepts, "weights": res.weights,
                               "sources": [str(a) for a in args.adapters]}}))
        if not saved:
            raise ValueError("--format adapter saves spectral_vision adapters; these concepts are PEFT LoRA: "
                             "use --format pipeline")
    else:
        pipe.save_pretrained(str(out), safe_serialization=True)
        saved["pipeline"] = str(out)
    print(res.overlap.explain())
    print(f"mode {res.mode}: fused {len(res.concepts)} concepts {res.concepts} (strengths {res.weights}) "
          f"in {res.seconds:.2f} s over {len(res.layers)} layers, as one {res.info.get('fused_method')} adapter")
    if res.info.get("objective") is not None:
        print(f"least-squares objective {res.info['objective']:.4g} (naive sum: {res.info['objective_naive_sum']:.4g})")
    report = {"base": args.base, "mode": res.mode, "concepts": res.concepts, "weights": res.weights,
              "adapters": [str(a) for a in args.adapters], "seconds_fuse": res.seconds,
              "seconds_total": time.perf_counter() - t0, "layers": len(res.layers), "overlap_ok": res.overlap.ok,
              "info": dict(res.info), "outputs": saved}
    if res.metrics is not None:
        print(res.metrics.table(args.table_layers))
        report["interference_summary"] = res.metrics.explain().splitlines()
        report["interference_overall"] = res.metrics.overall
        res.metrics.save_json(out / "interference.json")
        res.metrics.plot(out / "interference.png")
    atomic_write_json(out / "fusion_report.json", report)
    print(f"\nwrote {out.resolve()}/: " + ", ".join(sorted(p.name for p in out.iterdir())))
    if adapter:
        print("load it:  pipe = spectral_vision.integrations.diffusers.load_pipeline(" + repr(args.base) + ")\n"
              + "".join(f"          spectral_vision.load_adapter(pipe.{c}, {str(out / c)!r})\n" for c in saved))
    else:
        print(f"load it:  diffusers.StableDiffusionPipeline.from_pretrained({str(out)!r})\n"
              f"open it in the demo:  python -m demos.fusion_app --model {out}")
    return report


def cli(argv=None) -> int:
    """Entry point: exit status 0 on success, 2 for bad input, 1 for any other failure (message on stderr)."""
    import spectral_vision as sv

    args = parse_args(argv)
    try:
        main(args)
    except (ValueError, FileNotFoundError, KeyError, sv.AdapterFileError) as e:  # bad input: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 (any other failure: still non-zero, with the traceback)
        import traceback

        traceback.print_exc()
        print(f"error: fusion failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
