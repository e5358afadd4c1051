"""Whether Triton kernels can run, and the one-line errors when an explicit ``backend="triton"`` cannot: shared by
every op with a Triton backend (sparse conv, SSA, the refiners' volume ops). Only checked, never used to choose: the
choice stays the caller's (``backend="auto"`` picks by device)."""

from __future__ import annotations

import os

from d3s2.errors import D3S2Error

__all__ = ["triton_available", "check_triton_backend"]


def triton_available() -> bool:
    """The triton package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_triton_backend(on_cuda: bool, fallback: str) -> None:
    """One-line D3S2Error when ``backend="triton"`` cannot run: no triton package, or CPU tensors without Triton's
    interpreter (``TRITON_INTERPRET=1`` set before importing d3s2). ``fallback``: the backend to suggest instead."""
    if not triton_available():
        raise D3S2Error(f"backend='triton' needs the triton package (pip install triton), or use backend={fallback!r}")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise D3S2Error("backend='triton' on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1 set before "
                        f"importing d3s2); use backend={fallback!r} (or 'auto') on a CPU")
