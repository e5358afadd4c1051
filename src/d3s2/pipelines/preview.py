"""Preview images of ``d3s2 generate --preview``: the input image beside a shaded grey render of the generated mesh.

The mesh is rendered with d3s2's own renderer (:mod:`d3s2.data.render` on the rasteriser of
:mod:`d3s2.geometry.raster`, plain PyTorch, CPU or CUDA) from an orbit camera in the frame the pipeline generates in
(the normalised training frame, up +y). The default camera is the one of the bundled example images (elevation 20
deg, azimuth 45 deg, 50 mm), so for them the two panels show the same view; for other photos it is a fixed
three-quarter view. Each panel is cropped to its object (alpha), padded to a square and composited on white, so both
objects fill their panels alike. PNGs are written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from d3s2.errors import D3S2Error

__all__ = ["PreviewCamera", "render_mesh_view", "fit_panel", "compose_preview", "write_preview"]


@dataclass(frozen=True)
class PreviewCamera:
    """Orbit camera about the origin of the generation frame (conventions of :mod:`d3s2.geometry.cameras`)."""

    elevation_deg: float = 20.0
    azimuth_deg: float = 45.0
    focal_mm: float = 50.0
    up: str = "y"


def render_mesh_view(mesh: Any, size: int = 384, camera: PreviewCamera = PreviewCamera(), device: str = "cpu",
                     color: tuple[float, float, float] = (0.72, 0.72, 0.72)) -> np.ndarray:
    """RGBA uint8 ``[size, size, 4]`` of a mesh (anything with ``vertices`` / ``faces``), plain grey, Lambert
    shaded with a light near the camera; the camera distance fits the mesh's bounding sphere about the origin."""
    from d3s2.data.render import Renderer, RenderMesh, RenderPart, RenderSettings
    from d3s2.geometry.cameras import Camera, fit_distance

    v = np.asarray(mesh.vertices, dtype=np.float32)
    f = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    if len(f) == 0:
        raise D3S2Error("preview: the mesh has no faces, nothing to render")
    rm = RenderMesh([RenderPart(vertices=v, faces=f)]).validate()
    cam = Camera(elevation_deg=camera.elevation_deg, azimuth_deg=camera.azimuth_deg, focal_mm=camera.focal_mm,
                 distance=fit_distance(rm.bounding_radius(), camera.focal_mm), resolution=size, up=camera.up)
    settings = RenderSettings(size=size, supersample=2, plain_color=color)
    return Renderer(rm, settings, device=device).render(cam).rgba_uint8()


def fit_panel(image: Any, size: int, margin: float = 0.08, background=(255, 255, 255)) -> np.ndarray:
    """Image (path, PIL image or array; RGBA best) -> RGB uint8 ``[size, size, 3]``: cropped to the alpha mask's
    bounding box (whole image without alpha), centred on a square with ``margin`` of its side free on each side,
    composited on ``background``."""
    from PIL import Image

    from d3s2.pipelines.preprocess import load_image

    img = load_image(image).convert("RGBA")
    alpha = np.asarray(img)[..., 3]
    ys, xs = np.nonzero(alpha)
    if len(xs):
        img = img.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    inner = max(1, int(round(size * (1.0 - 2.0 * margin))))
    w, h = img.size
    scale = inner / max(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), tuple(background))
    canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2), img)
    return np.asarray(canvas)


def compose_preview(image: Any, mesh_rgba: np.ndarray, panel: int = 384, labels: tuple[str, str] | None = (
        "input", "generated mesh")) -> np.ndarray:
    """RGB uint8 ``[panel, 2 * panel, 3]``: the input image (left) and the mesh render (right), each fitted to its
    panel by :func:`fit_panel`; optional small captions in the top-left corners."""
    from PIL import Image, ImageDraw

    left, right = fit_panel(image, panel), fit_panel(mesh_rgba, panel)
    out = Image.fromarray(np.concatenate([left, right], axis=1))
    if labels:
        draw = ImageDraw.Draw(out)
        for i, text in enumerate(labels):
            draw.text((i * panel + 6, 4), text, fill=(90, 90, 90))
    return np.asarray(out)


def write_preview(path: str | os.PathLike, image: Any, mesh: Any, panel: int = 384,
                  camera: PreviewCamera = PreviewCamera(), device: str = "cpu") -> Path:
    """Render ``mesh``, compose it beside ``image`` and write the PNG atomically; returns the path."""
    import io

    from PIL import Image

    from d3s2.fileio import atomic_write_bytes

    rgb = compose_preview(image, render_mesh_view(mesh, panel, camera, device), panel)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
