#!/usr/bin/env bash
# Pack the demo meshes (demo/split.json, train + held out; OBJ + MTL, ~5 MB gzipped) and the wheels the GPU machine
# lacks (trimesh, libigl) into .whl/ (git-ignored) so a device call can carry them:  run(carry=[".whl"], ...).
#   demo/pack_meshes.sh [WHEEL_DIR]   (WHEEL_DIR: where to take the wheels from; default: pip download)
set -euo pipefail
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p .whl
ROOT=$("$PY" -c "import pybullet_data; print(pybullet_data.getDataPath())")
mapfile -t FILES < <("$PY" demo/make_split.py --print all)
MTL=()
for f in "${FILES[@]}"; do m="${f%.obj}.mtl"; [ -f "$ROOT/$m" ] && MTL+=("$m"); done
tar czf .whl/demo_meshes.tgz -C "$ROOT" "${FILES[@]}" "${MTL[@]}"
if [ -n "${1:-}" ]; then
  cp "$1"/trimesh-*.whl "$1"/libigl-*cp312*.whl .whl/
else
  "$PY" -m pip download --no-deps -d .whl trimesh "libigl==2.6.3" --python-version 3.12 --only-binary=:all:
fi
du -ch .whl/* | tail -1
