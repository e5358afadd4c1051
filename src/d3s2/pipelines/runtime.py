"""Runtime of the image-to-3D pipeline's models: device placement, low-VRAM offload, stage timing, progress bars.

:class:`PipelineRuntime` owns where the weights live. Without ``low_vram`` every model sits on the compute device in
its run dtype (the image encoder in fp32, the others in ``dtype``). With ``low_vram`` the host copy of every weight
stays put (pinned on CUDA, so the upload runs at full PCIe speed); :meth:`PipelineRuntime.use` points the modules at
device copies for one stage and, afterwards, back at the host copies: inference never writes weights, so nothing is
copied back. ``low_vram=None`` picks it on CUDA when the free memory is below the weights' size in the run dtypes plus
a 10 GiB working set (the 1024 stage's activations, see bench/pipeline.py).

Timing: :meth:`PipelineRuntime.stage` appends one entry per stage (``stage``, ``seconds``, ``peak_gpu_bytes`` and
``parts``) to a stats list; :meth:`PipelineRuntime.part` times a piece of the current stage into its ``parts``
(seconds, peak GPU bytes). :class:`StepBar` is the tqdm bar of a sampling stage.

User-facing notes: :func:`collect_notes` records the warnings of a pipeline call, keeps the :class:`UserWarning`
messages (the output's ``notes``) and emits every warning again afterwards, so callers' filters and handlers still see
them.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from typing import Any, Callable

import torch

__all__ = ["PipelineRuntime", "StepBar", "LOW_VRAM_WORKSPACE", "peak_reset", "peak", "collect_notes"]

LOW_VRAM_WORKSPACE = 10 << 30  # activations of the 1024 stage besides the weights (see bench/pipeline.py)


def peak_reset(device: torch.device) -> None:
    """Synchronise ``device`` and reset its peak-memory counter (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    """Peak allocated bytes on ``device`` since the last reset (None off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None


def _reemit(caught: list) -> None:
    """Emit recorded warnings again, from where they were raised, under the caller's warning filters."""
    for w in caught:
        module = registry = None
        for mod in list(sys.modules.values()):
            if getattr(mod, "__file__", None) == w.filename:
                module, registry = mod.__name__, mod.__dict__.setdefault("__warningregistry__", {})
                break
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, module=module, registry=registry,
                               source=w.source)


@contextlib.contextmanager
def collect_notes(notes: list[str]):
    """Context: the messages of the :class:`UserWarning` s raised inside go to ``notes`` (once each, in order); all
    warnings are emitted again on leaving (also when the block raises)."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
    finally:
        _reemit(caught)
    for w in caught:
        text = str(w.message)
        if issubclass(w.category, UserWarning) and text not in notes:
            notes.append(text)


class StepBar:
    """A tqdm bar per stage that counts sampling steps (``sample_euler``'s ``step_callback``)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False)

    def __call__(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _auto_low_vram(models: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda":
        return False
    # resident weights in their run dtypes (encoder fp32) + a working set for the 1024 stage; weights already on the
    # card count as free (they would be replaced, not duplicated)
    item = torch.empty(0, dtype=dtype).element_size()
    size = sum(p.numel() * (4 if n == "image_encoder" else item) for n, m in models.items() for p in m.parameters())
    here = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters()
               if p.device.type == "cuda")
    free = torch.cuda.mem_get_info(device)[0] + here
    return free < size + LOW_VRAM_WORKSPACE


class PipelineRuntime:
    """Places ``models`` (a dict shared with the pipeline) on ``device`` in their run dtypes, or keeps them on the
    host with ``low_vram`` (see the module docstring), and times stages and their parts."""

    def __init__(self, models: dict[str, torch.nn.Module], device: torch.device, dtype: torch.dtype,
                 low_vram: bool | None = None) -> None:
        self.models, self.device, self.dtype = models, device, dtype
        if low_vram is None:
            low_vram = _auto_low_vram(models, device, dtype)
        self.low_vram = bool(low_vram)
        self._parts: dict | None = None
        self._peak_seen = 0
        for name, m in models.items():
            m.to(dtype=torch.float32 if name == "image_encoder" else dtype)
            m.to("cpu" if self.low_vram else device)
        self._host: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if self.low_vram:
            for name, m in models.items():
                pairs = []
                for t in (*m.parameters(), *m.buffers()):
                    t.data = self.pinned(t.data)
                    pairs.append((t, t.data))
                self._host[name] = pairs

    def pinned(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in pinned host memory on CUDA (unchanged elsewhere, or where pinning fails)."""
        if self.device.type != "cuda":
            return t
        try:
            return t.pin_memory()
        except RuntimeError:  # pinning can fail (locked-memory limits): pageable copies still work, slower
            return t

    def use(self, *names: str):
        """Context: the named models on the compute device (back on their host copies afterwards when low_vram)."""
        rt = self

        class _Ctx:
            def __enter__(self):
                if rt.low_vram:
                    with rt.part("to_device"):
                        for n in names:
                            for t, host in rt._host[n]:
                                t.data = host.to(rt.device, non_blocking=True)
                return [rt.models[n] for n in names]

            def __exit__(self, *exc):
                if rt.low_vram:
                    with rt.part("offload"):
                        for n in names:
                            for t, host in rt._host[n]:
                                t.data = host
                        if rt.device.type == "cuda":
                            torch.cuda.empty_cache()
                return False

        return _Ctx()

    @contextlib.contextmanager
    def part(self, name: str):
        """Times a piece of the current stage (seconds, peak GPU bytes) into its ``parts`` entry."""
        if self._parts is None:
            yield
            return
        self._peak_seen = max(self._peak_seen, peak(self.device) or 0)
        peak_reset(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            entry = self._parts.setdefault(name, {"seconds": 0.0, "peak_gpu_bytes": None})
            entry["seconds"] += time.perf_counter() - t0
            pk = peak(self.device)
            if pk is not None:
                entry["peak_gpu_bytes"] = max(entry["peak_gpu_bytes"] or 0, pk)
                self._peak_seen = max(self._peak_seen, pk)

    def stage(self, name: str, stats: list, fn: Callable, *args: Any, **kwargs: Any):
        """Runs ``fn(*args, **kwargs)`` as stage ``name``: its seconds, peak GPU bytes and parts go to ``stats``."""
        peak_reset(self.device)
        self._parts, self._peak_seen = {}, 0
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            parts, self._parts = self._parts, None
        pk = peak(self.device)
        entry = {"stage": name, "seconds": time.perf_counter() - t0,
                 "peak_gpu_bytes": None if pk is None else max(pk, self._peak_seen)}
        if parts:
            entry["parts"] = parts
        stats.append(entry)
        return out
