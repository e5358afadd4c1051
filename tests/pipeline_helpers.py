"""Inputs and tiny random-weight pipelines for the pipeline, CLI and web-app tests (not a test module)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def square_image(path=None, size: int = 64, alpha: bool = True):
    """An orange rectangle on a transparent background (rows 16:48, columns 20:44 of 64); saved when ``path``."""
    s = size / 64
    a = np.zeros((size, size, 4), np.uint8)
    a[round(16 * s):round(48 * s), round(20 * s):round(44 * s)] = (200, 100, 50, 255)
    if not alpha:
        a[..., 3] = 0
    if path is None:
        return a
    Image.fromarray(a).save(path)
    return path


def make_tiny_weights(root) -> "os.PathLike":
    """A tiny random-weight pipeline saved under ``root/tiny`` whose 512-stage SS-VAE output is centred: the decoder
    bias is shifted by the median of one probe run, so the decoded SDF has a surface (random weights usually give an
    SDF that lies on one side of the level)."""
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = ImageTo3DPipeline.from_config("pipeline_tiny", seed=0)
        medians = []

        def hook(mod, inp, out):
            medians.append(out.feats.median())
            return out.replace(out.feats - medians[-1])

        vae = pipe.models["ss_vae_512"]
        handle = vae.decoder.out_layer.register_forward_hook(hook)
        pipe(square_image(), generator=torch.Generator().manual_seed(0), progress=False)
        handle.remove()
        with torch.no_grad():
            vae.decoder.out_layer.bias -= medians[0]
        return pipe.save_pretrained(os.path.join(root, "tiny"))
    finally:
        torch.set_num_threads(n)
