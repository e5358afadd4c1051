"""The settings of one ``d3s2 prepare`` run (paper Sec. 3.3 SDF band and resolutions, Sec. 5.1 render cameras).

:class:`PrepareConfig` is what the CLI flags fill in; :func:`d3s2.data.prepare_checks.check_prepare_config` refuses a
setting no item could be prepared with; :meth:`PrepareConfig.render_key` is what a finished item's renders were made
with (a rerun with other render settings redoes them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from d3s2.geometry.cameras import CameraSampling

__all__ = ["PrepareConfig"]


@dataclass
class PrepareConfig:
    resolutions: tuple[int, ...] = (512, 1024)
    views: int = CameraSampling.num_views
    image_size: int = 518
    supersample: int = 2
    tau: float = 1.0 / 128.0
    sign: str = "auto"
    sdf_backend: str = "auto"
    device: str | None = None  # None: SDF and renders on CUDA when present, else CPU
    sharp_angle: float = 30.0
    seed: int = 0
    # the cameras default to the paper's (Sec. 5.1), as d3s2.geometry.cameras has them
    up: str = CameraSampling.up
    elevation_deg: tuple[float, float] = CameraSampling.elevation_deg
    azimuth_deg: tuple[float, float] = CameraSampling.azimuth_deg
    focal_mm: tuple[float, float] = CameraSampling.focal_mm

    def render_key(self) -> dict:
        """What determines the renders: a finished item with other settings is redone."""
        keys = ("views", "image_size", "supersample", "seed", "up", "elevation_deg", "azimuth_deg", "focal_mm")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keys}
