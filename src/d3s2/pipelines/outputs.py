"""Output paths of ``d3s2 generate``, planned and checked before any model work (issue 22, cases 1 and 3).

Every input image maps to ``OUT_DIR/<stem>.<format>`` (and ``OUT_DIR/<stem>.preview.png`` with ``--preview``). Two
inputs of one run must never write the same file (``a/good.png`` and ``b/good.png`` both give ``good.glb``): such a run
is refused up front, naming both inputs, instead of silently overwriting the first mesh. Names are compared
case-folded, because on case-insensitive file systems (macOS, Windows) ``A.glb`` and ``a.glb`` are one file. An output
that would overwrite one of the run's input images is refused too.

The output folder is checked before the models are loaded: it must be a folder (or not exist yet, below a writable
folder) and writable, and no planned output may be an existing folder; otherwise a generation of minutes would end in
a failed write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from d3s2.errors import D3S2Error
from d3s2.fileio import check_writable_dir

__all__ = ["PlannedOutput", "plan_outputs"]


@dataclass(frozen=True)
class PlannedOutput:
    image: str
    mesh: Path
    preview: Path | None


def _key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path)).casefold()


def plan_outputs(images: list[str], out_dir: str | os.PathLike, fmt: str, preview: bool) -> list[PlannedOutput]:
    """One :class:`PlannedOutput` per image, after checking that no two collide and that ``out_dir`` is writable.

    Raises :class:`D3S2Error` (one line, naming the inputs or the folder) otherwise."""
    out = Path(out_dir)
    plans = []
    owner: dict[str, str] = {}
    inputs = {_key(Path(im)): im for im in images}
    for image in images:
        stem = Path(image).stem
        plan = PlannedOutput(image, out / f"{stem}.{fmt}", out / f"{stem}.preview.png" if preview else None)
        for target in (plan.mesh, plan.preview):
            if target is None:
                continue
            key = _key(target)
            if key in owner:
                first = owner[key]
                if first == image:
                    raise D3S2Error(f"{image} is given twice; each image is generated once per run")
                raise D3S2Error(f"{first} and {image} would both be written to {target}; rename one of them or "
                                "run them with different -o folders")
            if key in inputs:
                raise D3S2Error(f"the output {target} of {image} would overwrite the input image {inputs[key]}; "
                                "choose another -o folder")
            owner[key] = image
        plans.append(plan)
    check_writable_dir(out, "-o")
    for plan in plans:
        for target in (plan.mesh, plan.preview):
            if target is not None and target.is_dir():
                raise D3S2Error(f"-o: {target} is a folder, the mesh of {plan.image} cannot be written there; "
                                "move it away or choose another -o folder")
    return plans
