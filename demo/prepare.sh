#!/usr/bin/env bash
# Prepare the demo corpus (issue 7) from demo/split.json: sparse SDFs at 128^3 and 256^3 (SS-VAE multi-resolution; the
# structure stage derives its 64^3 occupancy from them as coords // (R / 64)) and 8 RGBA renders of 128 px per mesh.
#
#   demo/prepare.sh OUT_DIR [SPLIT] [extra d3s2 prepare args...]
#     SPLIT: train | heldout | all (default all)
#
# d3s2 prepare has no file-list option, so the selected meshes are staged as symlinks under OUT_DIR/.meshes with their
# pybullet_data-relative paths (item ids then equal those of a plain run on pybullet_data). Resumable: rerun to go on.
# Mesh root: $DEMO_MESH_ROOT (e.g. the unpacked demo/pack_meshes.sh tarball on the GPU machine, which has no pybullet)
# or else pybullet_data.getDataPath(). Needs trimesh + libigl (wheels carried to the GPU machine, see demo/README.md).
set -euo pipefail
OUT=${1:?usage: demo/prepare.sh OUT_DIR [train|heldout|all] [d3s2 prepare args...]}
SPLIT=${2:-all}
shift $(( $# >= 2 ? 2 : 1 ))
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
STAGE="$OUT/.meshes"
mkdir -p "$OUT"
"$PY" - "$HERE/split.json" "$STAGE" "$SPLIT" <<'PYEOF'
import json, os, sys
from pathlib import Path
split, stage, which = json.load(open(sys.argv[1])), Path(sys.argv[2]), sys.argv[3]
if which not in ("train", "heldout", "all"):
    sys.exit(f"SPLIT must be train, heldout or all, got {which!r}")
rels = (split["train"] + split["heldout"]) if which == "all" else split[which]
root = Path(os.environ.get("DEMO_MESH_ROOT") or __import__("pybullet_data").getDataPath())
for rel in rels:
    dst = stage / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_symlink():
        os.symlink(root / rel, dst)
    mtl = (root / rel).with_suffix(".mtl")  # keeps the OBJ's material reference resolvable; harmless when absent
    if mtl.is_file() and not dst.with_suffix(".mtl").is_symlink():
        os.symlink(mtl, dst.with_suffix(".mtl"))
print(f"staged {len(rels)} meshes ({which}) under {stage}")
PYEOF
exec "$PY" -m d3s2.cli prepare "$STAGE" "$OUT" --glob '*.obj' \
  --resolutions 128 256 --views "${DEMO_VIEWS:-8}" --image-size "${DEMO_IMAGE_SIZE:-128}" --supersample 2 \
  --tau 0.015625 --no-progress "$@"
