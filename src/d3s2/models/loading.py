"""Building models for a checkpoint without initialising their weights first.

A full release is ~2.5 B parameters: building each model on the CPU with its random initialisation and then copying
the checkpoint over it costs ~10 GB of memory and tens of seconds. :func:`empty_weights` builds the parameters on the
meta device (no memory, initialisers are no-ops) while buffers stay real (positional-frequency tables and the like are
derived from the config and are not in checkpoints); :func:`load_into_empty` then makes the checkpoint's tensors the
model's parameters (``load_state_dict(assign=True)``: no copy) and fails if any parameter was left on the meta device.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from d3s2.errors import D3S2Error

__all__ = ["empty_weights", "load_into_empty", "meta_parameters"]


@contextlib.contextmanager
def empty_weights():
    """Inside the context, ``nn.Module`` parameters are created on the meta device; buffers are unaffected."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def meta_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers still on the meta device."""
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]


def load_into_empty(model: nn.Module, state_dict: dict[str, torch.Tensor],
                    loader: Callable[..., object] | None = None) -> nn.Module:
    """Load ``state_dict`` strictly into a model built under :func:`empty_weights` (``loader(model, sd, strict=True,
    assign=True)``, default ``model.load_state_dict``); checkpoint tensors on the meta device stay there (tests build
    fake checkpoints that way)."""
    if loader is None:
        model.load_state_dict(state_dict, strict=True, assign=True)
    else:
        loader(model, state_dict, strict=True, assign=True)
    if not any(t.device.type == "meta" for t in state_dict.values()):
        left = meta_parameters(model)
        if left:
            raise D3S2Error(f"{type(model).__name__}: {len(left)} tensors were not loaded (first: {left[0]})")
    return model


def torch_load_weights(path) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)``; an unreadable or pickled-object file is one
    D3S2Error line naming it (the release's ``.ckpt`` files are read this way only)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise D3S2Error(f"{path}: cannot read the checkpoint with torch.load(weights_only=True) "
                        f"({' '.join(str(exc).split())[:200]})") from exc
