"""d3s2: an installable, fast implementation of Direct3D-S2 (image to 3D through sparse SDF volumes)."""

__version__ = "0.1.0"
