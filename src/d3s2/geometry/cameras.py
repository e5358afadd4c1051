"""Random pinhole cameras for the image-conditioning renders (paper Sec. 5.1).

The paper renders 45 views per mesh with elevation 10-40 deg, azimuth 0-180 deg and focal length 30-100 mm. Focal
lengths are 35 mm-equivalent: the field of view follows from a 36 mm sensor width (square images, so the vertical field
of view equals the horizontal one).

Conventions (documented once, used by the dataset renders of d3s2.data and the previews of d3s2.pipelines):

* World frame: the normalised mesh frame of d3s2.data (object in [-1, 1]^3, centred at the origin), up axis +y by
  default (glTF / trimesh convention; ``up="z"`` for z-up corpora).
* Elevation: angle above the horizontal plane, towards +up. Azimuth: rotation about the up axis, measured from the
  +z axis towards +x for y-up (from +x towards +y for z-up). Azimuth 0, elevation 0 looks at the object's front (+z).
* Camera distance: the object's bounding sphere (radius r about the origin) is inscribed in the view cone,
  ``distance = margin * r / sin(fov / 2)``, so every view holds the whole object whatever the focal length.
* ``intrinsics`` K is in pixels for the OpenCV camera frame (x right, y down, z forward), pixel (i, j) covering
  [i, i+1) x [j, j+1), principal point at the image centre. ``c2w`` is the OpenCV camera-to-world 4x4 matrix;
  ``c2w_opengl`` the same pose in the OpenGL / Blender convention (x right, y up, looking down -z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SENSOR_WIDTH_MM = 36.0


@dataclass(frozen=True)
class CameraSampling:
    """Ranges of the random cameras; defaults are the paper's (Sec. 5.1)."""

    num_views: int = 45
    elevation_deg: tuple[float, float] = (10.0, 40.0)
    azimuth_deg: tuple[float, float] = (0.0, 180.0)
    focal_mm: tuple[float, float] = (30.0, 100.0)
    sensor_width_mm: float = SENSOR_WIDTH_MM
    margin: float = 1.05
    up: str = "y"

    def __post_init__(self):
        for name in ("elevation_deg", "azimuth_deg", "focal_mm"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"CameraSampling.{name}: lower bound {lo} above upper bound {hi}")
        if self.focal_mm[0] <= 0 or self.num_views < 0 or self.margin < 1.0:
            raise ValueError("CameraSampling: focal lengths must be positive, num_views >= 0 and margin >= 1")
        if self.up not in ("y", "z"):
            raise ValueError(f"CameraSampling.up must be 'y' or 'z', got {self.up!r}")


@dataclass
class Camera:
    """One pinhole view: pose, intrinsics and the parameters it was drawn from."""

    elevation_deg: float
    azimuth_deg: float
    focal_mm: float
    distance: float
    resolution: int
    sensor_width_mm: float = SENSOR_WIDTH_MM
    up: str = "y"
    c2w: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.c2w = orbit_c2w(self.elevation_deg, self.azimuth_deg, self.distance, self.up)

    @property
    def fov_rad(self) -> float:
        return 2.0 * math.atan(0.5 * self.sensor_width_mm / self.focal_mm)

    @property
    def focal_px(self) -> float:
        return self.focal_mm / self.sensor_width_mm * self.resolution

    def intrinsics(self, resolution: int | None = None) -> np.ndarray:
        """3x3 K in pixels for a square image of ``resolution`` (default: the camera's own)."""
        res = self.resolution if resolution is None else resolution
        f = self.focal_mm / self.sensor_width_mm * res
        return np.array([[f, 0.0, res / 2.0], [0.0, f, res / 2.0], [0.0, 0.0, 1.0]])

    @property
    def w2c(self) -> np.ndarray:
        return np.linalg.inv(self.c2w)

    def to_json(self) -> dict:
        gl = self.c2w @ np.diag([1.0, -1.0, -1.0, 1.0])
        return {
            "elevation_deg": float(self.elevation_deg),
            "azimuth_deg": float(self.azimuth_deg),
            "focal_mm": float(self.focal_mm),
            "sensor_width_mm": float(self.sensor_width_mm),
            "fov_deg": math.degrees(self.fov_rad),
            "distance": float(self.distance),
            "resolution": int(self.resolution),
            "up": self.up,
            "intrinsics": self.intrinsics().tolist(),
            "c2w": self.c2w.tolist(),
            "c2w_opengl": gl.tolist(),
            "convention": "K, c2w: OpenCV camera (x right, y down, z forward); c2w_opengl: x right, y up, -z forward",
        }

    @classmethod
    def from_json(cls, d: dict) -> "Camera":
        return cls(
            elevation_deg=d["elevation_deg"],
            azimuth_deg=d["azimuth_deg"],
            focal_mm=d["focal_mm"],
            distance=d["distance"],
            resolution=d["resolution"],
            sensor_width_mm=d.get("sensor_width_mm", SENSOR_WIDTH_MM),
            up=d.get("up", "y"),
        )


def _frame(up: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(up, front, right) world axes: azimuth 0 looks from `front` towards the origin."""
    if up == "y":
        return np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])
    return np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])


def orbit_position(elevation_deg: float, azimuth_deg: float, distance: float, up: str = "y") -> np.ndarray:
    """Camera centre on a sphere of radius ``distance`` about the origin."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    u, f, r = _frame(up)
    return distance * (math.cos(e) * (math.cos(a) * f + math.sin(a) * r) + math.sin(e) * u)


def look_at_c2w(eye: np.ndarray, target: np.ndarray, up_vec: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world matrix of a camera at ``eye`` looking at ``target`` (x right, y down, z forward)."""
    z = np.asarray(target, dtype=np.float64) - np.asarray(eye, dtype=np.float64)
    z /= np.linalg.norm(z)
    x = np.cross(z, up_vec)
    if np.linalg.norm(x) < 1e-9:  # looking straight along the up axis: any right vector will do
        x = np.cross(z, np.roll(up_vec, 1))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w


def orbit_c2w(elevation_deg: float, azimuth_deg: float, distance: float, up: str = "y") -> np.ndarray:
    eye = orbit_position(elevation_deg, azimuth_deg, distance, up)
    return look_at_c2w(eye, np.zeros(3), _frame(up)[0])


def fit_distance(
    radius: float, focal_mm: float, sensor_width_mm: float = SENSOR_WIDTH_MM, margin: float = 1.05
) -> float:
    """Distance at which a sphere of ``radius`` about the look-at point fits inside the square view cone."""
    half_fov = math.atan(0.5 * sensor_width_mm / focal_mm)
    return margin * radius / math.sin(half_fov)


def sample_cameras(
    radius: float, resolution: int, sampling: CameraSampling = CameraSampling(), seed: int = 0
) -> list[Camera]:
    """Draw ``sampling.num_views`` cameras uniformly in the configured ranges (deterministic for a seed).

    ``radius`` is the bounding-sphere radius of the (normalised) object about the origin.
    """
    if not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"sample_cameras: object radius must be positive and finite, got {radius}")
    rng = np.random.default_rng(seed)
    n = sampling.num_views
    elev = rng.uniform(*sampling.elevation_deg, size=n)
    azim = rng.uniform(*sampling.azimuth_deg, size=n)
    focal = rng.uniform(*sampling.focal_mm, size=n)
    return [
        Camera(
            elevation_deg=float(e),
            azimuth_deg=float(a),
            focal_mm=float(f),
            distance=fit_distance(radius, float(f), sampling.sensor_width_mm, sampling.margin),
            resolution=resolution,
            sensor_width_mm=sampling.sensor_width_mm,
            up=sampling.up,
        )
        for e, a, f in zip(elev, azim, focal)
    ]
