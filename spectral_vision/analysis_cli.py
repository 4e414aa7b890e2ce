"""``spectral-analysis BASE TUNED``: the command line of :mod:`spectral_vision.analysis`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from torch import nn

from .analysis import _is_adapter_folder, analyze, save_report, summary_row
from .presets import PRESETS

# ---------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="spectral-analysis", description="Compare the spectra of a base and a tuned model, layer by layer.")
    io = p.add_argument_group("models")
    io.add_argument("base", help="base model: zoo:<name>, builtin:<name> (a pipeline, e.g. builtin:digits), "
                    "a .safetensors/.bin file or a model folder")
    io.add_argument("tuned", help="tuned model (same forms), an adapter folder applied to BASE and merged, or (with "
                    "a builtin: pipeline) a DreamBooth concept folder holding unet/ and text_encoder/ adapters")
    io.add_argument("--out", default="figs", help="output folder for analysis.json, analysis.csv, *.png (default: figs)")
    sel = p.add_argument_group("layers")
    sel.add_argument("--targets", default=None, help=f"preset ({', '.join(PRESETS)}) or regex of layer names (default: all layers)")
    sel.add_argument("--layers", nargs="*", default=None, help="layers shown in spectra.png (default: most changed)")
    st = p.add_argument_group("statistics")
    st.add_argument("--k", type=int, default=32, help="top singular pairs compared: cosines, σ change (default: 32)")
    st.add_argument("--fit-fraction", type=float, default=0.5, help="α fit over i = 1..ceil(f * min(out, in)) (default: 0.5)")
    st.add_argument("--max-sv", type=int, default=None, help="compute only the top singular values, for big layers (default: all)")
    st.add_argument("--no-figures", action="store_true", help="write JSON and CSV only")
    return p.parse_args(argv)


def _builtin_components(name: str) -> dict[str, nn.Module]:
    """``builtin:<name>`` (:mod:`spectral_vision.integrations.diffusers`) -> its weight-bearing pipeline components."""
    from .integrations.diffusers import load_pipeline

    pipe = load_pipeline(name)
    return {c: getattr(pipe, c) for c in ("unet", "text_encoder", "vae") if isinstance(getattr(pipe, c, None), nn.Module)}


def _analyze_pipeline(base: str, tuned: str, args) -> list[dict]:
    """A builtin pipeline against a concept folder (``unet/``, ``text_encoder/`` adapters), one adapter folder,
    another builtin, or a pipeline folder / state dict; layer names carry the component (``unet.<path>``)."""
    comps = _builtin_components(base)
    kw = dict(targets=args.targets, k=args.k, fit_fraction=args.fit_fraction, max_sv=args.max_sv)
    if str(tuned).startswith("builtin:"):
        other = _builtin_components(tuned)
        pairs = [(c, comps[c], other[c]) for c in comps if c in other]
    elif _is_adapter_folder(tuned):  # one adapter: the first component it loads onto
        errors = []
        for c in ("unet", "text_encoder"):
            try:
                return [dict(r, name=f"{c}.{r['name']}") for r in analyze(comps[c], tuned, **kw)]
            except ValueError as e:  # AdapterFileError is a ValueError
                errors.append(f"{c}: {str(e).splitlines()[0]}")
        raise ValueError(f"{tuned}: the adapter loads onto no component of {base} ({'; '.join(errors)})")
    elif Path(tuned).is_dir() and any(_is_adapter_folder(Path(tuned) / c) for c in comps):  # a concept folder
        pairs = [(c, comps[c], Path(tuned) / c) for c in comps if _is_adapter_folder(Path(tuned) / c)]
    else:
        return analyze(nn.ModuleDict(comps), tuned, **kw)
    records = []
    for c, b, t in pairs:
        try:
            records += [dict(r, name=f"{c}.{r['name']}") for r in analyze(b, t, **kw)]
        except ValueError as e:
            if "no layer of one name and shape" not in str(e):  # e.g. --targets sd_unet on the text encoder
                raise
    if not records:
        raise ValueError(f"no layer of {base} matches in {tuned} (targets: {args.targets or 'all'})")
    return records


def main(args: Optional[Union[argparse.Namespace, Sequence[str]]] = None) -> int:
    """The ``spectral-analysis`` command: 0 on success; on bad input one line on stderr and 1.

    In Python, :func:`analyze` returns the records and :func:`save_report` writes them.
    """
    args = args if isinstance(args, argparse.Namespace) else parse_args(args)
    try:
        if str(args.base).startswith("builtin:"):
            records = _analyze_pipeline(args.base, args.tuned, args)
        else:
            records = analyze(args.base, args.tuned, args.targets, args.k, args.fit_fraction, args.max_sv)
        paths = save_report(records, args.out, args.layers, figures=not args.no_figures)
    except (OSError, ValueError, KeyError) as e:  # missing files, wrong adapters, bad layer names
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"spectral-analysis: error: {msg}", file=sys.stderr)
        return 1
    changed = sorted(records, key=lambda r: -r["delta_rel_fro"])
    print(f"{len(records)} layers compared; most changed (‖ΔW‖/‖W‖, σ₁ change, mean |u·u'| top 4, α base→tuned):")
    for r in changed[:10]:
        print(f"  {r['name']:<60} {r['delta_rel_fro']:.3e}  {r['rel_change'][0]:+.3f}  "
              f"{summary_row(r)['mean_cos_u_top4']:.3f}  "
              f"{r['alpha_base']:.3f}→{r['alpha_tuned']:.3f}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
