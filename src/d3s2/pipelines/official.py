"""Loader for the authors' release of Direct3D-S2 (layout in shared/reference/official-release.md).

A release folder (``direct3d-s2-v-1-0/`` or ``direct3d-s2-v-1-1/``, any name) holds ``config.yaml`` and
``model_dense.ckpt`` (``{"vae", "dit"}``: dense structure VAE / DiT), ``model_sparse_512.ckpt`` and
``model_sparse_1024.ckpt`` (``{"vae", "dit"}``: SS-VAE / SS-DiT) and the refiners ``model_refiner.ckpt`` /
``model_refiner_1024.ckpt`` (``{"refiner"}``). Checkpoints are read with ``torch.load(weights_only=True)`` only.

:func:`load_release` returns the components: the d3s2 configs come from ``config.yaml``'s params
(:mod:`d3s2.pipelines.release_config`: version from the SS-DiT's params, every parameter translated or checked), each
model is built without initialising its weights (:mod:`d3s2.models.loading`) and loaded strictly through its
``load_official_state_dict`` (the release's key layout; a mismatch names the file and the first differing keys), and
the settings are the release's recipe (diffusers' sampler grid, the renormalised 1024 token band, dense-grid
marching-cubes semantics, the release's preprocessing, fp16). :func:`release_pipeline_parts` gives the pipeline's
keyword arguments; ``d3s2.pipelines.release_pipeline.load_official_pipeline`` builds it (this module never imports
the pipeline).
The DINOv2 encoder is not part of the release: its weights come from ``encoder_weights`` or the caches searched by
:func:`d3s2.models.image_encoder.find_dinov2_weights`.

Hub ids (``wushuang98/Direct3D-S2``, optionally ``/direct3d-s2-v-1-0``) are downloaded by :mod:`d3s2.pipelines.hub`
(only the files the resolution needs; offline mode honoured; an unreachable hub gives one line naming the files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from d3s2.errors import D3S2Error

__all__ = ["OFFICIAL_REPO", "OFFICIAL_FILES", "ReleaseComponents", "resolve_official_folder", "load_release",
           "release_pipeline_parts", "read_checkpoint", "release_settings"]

OFFICIAL_REPO = "wushuang98/Direct3D-S2"
OFFICIAL_FILES = ("config.yaml", "model_dense.ckpt", "model_sparse_512.ckpt", "model_sparse_1024.ckpt",
                  "model_refiner.ckpt", "model_refiner_1024.ckpt")
# checkpoint file -> (dict key, component) for the stages d3s2 builds from a release folder
_CHECKPOINTS = {
    "model_dense.ckpt": (("vae", "dense_vae"), ("dit", "dense_dit")),
    "model_sparse_512.ckpt": (("vae", "ss_vae_512"), ("dit", "ss_dit_512")),
    "model_sparse_1024.ckpt": (("vae", "ss_vae_1024"), ("dit", "ss_dit_1024")),
}


def resolve_official_folder(path_or_id: str | os.PathLike, *, revision: str | None = None,
                            local_files_only: bool | None = None, resolution: int | None = None) -> Path:
    """A local release folder, or a hub id downloaded (what ``resolution`` needs, and the DINOv2 weights) into the
    Hugging Face cache by :mod:`d3s2.pipelines.hub`; offline or unreachable, a D3S2Error naming the files."""
    p = Path(path_or_id)
    if p.is_dir():
        return p
    from d3s2.pipelines.hub import fetch_release, parse_hub_id

    hid = parse_hub_id(path_or_id)
    if hid is None:
        raise D3S2Error(f"weights folder not found: {os.fspath(path_or_id)}")
    return fetch_release(hid, revision=revision, local_files_only=local_files_only, resolution=resolution,
                         where=os.fspath(path_or_id)).folder


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors."""
    if not path.is_file():
        raise D3S2Error(f"missing checkpoint {path} (the authors' release folder holds {', '.join(OFFICIAL_FILES)})")
    from d3s2.models.loading import torch_load_weights

    ckpt = torch_load_weights(path)
    if not isinstance(ckpt, dict):
        raise D3S2Error(f"{path}: expected a dict of state dicts, got {type(ckpt).__name__}")
    return ckpt


def release_settings(decode_chunk_1024: int | None = None):
    """The release's recipe as :class:`~d3s2.pipelines.image_to_3d.PipelineSettings`: occupancy >= 0.1, the
    refiners on, marching cubes at 0.2 (1024) / 0.4 (512, on the refiner's output; 0.2 on the SS-VAE's output when
    the 512 refiner is off or absent, as the release's ``decode_mesh``) with the dense-grid semantics, the
    renormalised 1024 token band, the release's image preprocessing."""
    from d3s2.pipelines.folder_format import PipelineSettings

    return PipelineSettings(occupancy_threshold=0.1, mc_level_512=0.2, mc_level_512_refined=0.4,
                            mc_level_1024=0.2, refine=True, band="release",
                            surface="release", marching_cubes="lewiner", preprocess="release",
                            decode_chunk=decode_chunk_1024 if decode_chunk_1024 is not None else 64)


@dataclass
class ReleaseComponents:
    """What :func:`load_release` read: the folder, its version, the loaded models (``dense_vae``, ``dense_dit``,
    ``ss_vae_512``, ``ss_dit_512``, optionally ``ss_vae_1024``, ``ss_dit_1024``), their configs, the samplers and the
    release's settings; the refiners (:mod:`d3s2.models.refiner`) when their checkpoints are in the folder (else
    None)."""

    folder: Path
    version: str
    models: dict[str, torch.nn.Module]
    configs: dict[str, tuple[str, Any]]
    samplers: dict[str, Any]
    settings: Any
    dtype: torch.dtype = torch.float16
    files: dict[str, Path] = field(default_factory=dict)
    refiner_512: torch.nn.Module | None = None
    refiner_1024: torch.nn.Module | None = None


def load_release(path_or_id: str | os.PathLike, *, version: str | None = None, resolution: int = 1024,
                 revision: str | None = None, local_files_only: bool | None = None,
                 refiners: bool = True) -> ReleaseComponents:
    """Read a release folder or hub id (see the module docstring). ``version``: ``"v1.0"`` / ``"v1.1"`` to insist on
    one (an error if the folder holds the other). ``resolution``: 512 skips (and does not download) the 1024 stage's
    files. ``refiners``: also load ``model_refiner.ckpt`` / ``model_refiner_1024.ckpt`` (strictly) when the folder
    holds them and config.yaml names them (the 1024 one only with the 1024 stage). The models stay where the
    checkpoint tensors are (CPU, in the stored dtype)."""
    from d3s2.models import dense_dit, dense_vae, ss_dit, ss_vae
    from d3s2.models.loading import empty_weights, load_into_empty
    from d3s2.config import model_class
    from d3s2.pipelines.release_config import load_release_yaml, read_release_config

    if resolution not in (512, 1024):
        raise D3S2Error(f"resolution must be 512 or 1024, got {resolution}")
    folder = resolve_official_folder(path_or_id, revision=revision, local_files_only=local_files_only,
                                     resolution=resolution)
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        raise D3S2Error(f"{folder}: no config.yaml: not an authors' release folder ({', '.join(OFFICIAL_FILES)})")
    raw = load_release_yaml(cfg_path)
    with_1024 = resolution == 1024 and (folder / "model_sparse_1024.ckpt").is_file()
    rel = read_release_config(raw, cfg_path.name, with_1024=with_1024)
    if version is not None and version != rel.version:
        raise D3S2Error(f"{folder}: asked for release {version}, but its config.yaml describes {rel.version}")
    loaders = {"dense_vae": dense_vae.load_official_state_dict, "dense_dit": dense_dit.load_official_state_dict,
               "ss_vae": ss_vae.load_official_state_dict, "ss_dit": ss_dit.load_official_state_dict}
    models: dict[str, torch.nn.Module] = {}
    files: dict[str, Path] = {}
    for fname, entries in _CHECKPOINTS.items():
        if not all(name in rel.models for _, name in entries):
            continue
        path = folder / fname
        ckpt = read_checkpoint(path)
        for key, name in entries:
            if key not in ckpt:
                raise D3S2Error(f"{path}: no '{key}' state dict (found keys: {', '.join(map(str, ckpt))})")
            kind, cfg = rel.models[name]
            with empty_weights():
                model = model_class(kind)(cfg)
            try:
                load_into_empty(model, ckpt[key], loaders[kind])
            except D3S2Error as exc:
                raise D3S2Error(f"{path} [{key}]: {exc}") from exc
            models[name] = model
            files[name] = path
        del ckpt
    loaded = _load_refiners(folder, rel.refiners, files) if refiners else {}
    settings = release_settings(rel.decode_chunk_1024)
    return ReleaseComponents(folder=folder, version=rel.version, models=models, configs=rel.models,
                             samplers=rel.samplers, settings=settings, files=files, **loaded)


def _load_refiners(folder: Path, configs: dict[str, tuple[str, Any]], files: dict[str, Path]) -> dict:
    from d3s2.models.refiner import REFINERS, load_refiner_checkpoint

    out = {}
    for name, (_, cfg) in configs.items():
        path = folder / REFINERS[name][1]
        if not path.is_file():
            continue
        ckpt = read_checkpoint(path)
        key = REFINERS[name][2]
        if key not in ckpt:
            raise D3S2Error(f"{path}: no '{key}' state dict (found keys: {', '.join(map(str, ckpt))})")
        try:
            out[name] = load_refiner_checkpoint(ckpt[key], name, cfg)
        except D3S2Error as exc:
            raise D3S2Error(f"{path} [{key}]: {exc}") from exc
        files[name] = path
        del ckpt
    return out


def release_pipeline_parts(path_or_id: str | os.PathLike, device=None, dtype=None, *, version: str | None = None,
                           resolution: int | None = None, image_encoder: Any = None,
                           encoder_weights: str | os.PathLike | None = None, revision: str | None = None,
                           local_files_only: bool | None = None, refiners: bool = True) -> dict[str, Any]:
    """The keyword arguments of :class:`~d3s2.pipelines.image_to_3d.ImageTo3DPipeline` for the authors' release
    (``models``, ``samplers``, ``settings``, ``device``, ``dtype``, ``component_configs``): fp16 on CUDA as the
    release, fp32 on the CPU, unless ``dtype`` says otherwise. ``image_encoder``: a ready encoder module (else the
    DINOv2 ViT-L/14-reg with ``encoder_weights``). ``refiners``: load the release's refiners as the components
    ``refiner_512`` / ``refiner_1024`` (run when ``settings.refine``; :mod:`d3s2.pipelines.refining`). The pipeline
    class is built by its caller (``ImageTo3DPipeline.from_pretrained``, :mod:`d3s2.pipelines.release_pipeline`), so
    this loader never imports it."""
    from d3s2.models.image_encoder import DINOv2Encoder
    from d3s2.pipelines.folder_format import COMPONENT_KINDS, Component

    rel = load_release(path_or_id, version=version, resolution=resolution or 1024, revision=revision,
                       local_files_only=local_files_only, refiners=refiners)
    models = dict(rel.models)
    if image_encoder is None:
        image_encoder = DINOv2Encoder(weights=encoder_weights, load_weights=True)
    models["image_encoder"] = image_encoder
    comps = {n: Component(kind, cfg, rel.samplers.get(n)) for n, (kind, cfg) in rel.configs.items() if n in models}
    for name in ("refiner_512", "refiner_1024"):
        net = getattr(rel, name)
        if net is not None:
            models[name] = net
            comps[name] = Component(COMPONENT_KINDS[name], net.config)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:  # the release's fp16 on CUDA; CPU kernels are slow (or missing) in fp16
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    return dict(models=models, samplers=rel.samplers, settings=rel.settings, device=dev, dtype=dtype,
                component_configs=comps)
