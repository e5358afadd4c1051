"""Loader for the authors' release of Direct3D-S2 (layout in shared/reference/official-release.md).

A release folder (``direct3d-s2-v-1-0/`` or ``direct3d-s2-v-1-1/``) holds ``config.yaml`` and ``model_dense.ckpt``
(``{"vae", "dit"}``: dense structure VAE / DiT), ``model_sparse_512.ckpt`` and ``model_sparse_1024.ckpt`` (``{"vae",
"dit"}``: SS-VAE / SS-DiT), and refiner checkpoints that d3s2 does not use. Checkpoints are read with
``torch.load(weights_only=True)`` only, then renamed through each model's ``OFFICIAL_KEY_MAP``
(``load_official_state_dict``, strict); torchsparse's ``[Cin, Cout]`` 1x1 kernels are reshaped by ``SparseConv3d``.

The architectures come from d3s2's shipped configs for the version (``*_v1*.yaml``), not from ``config.yaml``'s
``target:`` classes (they name the authors' code); ``config.yaml`` only has to exist and name the components.
The DINOv2 encoder is not part of the release: its weights come from ``encoder_weights`` or the caches searched by
:func:`d3s2.models.image_encoder.find_dinov2_weights`.

Hub ids (``wushuang98/Direct3D-S2``, optionally ``/direct3d-s2-v-1-1``) are looked up in the local Hugging Face cache
only (nothing is downloaded at run time); when they are not there the error lists the files to place and where.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from d3s2.errors import D3S2Error

__all__ = ["OFFICIAL_REPO", "OFFICIAL_FILES", "resolve_official_folder", "official_component_specs",
           "load_official_pipeline", "read_checkpoint"]

OFFICIAL_REPO = "wushuang98/Direct3D-S2"
DEFAULT_SUBFOLDER = "direct3d-s2-v-1-1"
OFFICIAL_FILES = ("config.yaml", "model_dense.ckpt", "model_sparse_512.ckpt", "model_sparse_1024.ckpt")


def _missing_files_message(where: str, subfolder: str) -> str:
    files = ", ".join(OFFICIAL_FILES)
    return (f"{where}: the authors' weights are not available offline; download {files} from "
            f"https://huggingface.co/{OFFICIAL_REPO}/tree/main/{subfolder} into one folder (e.g. "
            f"./{subfolder}/) and pass that folder (model_sparse_1024.ckpt is only needed for --resolution 1024)")


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
        raise D3S2Error(f"missing checkpoint {path} (the authors' release folder needs {', '.join(OFFICIAL_FILES)})")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise D3S2Error(f"{path}: cannot read the checkpoint with torch.load(weights_only=True) "
                        f"({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(ckpt, dict):
        raise D3S2Error(f"{path}: expected a dict of state dicts, got {type(ckpt).__name__}")
    return ckpt


def _version(folder: Path, config: dict, version: str | None) -> str:
    if version is not None:
        if version not in ("v1.0", "v1.1"):
            raise D3S2Error(f"version must be 'v1.0' or 'v1.1', got {version!r}")
        return version
    name = folder.name.lower()
    if "v-1-0" in name or "v1.0" in name or "v1_0" in name:
        return "v1.0"
    text = yaml.safe_dump(config.get("sparse_dit_512", {})).lower()
    return "v1.0" if "sparse_cond" in text or "cond_proj" in text else "v1.1"


def official_component_specs(version: str) -> dict[str, str]:
    """d3s2 config names of each component of a release version."""
    tag = version.replace(".", "_")
    return {"dense_vae": "dense_vae_v1", "dense_dit": "dense_dit_v1", "ss_vae_512": "ss_vae_v1",
            "ss_dit_512": f"ss_dit_{tag}_512", "ss_vae_1024": "ss_vae_v1_1024", "ss_dit_1024": f"ss_dit_{tag}_1024"}


def load_official_pipeline(path_or_id: str | os.PathLike, device=None, dtype=None, low_vram=None, *,
                           version: str | None = None, components: dict[str, Any] | None = None,
                           image_encoder: Any = None, encoder_weights: str | os.PathLike | None = None,
                           revision: str | None = None, local_files_only: bool | None = None,
                           resolution: int | None = None, **kwargs):
    """Build an :class:`~d3s2.pipelines.image_to_3d.ImageTo3DPipeline` from the authors' release.

    ``components``: per-component config overrides (names or specs as in ``pipeline.yaml``; tests use the tiny
    configs). ``image_encoder``: a ready encoder module (else the DINOv2 ViT-L/14-reg with ``encoder_weights``)."""
    from d3s2.models import dense_dit, dense_vae, ss_dit, ss_vae
    from d3s2.models.image_encoder import DINOv2Encoder
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline, PipelineSettings, _model_class, _parse_component

    folder = resolve_official_folder(path_or_id, revision=revision, local_files_only=local_files_only,
                                     resolution=resolution)
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        raise D3S2Error(f"{folder}: no config.yaml: not an authors' release folder ({', '.join(OFFICIAL_FILES)})")
    try:
        config = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise D3S2Error(f"{cfg_path}: not valid YAML") from exc
    if not isinstance(config, dict) or "dense_dit" not in config:
        raise D3S2Error(f"{cfg_path}: expected the release's config (keys dense_vae, dense_dit, sparse_vae_512, ...)")
    ver = _version(folder, config, version)
    specs: dict[str, Any] = dict(official_component_specs(ver))
    specs.update(components or {})
    has_1024 = (folder / "model_sparse_1024.ckpt").is_file()
    if not has_1024:
        specs.pop("ss_vae_1024", None)
        specs.pop("ss_dit_1024", None)
    comps = {n: _parse_component(n, s, cfg_path.name) for n, s in specs.items()}
    loaders = {"dense_vae": dense_vae.load_official_state_dict, "dense_dit": dense_dit.load_official_state_dict,
               "ss_vae": ss_vae.load_official_state_dict, "ss_dit": ss_dit.load_official_state_dict}
    files = {"dense": "model_dense.ckpt", "512": "model_sparse_512.ckpt", "1024": "model_sparse_1024.ckpt"}
    models: dict[str, torch.nn.Module] = {}
    for stage, (vae_name, dit_name) in {"dense": ("dense_vae", "dense_dit"), "512": ("ss_vae_512", "ss_dit_512"),
                                        "1024": ("ss_vae_1024", "ss_dit_1024")}.items():
        if vae_name not in comps:
            continue
        ckpt_path = folder / files[stage]
        ckpt = read_checkpoint(ckpt_path)
        for key, name in (("vae", vae_name), ("dit", dit_name)):
            if key not in ckpt:
                raise D3S2Error(f"{ckpt_path}: no '{key}' state dict (found keys: {', '.join(map(str, ckpt))})")
            model = _model_class(comps[name].model)(comps[name].params)
            try:
                loaders[comps[name].model](model, ckpt[key], strict=True)
            except D3S2Error as exc:
                raise D3S2Error(f"{ckpt_path} [{key}]: {exc}") from exc
            models[name] = model.float()
        del ckpt
    if image_encoder is None:
        image_encoder = DINOv2Encoder(weights=encoder_weights, load_weights=True)
    models["image_encoder"] = image_encoder
    samplers = {n: c.sampler for n, c in comps.items() if c.sampler is not None}
    # the release: MC at 0.2 at 1024; no refiner here, so the 512 SDF is taken at its zero level
    settings = PipelineSettings(mc_level_512=0.0, mc_level_1024=0.2)
    return ImageTo3DPipeline(models, samplers, settings, device=device, dtype=dtype, low_vram=low_vram,
                             component_configs=comps, **kwargs)
