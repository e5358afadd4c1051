"""The sparse stages of :class:`~d3s2.pipelines.image_to_3d.ImageTo3DPipeline` (``sparse_512`` / ``sparse_1024``;
paper Sec. 4.3).

One stage: SS-DiT sampling on the stage's latent coordinates from fresh noise, SS-VAE decoding (in spatial chunks,
exact), the stage's refiner run when the pipeline has one (:mod:`d3s2.pipelines.refining`), then per sample marching
cubes (:mod:`d3s2.pipelines.surface`) and vertex normals on the compute device. The 1024 stage's latent coordinates
come from the 512 meshes (:meth:`SparseStages.band_coords`, :mod:`d3s2.pipelines.token_band`).

:class:`SparseStages` holds what one pipeline call gives every sparse stage (batch size, conditioning, generator,
per-stage sampler overrides, hooks); it runs the pipeline's models through the pipeline's runtime, so every piece is
timed into the current stage's ``parts``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from d3s2.errors import D3S2Error
from d3s2.pipelines.runtime import StepBar
from d3s2.pipelines.token_band import band_queries, latent_band_coords
from d3s2.pipelines.validation import require_finite, stage_override

if TYPE_CHECKING:
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

__all__ = ["SparseStages"]


class SparseStages:
    """The sparse stages of one call of ``pipe``: ``b`` images, their conditioning ``cond`` (dense tokens and, for
    sparse conditioning, per-stage sparse tokens), the call's ``generator``, ``steps`` / ``guidance_scale`` /
    ``shift`` overrides (one value or a dict keyed ``"512"`` / ``"1024"``), ``progress`` and the ``hooks`` dict
    (``decoded``, ``refined``, ``noise``; see :meth:`ImageTo3DPipeline.__call__`)."""

    def __init__(self, pipe: ImageTo3DPipeline, b: int, cond: dict, generator: torch.Generator, steps: Any,
                 guidance_scale: Any, shift: Any, progress: bool, hooks: dict[str, Callable]) -> None:
        self.pipe, self.b, self.cond, self.generator = pipe, b, cond, generator
        self.steps, self.guidance_scale, self.shift = steps, guidance_scale, shift
        self.progress, self.hooks = progress, hooks

    def run(self, stage: str, coords: torch.Tensor, resolution: int, level: float) -> list:
        """Stage ``"512"`` / ``"1024"`` on latent ``coords [N, 4]``: one ``trimesh.Trimesh`` per image, meshed at
        ``level`` (at the refined field's level when the stage is refined)."""
        from d3s2.pipelines.refining import refined_level, refiner_name

        pipe, hooks = self.pipe, self.hooks
        refine = refiner_name(pipe.models, pipe.settings, stage) is not None
        out = self._sample_decode(stage, coords, pipe.settings.decode_chunk, hooks.get("decoded"), hooks.get("noise"),
                                  features=refine and stage == "512")
        if not refine:
            return self._meshes(out, resolution, level)
        dec, feats = out if stage == "512" else (out, None)
        fields = self._refined(stage, dec, feats, resolution)
        del dec, feats, out
        if hooks.get("refined") is not None:
            with pipe.runtime.part("hook"):
                fields = hooks["refined"](stage, fields)
        return self._meshes(None, resolution, refined_level(pipe.settings, stage), fields)

    @torch.no_grad()
    def _sample_decode(self, stage: str, coords: torch.Tensor, chunk: int | None, hook=None, noise_hook=None,
                       features: bool = False):
        """SS-DiT sampling + SS-VAE decoding of one sparse stage: the decoded SparseTensor, or with ``features``
        a pair ``(decoded, decoder features)`` (the 512 SDF refiner's input)."""
        from d3s2.sparse import SparseTensor

        pipe, cond = self.pipe, self.cond
        dit_name, vae_name = f"ss_dit_{stage}", f"ss_vae_{stage}"
        dit_cfg = pipe.models[dit_name].config
        coords = coords.to(pipe.device, torch.int32)
        noise = (pipe._randn((coords.shape[0], dit_cfg.in_channels), self.generator) if noise_hook is None  # fp32
                 else torch.as_tensor(noise_hook(stage, coords)).to(pipe.device, torch.float32))
        x = SparseTensor(noise, coords, batch_size=self.b)
        sc = pipe.sampler_config(dit_name, stage_override(self.steps, stage),
                                 stage_override(self.guidance_scale, stage), stage_override(self.shift, stage))
        if stage in cond:  # sparse conditioning (v1.0)
            sparse = cond[stage]
            tokens = sparse.tokens.to(pipe.dtype)
            kwargs = {"cond_mask": sparse.mask, "cond_coords": sparse.coords}
        else:
            tokens, kwargs = cond["dense"].to(pipe.dtype), {}
        with pipe.runtime.use(dit_name) as (dit,):
            with pipe.runtime.part("dit"):
                latent = pipe._sample(dit_name, dit, x, tokens, torch.zeros_like(tokens), sc, kwargs, self.progress,
                                      f"sparse {stage}")
        del x, noise
        with pipe.runtime.use(vae_name) as (vae,):
            with pipe.runtime.part("decode"):
                vae_dtype = next(vae.parameters()).dtype
                decoded = vae.decode(latent.replace(latent.feats.to(vae_dtype)), chunk, return_features=features)
        feats = None
        if features:
            decoded, feats = decoded
        require_finite(decoded.feats, f"sparse {stage}")
        if hook is not None:
            with pipe.runtime.part("hook"):
                decoded = hook(stage, decoded)
                if feats is not None and len(feats) != decoded.num_voxels:
                    raise D3S2Error(f"the 'decoded' hook changed the {stage} stage's voxels; with the refiner on, "
                                    "keep the voxels (values only) or set settings.refine = False")
        return (decoded, feats) if features else decoded

    def _refined(self, stage: str, decoded, features, resolution: int) -> list:
        """The stage's refiner run (:mod:`d3s2.pipelines.refining`): one refined field per sample."""
        from d3s2.pipelines.refining import refine_decoded, refined_level, refiner_name

        pipe = self.pipe
        name = refiner_name(pipe.models, pipe.settings, stage)
        bar = StepBar(27, f"refiner {stage}", self.progress)
        try:
            with pipe.runtime.use(name) as (net,):
                with pipe.runtime.part("refiner"):
                    return refine_decoded(net, stage, decoded, features, self.b, resolution,
                                          refined_level(pipe.settings, stage), progress=lambda i, n: bar(i))
        finally:
            bar.close()

    def _meshes(self, decoded, resolution: int, level: float, fields: list | None = None) -> list:
        """One mesh per sample from the decoded SDF, or from the refined ``fields`` when the stage was refined."""
        import trimesh

        from d3s2.geometry.cleanup import vertex_normals
        from d3s2.pipelines.surface import extract_refined_surface, extract_surface

        runtime, settings = self.pipe.runtime, self.pipe.settings
        out = []
        for i in range(self.b):
            with runtime.part("marching_cubes"):
                if fields is not None:
                    verts, faces = extract_refined_surface(fields[i], settings)
                else:
                    sel = decoded.coords[:, 0] == i
                    verts, faces = extract_surface(decoded.coords[sel, 1:], decoded.feats[sel, 0].float(),
                                                   resolution, level, settings)
            if len(faces) == 0:
                raise D3S2Error(f"image {i}: the decoded SDF has no surface at level {level} at "
                                f"{resolution}^3; try another seed")
            with runtime.part("normals"):  # on the compute device: trimesh's take seconds on millions of faces
                normals = vertex_normals(verts, faces)
            with runtime.part("to_host"):
                out.append(trimesh.Trimesh(verts.cpu().numpy(), faces.cpu().numpy(),
                                           vertex_normals=normals.cpu().numpy(), process=False))
        return out

    def band_coords(self, meshes: list, resolution: int) -> torch.Tensor:
        """Latent coordinates of the 1024 stage from each 512 mesh (:mod:`d3s2.pipelines.token_band`: GPU octree on
        CUDA with warp-lang, libigl on the CPU; ``settings.band`` picks d3s2's or the release's rule)."""
        from d3s2.pipelines.token_band import RELEASE_BAND_VOXELS, release_band_mesh

        pipe = self.pipe
        factor = pipe.models["ss_vae_1024"].config.downsample_factor
        release = pipe.settings.band == "release"
        parts = []
        for i, mesh in enumerate(meshes):
            v = release_band_mesh(mesh.vertices) if release else np.asarray(mesh.vertices, dtype=np.float64)
            f = np.asarray(mesh.faces, dtype=np.int64)
            tau = RELEASE_BAND_VOXELS / resolution if release else pipe.settings.band_voxels / resolution
            with pipe.runtime.part("band_bvh"):
                queries = band_queries(v, f, pipe.device)
            with pipe.runtime.part("band"):
                lat = latent_band_coords(v, f, resolution, tau, factor, device=pipe.device, batch=i, queries=queries,
                                         rule=pipe.settings.band)
            del queries
            if len(lat) == 0:
                raise D3S2Error(f"image {i}: the 512 mesh has no band voxels at {resolution}^3")
            parts.append(lat)
        return torch.cat(parts)

    def run_1024(self, meshes_512: list, resolution: int, level: float) -> list:
        """The 1024 stage: its latent band from the 512 meshes, then :meth:`run`."""
        return self.run("1024", self.band_coords(meshes_512, resolution), resolution, level)
