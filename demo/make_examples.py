"""Example input images of the demo model (issue 7): renders of HELD-OUT meshes only (demo/split.json ``heldout``).

Each example is one RGBA render (d3s2.data.render, plain PyTorch, CPU) of a ``pybullet_data`` mesh normalised like
``d3s2 prepare`` does (bounding box centred, longest side 2 * 0.95, up axis +y, the training renders' convention), from
one fixed camera: elevation 20 deg, azimuth 45 deg, 50 mm (36 mm sensor), distance fitted to the bounding sphere.
Output (the lead commits it; meshes are never copied, only named):

    src/d3s2/assets/examples/<name>.png     RGBA, SIZE x SIZE
    src/d3s2/assets/examples/examples.json  per image: source mesh (path inside pybullet_data) and camera

    python demo/make_examples.py [--out src/d3s2/assets/examples] [--size 518]

Refuses any source that is not in the held-out list (the README's images must show shapes the model never saw).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPLIT_PATH = REPO / "demo" / "split.json"
OUT_DEFAULT = REPO / "src" / "d3s2" / "assets" / "examples"

# name -> mesh inside pybullet_data. Picked from a contact sheet of the 88 held-out meshes for distinct silhouettes:
# a rounded organic shape, a cluster of boxes, a flat rounded saucer, a block with pegs.
EXAMPLES = {
    "mushroom": "random_urdfs/306/306.obj",
    "blocks": "random_urdfs/628/628.obj",
    "saucer": "random_urdfs/573/573.obj",
    "pegs": "random_urdfs/049/049.obj",
}
CAMERA = {"elevation_deg": 20.0, "azimuth_deg": 45.0, "focal_mm": 50.0, "up": "y", "margin": 1.05}
SUPERSAMPLE = 2


def heldout_paths(split_path: Path = SPLIT_PATH) -> set[str]:
    return set(json.loads(Path(split_path).read_text())["heldout"])


def render_example(rel: str, size: int, mesh_root: Path | None = None, device: str = "cpu"):
    """RGBA uint8 ``[size, size, 4]`` of ``pybullet_data/<rel>`` and its :class:`~d3s2.geometry.cameras.Camera`."""
    from d3s2.data.mesh_io import load_mesh, normalize_mesh
    from d3s2.data.render import Renderer, RenderSettings, load_render_mesh
    from d3s2.geometry.cameras import Camera, fit_distance

    if mesh_root is None:
        import pybullet_data

        mesh_root = Path(pybullet_data.getDataPath())
    src = Path(mesh_root) / rel
    _, t = normalize_mesh(load_mesh(src))  # the same transform d3s2 prepare applies before rendering
    mesh = load_render_mesh(src).transformed(t.scale, t.offset)
    focal = CAMERA["focal_mm"]
    cam = Camera(elevation_deg=CAMERA["elevation_deg"], azimuth_deg=CAMERA["azimuth_deg"], focal_mm=focal,
                 distance=fit_distance(mesh.bounding_radius(), focal, margin=CAMERA["margin"]), resolution=size,
                 up=CAMERA["up"])
    rgba = Renderer(mesh, RenderSettings(size=size, supersample=SUPERSAMPLE), device=device).render(cam).rgba_uint8()
    return rgba, cam


def _png_bytes(rgba) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make_examples(out: Path, size: int = 518, examples: dict[str, str] = EXAMPLES,
                  split_path: Path = SPLIT_PATH) -> dict:
    from d3s2.errors import D3S2Error
    from d3s2.fileio import atomic_write_bytes, atomic_write_text

    heldout = heldout_paths(split_path)
    bad = [rel for rel in examples.values() if rel not in heldout]
    if bad:
        raise D3S2Error(f"example source(s) not in the held-out list of {split_path}: {', '.join(bad)}; "
                        "README images must come from held-out meshes (python demo/make_split.py --print heldout)")
    out = Path(out)
    records = {}
    for name, rel in examples.items():
        rgba, cam = render_example(rel, size)
        data = _png_bytes(rgba)
        atomic_write_bytes(out / f"{name}.png", data)
        cam_json = cam.to_json()
        records[name] = {
            "image": f"{name}.png",
            "source": rel,
            "source_root": "pybullet_data",
            "normalisation": "d3s2.data.mesh_io.normalize_mesh (bbox centred, longest side 1.9)",
            "camera": {k: cam_json[k] for k in ("elevation_deg", "azimuth_deg", "focal_mm", "sensor_width_mm",
                                                 "distance", "resolution", "up")},
            "supersample": SUPERSAMPLE,
        }
        print(f"{out / (name + '.png')}: {rel}, {len(data) / 1024:.0f} KiB")
    index = {"format": "d3s2-examples/1", "split": "demo/split.json (heldout)", "examples": records}
    atomic_write_text(out / "examples.json", json.dumps(index, indent=1) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT_DEFAULT), help="output folder (default: src/d3s2/assets/examples)")
    ap.add_argument("--size", type=int, default=518, help="image size in pixels (default 518)")
    args = ap.parse_args(argv)
    make_examples(Path(args.out), args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
