"""Clean-up of a large marching-cubes-sized mesh on the CPU (issue 20: clean-up is part of the 1024 time budget).

    PYTHONPATH=src python bench/cleanup.py --out bench/results                 # this checkout
    PYTHONPATH=/path/to/other/src python bench/cleanup.py --label before ...   # another checkout, same mesh

The pipeline hands clean-up a welded mesh with vertex normals computed on the device; at 1024 about 4.8 M faces.
Stand-in: an icosphere of 5.2 M faces (subdivision 9) with the pipeline's kind of normals given, (a) alone and
(b) with four small spheres (two inside it, two outside), through ``clean_mesh(remove_enclosed=True)`` as the
pipeline calls it. Median of ``--repeats`` wall-clock seconds per case; writes ``cleanup-<label>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def meshes():
    import trimesh

    big = trimesh.creation.icosphere(subdivisions=9, radius=0.8)
    small = [trimesh.creation.icosphere(subdivisions=3, radius=0.05).apply_translation(t)
             for t in ([0, 0, 0], [0.3, 0, 0], [0, 0.95, 0], [0.9, 0.5, 0.1])]
    out = {}
    for name, parts in (("one_component", [big]), ("with_enclosed_and_floaters", [big] + small)):
        m = trimesh.util.concatenate(parts)
        out[name] = trimesh.Trimesh(m.vertices, m.faces, vertex_normals=np.asarray(m.vertex_normals), process=False)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="cpu")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    import d3s2
    from d3s2.geometry.cleanup import clean_mesh

    sys.path.insert(0, str(HERE))
    from results_io import write_json

    rows = []
    for name, mesh in meshes().items():
        times, faces = [], None
        for _ in range(a.repeats):
            m = mesh.copy(include_cache=True)
            t0 = time.perf_counter()
            out = clean_mesh(m, remove_enclosed=True)
            times.append(time.perf_counter() - t0)
            faces = len(out.faces)
        rows.append({"case": name, "faces_in": len(mesh.faces), "faces_out": faces,
                     "seconds_median": statistics.median(times), "seconds": times})
        print(json.dumps(rows[-1]), flush=True)
    src = Path(d3s2.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(src), "status", "--porcelain", "src"], capture_output=True,
                                text=True).stdout.strip())
    import scipy
    import trimesh

    doc = {"bench": "cleanup", "label": a.label, "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
           "trimesh": trimesh.__version__, "scipy": scipy.__version__, "commit": commit + ("+dirty" if dirty else ""),
           "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"wrote {write_json(Path(a.out) / f'cleanup-{a.label}.json', doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
