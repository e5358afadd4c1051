"""Training tasks: one small adapter per stage, one trainer for all (issue 5). The public names of the tasks.

The interface and the registry are in :mod:`d3s2.train.task_base`, the tasks in :mod:`d3s2.train.tasks_dense`
(``dense_vae``, ``dense_dit``), :mod:`d3s2.train.tasks_ss_vae` (``ss_vae``) and :mod:`d3s2.train.tasks_ss_dit`
(``ss_dit``, imported on first use), the pieces they share in :mod:`d3s2.train.task_common`; this module gathers their
public names, importable from here as before the split.

Registration hook (for ``ss_vae`` / ``ss_dit`` and any later stage)::

    from d3s2.train.tasks import Task, register_task

    @register_task("ss_dit")
    class SparseDiTTask(Task):
        ...

or, without importing that module here, add a lazily imported ``"module:Class"`` string:
``TASK_REGISTRY["ss_dit"] = "d3s2.train.tasks_ss_dit:SSDiTTask"``.
"""

from __future__ import annotations

from d3s2.train.task_base import TASK_REGISTRY, Task, build_task, model_config_from, register_task
from d3s2.train.task_common import ImageViewDataset
from d3s2.train.tasks_dense import DenseDiTTask, DenseVAETask, occupancy_from_coords
from d3s2.train.tasks_ss_vae import SSVAETask, surface_samples

__all__ = ["Task", "TASK_REGISTRY", "register_task", "build_task", "model_config_from", "DenseVAETask", "DenseDiTTask",
           "SSVAETask", "ImageViewDataset", "occupancy_from_coords", "surface_samples"]
