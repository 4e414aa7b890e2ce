"""Tables, grid order and the concept-asset export of ``benchmarks/fusion_digits.py`` (results in, markdown out)."""
from __future__ import annotations

from pathlib import Path

from training import digit_concepts as dc


def strip(x):
    """Drop the image grids (kept for the PNG) from a result for JSON."""
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k != "grid"}
    return x


def export(args, folders: dict, solo_by: dict, bands: dict) -> None:
    """Copy each concept's adapter folders to ``DIR/<concept>/`` with a ``concept.json`` (token, prompts, recipe,
    band and the measured solo metrics) that :mod:`spectral_vision.assets.concepts` and the fusion tools read."""
    import shutil

    from spectral_vision.fileio import atomic_write_json

    for c, f in folders.items():
        dst = Path(args.export_assets) / c
        shutil.rmtree(dst, ignore_errors=True)
        for comp in ("unet", "text_encoder"):
            if (Path(f) / comp).is_dir():
                shutil.copytree(Path(f) / comp, dst / comp)
        x = solo_by[(args.export_method, c)]
        atomic_write_json(dst / "concept.json", {
            "concept": c, "token": dc.CONCEPTS[c].token, "instance_prompt": dc.concept_prompt([c]),
            "prompt_template": dc.concept_prompt([c], "{digit}"), "class_prompt": dc.concept_prompt([]),
            "method": args.export_method, "recipe": x["recipe"], "rank": args.rank, "band": bands[c],
            "base_model": args.pretrained_model_name_or_path, "measured": x["summary"],
            "measured_on": f"{args.samples_per_seed} samples x seeds {args.seeds}, benchmarks/fusion_digits.py"})


def _f(v, pct=True):
    return f"{100 * v:.1f} %" if pct else f"{v:.2f}"


def sweep_markdown(args, solo, chosen: dict) -> str:
    """The sweep table; ``chosen``: ``{(method, concept): recipe id}``."""
    lines = ["# Recipe sweep (solo concepts)\n", f"Measured on `{args.device}`: {args.samples_per_seed} samples per "
             f"cell x seeds {args.sweep_seeds}; recipe lr<UNet lr>_s<steps>_<te: text encoder at the same lr | "
             "te<lr> | unet: UNet only>[_conv: also the ResNet 3x3 convolutions]"
             f"; targets: concept-prompt accuracy >= 90 %, plain >= 97 %, shift >= 0.80 of the real concept's.\n",
             "| method | recipe | concept | acc. concept prompts | acc. plain prompts | shift / real | train s |",
             "|---|---|---|---|---|---|---|"]
    for x in sorted(solo, key=lambda x: (x["method"], x["recipe"], x["concept"])):
        sm = x["summary"]
        pick = x["recipe"] == chosen[x["method"], x["concept"]]
        lines.append(f"| {x['method']} | {x['recipe']}{' (chosen)' if pick else ''}"
                     f" | {x['concept']} | {_f(sm['acc_concept'])} | {_f(sm['acc_plain'])} | {_f(sm['shift_ratio'], 0)}"
                     f" | {x['train_seconds']} |")
    return "\n".join(lines) + "\n"


def markdown(args, res) -> str:
    n = args.samples_per_seed * len(args.seeds)
    head = (f"# Concepts and fusion on builtin:digits\n\nMeasured on `{res['device']}`: {n} samples per cell "
            f"({args.samples_per_seed} per seed, seeds {args.seeds}, digits 0-9 equally), guidance "
            f"{args.guidance_scale}, {args.num_inference_steps} DPM-Solver steps; rank {args.rank}, concept i on "
            f"band i; the recipe of each concept is in its row. Base digit accuracy (plain prompts): "
            f"{_f(res['base']['plain']['accuracy'])}. Real concept shifts (held-out digits, transformed - plain): "
            + ", ".join(f"{c} {v:+.2f}" for c, v in res["real_shift"].items()) + f". Total {res['total_seconds']} s."
            "\n\n## Single concepts (targets: >= 90 %, >= 97 %, shift >= 0.80 x real)\n\n"
            "| method | concept | recipe | acc. concept prompts | acc. plain prompts | shift (real) | shift / real | "
            "leak on plain prompts | meets |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for x in res["solo"]:
        sm = x["summary"]
        rows.append(f"| {x['method']} | {x['concept']} | {x['recipe']} | {_f(sm['acc_concept'])} | {_f(sm['acc_plain'])} | "
                    f"{sm['shift']:+.2f} ({res['real_shift'][x['concept']]:+.2f}) | {_f(sm['shift_ratio'], 0)} | "
                    f"{_f(sm['leak_plain'], 0)} | {'yes' if sm['margin'] >= 1 else 'no'} |")
    fz = ["\n\n## Fusion (all-token prompts; targets: accuracy >= 85 %, each concept keeps >= 0.80 of its solo "
          "shift)\n\nkept = the concept's shift in the fused model / its solo shift. A real combination changes the "
          "signatures too (shearing a dilated stroke thins it), so the brackets give what REAL combined digits keep "
          "of each real shift, and 'of real' = kept / that: the share of what a perfect fusion would keep. 'meets': "
          "the targets on kept as written; 'meets of real': on 'of real'.\n\n| method | mode | concepts | "
          "digit acc. | kept per concept (real) | of real | acc. plain prompts | fusion s | meets | meets of real "
          "|\n|---|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(res["fused"], key=lambda f: (f["set"].count("+"), f["set"], f["method"], f["mode"])):
        fz.append(f"| {f['method']} | {f['mode']} | {f['set']} | {_f(f['all_tokens']['accuracy'])} | "
                  + ", ".join(f"{c} {v:.2f} ({f['real_kept'][c]:.2f})" for c, v in f["kept"].items()) + " | "
                  + ", ".join(f"{v:.2f}" for v in f["kept_vs_real"].values())
                  + f" | {_f(f['plain_prompt']['accuracy'])} | {f['fusion_seconds']:.2f} | "
                    f"{'yes' if f['meets'] else 'no'} | {'yes' if f['meets_vs_real'] else 'no'} |")
    last = max(res["fused"], key=lambda f: f["set"].count("+"))["set"] if res["fused"] else ""
    order = [f"{f['method']} {f['mode']}" for f in res["fused"] if f["set"] == last]
    grid = ("\n\nGrid `fusion_digits.png` (columns: digits 0-9; rows top to bottom): the base (plain prompts); "
            "the solo concepts on their own token: " + ", ".join(f"{m} {c}" for m in args.methods for c in args.concepts)
            + f"; then {last} fused (all tokens): " + ", ".join(order) + ".\n")
    return head + "\n".join(rows) + "\n".join(fz) + grid
