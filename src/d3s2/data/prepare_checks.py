"""Checks of ``d3s2 prepare``'s global settings before the first mesh (issue 22, case 8).

A setting that makes every item fail (``--image-size 0`` fails at render after every SDF was computed, ``--tau 0``
or NaN fails each item's SDF) is refused up front with one line naming the flag. Bounds are sanity limits: the paper
renders at 518 px, samples ``tau`` of a few voxels and 45 views per mesh.
"""

from __future__ import annotations

import math
from typing import Any

from d3s2.errors import D3S2Error

__all__ = ["check_prepare_config", "MAX_IMAGE_SIZE", "MAX_VIEWS", "MAX_SUPERSAMPLE"]

MAX_IMAGE_SIZE = 8192
MAX_VIEWS = 10000
MAX_SUPERSAMPLE = 16


def _fail(flag: str, want: str, value: Any) -> None:
    raise D3S2Error(f"{flag} must be {want}, got {value!r}")


def _int_in(value: Any, lo: int, hi: int, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        _fail(flag, f"an integer in [{lo}, {hi}]", value)


def _range(value: Any, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        _fail(flag, "two numbers (low, high)", value)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        _fail(flag, "two finite numbers with low <= high", value)
    return lo, hi


def check_prepare_config(cfg) -> None:
    """Raise :class:`D3S2Error` for a :class:`~d3s2.data.prepare_config.PrepareConfig` setting no item could be prepared
    with."""
    if not all(isinstance(r, int) and not isinstance(r, bool) and 2 <= r <= 32767 for r in cfg.resolutions):
        _fail("--resolutions", "integers in [2, 32767]", list(cfg.resolutions))
    _int_in(cfg.views, 0, MAX_VIEWS, "--views")
    if cfg.views > 0:  # render settings matter only when rendering
        _int_in(cfg.image_size, 2, MAX_IMAGE_SIZE, "--image-size")
        _int_in(cfg.supersample, 1, MAX_SUPERSAMPLE, "--supersample")
        elev = _range(cfg.elevation_deg, "elevation_deg")
        if not -90 <= elev[0] <= elev[1] <= 90:
            _fail("elevation_deg", "a range within [-90, 90] degrees", cfg.elevation_deg)
        _range(cfg.azimuth_deg, "azimuth_deg")
        focal = _range(cfg.focal_mm, "focal_mm")
        if focal[0] <= 0:
            _fail("focal_mm", "a range of positive focal lengths", cfg.focal_mm)
    if cfg.resolutions:
        tau = cfg.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or not 0 < tau <= 1:
            _fail("--tau", "a band half-width in (0, 1] ([-1, 1] units; the default is 1/128)", tau)
        a = cfg.sharp_angle
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0 <= a <= 180:
            _fail("--sharp-angle", "an angle in [0, 180] degrees", a)
    from d3s2.data.sdf import SIGN_METHODS  # the SDF's own list: --sign offers every method it has

    if cfg.sign not in SIGN_METHODS:
        _fail("--sign", ", ".join(SIGN_METHODS[:-1]) + " or " + SIGN_METHODS[-1], cfg.sign)
    if cfg.sdf_backend not in ("auto", "cpu", "warp"):
        _fail("--sdf-backend", "auto, cpu or warp", cfg.sdf_backend)
    if cfg.up not in ("y", "z"):
        _fail("--up", "y or z", cfg.up)
