"""The training task interface and the registry of tasks by name (issue 5: one small adapter per stage, one trainer).

A task turns a :class:`~d3s2.train.config.TrainConfig` into

* ``build_module()``: the trainable *train module*, an ``nn.Module`` whose ``forward(batch)`` returns
  ``{"loss": scalar, <term>: scalar, ...}`` (so DDP / FSDP wrap one module and see the whole loss in ``forward``);
* ``build_dataset(split)``: a map-style data set indexed by keys ``(item_index, resolution, epoch)``, and ``collate``;
* ``prepare_batch(batch)``: on-device work outside the trainable graph (e.g. encoding with a frozen VAE);
* ``batch_stats(batch)``: ``{"samples": B, "tokens": N}`` for throughput;
* ``validate(module, batch)``: metrics of a validation batch (optional).

:data:`TASK_REGISTRY` maps a task name (``task:`` of the training YAML) to its class, or to a ``"module:Class"`` string
imported on first use; the shipped tasks are such strings until their module is imported
(:mod:`d3s2.train.tasks_dense`, :mod:`d3s2.train.tasks_ss_vae`, :mod:`d3s2.train.tasks_ss_dit`), which then stores the
class through :func:`register_task`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn

from d3s2.config import MODEL_REGISTRY, ModelFileConfig, from_dict, load_model_config, model_class
from d3s2.errors import D3S2Error
from d3s2.train.config import TrainConfig

__all__ = ["Task", "TASK_REGISTRY", "register_task", "check_task_name", "task_class", "build_task",
           "model_config_from", "model_config_of"]

TASK_REGISTRY: dict[str, Any] = {
    "dense_vae": "d3s2.train.tasks_dense:DenseVAETask",
    "dense_dit": "d3s2.train.tasks_dense:DenseDiTTask",
    "ss_vae": "d3s2.train.tasks_ss_vae:SSVAETask",
    "ss_dit": "d3s2.train.tasks_ss_dit:SSDiTTask",
}


def register_task(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        TASK_REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def check_task_name(name: str) -> None:
    """Raise :class:`D3S2Error` unless ``name`` is a registered task (without importing its module)."""
    if name not in TASK_REGISTRY:
        raise D3S2Error(f"unknown task '{name}' (known: {', '.join(sorted(TASK_REGISTRY))})")


def task_class(name: str) -> type:
    """The class of task ``name``, its module imported when the registry holds a ``"module:Class"`` string."""
    check_task_name(name)
    entry = TASK_REGISTRY[name]
    if isinstance(entry, str):
        module, cls = entry.split(":")
        entry = getattr(importlib.import_module(module), cls)
    return entry


def build_task(cfg: TrainConfig, device: torch.device) -> "Task":
    return task_class(cfg.task)(cfg, device)


def model_config_from(spec: Any, where: str = "model") -> ModelFileConfig:
    """A model config name / path, or an inline mapping ``{model: name, params: {...}, flow: {...}}``."""
    if isinstance(spec, str):
        return load_model_config(spec)
    if not isinstance(spec, dict) or "model" not in spec:
        raise D3S2Error(
            f"{where}: give a model config name (e.g. dense_vae_tiny) or a mapping with 'model:' and 'params:'"
        )
    from d3s2.flow.rectified import FlowConfig
    from d3s2.flow.sampler import SamplerConfig

    unknown = set(spec) - {"model", "params", "flow", "sampler"}
    if unknown:
        raise D3S2Error(f"{where}: unknown key '{sorted(unknown)[0]}' (valid: flow, model, params, sampler)")
    name = spec["model"]
    if name not in MODEL_REGISTRY:
        raise D3S2Error(f"{where}: unknown model '{name}' (known: {', '.join(sorted(MODEL_REGISTRY))})")
    mcls = model_class(name)
    return ModelFileConfig(
        model=name,
        params=from_dict(mcls.config_class, spec.get("params"), f"{where}.params"),
        flow=from_dict(FlowConfig, spec["flow"], f"{where}.flow") if "flow" in spec else None,
        sampler=from_dict(SamplerConfig, spec["sampler"], f"{where}.sampler") if "sampler" in spec else None,
    )


def model_config_of(spec: Any, kind: str, task: str) -> ModelFileConfig:
    """:func:`model_config_from`, refused unless it configures a ``kind`` model (the one task ``task`` trains)."""
    cfg = model_config_from(spec)
    if cfg.model != kind:
        article = "an" if kind.startswith("ss_") else "a"  # "an ss_vae": read "ess"
        raise D3S2Error(f"task {task} needs {article} {kind} model config, got '{cfg.model}'")
    return cfg


def _check_args(args: dict, allowed: dict[str, Any], task: str) -> dict:
    unknown = set(args) - set(allowed)
    if unknown:
        raise D3S2Error(
            f"task_args: unknown key '{sorted(unknown)[0]}' for task {task} (valid: {', '.join(sorted(allowed))})"
        )
    return {**allowed, **args}


class Task:
    name = "task"
    task_args: dict[str, Any] = {}
    # validate() only calls the train module's forward (FSDP2 gathers parameters in forward hooks only)
    validate_under_fsdp = False

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.args = _check_args(cfg.task_args, type(self).task_args, self.name)

    def build_module(self) -> nn.Module:
        raise NotImplementedError

    def build_dataset(self, split: str = "train") -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        return torch.utils.data.default_collate(items)

    def prepare_batch(self, batch: dict) -> dict:
        return batch

    def batch_stats(self, batch: dict) -> dict[str, float]:
        return {"samples": float(len(batch.get("item_ids", [])))}

    def validate(self, module: nn.Module, batch: dict) -> dict[str, float]:
        out = module(batch)
        return {f"val_{k}": float(v) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
