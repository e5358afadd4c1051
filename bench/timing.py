"""Wall time and peak CUDA memory of one call, shared by the bench scripts.

Scripts run as files (``python bench/x.py``, ``python bench/parity/run.py``), so this is imported as the top-level
module ``timing``: with ``bench/`` on ``sys.path`` (a script in ``bench/`` has it as its own folder; the modules in
``bench/parity`` add it).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

__all__ = ["timed"]


def timed(fn: Callable, device: torch.device, *args: Any, unit: int = 2 ** 30) -> tuple[Any, float, float | None]:
    """``(fn(*args), seconds, peak)``: ``peak`` is the most memory allocated on CUDA ``device`` during the call above
    what was allocated before it, in ``unit`` bytes (GiB by default); None off CUDA. On CUDA the device is
    synchronised before and after, and the allocator's free cached blocks are released first, so the call pays for
    its own allocations as a fresh run does."""
    cuda = device.type == "cuda"
    base = 0
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn(*args)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - base) / unit if cuda else None
    return out, seconds, peak
