"""The work behind ``d3s2 serve``, without any web framework: reading an upload safely, the mask / crop preview,
one generation run into a session's own folder, the clean-up of old outputs, and error messages fit for a web page.

Kept apart from :mod:`d3s2.serve.app` (the Gradio page) so that it is testable without Gradio and the page code
stays a thin layer. Nothing here returns a server path to show to the user: messages are built from the upload's own
file name, and :func:`public_message` removes any absolute path a lower layer put into an error.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from d3s2.errors import D3S2Error

__all__ = ["IMAGE_EXTENSIONS", "GenerateOptions", "GenerateResult", "SessionStore", "Generator", "bundled_weights",
           "resolve_weights", "list_examples", "read_upload", "preview_image", "has_alpha_mask", "public_message",
           "safe_stem", "format_stats_markdown", "format_report_markdown", "run_logged"]

log = logging.getLogger("d3s2.serve")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# PIL formats we accept after decoding (the extension alone proves nothing: a renamed text file ends in .png too)
_PIL_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "MPO"}
_MAX_PIXELS = 64_000_000  # decompression-bomb guard: a small file may still decode to a huge bitmap


def bundled_weights() -> Path | None:
    """The demo model shipped inside the package (``d3s2/assets/demo``), or None."""
    from d3s2.pipelines.bundled import bundled_model_path

    return bundled_model_path()


def resolve_weights(weights: str | os.PathLike | None) -> str:
    """``--weights`` if given, else the bundled demo model (as ``d3s2 generate`` resolves it), else a D3S2Error."""
    from d3s2.pipelines.bundled import resolve_weights as resolve

    return resolve(weights)[0]


def list_examples(folder: str | os.PathLike | None = None) -> list[Path]:
    """PNG images in ``folder`` (default: the bundled examples, ``d3s2/assets/examples``), sorted; empty when none."""
    if folder is None:
        from d3s2.pipelines.bundled import example_images

        return example_images()
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())


def safe_stem(name: str | None, default: str = "mesh") -> str:
    """A file stem made of ``[A-Za-z0-9_-]`` (at most 48 characters) from an uploaded file's name."""
    stem = Path(name or "").stem
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:48]
    return stem or default


_ABS_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][^\s\\/'\"():,;]+){2,}")


def public_message(text: str, upload_name: str | None = None) -> str:
    """``text`` on one line with every absolute path replaced by ``upload_name`` (default: the path's basename)."""
    text = " ".join(str(text).split())
    return _ABS_PATH.sub(lambda m: upload_name or Path(m.group(0)).name, text)


def read_upload(path: str | os.PathLike, max_bytes: int | None = None, name: str | None = None):
    """An uploaded file -> PIL image (RGB or RGBA) after checking it really is an image of an accepted type.

    ``name`` is the user's file name for messages (default: the basename of ``path``). Raises D3S2Error with a message
    that names the upload, never the server path."""
    from PIL import Image, UnidentifiedImageError

    from d3s2.pipelines.preprocess import load_image

    shown = name or Path(path).name
    if Path(shown).suffix.lower() not in IMAGE_EXTENSIONS:
        raise D3S2Error(f"{shown}: not an accepted image type; upload a PNG, JPEG, WebP or BMP image")
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise D3S2Error(f"{shown}: the upload could not be read; please upload it again") from exc
    if size == 0:
        raise D3S2Error(f"{shown}: the file is empty")
    if max_bytes is not None and size > max_bytes:
        raise D3S2Error(f"{shown}: the file is {size / 2**20:.1f} MB, more than the limit of "
                        f"{max_bytes / 2**20:.0f} MB")
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if im.width * im.height > _MAX_PIXELS:
                raise D3S2Error(f"{shown}: {im.width} x {im.height} pixels is too large; use at most "
                                f"{_MAX_PIXELS // 1_000_000} megapixels")
            if fmt not in _PIL_FORMATS:
                raise D3S2Error(f"{shown}: a {fmt} image is not accepted; upload a PNG, JPEG, WebP or BMP image")
            im.load()
            img = im.copy()
    except D3S2Error:
        raise
    except UnidentifiedImageError as exc:
        raise D3S2Error(f"{shown}: not an image (the content is not PNG, JPEG, WebP or BMP data)") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise D3S2Error(f"{shown}: the image cannot be decoded; the file may be truncated or corrupt") from exc
    try:
        return load_image(img)
    except D3S2Error as exc:
        raise D3S2Error(public_message(f"{shown}: {exc}", shown)) from exc


def preview_image(img, image_pad_fraction: float = 16 / 518, size: int = 256,
                  background_remover: Callable | None = None) -> np.ndarray:
    """What the model will see: ``[size, 2 * size, 3]`` uint8, the crop composited on white (left) beside its mask
    (right), the mask of an image without alpha from ``background_remover`` (the pipeline's). Raises D3S2Error when
    the mask is empty."""
    import warnings

    from d3s2.pipelines.preprocess import preprocess_image

    with warnings.catch_warnings():  # the no-alpha warning is shown in the page by the caller, not logged
        warnings.simplefilter("ignore")
        x = preprocess_image(img, size=size, pad=round(image_pad_fraction * size), source="the image",
                             background_remover=background_remover)
    rgb = (x[:3].permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    mask = (x[3].numpy() * 255.0 + 0.5).astype(np.uint8)
    return np.concatenate([rgb, np.repeat(mask[..., None], 3, axis=-1)], axis=1)


def has_alpha_mask(img) -> bool:
    """True when the image's alpha channel carries a mask (not absent, not fully opaque)."""
    if img.mode != "RGBA":
        return False
    return int(np.asarray(img.getchannel("A")).min()) < 255


class SessionStore:
    """One output folder per browser session under ``root``; folders untouched for ``max_age_s`` are removed."""

    def __init__(self, root: str | os.PathLike, max_age_s: float = 3600.0):
        from d3s2.serve.ownership import ResultOwners

        self.root = Path(root)
        self.max_age_s = float(max_age_s)
        self.owners = ResultOwners()  # published result files -> browser sessions allowed to fetch them
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @staticmethod
    def _key(session: str | None) -> str:
        key = re.sub(r"[^A-Za-z0-9_-]", "", session or "")[:64]
        return key or "anonymous"

    def folder(self, session: str | None) -> Path:
        """The session's folder (created); its modification time marks it as in use."""
        p = self.root / self._key(session)
        with self._lock:
            p.mkdir(parents=True, exist_ok=True)
            os.utime(p)
        return p

    def new_run(self, session: str | None) -> Path:
        """A fresh empty sub-folder for one run; the session's previous runs are removed (one result per session)."""
        base = self.folder(session)
        with self._lock:
            for old in base.iterdir():
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
            run = base / f"run-{time.time_ns()}"
            run.mkdir()
        return run

    def drop(self, session: str | None) -> None:
        with self._lock:
            shutil.rmtree(self.root / self._key(session), ignore_errors=True)

    def cleanup(self, now: float | None = None) -> list[str]:
        """Remove session folders older than ``max_age_s``; returns their names."""
        now = time.time() if now is None else now
        removed = []
        with self._lock:
            for p in self.root.iterdir():
                try:
                    age = now - p.stat().st_mtime
                except OSError:
                    continue
                if p.is_dir() and age > self.max_age_s:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        return removed


@dataclass
class GenerateOptions:
    """One request of the page. ``steps`` / ``guidance``: per stage (keys ``dense``, ``512``, ``1024``); ``faces``
    0 or None keeps every face."""

    seed: int = 0
    resolution: int = 512
    steps: dict = field(default_factory=dict)
    guidance: dict = field(default_factory=dict)
    faces: int | None = None
    format: str = "glb"


@dataclass
class GenerateResult:
    viewer_path: Path  # GLB for the 3D viewer
    download_path: Path  # the mesh in the requested format
    vertices: int
    faces: int
    stats: list  # the pipeline output's stats
    warnings: list[str]
    report: dict | None = None  # d3s2.geometry.report.MeshReport.as_dict() of the mesh


class Generator:
    """Holds the loaded pipeline; runs one request at a time (the models are shared by every session)."""

    def __init__(self, pipeline, weights_label: str = "model"):
        self.pipe = pipeline
        self.weights_label = weights_label
        self._lock = threading.Lock()

    @classmethod
    def load(cls, weights: str, device: str | None = None, low_vram: bool = False,
             matting: str | None = None) -> "Generator":
        from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

        pipe = ImageTo3DPipeline.from_pretrained(weights, device=device, low_vram=low_vram or None, matting=matting)
        return cls(pipe, Path(weights).name)

    # ---------------------------------------------------------------- what the page offers
    @property
    def has_1024(self) -> bool:
        return "ss_dit_1024" in self.pipe.models

    def stage_defaults(self) -> dict[str, tuple[int, float]]:
        """Per stage key (``dense``, ``512``, ``1024``): (steps, guidance) of the pipeline's sampler configs."""
        out = {}
        for key, name in (("dense", "dense_dit"), ("512", "ss_dit_512"), ("1024", "ss_dit_1024")):
            if name in self.pipe.models:
                s = self.pipe.sampler_config(name)
                out[key] = (int(s.steps), float(s.cfg_scale))
        return out

    def grids(self) -> dict[int, int]:
        """Resolution choice -> voxel grid of that stage (the tiny and demo models use smaller grids)."""
        out = {512: int(self.pipe.resolution_512)}
        if self.has_1024:
            out[1024] = int(self.pipe.resolution_1024)
        return out

    def image_pad_fraction(self) -> float:
        size = self.pipe.models["image_encoder"].config.image_size
        pad = self.pipe.settings.image_pad
        return (16 / 518) if pad is None else pad / size

    # ---------------------------------------------------------------- one run
    def validate(self, opts: GenerateOptions) -> None:
        from d3s2.geometry.export import MESH_FORMATS

        if opts.resolution not in self.grids():
            raise D3S2Error(f"resolution {opts.resolution} is not available with this model "
                            f"(choose {' or '.join(map(str, self.grids()))})")
        if opts.format not in MESH_FORMATS:
            raise D3S2Error(f"unknown format {opts.format!r}; choose one of {', '.join(MESH_FORMATS)}")
        if opts.faces is not None and opts.faces != 0 and not 4 <= opts.faces <= 5_000_000:
            raise D3S2Error(f"target face count {opts.faces} is out of range: use 0 (keep all) or 4 to 5,000,000")
        for key, v in opts.steps.items():
            if v is not None and not 1 <= int(v) <= 200:
                raise D3S2Error(f"steps of stage {key} must be between 1 and 200, got {v}")
        for key, v in opts.guidance.items():
            if v is not None and not 0.0 <= float(v) <= 30.0:
                raise D3S2Error(f"guidance of stage {key} must be between 0 and 30, got {v}")
        if not 0 <= int(opts.seed) < 2**63:
            raise D3S2Error(f"seed must be a non-negative integer below 2^63, got {opts.seed}")

    def generate(self, image, opts: GenerateOptions, out_dir: Path, stem: str = "mesh",
                 progress: bool = True) -> GenerateResult:
        """Run the pipeline on a PIL image and write ``<stem>.glb`` (viewer) and ``<stem>.<format>`` into ``out_dir``.
        D3S2Error for a bad request or when no shape comes out (message fit for the page)."""
        import warnings

        import torch

        from d3s2.geometry.export import save_mesh

        self.validate(opts)
        faces = opts.faces if opts.faces else None
        with self._lock, warnings.catch_warnings(record=True):  # the notes are shown in the page, not logged
            warnings.simplefilter("always")
            out = self.pipe(image, generator=torch.Generator().manual_seed(int(opts.seed)),
                               resolution=opts.resolution, num_inference_steps=dict(opts.steps),
                               guidance_scale=dict(opts.guidance), faces=faces, progress=progress)
        stats = [dict(s) for s in out.stats]
        mesh = out.meshes[0]
        if len(mesh.faces) == 0:
            raise D3S2Error("the result has no faces; try another seed")
        out_dir = Path(out_dir)
        viewer = Path(save_mesh(mesh, out_dir / f"{stem}.glb", "glb"))
        download = viewer if opts.format == "glb" else Path(save_mesh(mesh, out_dir / f"{stem}.{opts.format}",
                                                                      opts.format))
        msgs = []  # only warnings meant for the user (e.g. no alpha channel), once each
        for note in out.notes:
            text = public_message(note)
            if text not in msgs:
                msgs.append(text)
        return GenerateResult(viewer, download, len(mesh.vertices), len(mesh.faces), stats, msgs,
                              mesh.metadata.get("d3s2_report"))


def format_report_markdown(report: dict | None) -> str:
    """Closed or not, boundary edges, components and volume of the result (empty without a report)."""
    if not report:
        return ""
    from d3s2.geometry.report import MeshReport

    return f"Mesh: {MeshReport(**report).summary()}."


def format_stats_markdown(stats: list[dict]) -> str:
    """A one-line summary of the per-stage seconds."""
    parts = []
    for s in stats:
        item = f"{s['stage'].replace('_', ' ')} {s['seconds']:.2f} s"
        if s.get("peak_gpu_bytes"):
            item += f" ({s['peak_gpu_bytes'] / 2**30:.2f} GiB)"
        parts.append(item)
    return " · ".join(parts)


def run_logged(fn: Callable[[], Any], what: str, upload_name: str | None = None):
    """Run ``fn``; a D3S2Error becomes ``(None, message)``, any other exception is logged with its traceback on the
    server and becomes a generic message (no stack trace, no paths in the page)."""
    try:
        return fn(), None
    except D3S2Error as exc:
        return None, public_message(str(exc), upload_name)
    except Exception:  # noqa: BLE001 - the page must never show a traceback; the server log keeps it
        log.exception("d3s2 serve: %s failed", what)
        return None, f"{what} failed with an internal error (details are in the server log)"
