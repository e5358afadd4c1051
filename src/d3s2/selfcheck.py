"""`d3s2 selfcheck`: voxelise a real mesh into a SparseTensor and run a small sparse conv stack on it.

A newcomer's first command: it needs no weights and no network. It loads the duck mesh shipped with pybullet_data,
samples its surface, voxelises it at ``--resolution`` (paper Sec. 3.1 works on such sparse surface volumes), runs
conv3 -> GroupNorm -> SiLU -> strided conv / mean pool -> conv3 -> subdivide -> conv3 forward and backward, checks that
everything is finite and that the sparse convolutions equal ``torch.nn.functional.conv3d`` on the dense grid at the
active voxels, and prints a short report with timings. Exit status 0 when every check passes, 2 otherwise.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from d3s2.errors import D3S2Error

MESHES = {"duck": "duck.obj", "teddy": "teddy2_VHACD_CHs.obj", "bunny": "bunny.obj", "stone": "stone.obj"}


def load_pybullet_mesh(name: str = "duck"):
    """A mesh shipped inside the pybullet_data package (loaded with trimesh, never copied)."""
    try:
        import pybullet_data
    except ImportError as exc:
        raise D3S2Error(f"selfcheck needs pybullet for its shipped meshes ({exc}); pip install 'd3s2[data]'") from exc
    try:
        import trimesh
    except ImportError as exc:
        raise D3S2Error(f"selfcheck needs trimesh to load meshes ({exc}); pip install 'd3s2[data]'") from exc
    fname = MESHES.get(name, name)
    path = os.path.join(pybullet_data.getDataPath(), fname)
    if not os.path.isfile(path):
        raise D3S2Error(f"mesh {fname!r} not found in pybullet_data ({path}); choose one of {sorted(MESHES)}")
    mesh = trimesh.load(path, force="mesh")
    if len(mesh.faces) == 0:
        raise D3S2Error(f"mesh {path} has no faces")
    return mesh


def surface_voxels(mesh, resolution: int, points_per_voxel: float = 12.0, seed: int = 0) -> np.ndarray:
    """Unique voxels ``[N, 3]`` (int) touched by points sampled uniformly on the surface, the mesh scaled to fit
    ``[0, resolution)^3`` with half a voxel margin."""
    import trimesh

    lo, hi = mesh.bounds
    scale = (resolution - 1) / float((hi - lo).max())
    area_vox = float(mesh.area) * scale**2
    count = int(max(1000, points_per_voxel * area_vox))
    pts, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    # centre the shape in the grid
    centre = (lo + hi) / 2
    grid = (np.asarray(pts) - centre) * scale + resolution / 2
    vox = np.clip(np.floor(grid), 0, resolution - 1).astype(np.int64)
    key = np.unique((vox[:, 0] * resolution + vox[:, 1]) * resolution + vox[:, 2])  # raster order
    return np.stack([key // resolution**2, (key // resolution) % resolution, key % resolution], axis=1)


def voxels_to_sparse(vox: np.ndarray, resolution: int, device="cpu", dtype=torch.float32):
    """SparseTensor (batch 1) with features (1, x, y, z normalised to [-1, 1])."""
    from d3s2.sparse import SparseTensor

    xyz = torch.from_numpy(vox).to(torch.int32)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int32), xyz], dim=1)
    pos = (xyz.float() + 0.5) / resolution * 2 - 1
    feats = torch.cat([torch.ones(len(xyz), 1), pos], dim=1)
    return SparseTensor(feats.to(device=device, dtype=dtype), coords.to(device), 1, resolution)


def ascii_silhouette(vox: np.ndarray, resolution: int, width: int = 48) -> str:
    """Front view (x across, y up) of the occupied voxels."""
    cell = max(1, -(-resolution // width))
    w = -(-resolution // cell)
    hgt = -(-resolution // (2 * cell))
    img = np.zeros((hgt, w), dtype=bool)
    img[(vox[:, 1] // (2 * cell)), vox[:, 0] // cell] = True
    rows = ["".join("#" if v else "." for v in row) for row in img[::-1]]
    keep = [r for r in rows if "#" in r] or rows
    return "\n".join("    " + r for r in keep)


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _check_conv_against_dense(x, conv, tol: float) -> CheckResult:
    """The sparse conv equals F.conv3d on the densified grid, at every output voxel."""
    from d3s2.sparse import dense_padding, kernel_to_dense_weight

    with torch.no_grad():
        y = conv(x)
        dense = x.float().to_dense()
        if conv.stride > 1:
            dense = F.pad(dense, (0, (-dense.shape[-1]) % conv.stride) * 3)
        ref = F.conv3d(dense, kernel_to_dense_weight(conv.kernel.float()), conv.bias.float(), stride=conv.stride,
                       padding=dense_padding(conv.kernel_size))
        c = y.coords.long()
        ref_rows = ref[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]
        err = _max_rel(y.feats.float(), ref_rows)
    name = f"conv k{conv.kernel_size} s{conv.stride} == dense conv3d"
    return CheckResult(name, err < tol, f"max rel err {err:.1e} over {y.num_voxels} voxels (tol {tol:.0e})")


def run_selfcheck(resolution: int = 64, device: str = "auto", mesh_name: str = "duck", dtype: str = "float32",
                  seed: int = 0, out=print) -> bool:
    from d3s2.sparse import (
        SparseConv3d,
        SparseGroupNorm,
        SparseLinear,
        SparseSiLU,
        serialize_blocks,
        sparse_mean_pool,
        subdivide,
    )

    if resolution < 8 or resolution > 1024:
        raise D3S2Error(f"--resolution must be in [8, 1024], got {resolution}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise D3S2Error("--device cuda requested but no CUDA device is available; use --device cpu")
    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if dt is None:
        raise D3S2Error(f"--dtype must be float32, float16 or bfloat16, got {dtype}")
    torch.manual_seed(seed)
    timings: dict[str, float] = {}

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    mesh = load_pybullet_mesh(mesh_name)
    vox = surface_voxels(mesh, resolution, seed=seed)
    x = voxels_to_sparse(vox, resolution, device, dt)
    timings["load + voxelise"] = time.perf_counter() - t0
    lay = serialize_blocks(x.coords, block_size=8, sub_block_size=4, batch_size=1)
    sizes = lay.block_sizes().float()
    out(f"d3s2 selfcheck: mesh {mesh_name} ({len(mesh.vertices)} vertices, {len(mesh.faces)} faces) -> "
        f"{resolution}^3 sparse grid on {device}, {dtype}")
    out(f"  voxels {x.num_voxels} ({100.0 * x.num_voxels / resolution**3:.2f}% of the grid); 8^3 blocks "
        f"{lay.num_blocks}, tokens/block mean {float(sizes.mean()):.1f} max {int(sizes.max())}")
    out(ascii_silhouette(vox, resolution))

    c = 16
    stack = torch.nn.ModuleDict({
        "conv_in": SparseConv3d(4, c, 3),
        "norm": SparseGroupNorm(4, c),
        "act": SparseSiLU(),
        "down": SparseConv3d(c, 2 * c, kernel_size=2, stride=2),
        "mid": SparseConv3d(2 * c, 2 * c, 3),
        "up": SparseConv3d(2 * c, c, 3),
        "head": SparseLinear(c, 1),
    }).to(device=device, dtype=dt)

    sync()
    t0 = time.perf_counter()
    h = stack["act"](stack["norm"](stack["conv_in"](x)))
    pooled = sparse_mean_pool(h)
    d = stack["down"](h) + pooled.replace(pooled.feats.repeat(1, 2))
    d = stack["act"](stack["mid"](d))
    u = stack["act"](stack["up"](subdivide(d)))
    y = stack["head"](u)
    loss = y.feats.float().square().mean()
    sync()
    timings["forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss.backward()
    sync()
    timings["backward"] = time.perf_counter() - t0

    grads = [p.grad for p in stack.parameters()]
    grads_ok = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    checks = [
        CheckResult("forward finite", bool(torch.isfinite(y.feats).all()), f"output {tuple(y.feats.shape)}"),
        CheckResult("gradients finite", grads_ok, f"{sum(p.numel() for p in stack.parameters())} params"),
        CheckResult("down/up coordinates", d.num_voxels == pooled.num_voxels and u.num_voxels == 8 * d.num_voxels,
                    f"{x.num_voxels} -> {d.num_voxels} parents -> {u.num_voxels} children"),
    ]
    tol = 1e-4 if dt == torch.float32 else 2e-2
    t0 = time.perf_counter()
    checks.append(_check_conv_against_dense(x, stack["conv_in"], tol))
    checks.append(_check_conv_against_dense(h, stack["down"], tol))
    timings["dense reference"] = time.perf_counter() - t0

    out(f"  stack: conv3 -> GN -> SiLU -> (k2 s2 conv + mean pool) -> conv3 -> subdivide -> conv3 -> linear")
    for ch in checks:
        out(f"  [{'ok' if ch.ok else 'FAIL'}] {ch.name}: {ch.detail}")
    out("  timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    ok = all(ch.ok for ch in checks)
    out("selfcheck passed" if ok else "selfcheck FAILED")
    return ok


def add_parser(sub):
    p = sub.add_parser("selfcheck", help="build a sparse tensor from a shipped mesh and run a sparse conv stack")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    p.add_argument("--resolution", type=int, default=64, help="grid resolution (default 64)")
    p.add_argument("--mesh", default="duck", help=f"pybullet_data mesh: {', '.join(sorted(MESHES))} or a file name")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=_main)


def _main(args) -> int:
    ok = run_selfcheck(args.resolution, args.device, args.mesh, args.dtype)
    if not ok:
        raise D3S2Error("a self-check failed (see the report above)")
    return 0
