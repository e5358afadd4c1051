"""The authors' release as an :class:`~d3s2.pipelines.image_to_3d.ImageTo3DPipeline` (paper Sec. 4.3 / 5.2, the
recipe of shared/reference/official-release.md): :func:`d3s2.pipelines.official.release_pipeline_parts` reads the
folder or hub id into components, this module builds the pipeline from them. Kept apart so that the release loader
never imports the pipeline (``ImageTo3DPipeline.from_pretrained`` reads release folders through the same parts).
"""

from __future__ import annotations

import os
from typing import Any

from d3s2.pipelines.image_to_3d import ImageTo3DPipeline
from d3s2.pipelines.official import release_pipeline_parts

__all__ = ["load_official_pipeline"]


def load_official_pipeline(path_or_id: str | os.PathLike, device=None, dtype=None, low_vram=None, *,
                           version: str | None = None, resolution: int | None = None, image_encoder: Any = None,
                           encoder_weights: str | os.PathLike | None = None, revision: str | None = None,
                           local_files_only: bool | None = None, refiners: bool = True,
                           **kwargs) -> ImageTo3DPipeline:
    """An :class:`ImageTo3DPipeline` from the authors' release (see
    :func:`~d3s2.pipelines.official.release_pipeline_parts`); ``kwargs`` go to the pipeline (``matting``, ...)."""
    parts = release_pipeline_parts(path_or_id, device, dtype, version=version, resolution=resolution,
                                   image_encoder=image_encoder, encoder_weights=encoder_weights, revision=revision,
                                   local_files_only=local_files_only, refiners=refiners)
    return ImageTo3DPipeline(**parts, low_vram=low_vram, **kwargs)
