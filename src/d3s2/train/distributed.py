"""Process groups and model wrapping on PyTorch's own engine: DDP, or FSDP2 (``fully_shard``) for large DiTs.

Launched by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) or as one plain process; the same
command works both ways. Backend ``auto``: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from d3s2.errors import D3S2Error

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "wrap_model", "all_reduce_mean", "unwrap"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise D3S2Error("device: cuda asked but no CUDA device is visible; use device: cpu")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise D3S2Error(f"device must be auto, cpu or cuda, got {device!r}")
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank, world, local, dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:
        raise D3S2Error(
            f"distributed.strategy: fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
            f"{torch.__version__}: upgrade torch or use strategy: ddp"
        ) from exc
    return fully_shard


def wrap_model(
    module: nn.Module, info: DistInfo, strategy: str = "ddp", find_unused_parameters: bool = False
) -> nn.Module:
    """DDP, or FSDP2: every block (``*.blocks.<i>``) sharded on its own, then the root."""
    if not info.enabled:  # one process: nothing to shard or synchronise
        return module
    if strategy == "fsdp":
        fully_shard = _fully_shard()
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for name, sub in module.named_modules():
            if isinstance(sub, nn.ModuleList) and name.split(".")[-1] == "blocks":
                for block in sub:
                    fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    t /= info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}
