"""The result of one :class:`~d3s2.pipelines.image_to_3d.ImageTo3DPipeline` call: :class:`ImageTo3DOutput`.

``meshes`` (one ``trimesh.Trimesh`` per input image), ``stats`` (per stage: seconds, peak GPU bytes, ``parts``; the
list the pipeline also keeps as ``last_stats``) and ``notes`` (the user-facing warnings of the run, e.g. an image
without alpha channel, once each and in order; they are still emitted as :class:`UserWarning` too).

For callers written against the old return value (a list of meshes) the output behaves like that list where it is
indexed, iterated or measured: ``out[0]``, ``for m in out``, ``len(out)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import trimesh

__all__ = ["ImageTo3DOutput"]


@dataclass
class ImageTo3DOutput:
    """Meshes, per-stage statistics and user-facing notes of one pipeline call (see the module docstring)."""

    meshes: list["trimesh.Trimesh"]
    stats: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator["trimesh.Trimesh"]:
        return iter(self.meshes)

    def __len__(self) -> int:
        return len(self.meshes)

    def __getitem__(self, index):
        return self.meshes[index]
