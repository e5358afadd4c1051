"""d3s2: an installable, fast implementation of Direct3D-S2 (image to 3D through sparse SDF volumes).

Public API (imported lazily, so that ``import d3s2`` does not import torch)::

    from d3s2 import ImageTo3DPipeline
    pipe = ImageTo3DPipeline.from_pretrained("wushuang98/Direct3D-S2")
    out = pipe("photo.png")            # ImageTo3DOutput: .meshes, .stats, .notes (out[0] is the first mesh)

``ImageTo3DOutput`` is the call's result type, ``PipelineSettings`` the settings of ``pipeline.yaml`` and
``load_release`` reads the authors' release folders (:mod:`d3s2.pipelines.official`).
"""

__version__ = "0.1.0"

__all__ = ["ImageTo3DPipeline", "ImageTo3DOutput", "PipelineSettings", "load_release", "__version__"]

_LAZY = {"ImageTo3DPipeline": "d3s2.pipelines.image_to_3d", "PipelineSettings": "d3s2.pipelines.image_to_3d",
         "ImageTo3DOutput": "d3s2.pipelines.output_types", "load_release": "d3s2.pipelines.official"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'd3s2' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
