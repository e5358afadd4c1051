"""Image-to-3D inference pipeline (paper Sec. 4.3 / 5.2; recipe of shared/reference/official-release.md).

A call returns an :class:`~d3s2.pipelines.output_types.ImageTo3DOutput` (meshes, stats, notes). Stages, each timed
(seconds and peak GPU memory) in its ``stats`` (also kept as :attr:`ImageTo3DPipeline.last_stats`):

1. ``preprocess``: :func:`d3s2.pipelines.preprocess.preprocess_image` (RGB + mask at the encoder's image size).
2. ``condition``: DINOv2 tokens; sparse conditioning (Eq. 9) for SS-DiTs with ``sparse_conditioning`` (v1.0), dense
   tokens otherwise (v1.1); the unconditional input is ``zeros_like`` (CFG).
3. ``structure``: DenseDiT on the dense latent from noise, DenseShapeVAE decode, ``sigmoid >= threshold`` -> latent
   coordinates of the first sparse stage (grid = dense VAE resolution = SS-VAE resolution / 8).
4. ``sparse_512``: SS-DiT on those coordinates, SS-VAE decode (tanh SDF in ``s / tau`` units, negative inside), sparse
   marching cubes at ``mc_level_512``.
5. ``sparse_1024`` (optional): unsigned band of the 512 mesh at the 1024 grid (``tau = band_voxels / R``),
   ``coords // 8`` -> latent coordinates, SS-DiT-1024 from fresh noise, SS-VAE-1024 decode in spatial chunks
   (:meth:`d3s2.models.ss_vae.SSVAE.decode` with ``chunk``, exact), marching cubes at ``mc_level_1024``.
6. ``cleanup``: floaters, optional decimation to ``faces`` (:func:`d3s2.geometry.cleanup.clean_mesh`); with
   ``min_area_fraction = 0`` and no ``faces`` there is nothing to do (vertex normals are computed on the device right
   after marching cubes), which saves seconds on the millions of faces of a 1024 mesh.

Marching-cubes levels, in the decoder's tanh units (1 = ``tau`` outside): the release extracts at 0.2 at 1024 and at
0.4 at 512 on the output of its dense refiner, which d3s2 does not run. Without a refiner the 512 SDF is taken at its
zero level (``mc_level_512 = 0.0``, the surface the VAE was trained to put at 0); ``mc_level_1024`` defaults to the
release's 0.2. Both are settings in ``pipeline.yaml``.

No dense grid above the structure stage's 64^3 is built: the 1024 band comes from a sparse octree
(:func:`latent_band_coords`; on CUDA with warp-lang it runs on the GPU, BVH distance queries included), decoding and
surface extraction run on sparse voxels.

Precision: the models run in ``dtype`` (bf16 on CUDA, the image encoder in fp32), the flow latents are integrated in
fp32 (a bf16 latent would lose the small Euler increments of the last steps) and cast to the model dtype inside each
model call. Each stage entry of :attr:`last_stats` also holds ``parts``: seconds and peak GPU bytes of its pieces
(``dit``, ``decode``, ``marching_cubes``, ``band``, ``to_device`` / ``offload`` with ``low_vram``).

Folder format (``save_pretrained`` / ``from_pretrained`` / ``from_config``): :mod:`d3s2.pipelines.folder_format`
(``pipeline.yaml`` + one ``<component>.safetensors`` per model). Device placement, low-VRAM offload and the timing
of stages and parts: :mod:`d3s2.pipelines.runtime`. The sparse stages (4, 5: sampling, decoding, refiner, marching
cubes, the 1024 band): :mod:`d3s2.pipelines.sparse_stage`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from d3s2.config import load_yaml, model_class, resolve_config_path
from d3s2.errors import D3S2Error
from d3s2.pipelines.folder_format import (
    COMPONENTS,
    FORMAT_TAG,
    OPTIONAL_COMPONENTS,
    STAGE_1024_COMPONENTS,
    Component,
    PipelineSettings,
    parse_pipeline_config,
    pipeline_yaml_dict,
    read_pipeline_folder,
    write_pipeline_folder,
)
from d3s2.pipelines.official import release_pipeline_parts
from d3s2.pipelines.output_types import ImageTo3DOutput
from d3s2.pipelines.runtime import PipelineRuntime, StepBar, collect_notes
from d3s2.pipelines.sparse_stage import SparseStages
from d3s2.pipelines.token_band import latent_band_coords
from d3s2.pipelines.validation import require_finite as _require_finite
from d3s2.pipelines.validation import stage_override

__all__ = ["PipelineSettings", "ImageTo3DPipeline", "ImageTo3DOutput", "latent_shell_coords",
           "latent_band_coords", "COMPONENTS", "OPTIONAL_COMPONENTS", "STAGE_1024_COMPONENTS", "FORMAT_TAG"]


def latent_shell_coords(coords: np.ndarray | torch.Tensor, factor: int = 8, batch: int = 0) -> torch.Tensor:
    """Voxel coordinates ``[N, 3]`` -> unique latent coordinates ``[M, 4]`` (batch, x, y, z) = ``coords // factor``."""
    c = torch.as_tensor(np.asarray(coords), dtype=torch.int64).reshape(-1, 3)
    lat = torch.unique(torch.div(c, factor, rounding_mode="floor"), dim=0)
    return torch.cat([torch.full((len(lat), 1), batch, dtype=torch.int64), lat], 1).to(torch.int32)


class ImageTo3DPipeline:
    """Image(s) -> :class:`~d3s2.pipelines.output_types.ImageTo3DOutput` (one ``trimesh.Trimesh`` per image; see
    the module docstring).

    ``models``: dict with the modules named in :data:`COMPONENTS` (and optionally :data:`OPTIONAL_COMPONENTS`);
    ``samplers``: per DiT component a :class:`~d3s2.flow.SamplerConfig` (steps / cfg / shift defaults).
    ``low_vram``: keep models on the CPU (pinned) and upload each to ``device`` only for its stage (default: on CUDA
    when the free memory is below the weights' size in the run dtypes plus a 10 GiB working set).
    ``matting``: ``"birefnet" | "border" | "none"`` or None (BiRefNet when installed) for images without alpha
    (:mod:`d3s2.pipelines.matting`); a ``background_remover`` callable replaces it."""

    def __init__(self, models: dict[str, torch.nn.Module], samplers: dict[str, Any] | None = None,
                 settings: PipelineSettings | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, low_vram: bool | None = None,
                 component_configs: dict[str, Component] | None = None, encoder_config: Any = None,
                 background_remover: Callable | None = None, matting: str | None = None) -> None:
        missing = [c for c in COMPONENTS if c not in models]
        if missing:
            raise D3S2Error(f"pipeline is missing component(s): {', '.join(missing)}")
        if ("ss_vae_1024" in models) != ("ss_dit_1024" in models):
            raise D3S2Error("the 1024 stage needs both ss_vae_1024 and ss_dit_1024")
        empty = [n for n, m in models.items() if any(p.is_meta for p in m.parameters())]
        if empty:
            raise D3S2Error(f"component(s) {', '.join(empty)} hold no weights (meta tensors): load their checkpoints "
                            "first (or leave them out, e.g. refiners=False)")
        self.models = dict(models)
        self.samplers = dict(samplers or {})
        self.settings = settings or PipelineSettings()
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.component_configs = component_configs or {}
        self.encoder_config = encoder_config if encoder_config is not None else models["image_encoder"].config
        if background_remover is None:
            from d3s2.pipelines.matting import background_remover_for

            background_remover = background_remover_for(matting, device=self.device)
        elif matting is not None:
            raise D3S2Error("give matting= or background_remover=, not both")
        self.background_remover = background_remover
        self.last_stats: list[dict[str, Any]] = []
        for m in self.models.values():
            m.eval().requires_grad_(False)
        self._check_dims()
        self.runtime = PipelineRuntime(self.models, self.device, self.dtype, low_vram)

    # ------------------------------------------------------------------ construction
    def _check_dims(self) -> None:
        m = self.models
        enc_c = m["image_encoder"].config.embed_dim
        dvae, ddit = m["dense_vae"].config, m["dense_dit"].config
        if ddit.cond_channels != enc_c:
            raise D3S2Error(f"dense_dit.cond_channels {ddit.cond_channels} != image encoder width {enc_c}")
        if dvae.latent_resolution != ddit.resolution or dvae.latent_channels != ddit.in_channels:
            raise D3S2Error(f"dense_dit (res {ddit.resolution}, {ddit.in_channels} ch) does not match the dense VAE "
                            f"latent (res {dvae.latent_resolution}, {dvae.latent_channels} ch)")
        for s in ("512", "1024"):
            if f"ss_dit_{s}" not in m:
                continue
            dit, vae = m[f"ss_dit_{s}"].config, m[f"ss_vae_{s}"].config
            if dit.cond_channels != enc_c:
                raise D3S2Error(f"ss_dit_{s}.cond_channels {dit.cond_channels} != image encoder width {enc_c}")
            if dit.in_channels != vae.latent_channels:
                raise D3S2Error(f"ss_dit_{s} has {dit.in_channels} channels, ss_vae_{s} latent has "
                                f"{vae.latent_channels}")

    @property
    def resolution_512(self) -> int:
        """Voxel grid of the first sparse stage (512 for the release; smaller for the tiny configs)."""
        return self.models["dense_vae"].config.resolution * self.models["ss_vae_512"].config.downsample_factor

    @property
    def resolution_1024(self) -> int | None:
        return 2 * self.resolution_512 if "ss_dit_1024" in self.models else None

    @classmethod
    def from_config(cls, config: str | os.PathLike | dict, seed: int | None = 0, **kwargs) -> "ImageTo3DPipeline":
        """Random-weight pipeline from a pipeline YAML (``configs/pipeline_*.yaml`` name, path, or parsed dict)."""
        from d3s2.models.image_encoder import DINOv2Encoder

        if isinstance(config, dict):
            data, where = config, "pipeline config"
        else:
            path = resolve_config_path(config)
            data, where = load_yaml(path), path.name
        comps, enc_cfg, settings = parse_pipeline_config(data, where)
        if seed is not None:
            torch.manual_seed(seed)
        models = {"image_encoder": DINOv2Encoder(enc_cfg)}
        for name, comp in comps.items():
            models[name] = model_class(comp.model)(comp.params)
        samplers = {n: c.sampler for n, c in comps.items() if c.sampler is not None}
        return cls(models, samplers, settings, component_configs=comps, encoder_config=enc_cfg, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, low_vram: bool | None = None, *,
                        revision: str | None = None, local_files_only: bool | None = None,
                        resolution: int | None = None, refiners: bool = True, **kwargs) -> "ImageTo3DPipeline":
        """Load a folder written by :meth:`save_pretrained` (``pipeline.yaml`` + one safetensors file per model), or
        the authors' release layout (``config.yaml`` + ``.ckpt``; see :mod:`d3s2.pipelines.official`), or a hub id of
        either (downloaded by :mod:`d3s2.pipelines.hub`). ``resolution=512`` skips the 1024 stage's weights;
        ``refiners=False`` leaves the refiners (``refiner_512`` / ``refiner_1024``) out."""
        from d3s2.pipelines import hub

        folder = Path(path)
        if not folder.is_dir() and hub.parse_hub_id(path) is not None:
            folder = hub.fetch_weights(path, revision=revision, local_files_only=local_files_only,
                                       resolution=resolution).folder
        if not folder.is_dir():
            raise D3S2Error(f"weights folder not found: {folder} (give a folder saved by save_pretrained, with "
                            "pipeline.yaml and one .safetensors file per model)")
        cfg_path = folder / "pipeline.yaml"
        if not cfg_path.is_file():
            if (folder / "config.yaml").is_file():
                parts = release_pipeline_parts(folder, device, dtype, resolution=resolution, refiners=refiners,
                                               **{k: kwargs.pop(k) for k in ("version", "image_encoder",
                                                                             "encoder_weights") if k in kwargs})
                return cls(**parts, low_vram=low_vram, **kwargs)
            raise D3S2Error(f"{folder}: no pipeline.yaml: not a d3s2 pipeline folder (save one with "
                            "ImageTo3DPipeline.save_pretrained)")
        read = read_pipeline_folder(folder, resolution, refiners)
        return cls(read.models, read.samplers, read.settings, device=device, dtype=dtype, low_vram=low_vram,
                   component_configs=read.components, encoder_config=read.encoder_config, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``pipeline.yaml`` + ``<component>.safetensors`` into ``path``
        (:func:`~d3s2.pipelines.folder_format.write_pipeline_folder`: written beside it and moved in, ``pipeline.yaml``
        last, so a reader never loads a half-saved pipeline)."""
        return write_pipeline_folder(path, self.models, pipeline_yaml_dict(self.models, self.samplers, self.settings))

    # ------------------------------------------------------------------ helpers
    @property
    def low_vram(self) -> bool:
        """Whether the models stay on the host between stages (:class:`~d3s2.pipelines.runtime.PipelineRuntime`)."""
        return self.runtime.low_vram

    def sampler_config(self, name: str, steps: int | None = None, guidance_scale: float | None = None,
                       shift: float | None = None):
        """The sampler settings of stage ``name`` (``dense_dit``, ``ss_dit_512``, ``ss_dit_1024``): the pipeline's
        config (else the release's 50 / 30 / 15 steps, CFG 7, shift 6 / 6 / 8), overridden where a value is given."""
        from d3s2.flow.sampler import SamplerConfig

        defaults = {"dense_dit": (50, 6.0), "ss_dit_512": (30, 6.0), "ss_dit_1024": (15, 8.0)}[name]
        base = self.samplers.get(name) or SamplerConfig(steps=defaults[0], cfg_scale=7.0, shift=defaults[1])
        return dataclasses.replace(base, steps=steps if steps is not None else base.steps,
                                   cfg_scale=guidance_scale if guidance_scale is not None else base.cfg_scale,
                                   shift=shift if shift is not None else base.shift)

    def _randn(self, shape, generator, dtype=torch.float32) -> torch.Tensor:
        # Noise is drawn on the CPU so that a seed gives the same result on any device.
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, dtype)

    def _sample(self, name, model, noise, cond, uncond, sc, kwargs, progress, desc):
        """Euler sampling of one stage with the stage's sampler settings ``sc`` (a SamplerConfig)."""
        from d3s2.flow.latents import is_sparse
        from d3s2.flow.sampler import is_guided, sample_euler

        guided = is_guided(sc.cfg_scale)
        batch_cfg = self.settings.batch_cfg
        if batch_cfg is None:
            batch_cfg = self.device.type == "cuda" or not is_sparse(noise)
        graphs = self.settings.cuda_graphs
        if graphs is None:
            graphs = self.device.type == "cuda"
        bar = StepBar(sc.steps, desc, progress)
        try:
            return sample_euler(model, noise, cond, uncond if guided else None, steps=sc.steps,
                                guidance_scale=sc.cfg_scale, shift=sc.shift, t_scale=sc.t_scale, batch_cfg=batch_cfg,
                                model_kwargs=kwargs, schedule=sc.schedule, state_dtype=sc.state_dtype,
                                model_dtype=self.dtype, cuda_graphs=graphs and is_sparse(noise), step_callback=bar)
        finally:
            bar.close()

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def encode_images(self, images: list) -> torch.Tensor:
        from d3s2.pipelines.preprocess import preprocess_image

        size = self.models["image_encoder"].config.image_size
        return torch.stack([preprocess_image(im, size=size, pad=self.settings.image_pad,
                                             background_remover=self.background_remover,
                                             mode=self.settings.preprocess) for im in images])

    @torch.no_grad()
    def _condition(self, pixels: torch.Tensor):
        from d3s2.models.conditioning import sparse_condition

        with self.runtime.use("image_encoder") as (enc,):
            with self.runtime.part("encoder"):
                tokens = enc(pixels.to(self.device)).float()
        out = {"dense": tokens}
        for s in ("512", "1024"):
            dit = self.models.get(f"ss_dit_{s}")
            if dit is not None and dit.config.sparse_conditioning:
                num_prefix = 1 + int(enc.config.num_registers)
                out[s] = sparse_condition(tokens, pixels[:, 3].to(self.device), num_prefix)
        return out

    @torch.no_grad()
    def _structure(self, cond, generator, steps, guidance_scale, shift, progress, hook=None,
                   noise_hook=None) -> torch.Tensor:
        from d3s2.models.dense_vae import occupancy_to_coords

        dit_cfg = self.models["dense_dit"].config
        b = cond["dense"].shape[0]
        r = dit_cfg.resolution
        shape = (b, dit_cfg.in_channels, r, r, r)
        noise = (self._randn(shape, generator) if noise_hook is None  # fp32 latent, cast inside the model
                 else torch.as_tensor(noise_hook("dense", shape)).to(self.device, torch.float32))
        sc = self.sampler_config("dense_dit", steps, guidance_scale, shift)
        with self.runtime.use("dense_dit") as (dit,):
            tokens = cond["dense"].to(self.dtype)
            with self.runtime.part("dit"):
                latent = self._sample("dense_dit", dit, noise, tokens, torch.zeros_like(tokens), sc, {}, progress,
                                      "structure")
        with self.runtime.use("dense_vae") as (vae,):
            with self.runtime.part("decode"):
                logits = vae.decode(latent)
                _require_finite(logits, "structure")
                coords = occupancy_to_coords(logits, self.settings.occupancy_threshold)
        if hook is not None:
            with self.runtime.part("hook"):
                coords = torch.as_tensor(hook(coords)).to(self.device, torch.int32)
        counts = torch.bincount(coords[:, 0].long(), minlength=b)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            raise D3S2Error(f"no shape found for image(s) {empty} (the structure stage gave no voxels); "
                            "try another seed")
        return coords

    # ------------------------------------------------------------------ call
    def __call__(self, image: Any, generator: torch.Generator | None = None, resolution: int = 512,
                 num_inference_steps: dict[str, int | None] | int | None = None,
                 guidance_scale: dict[str, float | None] | float | None = None,
                 shift: dict[str, float | None] | float | None = None, faces: int | None = None,
                 progress: bool = True, structure_coords: torch.Tensor | None = None,
                 hooks: dict[str, Callable] | None = None) -> ImageTo3DOutput:
        """Generate one mesh per image: an :class:`~d3s2.pipelines.output_types.ImageTo3DOutput` (``meshes``,
        ``stats``, ``notes``; indexing / iterating it gives the meshes, as the list returned before).

        ``image``: a path, PIL image, array or a list of them. ``resolution``: 512 (first sparse stage) or 1024 (adds
        the refinement stage; needs its models). For the tiny configs these name the stages, whose grids are
        :attr:`resolution_512` / :attr:`resolution_1024`. ``num_inference_steps`` / ``guidance_scale`` / ``shift``:
        one value for every stage or a dict with keys ``dense``, ``512``, ``1024`` (defaults from the configs, the
        release's 50 / 30 / 15 steps, CFG 7, shift 6 / 6 / 8). ``faces``: decimate to about this many faces.
        ``structure_coords``: DEBUGGING / BENCHMARK HOOK: int ``[N, 4]`` (batch, x, y, z) latent coordinates of the
        first sparse stage that replace the structure stage (e.g. a real mesh's latent shell, so that random-weight
        models see a realistic token set). ``hooks``: BENCHMARK HOOKS that keep every stage running but replace its
        result: ``"structure"``: ``fn(coords [N, 4]) -> coords`` after the structure stage; ``"decoded"``:
        ``fn(stage "512" | "1024", decoded SparseTensor) -> SparseTensor`` after each SS-VAE decode (e.g. a real
        mesh's SDF on the decoded voxels, so that marching cubes, the 1024 band and clean-up see a real surface);
        their time is reported as the part ``hook``; ``"refined"``: ``fn(stage, fields) -> fields`` after a refiner
        run (:class:`~d3s2.geometry.refine.RefinedField` per sample; random refiner weights give no shape);
        ``"noise"``: ``fn("dense", shape)`` / ``fn("512" | "1024",
        coords [N, 4])`` -> the initial noise (the parity harness injects the same noise into the authors' pipeline).
        Per-stage seconds and peak GPU bytes (and ``parts``): the output's ``stats`` (also :attr:`last_stats`) and
        each mesh's ``metadata["d3s2_stats"]``. User-facing warnings of the run (:class:`UserWarning`, e.g. an image
        without alpha channel) are the output's ``notes``; they are still emitted as warnings, after the run."""
        notes: list[str] = []
        with collect_notes(notes):
            meshes = self._generate(image, generator, resolution, num_inference_steps, guidance_scale, shift, faces,
                                    progress, structure_coords, hooks)
        return ImageTo3DOutput(meshes, self.last_stats, notes)

    @torch.no_grad()
    def _generate(self, image, generator, resolution, num_inference_steps, guidance_scale, shift, faces, progress,
                  structure_coords, hooks) -> list:
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise D3S2Error("no images given")
        if resolution not in (512, 1024):
            raise D3S2Error(f"resolution must be 512 or 1024, got {resolution}")
        if resolution == 1024 and "ss_dit_1024" not in self.models:
            raise D3S2Error("this pipeline has no 1024 stage (ss_vae_1024 / ss_dit_1024); use resolution=512")
        from d3s2.pipelines.validation import check_overrides

        check_overrides(num_inference_steps, guidance_scale, shift)  # before any stage runs
        hooks = dict(hooks or {})
        unknown = set(hooks) - {"structure", "decoded", "refined", "noise"}
        if unknown:
            raise D3S2Error(f"unknown hook(s) {sorted(unknown)} (valid: structure, decoded, refined, noise)")
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))

        stats: list[dict] = []
        self.last_stats = stats
        b = len(images)
        t_all = time.perf_counter()
        pixels = self.runtime.stage("preprocess", stats, self.encode_images, images)
        cond = self.runtime.stage("condition", stats, self._condition, pixels)
        if structure_coords is None:
            coords = self.runtime.stage("structure", stats, self._structure, cond, generator,
                                        stage_override(num_inference_steps, "dense"),
                                        stage_override(guidance_scale, "dense"), stage_override(shift, "dense"),
                                        progress, hooks.get("structure"), hooks.get("noise"))
        else:
            coords = torch.as_tensor(structure_coords).to(torch.int32)
            if coords.ndim != 2 or coords.shape[1] != 4 or coords.shape[0] == 0:
                raise D3S2Error("structure_coords must be a non-empty int tensor [N, 4] (batch, x, y, z)")
            r = self.models["dense_vae"].config.resolution
            if int(coords[:, 1:].min()) < 0 or int(coords[:, 1:].max()) >= r or int(coords[:, 0].max()) >= b:
                raise D3S2Error(f"structure_coords must lie in [0, {r}) with batch index < {b}")
        sparse = SparseStages(self, b, cond, generator, num_inference_steps, guidance_scale, shift, progress, hooks)
        meshes = self.runtime.stage("sparse_512", stats, sparse.run, "512", coords, self.resolution_512,
                                    self.settings.mc_level_512)
        if resolution == 1024:
            meshes = self.runtime.stage("sparse_1024", stats, sparse.run_1024, meshes, self.resolution_1024,
                                        self.settings.mc_level_1024)

        def cleanup():
            from d3s2.geometry.cleanup import clean_mesh

            st = self.settings
            if st.min_area_fraction <= 0 and st.min_volume_fraction <= 0 and faces is None and not st.remove_enclosed:
                # nothing to remove or decimate: the marching-cubes meshes (welded, vertex normals computed on the
                # device) are final; clean_mesh would only rebuild them (seconds at 1024)
                return meshes
            with self.runtime.part("clean_mesh"):
                return [clean_mesh(m, min_area_fraction=st.min_area_fraction, min_volume_fraction=st.min_volume_fraction,
                                   remove_enclosed=st.remove_enclosed, target_faces=faces) for m in meshes]

        meshes = self.runtime.stage("cleanup", stats, cleanup)
        from d3s2.geometry.report import mesh_report

        for m in meshes:  # closed / boundary edges / components / faces / volume of what is returned (issue 24)
            m.metadata["d3s2_report"] = mesh_report(m).as_dict()
        stats.append({"stage": "total", "seconds": time.perf_counter() - t_all,
                      "peak_gpu_bytes": max((s["peak_gpu_bytes"] or 0 for s in stats), default=0)
                      if self.device.type == "cuda" else None})
        for m in meshes:
            m.metadata["d3s2_stats"] = [dict(s) for s in stats]
        return meshes
