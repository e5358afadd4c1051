"""``d3s2 serve``: a local web page (Gradio) from one image to an interactive 3D mesh.

Upload an image or pick a bundled example, see the crop and mask the model will use, choose the resolution, seed,
steps and guidance per stage, target face count and export format, follow the progress of each stage, turn the result
in a 3D viewer and download it.

Safe defaults: binds 127.0.0.1 (``--host 0.0.0.0`` to open it to the network), an upload size limit
(``--max-file-size``), image types only, decoding checked on the server (a renamed text file is refused with a
message in the page), errors shown as one line (tracebacks go to the server log), no server paths in messages, no
analytics, no share tunnel, no web fonts. Several users: requests queue (one generation at a time on the shared
models, ``--queue-size`` waiting), each browser session writes into its own folder under ``--output-dir``, a session's
folder is removed when its page closes and any folder idle for ``--max-age`` seconds is removed. A result's files can
only be fetched by the browser that generated it (a session cookie, :mod:`d3s2.serve.ownership`).

Gradio is imported only when the command runs (``pip install 'd3s2[serve]'``).
"""

# No `from __future__ import annotations`: Gradio finds `request: gr.Request` by its real annotation.
import argparse
import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from d3s2.errors import D3S2Error
from d3s2.serve.backend import (IMAGE_EXTENSIONS, GenerateOptions, Generator, SessionStore, format_report_markdown,
                                format_stats_markdown, has_alpha_mask, list_examples, preview_image, read_upload,
                                resolve_weights, run_logged, safe_stem)
from d3s2.serve.ownership import SessionBinding, publish_result, session_token

__all__ = ["add_parser", "run_serve", "build_app", "launch_kwargs"]

log = logging.getLogger("d3s2.serve")

_INTRO = "Upload an image or pick an example, then press Generate."
_CSS = """
#d3s2-status .d3s2-error {color: #b42318; font-weight: 600;}
#d3s2-status .d3s2-ok {color: #067647; font-weight: 600;}
"""


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="web app: image in, interactive 3D mesh out",
                       description="Start a local web page (Gradio) that turns an image into a 3D mesh.")
    p.add_argument("--weights", metavar="PATH_OR_HUB_ID",
                   help="pipeline folder or hub id, e.g. wushuang98/Direct3D-S2 (default: the bundled demo model)")
    p.add_argument("--matting", choices=("birefnet", "border", "none"), default=None,
                   help="background removal for images without alpha (default: birefnet when installed, else border)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                        "0.0.0.0 opens the page to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--low-vram", action="store_true", help="keep each model on the GPU only for its stage")
    p.add_argument("--output-dir", metavar="DIR", default=None,
                   help="root of the per-session output folders (default: a new temporary folder)")
    p.add_argument("--max-age", type=float, default=3600.0, metavar="SECONDS",
                   help="remove session outputs idle for longer than this (default 3600)")
    p.add_argument("--max-file-size", type=float, default=10.0, metavar="MB", help="upload size limit (default 10)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait in the queue (default 16)")
    p.set_defaults(func=run_serve)


_NO_ALPHA = {  # the upload note for an image without a transparent background, by matting method
    "birefnet": " No transparent background: the object is cut out by the BiRefNet matting model.",
    "none": " No transparent background: the whole image is used as the object.",
    None: " No transparent background: the object is separated from the background by the border colour (plain "
          "backgrounds only).",
}


def _status(kind: str, text: str) -> str:
    import html

    return f'<span class="d3s2-{kind}">{html.escape(text)}</span>'


def _session_token(request) -> str | None:
    raw = getattr(request, "request", None)  # gr.Request wraps the request that queued the event
    cookies = getattr(raw, "cookies", None) if raw is not None else None
    return session_token(cookies if isinstance(cookies, dict) else None)


def build_app(generator: Generator, store: SessionStore, examples: list[Path] | None = None,
              max_file_bytes: int | None = None):
    """The Gradio Blocks page around ``generator``; ``store`` gives each session its folder."""
    import gradio as gr

    examples = list(examples or [])
    defaults = generator.stage_defaults()
    grids = generator.grids()
    pad_fraction = generator.image_pad_fraction()
    remover = generator.pipe.background_remover

    def load(file_path):
        if not file_path:
            raise D3S2Error("no image: upload one or pick an example")
        return read_upload(file_path, max_file_bytes, name=Path(file_path).name)

    def on_upload(file_path):
        if not file_path:
            return None, _INTRO

        def work():
            img = load(file_path)
            pic = preview_image(img, pad_fraction, background_remover=remover)
            note = "" if has_alpha_mask(img) else _NO_ALPHA.get(getattr(remover, "method", None), _NO_ALPHA[None])
            return pic, note

        out, err = run_logged(work, "reading the image", Path(file_path).name)
        if err is not None:
            return None, _status("error", f"Cannot use this image: {err}")
        pic, note = out
        return pic, _status("ok", f"Image ready ({Path(file_path).name}): left, the crop the model sees; right, "
                                  "its mask." + note)

    def on_generate(file_path, resolution, seed, randomise, steps_dense, cfg_dense, steps_512, cfg_512, steps_1024,
                    cfg_1024, faces, fmt, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        import random

        store.cleanup()
        try:
            seed = random.randrange(2**31) if randomise else int(seed or 0)
        except (TypeError, ValueError):
            seed = 0
        hidden = gr.DownloadButton(value=None, visible=False)
        name = Path(file_path).name if file_path else None
        progress(0.0, desc="reading the image")
        img, err = run_logged(lambda: load(file_path), "reading the image", name)
        if err is not None:
            return _status("error", f"Cannot use this image: {err}"), None, hidden, seed

        def work():
            steps = {"dense": steps_dense, "512": steps_512}
            guidance = {"dense": cfg_dense, "512": cfg_512}
            try:
                res = int(resolution)
                if res == 1024:
                    steps["1024"], guidance["1024"] = steps_1024, cfg_1024
                opts = GenerateOptions(seed=seed, resolution=res, steps={k: int(v) for k, v in steps.items()},
                                       guidance={k: float(v) for k, v in guidance.items()},
                                       faces=int(faces) if faces else None, format=str(fmt))
            except (TypeError, ValueError) as exc:
                raise D3S2Error(f"a setting is not a number ({exc})") from exc
            run_dir = store.new_run(getattr(request, "session_hash", None))
            res = generator.generate(img, opts, run_dir, stem=safe_stem(name))
            files = publish_result([res.viewer_path, res.download_path], _session_token(request), store.owners,
                                   demo.GRADIO_CACHE)
            return dataclasses.replace(res, viewer_path=Path(files[0]), download_path=Path(files[1]))

        result, err = run_logged(work, "generation", name)
        if err is not None:
            return _status("error", f"Generation failed (seed {seed}): {err}"), None, hidden, seed
        text = (f"Done: {result.vertices:,} vertices, {result.faces:,} faces, seed {seed}. "
                f"{format_report_markdown(result.report)} {format_stats_markdown(result.stats)}")
        if result.warnings:
            text += " Warnings: " + " ".join(result.warnings)
        download = gr.DownloadButton(label=f"Download {result.download_path.name}",
                                     value=str(result.download_path), visible=True)
        return _status("ok", text), str(result.viewer_path), download, seed

    def on_unload(request: gr.Request):
        store.drop(getattr(request, "session_hash", None))

    with gr.Blocks(title="d3s2: image to 3D", analytics_enabled=False, delete_cache=(600, int(store.max_age_s))) \
            as demo:
        gr.Markdown("## d3s2: image to 3D mesh\nDirect3D-S2 (sparse SDF volumes, Spatial Sparse Attention). "
                    f"Model: `{generator.weights_label}`. Best input: an object on a transparent background (RGBA).")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image (PNG, JPEG, WebP, BMP)", file_types=list(IMAGE_EXTENSIONS),
                                 type="filepath", elem_id="d3s2-upload")
                if examples:
                    gr.Examples(examples=[[os.fspath(p)] for p in examples], inputs=[upload],
                                example_labels=[p.stem for p in examples], label="Examples")
                preview = gr.Image(label="Crop and mask the model will use", interactive=False, type="numpy",
                                   format="png", height=220, elem_id="d3s2-preview")
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        resolution = gr.Radio([(f"{k} ({v}³ grid)", k) for k, v in grids.items()], value=512,
                                              label="Resolution", elem_id="d3s2-resolution")
                        fmt = gr.Radio(["glb", "obj", "ply", "stl"], value="glb", label="Export format",
                                       elem_id="d3s2-format")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="d3s2-seed")
                        randomise = gr.Checkbox(value=False, label="Randomise seed", elem_id="d3s2-randomise")
                        faces = gr.Number(value=100_000, precision=0, minimum=0, label="Target faces (0: keep all)",
                                          elem_id="d3s2-faces")
                    stage_inputs = []
                    for key, title in (("dense", "Structure stage"), ("512", "512 stage"), ("1024", "1024 stage")):
                        st, cfg = defaults.get(key, (15, 7.0))
                        with gr.Row(visible=key in defaults):
                            stage_inputs.append(gr.Slider(1, 100, value=st, step=1, label=f"{title}: steps",
                                                          elem_id=f"d3s2-steps-{key}"))
                            stage_inputs.append(gr.Slider(1.0, 15.0, value=cfg, step=0.1,
                                                          label=f"{title}: guidance", elem_id=f"d3s2-cfg-{key}"))
                run = gr.Button("Generate", variant="primary", elem_id="d3s2-generate")
            with gr.Column(scale=1):
                status = gr.HTML(_INTRO, elem_id="d3s2-status")
                viewer = gr.Model3D(label="Result", height=420, elem_id="d3s2-viewer",
                                    clear_color=(0.95, 0.95, 0.95, 1.0))
                download = gr.DownloadButton("Download", visible=False, elem_id="d3s2-download")
        upload.change(on_upload, inputs=[upload], outputs=[preview, status], concurrency_limit=4,
                      api_visibility="private")
        run.click(on_generate, inputs=[upload, resolution, seed, randomise, *stage_inputs, faces, fmt],
                  outputs=[status, viewer, download, seed], concurrency_limit=1, api_visibility="private")
        demo.unload(on_unload)
    return demo


def launch_kwargs(args: argparse.Namespace, store: SessionStore, examples: list[Path]) -> dict:
    """Arguments of ``Blocks.launch``: loopback by default, no share link, size limit, no remote fonts."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # plain names: nothing is fetched from a font service
    theme = gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])
    from starlette.middleware import Middleware

    # results are served from Gradio's cache (publish_result), bound to their session: the session folders
    # themselves need not be reachable
    allowed = sorted({os.fspath(p.parent) for p in examples})
    return dict(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=False,
                app_kwargs={"middleware": [Middleware(SessionBinding, owners=store.owners)]},
                max_file_size=int(args.max_file_size * 2**20), allowed_paths=allowed, ssr_mode=False, mcp_server=False,
                footer_links=["gradio", "settings"], theme=theme, css=_CSS, quiet=True)


def _start_janitor(store: SessionStore) -> None:
    """Remove idle session folders every quarter of ``max_age`` (a daemon thread, ends with the server)."""
    period = max(10.0, store.max_age_s / 4)

    def loop():
        while True:
            threading.Event().wait(period)
            store.cleanup()

    threading.Thread(target=loop, name="d3s2-serve-cleanup", daemon=True).start()


def run_serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise D3S2Error(f"--port {args.port} is not a valid port (1-65535)")
    if args.max_file_size <= 0:
        raise D3S2Error("--max-file-size must be positive (MB)")
    if args.queue_size < 1:
        raise D3S2Error("--queue-size must be at least 1")
    if args.max_age <= 0:
        raise D3S2Error("--max-age must be positive (seconds)")
    # Our page never reports usage or checks versions online; set before Gradio is imported (it reads it then).
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise D3S2Error(f"'d3s2 serve' needs Gradio ({exc}); install it with: pip install 'd3s2[serve]'") from exc
    weights = resolve_weights(args.weights)
    generator = Generator.load(weights, device=args.device, low_vram=args.low_vram, matting=args.matting)
    own_root = not args.output_dir
    root = Path(tempfile.mkdtemp(prefix="d3s2-serve-")) if own_root else Path(args.output_dir)
    store = SessionStore(root, max_age_s=args.max_age)
    examples = list_examples()
    demo = build_app(generator, store, examples, max_file_bytes=int(args.max_file_size * 2**20))
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    _start_janitor(store)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"d3s2 serve: warning: listening on {args.host}: anyone who can reach this address can use the page",
              flush=True)
    try:
        demo.launch(prevent_thread_lock=True, **launch_kwargs(args, store, examples))
    except OSError as exc:  # e.g. the port is taken
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
        raise D3S2Error(f"cannot serve on {args.host}:{args.port} ({' '.join(str(exc).split())}); "
                        "choose another --port") from exc
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"d3s2 serve: model {generator.weights_label}, outputs under {root}", flush=True)
    print(f"d3s2 serve: open http://{host}:{args.port}/ (Ctrl+C stops)", flush=True)

    def stop(signum, frame):  # SIGTERM ends the server like Ctrl+C, so the clean-up below runs
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        demo.block_thread()
    finally:
        signal.signal(signal.SIGTERM, previous)
        demo.close()
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
    return 0
