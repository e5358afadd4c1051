"""Inference pipelines (paper Sec. 4.3 / 5.2): image preprocessing, the image-to-3D pipeline and ``d3s2 generate``.

Names are imported lazily so that the CLI's ``--help`` does not import torch.
"""

__all__ = ["ImageTo3DPipeline", "ImageTo3DOutput", "PipelineSettings", "preprocess_image"]


def __getattr__(name):
    if name in ("ImageTo3DPipeline", "PipelineSettings"):
        from d3s2.pipelines import image_to_3d

        return getattr(image_to_3d, name)
    if name == "ImageTo3DOutput":
        from d3s2.pipelines.output_types import ImageTo3DOutput

        return ImageTo3DOutput
    if name == "preprocess_image":
        from d3s2.pipelines.preprocess import preprocess_image

        return preprocess_image
    raise AttributeError(f"module 'd3s2.pipelines' has no attribute {name!r}")
