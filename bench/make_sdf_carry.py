"""Build ``.whl/`` (git-ignored) for the GPU run of ``bench/prepare_sdf.py``: the wheels its machine lacks (warp-lang
1.2.2 with its CPU compiler and examples stripped, to fit the 64 MiB carry; libigl; trimesh) and the benchmark meshes
as npz (``.whl/meshes``, from the installed pymeshfix / pybullet_data packages and the union made by the benchmark).

    python bench/make_sdf_carry.py            # here, once; then carry .whl (see the README, "SDF signs of parts")
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
WHEELS = ["warp-lang==1.2.2", "libigl==2.6.3", "trimesh==5.2.0"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def _strip_warp(path: str) -> None:
    """Drop warp's CPU compiler (warp-clang.so), examples and tests from the wheel (and its RECORD)."""

    def drop(name: str) -> bool:
        return name.endswith("warp-clang.so") or name.startswith(("warp/examples/", "warp/tests/"))

    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            if drop(info.filename):
                continue
            data = zi.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(x for x in data.split(b"\n") if not drop(x.split(b",")[0].decode()))
            zo.writestr(info, data)
    os.replace(tmp, path)


def main() -> None:
    out = os.path.join(ROOT, ".whl")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", out]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.check_call(cmd + WHEELS)
    for f in os.listdir(out):
        if f.startswith("warp_lang-") and f.endswith(".whl"):
            _strip_warp(os.path.join(out, f))
    subprocess.check_call([sys.executable, os.path.join(ROOT, "bench", "prepare_sdf.py"), "--export-meshes",
                           os.path.join(out, "meshes")])
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f".whl: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
