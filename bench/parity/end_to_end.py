"""End-to-end parity: the authors' ``Direct3DS2Pipeline`` and d3s2's ``ImageTo3DPipeline`` on the same release folder,
the same image and the same noise, compared on their final meshes.

The initial noise is a function of the stage and the latent coordinate (a fixed dense tensor for the structure stage,
fixed per-cell tables for the 64^3 and 128^3 latent grids), injected into d3s2 through its ``noise`` hook and into the
authors' ``inference`` by replacing ``torch.randn`` for the duration of that call with a lookup on the call's own
``latent_index`` (their token order is theirs; the values follow the coordinates). Both sides share one image encoder
(d3s2's DINOv2 with random weights; the release downloads DINOv2 through torch.hub, which cannot run here), wrapped
in the interface of the authors' ``DinoEncoder``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from compare import vertex_distance


class SharedEncoder(torch.nn.Module):
    """d3s2's encoder behind the authors' ``DinoEncoder`` interface: ``forward(image[:, :3], mask=None)``."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, image, image_mask=None):
        import torch.nn.functional as F

        z = self.encoder(image)
        if image_mask is not None:
            return z, F.max_pool2d(image_mask, kernel_size=14, stride=14).squeeze(1) > 0
        return z


class NoiseTables:
    def __init__(self, dense_shape, channels: int, grids=(64, 128), seed: int = 11, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.dense = torch.randn(dense_shape, generator=g)
        self.tables = {"512": torch.randn(grids[0], grids[0], grids[0], channels, generator=g),
                       "1024": torch.randn(grids[1], grids[1], grids[1], channels, generator=g)}
        self.device = device

    def __call__(self, stage, coords_or_shape):
        if stage == "dense":
            return self.dense.to(self.device)
        c = torch.as_tensor(coords_or_shape).long().cpu()
        return self.tables[stage][c[:, 1], c[:, 2], c[:, 3]].to(self.device)


@contextlib.contextmanager
def injected_randn(fn):
    orig = torch.randn

    def randn(*shape, dtype=None, device=None, generator=None, **kw):
        out = fn(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape)
        return out.to(device=device or out.device, dtype=dtype or out.dtype)

    torch.randn = randn
    try:
        yield
    finally:
        torch.randn = orig


def chamfer_voxels(va: np.ndarray, vb: np.ndarray, resolution: int) -> dict:
    from scipy.spatial import cKDTree

    voxel = 2.0 / resolution
    da = cKDTree(vb).query(va)[0]
    db = cKDTree(va).query(vb)[0]
    return {"chamfer_voxels": float((da.mean() + db.mean()) / 2 / voxel),
            "hausdorff_voxels": float(max(da.max(), db.max()) / voxel)}


@torch.no_grad()
def end_to_end(h, image_path: Path, resolution: int = 1024, seed: int = 0) -> dict:
    name = f"end to end {h.version} at {resolution} (same noise, both pipelines)"
    if h.device.type != "cuda":
        return {"row": name, "ok": None, "skipped": "the authors' pipeline needs CUDA"}
    from PIL import Image

    from d3s2.models.image_encoder import DINOv2Encoder
    from d3s2.pipelines.release_pipeline import load_official_pipeline
    from direct3d_s2.pipeline import Direct3DS2Pipeline
    from diffusers import FlowMatchEulerDiscreteScheduler

    dev = h.device
    torch.manual_seed(seed)
    enc = DINOv2Encoder().eval().to(dev)
    shared = SharedEncoder(enc)
    theirs_models = {k: h.release_fp16(k) for k in ("dense_vae", "dense_dit", "sparse_vae_512", "sparse_dit_512",
                                                    "sparse_vae_1024", "sparse_dit_1024")}
    refiners = {k: h.release_fp16(k) for k in ("refiner", "refiner_1024")}
    shifts = {"dense": 6.0, "512": 6.0, "1024": 8.0}
    pipe_t = Direct3DS2Pipeline(
        dense_vae=theirs_models["dense_vae"], dense_dit=theirs_models["dense_dit"],
        sparse_vae_512=theirs_models["sparse_vae_512"], sparse_dit_512=theirs_models["sparse_dit_512"],
        sparse_vae_1024=theirs_models["sparse_vae_1024"], sparse_dit_1024=theirs_models["sparse_dit_1024"],
        refiner=refiners["refiner"], refiner_1024=refiners["refiner_1024"], dense_image_encoder=shared,
        sparse_image_encoder=shared,
        dense_scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shifts["dense"]),
        sparse_scheduler_512=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shifts["512"]),
        sparse_scheduler_1024=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shifts["1024"]))
    pipe_t.to(dev)
    cfg = h.ours.configs["dense_dit"][1]
    noise = NoiseTables((1, cfg.in_channels, cfg.resolution, cfg.resolution, cfg.resolution),
                        h.ours.configs["ss_dit_512"][1].in_channels, device=dev)
    original = pipe_t.inference
    seen = {}

    def inference(image, vae, dit, conditioner, scheduler, *a, latent_index=None, mode="dense", **kw):
        stage = {"dense": "dense", "sparse512": "512", "sparse1024": "1024"}[mode]
        if latent_index is not None:
            seen[stage] = latent_index[:, 1:].cpu().numpy()
        with injected_randn(lambda shape: noise(stage, latent_index if latent_index is not None else shape)):
            return original(image, vae, dit, conditioner, scheduler, *a, latent_index=latent_index, mode=mode, **kw)

    pipe_t.inference = inference
    img = Image.open(image_path).convert("RGBA")
    t0 = time.perf_counter()
    mesh_t = pipe_t(img, sdf_resolution=resolution, generator=torch.Generator(dev).manual_seed(seed))["mesh"]
    sec_t = time.perf_counter() - t0
    peak_t = torch.cuda.max_memory_allocated(dev)
    for m in (*theirs_models.values(), *refiners.values()):
        m.cpu()
    del pipe_t
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)

    pipe_o = load_official_pipeline(h.folder, device=dev, image_encoder=enc, matting="none")
    got = {}

    def noise_hook(stage, coords_or_shape):
        if stage != "dense":
            got[stage] = torch.as_tensor(coords_or_shape)[:, 1:].cpu().numpy()
        return noise(stage, coords_or_shape)

    t0 = time.perf_counter()
    out_o = pipe_o(img, generator=torch.Generator().manual_seed(seed), resolution=resolution, progress=False,
                   hooks={"noise": noise_hook})
    mesh_o = out_o.meshes[0]
    sec_o = time.perf_counter() - t0
    peak_o = torch.cuda.max_memory_allocated(dev)
    tokens = {}
    for stage in ("512", "1024"):
        if stage in seen and stage in got:
            a = {tuple(r) for r in got[stage].tolist()}
            b = {tuple(r) for r in seen[stage].tolist()}
            tokens[stage] = {"ours": len(a), "theirs": len(b), "only_ours": len(a - b), "only_theirs": len(b - a)}
    va, vb = np.asarray(mesh_o.vertices), np.asarray(mesh_t.vertices)
    cham = chamfer_voxels(va, vb, resolution)
    return {"row": name, **cham, "bound": "chamfer <= 0.5 voxel", "ok": cham["chamfer_voxels"] <= 0.5,
            "max_vertex_distance": vertex_distance(va, vb), "faces_ours": len(mesh_o.faces),
            "faces_theirs": len(mesh_t.faces), "tokens": tokens, "seconds_ours": sec_o, "seconds_theirs": sec_t,
            "peak_gpu_bytes_ours": peak_o, "peak_gpu_bytes_theirs": peak_t, "device": str(dev), "dtype": "float16",
            "stats_ours": out_o.stats}
