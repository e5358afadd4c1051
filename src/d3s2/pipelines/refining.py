"""The release's refiner step inside the pipeline (issue 20; the authors' ``remove_interior`` path).

The release never meshes the SS-VAE's output directly: at 512 the decoded sparse SDF and the decoder's last
32-channel features go through the SDF refiner (``model_refiner.ckpt``) and the refined field is meshed at 0.4; at
1024 the sign refiner (``model_refiner_1024.ckpt``) gives the volume's interior its sign and the field is meshed at
0.2. The runs themselves are :mod:`d3s2.geometry.refine` (patch by patch, no dense feature grid, no dense 1024^3
tensor); this module decides when a stage is refined and turns the decoded tensors into refined fields.

A pipeline refines a stage when it holds that stage's refiner (components ``refiner_512`` / ``refiner_1024``, loaded
from a release folder or saved with the pipeline) and ``settings.refine`` is on.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["REFINER_OF_STAGE", "refiner_name", "refine_decoded", "refined_level"]

REFINER_OF_STAGE = {"512": "refiner_512", "1024": "refiner_1024"}


def refiner_name(models: dict, settings, stage: str) -> str | None:
    """The component that refines ``stage`` ("512" / "1024") under ``settings``, or None."""
    name = REFINER_OF_STAGE[stage]
    return name if settings.refine and name in models else None


def refined_level(settings, stage: str) -> float:
    """Marching-cubes level of a refined stage's field: the 512 refiner's tanh output at ``mc_level_512_refined``
    (the release: twice its 0.2), the sign-refined 1024 field at ``mc_level_1024``."""
    return settings.mc_level_512_refined if stage == "512" else settings.mc_level_1024


def refine_decoded(net, stage: str, decoded, features: torch.Tensor | None, batch_size: int, resolution: int,
                   level: float, progress: Callable[[int, int], None] | None = None) -> list:
    """``decoded``: the SS-VAE's SparseTensor (coords ``[N, 4]``, SDF ``[N, 1]``); ``features``: its last features
    ``[N, C]`` (512 only). One :class:`~d3s2.geometry.refine.RefinedField` per sample."""
    from d3s2.geometry.refine import refine_sdf_512, refine_signs_1024

    coords, sdf = decoded.coords, decoded.feats[:, 0]
    if stage == "512":
        return refine_sdf_512(net, coords, sdf, features, resolution=resolution, level=level,
                              batch_size=batch_size, progress=progress)
    return refine_signs_1024(net, coords, sdf, resolution=resolution, level=level, batch_size=batch_size,
                             progress=progress)
