"""Gradio demo: fuse concept adapters trained on disjoint spectral bands, and generate.

    python -m demos.fusion_app                                  # builtin:digits + its built-in concepts
    python -m demos.fusion_app --model stable-diffusion-v1-5/stable-diffusion-v1-5 --concepts_dir out/

The UI only wires widgets to :mod:`demos.sessions` (state, fusion, sampling), :mod:`demos.uploads` (input
checks) and :mod:`demos.views` (tables, figures), all tested without a browser. The frozen base is loaded
once per process and shared by every session; the browser holds a session id; sessions are bounded and
expire when idle; the queue bounds how many generations run at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls

from .sessions import MAX_CONCEPTS, MODES, AppConfig, PipelineCache, Session  # noqa: E402
from .store import SessionStore  # noqa: E402
from .uploads import check_base, parse_seeds  # noqa: E402
from .views import (  # noqa: E402
    builtin_concept_folders, concept_rows, default_model, default_prompt, interference_rows, list_concept_folders,
    spectrum_figure,
)

__all__ = ["parse_args", "build_app", "main"]

INTRO = """## spectral-vision · concept fusion
Add concept adapters (trained with `training/dreambooth_spectral.py`, each on its own singular band), set their
strengths, and generate: the **fused** model beside **each concept alone** and the **base**, for the same seeds.
Spectral fusion refuses concepts that share band columns; `mean`, `weighted`, `lora_sum`, `least_squares` are
the baselines. The interference table names each number; its summary line says what it means."""


CSS = "#gallery .grid-wrap { min-height: 0 !important; height: auto !important; }"  # no empty band under images


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demos.fusion_app", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and concepts")
    g.add_argument("--model", default=None, help="base pipeline: builtin:digits / builtin:tiny-sd, a local "
                   "save_pretrained folder or a hub id (default: builtin:digits when installed, else builtin:tiny-sd)")
    g.add_argument("--concepts_dir", nargs="+", default=["concepts"],
                   help="folder(s) of concept folders; adapters are only loaded from these (and from uploads)")
    g.add_argument("--no_builtin_concepts", action="store_true",
                   help="do not preload the built-in concepts of builtin:digits")
    g.add_argument("--model_dirs", nargs="*", default=[], help="folders from which local base pipelines may be picked")
    g.add_argument("--upload_dir", default=None, help="where uploads are staged (default: a temporary folder)")
    g = p.add_argument_group("limits")
    g.add_argument("--concurrency", type=int, default=2, help="generations running at once (queue)")
    g.add_argument("--max_sessions", type=int, default=16, help="live sessions (least recently used closed first)")
    g.add_argument("--session_ttl", type=float, default=3600, help="seconds before an idle session is closed")
    g.add_argument("--max_seeds", type=int, default=4)
    g.add_argument("--max_steps", type=int, default=100)
    g.add_argument("--record_timesteps", type=int, nargs="+", default=[999, 500, 100],
                   help="UNet timesteps of the recorded concept inputs (interference metrics, least_squares)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on (loopback by default)")
    g.add_argument("--port", type=int, default=7860)
    g.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    return p.parse_args(argv)


def build_app(config: AppConfig, store: SessionStore, base_choices: list[str], concurrency: int = 2):
    """``(gr.Blocks, launch style kwargs)``: the UI wired to a :class:`Session` of ``store`` per browser session
    (the browser's ``gr.State`` holds only the session id)."""
    import gradio as gr
    import pandas as pd

    def fail(e: Exception) -> str:
        """A user error: toast + status box (the app keeps running)."""
        if not isinstance(e, (ValueError, FileNotFoundError, KeyError)):
            traceback.print_exc()
        msg = str(e) if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {e}"
        gr.Warning(msg.splitlines()[0][:300])
        return msg

    def concept_views(s: Session):
        headers, rows = concept_rows(s.concepts, s.overlap())
        names = list(s.concepts)
        sliders = [gr.update(visible=i < len(names), label=f"strength · {names[i]}" if i < len(names) else "",
                             value=s.concepts[names[i]].strength if i < len(names) else 1.0)
                   for i in range(MAX_CONCEPTS)]
        return [pd.DataFrame(rows, columns=headers), gr.update(choices=names, value=names[-1] if names else None),
                *sliders]

    def overlap_note(s: Session) -> str:
        rep = s.overlap()
        return "" if rep.ok else "\n⚠ " + rep.explain(max_layers=3)

    def folders():
        return gr.update(choices=list_concept_folders(config.concepts_dirs))

    def init(sid):
        s, note = store.open(sid)
        ready = f"base {s.base_name} ready ({s.resolution}px); {len(s.concepts)} concepts loaded"
        msg = "\n".join(x for x in (note, ready, *s.notes) if x)
        prompt = default_prompt([c.prompt for c in s.concepts.values()])
        return [s.id, msg, folders(), prompt, *concept_views(s)]

    def load_base(sid, name, progress=gr.Progress()):
        try:
            progress(0.1, desc=f"loading {name}")
            s, _ = store.open(sid)
            s.set_base(name)
            msg = "\n".join([f"base {s.base_name} loaded ({s.resolution}px); {len(s.concepts)} concepts", *s.notes])
        except Exception as e:  # noqa: BLE001 (shown to the user)
            return [sid, fail(e), gr.update(), *([gr.update()] * (2 + MAX_CONCEPTS))]
        return [s.id, msg, folders(), *concept_views(s)]

    def add(sid, load, progress):
        """Run ``load(session) -> Concept`` and refresh the concept views, or report the error."""
        try:
            s, _ = store.open(sid)
            progress(0.1, desc="loading adapters")
            c = load(s)
            msg = f"added {c.name}: {c.method} rank {c.rank}, band columns {c.band}" + overlap_note(s)
            if not s.overlap().ok:
                gr.Warning(f"{c.name}: shares band columns with another concept (spectral mode will refuse)")
        except Exception as e:  # noqa: BLE001
            return [sid, fail(e), gr.update(), *([gr.update()] * (2 + MAX_CONCEPTS))]
        return [s.id, msg, None, *concept_views(s)]

    def add_folder(sid, folder, name, progress=gr.Progress()):
        def load(s: Session):
            if not folder:
                raise ValueError("pick a concept folder")
            return s.add_concept(folder, name or None)
        return add(sid, load, progress)

    def add_upload(sid, files, name, progress=gr.Progress()):
        paths = [getattr(f, "name", f) for f in files or []]  # Gradio's temporary copies: deleted once staged
        return add(sid, lambda s: s.add_upload(paths, name or None, consume=True), progress)

    def remove(sid, name):
        try:
            s, _ = store.open(sid)
            s.remove_concept(name)
        except Exception as e:  # noqa: BLE001
            return [sid, fail(e), *([gr.update()] * (2 + MAX_CONCEPTS))]
        return [s.id, f"removed {name}" + overlap_note(s), *concept_views(s)]

    def generate(sid, prompt, mode, allow, seeds, steps, guidance, base, *strengths, progress=gr.Progress()):
        keep = [gr.update()] * 5
        try:
            s, note = store.open(sid)
            if note:
                gr.Warning(note)
                return [s.id, f"{note}: add concepts again", *keep]
            w = dict(zip(s.concepts, strengths))
            r = s.generate(prompt, parse_seeds(seeds, config.max_seeds), steps, guidance, mode, w, allow, base,
                           progress=lambda f, d: progress(f, desc=d))
        except Exception as e:  # noqa: BLE001
            return [sid, fail(e), *keep]
        info = (f"**{r.mode}** fusion of {len(s.concepts)} concepts in {r.seconds_fuse:.2f} s (this click: fusion, "
                f"input recording and metrics {r.seconds_fusion:.1f} s, 0 when cached; total with sampling "
                f"{r.seconds_total:.1f} s); {r.overlap.explain(max_layers=2).splitlines()[0]}")
        table = None
        if r.interference is not None:
            h, rows = interference_rows(r.interference)
            table = pd.DataFrame(rows, columns=h)
            info += ("; metrics on recorded inputs" if r.interference.activations else "; metrics in weight space")
            info += "\n\n" + "  \n".join(r.interference.explain().splitlines())
        layer = r.layers[0] if r.layers else None
        fig = spectrum_figure(*s.spectrum(layer), layer) if layer else None
        return [s.id, f"generated {len(r.gallery)} images", gr.update(value=r.gallery, columns=r.columns), info,
                table, gr.update(choices=r.layers, value=layer), fig]

    def spectrum(sid, layer):
        try:
            if not sid or not layer:
                return gr.update()
            s, _ = store.open(sid)
            return spectrum_figure(*s.spectrum(layer), layer)
        except Exception as e:  # noqa: BLE001
            fail(e)
            return gr.update()

    theme = gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts
    with gr.Blocks(title="spectral-vision fusion", analytics_enabled=False) as app:
        state = gr.State(None, time_to_live=config.session_ttl_s, delete_callback=store.close)  # the session id
        gr.Markdown(INTRO)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                with gr.Row():
                    base = gr.Dropdown(base_choices, value=base_choices[0], allow_custom_value=True, scale=4,
                                       label="base pipeline (built-in, --model, hub id)")
                    load_btn = gr.Button("load base", scale=1, min_width=90)
                with gr.Row():
                    folder = gr.Dropdown([], label="concept folder (from --concepts_dir)", allow_custom_value=True,
                                         scale=5, elem_id="concept-folder")
                    refresh = gr.Button("↻", scale=0, min_width=44)
                with gr.Row():
                    cname = gr.Textbox(label="concept name (optional)", max_lines=1, scale=3)
                    add_btn = gr.Button("add concept", variant="secondary", scale=2, elem_id="add-concept")
                with gr.Accordion("…or upload a concept", open=False):
                    gr.Markdown("A `.zip` of a concept folder (`unet/`, `text_encoder/`), or one adapter's "
                                "`adapter_config.json` + `adapter_model.safetensors`.")
                    upload = gr.File(file_count="multiple", file_types=[".zip", ".json", ".safetensors"],
                                     show_label=False, height=100, elem_id="upload")
                    up_btn = gr.Button("add uploaded concept", elem_id="add-upload")
                concepts = gr.Dataframe(label="concepts", interactive=False, wrap=True, elem_id="concepts")
                with gr.Row():
                    rm_choice = gr.Dropdown([], label="remove concept", scale=3)
                    rm_btn = gr.Button("remove", scale=1, min_width=80)
                status = gr.Textbox(label="status", lines=3, interactive=False, elem_id="status")
            with gr.Column(scale=4):
                prompt = gr.Textbox(label="prompt", value=default_prompt([]), elem_id="prompt")
                with gr.Row():
                    mode = gr.Dropdown(list(MODES), value="spectral", label="fusion mode")
                    allow = gr.Checkbox(label="allow overlapping bands", value=False)
                sliders = [gr.Slider(0.0, 2.0, value=1.0, step=0.05, visible=False) for _ in range(MAX_CONCEPTS)]
                with gr.Row():
                    seeds = gr.Textbox(label="seeds", value="0", max_lines=1, min_width=80)
                    steps = gr.Slider(1, config.max_steps, value=25, step=1, label="steps", elem_id="steps")
                    guidance = gr.Slider(0.0, 15.0, value=4.0, step=0.5, label="guidance")
                with_base = gr.Checkbox(label="also show the base model", value=True)
                gen_btn = gr.Button("generate", variant="primary", elem_id="generate")
        gallery = gr.Gallery(label="fused | each concept alone | base (rows: seeds)", columns=4,
                             object_fit="contain", elem_id="gallery")
        info = gr.Markdown()
        table = gr.Dataframe(label="interference (fused vs each concept alone; OVERALL, then worst layers)",
                             interactive=False, wrap=True)
        with gr.Row():
            layer = gr.Dropdown([], label="layer (spectrum before / after fusion)", scale=1)
            plot = gr.Plot(label="singular values", scale=3)

        views = [concepts, rm_choice, *sliders]
        app.load(init, [state], [state, status, folder, prompt, *views])
        load_btn.click(load_base, [state, base], [state, status, folder, *views], concurrency_id="gpu",
                       concurrency_limit=concurrency)
        refresh.click(folders, None, folder)
        add_btn.click(add_folder, [state, folder, cname], [state, status, upload, *views],
                      concurrency_id="gpu", concurrency_limit=concurrency)
        up_btn.click(add_upload, [state, upload, cname], [state, status, upload, *views],
                     concurrency_id="gpu", concurrency_limit=concurrency)
        rm_btn.click(remove, [state, rm_choice], [state, status, *views])
        gen_btn.click(generate, [state, prompt, mode, allow, seeds, steps, guidance, with_base, *sliders],
                      [state, status, gallery, info, table, layer, plot], concurrency_id="gpu",
                      concurrency_limit=concurrency)
        layer.change(spectrum, [state, layer], plot)
    app.queue(default_concurrency_limit=concurrency, max_size=64)
    return app, {"theme": theme, "css": CSS}


def main(args: argparse.Namespace) -> None:
    model = args.model or default_model()
    upload = Path(args.upload_dir or tempfile.mkdtemp(prefix="sv-fusion-uploads-"))
    for d in args.concepts_dir:
        Path(d).mkdir(parents=True, exist_ok=True)
    builtin, note = ({}, "") if args.no_builtin_concepts or model != "builtin:digits" else builtin_concept_folders()
    preload = list(builtin.values())[:2]  # bands 0 and 1: a first click shows two concepts, their fusion, the base
    config = AppConfig(model=model, concepts_dirs=[*args.concepts_dir, *{p.parent for p in builtin.values()}],
                       upload_dir=upload, model_dirs=args.model_dirs, preload=preload, max_seeds=args.max_seeds,
                       max_steps=args.max_steps, max_sessions=args.max_sessions, session_ttl_s=args.session_ttl,
                       record_timesteps=tuple(args.record_timesteps))
    from spectral_vision.integrations.diffusers import BUILTIN_PIPELINES

    choices = list(dict.fromkeys([model, *sorted(BUILTIN_PIPELINES)]))
    cache = PipelineCache(config.device)
    try:
        base = check_base(model, model, config.model_dirs)
    except ValueError as e:
        sys.exit(f"error: {e}")
    app, style = build_app(config, SessionStore(config, cache), choices, args.concurrency)
    # serve first (Gradio's 3 s self-check of the local URL), then load the default base before announcing it
    app.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size="200mb",
               footer_links=[], quiet=True, prevent_thread_lock=True, **style)
    try:
        cache.get(base)
    except ValueError as e:
        app.close()
        sys.exit(f"error: {e}")
    print(f"base {model}; concepts from {[str(d) for d in config.concepts_dirs]}; uploads staged in {upload}"
          + (f"; preloaded {[p.name for p in preload]}" if preload else "") + (f"\nnote: {note}" if note else ""),
          flush=True)
    print(f"running on {app.local_url}" + (f" and {app.share_url}" if args.share else
                                           " (for a public link, restart with --share)"), flush=True)
    app.block_thread()


if __name__ == "__main__":
    main(parse_args())
