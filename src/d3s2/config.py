"""Typed configs: YAML files -> dataclasses, with clear errors for unknown keys and wrong types.

A model config file (``configs/*.yaml``) looks like the authors' ``target:``/``params:`` layout::

    model: dense_dit          # registered model name (see MODEL_REGISTRY)
    params: {...}             # fields of that model's config dataclass
    flow: {...}               # optional: d3s2.flow.FlowConfig (training objective)
    sampler: {...}            # optional: d3s2.flow.SamplerConfig (inference settings)

Other top-level sections (e.g. ``train``) are rejected unless the caller names them in ``extra_sections``; they are
then returned untouched in ``ModelFileConfig.extra`` for their owner to parse with :func:`from_dict`.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from d3s2.errors import D3S2Error

__all__ = [
    "MODEL_REGISTRY",
    "ModelFileConfig",
    "from_dict",
    "load_yaml",
    "resolve_config_path",
    "load_model_config",
    "build_model",
    "model_class",
]

# name -> "module:Class"; the class has a ``config_class`` attribute (its dataclass). Other stages add their models here.
MODEL_REGISTRY: dict[str, str] = {
    "dense_vae": "d3s2.models.dense_vae:DenseShapeVAE",
    "dense_dit": "d3s2.models.dense_dit:DenseDiT",
    "ss_vae": "d3s2.models.ss_vae:SSVAE",
    "ss_dit": "d3s2.models.ss_dit:SSDiT",
    "sdf_refiner": "d3s2.models.refiner:SDFRefiner",
    "sign_refiner": "d3s2.models.refiner:SignRefiner",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except D3S2Error:
                pass
        raise D3S2Error(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise D3S2Error(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise D3S2Error(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise D3S2Error(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise D3S2Error(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise D3S2Error(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads 1e-4 (no dot) as a string; accept numeric strings for floats only.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise D3S2Error(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise D3S2Error(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise :class:`D3S2Error` naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise D3S2Error(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise D3S2Error(
            f"{where}: unknown key '{unknown[0]}' for {cls.__name__} (valid keys: {', '.join(sorted(fields))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise D3S2Error(f"{where}: {exc}") from exc


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise D3S2Error(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:  # a binary file given as a config (issue 22, case 5)
        raise D3S2Error(f"{path}: not a text file (byte {exc.start} is not UTF-8); give a YAML config") from exc
    except OSError as exc:
        raise D3S2Error(f"{path}: cannot read the config ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise D3S2Error(f"{path}: not valid YAML ({' '.join(str(exc).split())[:300]})") from exc
    except RecursionError as exc:  # thousands of nested brackets
        raise D3S2Error(f"{path}: not a usable YAML config (nested too deeply)") from exc
    if not isinstance(data, dict):
        raise D3S2Error(f"{path}: expected a mapping at the top level")
    return data


def _config_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here / "configs", here.parents[1] / "configs"]  # installed package data, then the source checkout


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to an existing file, or a shipped config name such as ``dense_dit_v1`` / ``dense_dit_tiny.yaml``."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
    for d in _config_dirs():
        if (d / stem).is_file():
            return d / stem
    raise D3S2Error(f"config not found: {name_or_path} (give a YAML path or one of the names in configs/)")


@dataclass
class ModelFileConfig:
    model: str
    params: Any
    flow: Any = None
    sampler: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def model_class(name: str) -> type:
    """The model class registered under ``name`` in :data:`MODEL_REGISTRY` (imported on first use)."""
    if name not in MODEL_REGISTRY:
        raise D3S2Error(f"unknown model '{name}' (known: {', '.join(sorted(MODEL_REGISTRY))})")
    module, cls = MODEL_REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_model_config(name_or_path: str | Path, extra_sections: tuple[str, ...] = ()) -> ModelFileConfig:
    """Parse a model config file (see module docstring) into typed dataclasses."""
    from d3s2.flow.rectified import FlowConfig
    from d3s2.flow.sampler import SamplerConfig

    path = resolve_config_path(name_or_path)
    data = load_yaml(path)
    allowed = {"model", "params", "flow", "sampler", *extra_sections}
    for key in data:
        if key not in allowed:
            raise D3S2Error(f"{path}: unknown top-level key '{key}' (valid: {', '.join(sorted(allowed))})")
    if "model" not in data:
        raise D3S2Error(f"{path}: missing 'model:' (one of {', '.join(sorted(MODEL_REGISTRY))})")
    cls = model_class(data["model"])
    return ModelFileConfig(
        model=data["model"],
        params=from_dict(cls.config_class, data.get("params"), f"{path.name}:params"),
        flow=from_dict(FlowConfig, data["flow"], f"{path.name}:flow") if "flow" in data else None,
        sampler=from_dict(SamplerConfig, data["sampler"], f"{path.name}:sampler") if "sampler" in data else None,
        extra={k: data[k] for k in extra_sections if k in data},
        path=path,
    )


def build_model(config: str | Path | ModelFileConfig, device: Any = None):
    """Instantiate the model a config file describes (on ``device``, e.g. ``"meta"`` to inspect shapes for free)."""
    cfg = config if isinstance(config, ModelFileConfig) else load_model_config(config)
    cls = model_class(cfg.model)
    if device is None:
        return cls(cfg.params)
    import torch

    with torch.device(device):
        return cls(cfg.params)
