"""Training YAML schema (issue 5, paper Sec. 5.2 / Table 1): dataclasses parsed with :func:`d3s2.config.from_dict`.

A training file looks like::

    task: dense_vae                 # a registered task (d3s2.train.tasks.TASK_REGISTRY)
    model: dense_vae_tiny           # a model config name / path, or inline {model: ..., params: {...}, flow: {...}}
    task_args: {...}                # task-specific settings (e.g. the frozen VAE of the DiT task)
    data: {root: prepared/, resolutions: [32, 64], batch_size: 2, workers: 0}
    optim: {lr: 1.0e-4, weight_decay: 0.0, betas: [0.9, 0.999], grad_clip: 1.0}
    schedule: {warmup_steps: 100, decay: cosine, min_lr_ratio: 0.1}
    phases:                         # progressive resolution (Table 1); empty: one phase of max_steps
      - {steps: 1000, resolution: 256, lr: 1.0e-4, batch_size: 8}
    precision: auto                 # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    ema: {decay: 0.9999, every: 1}
    checkpoint: {dir: runs/x/checkpoints, every: 1000, keep: 3}
    log: {dir: runs/x, every: 10, tensorboard: true, progress: true}
    validate: {every: 0, items: 2}
    distributed: {strategy: ddp}    # ddp | fsdp (FSDP2 fully_shard, torch >= 2.6)
    seed: 0
    max_steps: 10000
    resume: auto                    # never | auto (continue from the latest checkpoint when there is one)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from d3s2.config import from_dict
from d3s2.errors import D3S2Error

__all__ = [
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "PhaseConfig",
    "EMAConfig",
    "CheckpointConfig",
    "LogConfig",
    "ValidateConfig",
    "DistributedConfig",
    "TrainConfig",
    "parse_train_config",
    "apply_overrides",
]


def _check(ok: bool, key: str, want: str, value: Any) -> None:
    """Every numeric setting is range-checked when the config is parsed, so ``d3s2 train --check`` catches what would
    otherwise crash (or silently diverge) after the models are built (issue 22, case 7)."""
    if not ok:
        raise D3S2Error(f"{key} must be {want}, got {value!r}")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class DataConfig:
    root: str = ""
    resolutions: list[int] = field(default_factory=lambda: [256, 384, 512])  # multi-resolution set (Sec. 3.3)
    resolution_weights: list[float] | None = None
    batch_size: int = 1  # per process
    workers: int = 0
    val_root: str | None = None  # validation items (default: root)
    max_voxels: int | None = None  # SS-VAE: random spatial crops of larger volumes (1024^3 bands on 80 GB cards)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", "an integer >= 1", self.batch_size)
        _check(self.workers >= 0, "data.workers", "an integer >= 0", self.workers)
        _check(len(self.resolutions) > 0 and all(r >= 1 for r in self.resolutions), "data.resolutions",
               "a non-empty list of positive resolutions", self.resolutions)
        w = self.resolution_weights
        if w is not None:
            _check(len(w) == len(self.resolutions), "data.resolution_weights",
                   f"one weight per resolution ({len(self.resolutions)})", w)
            _check(all(_finite(x) and x >= 0 for x in w) and sum(w) > 0, "data.resolution_weights",
                   "finite weights >= 0 with a positive sum", w)
        _check(self.max_voxels is None or self.max_voxels >= 1, "data.max_voxels", "null or an integer >= 1",
               self.max_voxels)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)

    def __post_init__(self) -> None:
        _check(_finite(self.lr) and self.lr > 0, "optim.lr", "a finite number > 0", self.lr)
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", "a finite number >= 0",
               self.weight_decay)
        _check(all(_finite(b) and 0 <= b < 1 for b in self.betas), "optim.betas", "two numbers in [0, 1)",
               list(self.betas))
        _check(_finite(self.eps) and self.eps > 0, "optim.eps", "a finite number > 0", self.eps)
        _check(_finite(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip", "a finite number >= 0 (0: off)",
               self.grad_clip)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine (over the whole run, to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.decay not in ("constant", "cosine"):
            raise D3S2Error(f"schedule.decay must be 'constant' or 'cosine', got {self.decay!r}")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", "an integer >= 0", self.warmup_steps)
        _check(_finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio",
               "a number in [0, 1]", self.min_lr_ratio)


@dataclass
class PhaseConfig:
    """One progressive-resolution phase (a row of Table 1)."""

    steps: int
    resolution: int | None = None  # None: draw from data.resolutions each step (multi-resolution)
    lr: float | None = None  # None: optim.lr
    batch_size: int | None = None  # per process; None: data.batch_size

    def __post_init__(self) -> None:
        _check(self.resolution is None or self.resolution >= 1, "phases[].resolution", "null or an integer >= 1",
               self.resolution)
        _check(self.lr is None or (_finite(self.lr) and self.lr > 0), "phases[].lr", "null or a finite number > 0",
               self.lr)
        _check(self.batch_size is None or self.batch_size >= 1, "phases[].batch_size", "null or an integer >= 1",
               self.batch_size)


@dataclass
class EMAConfig:
    decay: float = 0.0  # 0 disables EMA
    every: int = 1
    warmup: bool = True  # decay min(decay, (1 + step) / (10 + step)): short runs' EMA forgets the random init

    def __post_init__(self) -> None:
        _check(_finite(self.decay) and 0 <= self.decay < 1, "ema.decay", "a number in [0, 1) (0: no EMA)", self.decay)
        _check(self.every >= 1, "ema.every", "an integer >= 1", self.every)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every: int = 1000
    keep: int = 3
    at_exit: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.dir), "checkpoint.dir", "a folder path", self.dir)
        _check(self.every >= 0, "checkpoint.every", "an integer >= 0 (0: only at exit)", self.every)
        _check(self.keep >= 0, "checkpoint.keep", "an integer >= 0 (0: keep all)", self.keep)


@dataclass
class LogConfig:
    dir: str = "runs"
    every: int = 1
    tensorboard: bool = True  # used when the tensorboard package is installed; metrics.jsonl is always written
    progress: bool = True
    all_ranks: bool = False  # every rank writes metrics_rank<r>.jsonl (tests / debugging)

    def __post_init__(self) -> None:
        _check(self.every >= 1, "log.every", "an integer >= 1", self.every)


@dataclass
class ValidateConfig:
    every: int = 0  # steps; 0 disables
    items: int = 2
    at_end: bool = False

    def __post_init__(self) -> None:
        _check(self.every >= 0, "validate.every", "an integer >= 0 (0: off)", self.every)
        _check(self.items >= 1, "validate.items", "an integer >= 1", self.items)


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # ddp | fsdp
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise D3S2Error(f"distributed.strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")


@dataclass
class TrainConfig:
    task: str
    model: Any  # config name/path (str) or an inline model file mapping
    task_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    precision: str = "auto"
    gradient_checkpointing: bool = False
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    device: str = "auto"  # auto | cpu | cuda
    cpu_threads: int | None = None  # torch.set_num_threads for this run (None: torch's default)
    seed: int = 0
    max_steps: int | None = None
    resume: str = "never"  # never | auto

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise D3S2Error(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.resume not in ("never", "auto"):
            raise D3S2Error(f"resume must be 'never' or 'auto', got {self.resume!r}")
        _check(self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda", self.device)
        _check(self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads", "null or an integer >= 1",
               self.cpu_threads)
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", "null or an integer >= 1", self.max_steps)
        if not self.phases:
            if not self.max_steps:
                raise D3S2Error("give max_steps or a list of phases (each with steps)")
            self.phases = [PhaseConfig(steps=self.max_steps)]
        for i, p in enumerate(self.phases):
            if p.steps < 1:
                raise D3S2Error(f"phases[{i}].steps must be >= 1")
        if self.max_steps is None:
            self.max_steps = sum(p.steps for p in self.phases)

    @property
    def total_steps(self) -> int:
        return int(self.max_steps)

    def phase_at(self, step: int) -> tuple[int, PhaseConfig]:
        """(index, phase) for 0-based ``step``; steps past the last phase stay in it."""
        end = 0
        for i, p in enumerate(self.phases):
            end += p.steps
            if step < end:
                return i, p
        return len(self.phases) - 1, self.phases[-1]


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["optim.lr=1e-3", "max_steps=10"]`` -> nested updates (values parsed as YAML)."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise D3S2Error(f"--set expects KEY=VALUE (e.g. optim.lr=1e-3), got {item!r}")
        key, value = item.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise D3S2Error(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return data


def parse_train_config(data: dict, where: str = "train config") -> TrainConfig:
    if "task" not in data or "model" not in data:
        raise D3S2Error(f"{where}: needs 'task:' and 'model:' (see d3s2/configs/train_dense_vae_tiny.yaml)")
    return from_dict(TrainConfig, data, where)
