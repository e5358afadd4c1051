"""The d3s2 pipeline folder format: ``pipeline.yaml`` and one ``<component>.safetensors`` per model.

``pipeline.yaml`` holds a format tag (:data:`FORMAT_TAG`), the inference settings (:class:`PipelineSettings`), the
image encoder's config and, per component, its model config inline: ``model``, ``params``, ``sampler``. The
components are :data:`COMPONENTS` (``image_encoder, dense_vae, dense_dit, ss_vae_512, ss_dit_512``) and optionally
:data:`OPTIONAL_COMPONENTS` (``ss_vae_1024, ss_dit_1024`` and the refiners). A shipped config such as
``configs/pipeline_tiny.yaml`` has the same layout but may name model configs (``config: dense_dit_tiny``) with
``params`` / ``sampler`` overrides.

Implemented here: the parse of such a mapping (:func:`parse_pipeline_config`: one :class:`Component` per model, the
encoder config, the settings), reading a saved folder into models (:func:`read_pipeline_folder`), the mapping a
pipeline saves (:func:`pipeline_yaml_dict`) and the atomic write of a folder (:func:`write_pipeline_folder`).
:class:`~d3s2.pipelines.image_to_3d.ImageTo3DPipeline` uses them in ``from_config`` / ``from_pretrained`` /
``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from d3s2.config import from_dict, load_yaml, model_class, resolve_config_path
from d3s2.errors import D3S2Error

__all__ = ["FORMAT_TAG", "COMPONENTS", "OPTIONAL_COMPONENTS", "STAGE_1024_COMPONENTS", "COMPONENT_KINDS",
           "PipelineSettings", "Component", "PipelineFolder", "parse_component", "encoder_config",
           "parse_pipeline_config", "read_pipeline_folder", "pipeline_yaml_dict", "write_pipeline_folder"]

FORMAT_TAG = "d3s2-pipeline/1"
COMPONENTS = ("image_encoder", "dense_vae", "dense_dit", "ss_vae_512", "ss_dit_512")
OPTIONAL_COMPONENTS = ("ss_vae_1024", "ss_dit_1024", "refiner_512", "refiner_1024")
STAGE_1024_COMPONENTS = ("ss_vae_1024", "ss_dit_1024", "refiner_1024")
# component -> the model registry name (d3s2.config.MODEL_REGISTRY) it must be
COMPONENT_KINDS = {"dense_vae": "dense_vae", "dense_dit": "dense_dit", "ss_vae_512": "ss_vae", "ss_dit_512": "ss_dit",
                   "ss_vae_1024": "ss_vae", "ss_dit_1024": "ss_dit", "refiner_512": "sdf_refiner",
                   "refiner_1024": "sign_refiner"}


@dataclass
class PipelineSettings:
    """Inference settings stored in ``pipeline.yaml`` (``settings:``)."""

    occupancy_threshold: float = 0.1
    mc_level_512: float = 0.0
    mc_level_1024: float = 0.2
    # the release's refiners (components refiner_512 / refiner_1024, pipelines/refining.py) when the pipeline has
    # them: the 512 SDF refiner's output is meshed at mc_level_512_refined (the release: 0.4), the 1024 sign
    # refiner's field at mc_level_1024
    refine: bool = True
    mc_level_512_refined: float = 0.4
    band_voxels: float = 4.0  # 1024 stage: unsigned band |d| < band_voxels / R of the 512 mesh
    decode_chunk: int | None = 64  # latent voxels per side of one SS-VAE decoding chunk (None: one shot)
    min_area_fraction: float = 0.0  # cleanup: drop components below this fraction of the area
    image_pad: int | None = None  # preprocessing margin (default: 16 px at 518, scaled)
    # sparse stages: conditional + unconditional branch in one batched model call (None: on CUDA, where the SSA
    # kernels are launch-bound at the 512 stage's token counts; two calls on the CPU, where batching gains nothing)
    batch_cfg: bool | None = None
    # sparse stages with batched guidance: replay each step's model call from a CUDA graph (None: on CUDA). The token
    # set is fixed within a stage, so the graph is captured once per stage; launch overhead dominates at 512^3.
    cuda_graphs: bool | None = None
    # the release's computations where they differ from d3s2's (release folders set them; see pipelines/official.py)
    band: str = "d3s2"  # 1024 token set: "d3s2" | "release" (renormalised mesh, grid points i/(R-1)), token_band.py
    # absent voxels in marching cubes: "closed" (inside / outside values: closed surfaces, geometry/closed.py) |
    # "d3s2" (no cell: open where the band stops) | "release" (value 1.0, vertex g/R*2-1)
    surface: str = "closed"
    closed_dilation: int = 1  # surface "closed": coarse cells the band is dilated by before the outside flood fill
    closed_factor: int | None = None  # surface "closed": coarse cell size in voxels (None: grid of at most ~128^3)
    min_volume_fraction: float = 0.0  # cleanup: drop closed components below this fraction of the largest's volume
    remove_enclosed: bool = True  # cleanup: drop components inside another (generalised winding number > 0.5)
    marching_cubes: str = "lorensen"  # "lorensen" (vectorised, any device) | "lewiner" (skimage's triangles, CPU)
    preprocess: str = "d3s2"  # image framing: "d3s2" | "release" (pipelines/preprocess.py)

    def __post_init__(self) -> None:
        for name, allowed in (("band", ("d3s2", "release")), ("surface", ("closed", "d3s2", "release")),
                              ("marching_cubes", ("lorensen", "lewiner")), ("preprocess", ("d3s2", "release"))):
            if getattr(self, name) not in allowed:
                raise D3S2Error(f"settings.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.closed_dilation < 0 or (self.closed_factor is not None and self.closed_factor < 1):
            raise D3S2Error("settings.closed_dilation must be >= 0 and closed_factor >= 1 (or null)")
        if not (0 <= self.min_area_fraction < 1 and 0 <= self.min_volume_fraction < 1):
            raise D3S2Error("settings.min_area_fraction / min_volume_fraction must lie in [0, 1)")
        if self.marching_cubes == "lewiner" and self.surface != "release":
            raise D3S2Error("settings.marching_cubes 'lewiner' needs surface 'release' (a value for absent voxels)")


@dataclass
class Component:
    """One model of a pipeline: its registry name, its config dataclass and (DiTs) its sampler settings."""

    model: str
    params: Any
    sampler: Any = None


def _sampler_cls():
    from d3s2.flow.sampler import SamplerConfig

    return SamplerConfig


def parse_component(name: str, spec: Any, where: str) -> Component:
    """A component entry: a config name / path, or a mapping with ``config`` (optional), ``model``, ``params``,
    ``sampler`` (the latter two override the named config's sections field by field)."""
    if isinstance(spec, str):
        spec = {"config": spec}
    if not isinstance(spec, dict):
        raise D3S2Error(f"{where}: component '{name}' must be a config name or a mapping")
    unknown = set(spec) - {"config", "model", "params", "sampler"}
    if unknown:
        raise D3S2Error(f"{where}: component '{name}' has unknown key '{sorted(unknown)[0]}' "
                        "(valid: config, model, params, sampler)")
    base: dict[str, Any] = {}
    if "config" in spec:
        base = load_yaml(resolve_config_path(spec["config"]))
    model = spec.get("model", base.get("model"))
    if model != COMPONENT_KINDS[name]:
        raise D3S2Error(f"{where}: component '{name}' must be a '{COMPONENT_KINDS[name]}' model, got {model!r}")
    params = {**(base.get("params") or {}), **(spec.get("params") or {})}
    sampler_d = base.get("sampler"), spec.get("sampler")
    cls = model_class(model)
    p = from_dict(cls.config_class, params, f"{where}:{name}.params")
    s = None
    if sampler_d[0] is not None or sampler_d[1] is not None:
        s = from_dict(_sampler_cls(), {**(sampler_d[0] or {}), **(sampler_d[1] or {})}, f"{where}:{name}.sampler")
    return Component(model, p, s)


def encoder_config(spec: Any, where: str):
    """The image encoder's config from ``pipeline.yaml``'s ``image_encoder`` entry (``tiny``, ``release`` or a
    mapping of :class:`~d3s2.models.image_encoder.ImageEncoderConfig` fields, optionally with a ``preset``)."""
    from d3s2.models.image_encoder import ImageEncoderConfig

    if spec in (None, "release", "dinov2_vitl14_reg"):
        return ImageEncoderConfig()
    if spec == "tiny":
        return ImageEncoderConfig.tiny()
    if isinstance(spec, dict):
        spec = dict(spec)
        base = spec.pop("preset", None)
        cfg = dataclasses.asdict(ImageEncoderConfig.tiny() if base == "tiny" else ImageEncoderConfig())
        cfg.update(spec)
        cfg["weights"] = None  # weights come from the pipeline folder
        return from_dict(ImageEncoderConfig, cfg, f"{where}:image_encoder")
    raise D3S2Error(f"{where}: image_encoder must be 'tiny', 'release' or a mapping of ImageEncoderConfig fields")


def parse_pipeline_config(data: dict, where: str) -> tuple[dict[str, Component], Any, PipelineSettings]:
    """A parsed ``pipeline.yaml`` (or shipped pipeline config) -> ``(components, encoder config, settings)``."""
    unknown = set(data) - {"format", "image_encoder", "components", "settings"}
    if unknown:
        raise D3S2Error(f"{where}: unknown top-level key '{sorted(unknown)[0]}' "
                        "(valid: format, image_encoder, components, settings)")
    spec = data.get("components") or {}
    missing = [c for c in COMPONENTS[1:] if c not in spec]
    if missing:
        raise D3S2Error(f"{where}: components is missing {', '.join(missing)}")
    extra = set(spec) - set(COMPONENTS) - set(OPTIONAL_COMPONENTS)
    if extra:
        raise D3S2Error(f"{where}: unknown component '{sorted(extra)[0]}'")
    comps = {n: parse_component(n, spec[n], where) for n in (*COMPONENTS[1:], *OPTIONAL_COMPONENTS) if n in spec}
    enc = encoder_config(data.get("image_encoder"), where)
    settings = from_dict(PipelineSettings, data.get("settings"), f"{where}:settings")
    return comps, enc, settings


@dataclass
class PipelineFolder:
    """What :func:`read_pipeline_folder` read: the models with their weights and the pipeline's configuration."""

    models: dict[str, Any]
    samplers: dict[str, Any]
    settings: PipelineSettings
    components: dict[str, Component]
    encoder_config: Any


def read_pipeline_folder(folder: Path, resolution: int | None = None, refiners: bool = True) -> PipelineFolder:
    """Read a folder written by :func:`write_pipeline_folder` (``folder / "pipeline.yaml"`` must exist).
    ``resolution=512`` skips the 1024 stage's weights; ``refiners=False`` leaves the refiners out."""
    from safetensors.torch import load_file

    from d3s2.models.image_encoder import DINOv2Encoder

    cfg_path = folder / "pipeline.yaml"
    data = load_yaml(cfg_path)
    if data.get("format") != FORMAT_TAG:
        raise D3S2Error(f"{cfg_path}: format {data.get('format')!r} is not {FORMAT_TAG!r}")
    comps, enc_cfg, settings = parse_pipeline_config(data, cfg_path.name)
    if resolution == 512:
        comps = {n: c for n, c in comps.items() if n not in STAGE_1024_COMPONENTS}
    if not refiners:
        comps = {n: c for n, c in comps.items() if not n.startswith("refiner_")}
    models: dict[str, Any] = {}
    names = ["image_encoder", *comps]
    for name in names:
        f = folder / f"{name}.safetensors"
        if not f.is_file():
            raise D3S2Error(f"{folder}: missing weights file {f.name}")
        model = DINOv2Encoder(enc_cfg) if name == "image_encoder" else model_class(comps[name].model)(
            comps[name].params)
        try:
            sd = load_file(str(f))
        except Exception as exc:  # safetensors raises its own error types on corrupt headers
            raise D3S2Error(f"{f}: not a readable safetensors file ({' '.join(str(exc).split())[:200]})") from exc
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise D3S2Error(f"{f}: weights do not match the config in pipeline.yaml "
                            f"({' '.join(str(exc).split())[:300]})") from exc
        models[name] = model
    samplers = {n: c.sampler for n, c in comps.items() if c.sampler is not None}
    return PipelineFolder(models, samplers, settings, comps, enc_cfg)


def pipeline_yaml_dict(models: dict[str, Any], samplers: dict[str, Any], settings: PipelineSettings) -> dict:
    """The ``pipeline.yaml`` mapping of a pipeline's models (their ``config`` dataclasses), samplers and settings."""
    comps = {}
    for name in (*COMPONENTS[1:], *OPTIONAL_COMPONENTS):
        if name not in models:
            continue
        entry = {"model": COMPONENT_KINDS[name], "params": dataclasses.asdict(models[name].config)}
        if samplers.get(name) is not None:
            entry["sampler"] = dataclasses.asdict(samplers[name])
        comps[name] = entry
    enc = dataclasses.asdict(models["image_encoder"].config)
    enc.pop("weights", None)
    return {"format": FORMAT_TAG, "image_encoder": enc, "components": comps, "settings": dataclasses.asdict(settings)}


def write_pipeline_folder(path: str | os.PathLike, models: dict[str, Any], data: dict) -> Path:
    """Write ``pipeline.yaml`` (``data``) + ``<component>.safetensors`` into ``path``; the files are written in a
    temporary folder beside it and moved in afterwards, ``pipeline.yaml`` last, so a reader never loads a half-saved
    pipeline."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for name, m in models.items():
            sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in m.state_dict().items()}
            save_file(sd, str(tmp / f"{name}.safetensors"))
        (tmp / "pipeline.yaml").write_text(
            "# d3s2 image-to-3D pipeline (ImageTo3DPipeline.save_pretrained)\n"
            + yaml.safe_dump(data, sort_keys=False))
        if not path.exists():
            os.replace(tmp, path)
        else:
            if (path / "pipeline.yaml").exists():
                os.unlink(path / "pipeline.yaml")
            for f in sorted(tmp.iterdir(), key=lambda p: p.name == "pipeline.yaml"):
                os.replace(f, path / f.name)
            tmp.rmdir()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
