"""The demo model and example images shipped inside the package (issue 7).

``d3s2/assets/demo/`` holds a small image-to-3D pipeline trained on ``pybullet_data`` meshes (written by
``demo/bundle.py`` with :meth:`~d3s2.pipelines.image_to_3d.ImageTo3DPipeline.save_pretrained`);
``d3s2/assets/examples/`` holds RGBA renders of held-out meshes (``demo/make_examples.py``). ``d3s2 generate`` and the
web app resolve their weights here when the user names none (:func:`resolve_weights`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from d3s2.errors import D3S2Error

__all__ = ["bundled_model_path", "resolve_weights", "example_images", "BUNDLED_NOTE", "MISSING_BUNDLE"]

BUNDLED_NOTE = "using the bundled demo model (small, trained on pybullet meshes; see README)"
MISSING_BUNDLE = ("this install has no bundled demo model (d3s2/assets/demo/ is missing): pass --weights PIPELINE_DIR "
                  "(a folder written by ImageTo3DPipeline.save_pretrained, or the authors' release folder), or "
                  "build the demo model with demo/bundle.py (see demo/README.md)")


def _assets_dir() -> Path:
    """The package's ``assets`` folder (a plain folder for regular and editable installs)."""
    return Path(os.fspath(resources.files("d3s2") / "assets"))


def bundled_model_path() -> Path | None:
    """Folder of the bundled demo pipeline, or None when this install has none (no ``pipeline.yaml``)."""
    folder = _assets_dir() / "demo"
    return folder if (folder / "pipeline.yaml").is_file() else None


def resolve_weights(weights: str | os.PathLike | None) -> tuple[str, bool]:
    """``(weights to load, is_bundled)``: the user's ``weights`` unchanged, else the bundled demo model.

    Raises :class:`D3S2Error` (one line saying how to get weights) when neither is there."""
    if weights is not None:
        return os.fspath(weights), False
    path = bundled_model_path()
    if path is None:
        raise D3S2Error(f"no weights given and {MISSING_BUNDLE}")
    return os.fspath(path), True


def example_images() -> list[Path]:
    """The bundled example images (RGBA PNGs rendered from held-out meshes), sorted by name; empty when absent."""
    folder = _assets_dir() / "examples"
    return sorted(folder.glob("*.png")) if folder.is_dir() else []
