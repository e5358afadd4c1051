"""Fixed train / held-out split of the demo corpus (issue 7): meshes shipped in the ``pybullet_data`` package.

The corpus is ``random_urdfs/*/*.obj`` plus a curated list of single-object meshes (duck, teddy, mug, lego, ...), as
paths relative to ``pybullet_data.getDataPath()`` (never copied). Every candidate is loaded with
:func:`d3s2.data.mesh_io.load_mesh`; the ones that fail are listed under ``excluded`` with the reason. An item is held out
when ``sha1("d3s2-demo-split:<seed>:<path>")`` modulo 1000 is below ``1000 * heldout_fraction``: the assignment of one path
never depends on the others, so adding meshes does not reshuffle the split.

    python demo/make_split.py            # rewrites demo/split.json
    python demo/make_split.py --check    # exit 1 when demo/split.json differs from a fresh build

README example images must come from ``heldout`` meshes only.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from pathlib import Path

SPLIT_PATH = Path(__file__).resolve().parent / "split.json"
SEED = 0
HELDOUT_FRACTION = 0.10

# Single objects outside random_urdfs. Left out on purpose: planes/terrain/cloth (flat sheets), scenes
# (samurai_monastry), convex-decomposition duplicates (*_vhacd, *_col, *_lores) of meshes already listed.
EXTRA_MESHES = (
    "duck.obj",
    "teddy2_VHACD_CHs.obj",
    "objects/mug.obj",
    "lego/lego.obj",
    "bunny.obj",
    "soccerball.obj",
    "sphere_smooth.obj",
    "cube.obj",
    "torus/torus_textured.obj",
    "toys/concave_box.obj",
    "toys/cylinder.obj",
    "toys/prism.obj",
    "toys/shape_sorter.obj",
    "table/table.obj",
    "table_square/table.obj",
    "tray/tray_textured.obj",
    "domino/domino.obj",
    "jenga/jenga.obj",
    "laikago/chassis.obj",
    "stone.obj",
)


def data_root() -> Path:
    import pybullet_data

    return Path(pybullet_data.getDataPath())


def candidates(root: Path) -> list[str]:
    rand = sorted(Path(p).relative_to(root).as_posix() for p in glob.glob(str(root / "random_urdfs" / "*" / "*.obj")))
    extra = [p for p in EXTRA_MESHES if (root / p).is_file()]
    return sorted(set(rand) | set(extra))


def is_heldout(rel: str, seed: int = SEED, fraction: float = HELDOUT_FRACTION) -> bool:
    h = int(hashlib.sha1(f"d3s2-demo-split:{seed}:{rel}".encode()).hexdigest()[:12], 16)
    return h % 1000 < round(1000 * fraction)


def build_split(root: Path | None = None, seed: int = SEED, fraction: float = HELDOUT_FRACTION) -> dict:
    from d3s2.data.mesh_io import load_mesh

    root = data_root() if root is None else Path(root)
    train, heldout, excluded = [], [], {}
    for rel in candidates(root):
        try:
            load_mesh(root / rel)
        except Exception as exc:  # noqa: BLE001 - any load failure excludes the mesh, with its reason
            excluded[rel] = str(exc).replace(str(root) + os.sep, "").splitlines()[0][:200]
            continue
        (heldout if is_heldout(rel, seed, fraction) else train).append(rel)
    return {
        "format": "d3s2-demo-split/1",
        "source": "pybullet_data (paths relative to pybullet_data.getDataPath())",
        "rule": f"heldout iff int(sha1('d3s2-demo-split:{seed}:'+path)[:12], 16) % 1000 < {round(1000 * fraction)}",
        "seed": seed,
        "heldout_fraction": fraction,
        "counts": {"train": len(train), "heldout": len(heldout), "excluded": len(excluded)},
        "train": train,
        "heldout": heldout,
        "excluded": excluded,
    }


def dumps(split: dict) -> str:
    return json.dumps(split, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(SPLIT_PATH))
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    ap.add_argument("--print", dest="which", choices=["train", "heldout", "all"],
                    help="print the paths of this part of --out (one a line) and exit")
    args = ap.parse_args(argv)
    if args.which:
        split = json.loads(Path(args.out).read_text())
        print("\n".join(split["train"] + split["heldout"] if args.which == "all" else split[args.which]))
        return 0
    text = dumps(build_split())
    out = Path(args.out)
    if args.check:
        same = out.is_file() and out.read_text() == text
        print(f"{out}: {'up to date' if same else 'DIFFERS from a fresh build'}")
        return 0 if same else 1
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    s = json.loads(text)["counts"]
    print(f"wrote {out}: {s['train']} train, {s['heldout']} held out, {s['excluded']} excluded")
    return 0


def write_lists(split: dict, folder: Path) -> tuple[Path, Path]:
    """train.txt / heldout.txt (one relative path a line) for shell tools."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in ("train", "heldout"):
        p = folder / f"{key}.txt"
        p.write_text("".join(r + "\n" for r in split[key]))
        paths.append(p)
    return paths[0], paths[1]


if __name__ == "__main__":
    sys.exit(main())
