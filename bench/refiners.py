"""Benchmark: the release's refiner runs, lean (d3s2.geometry.refine) vs the dense reproduction of the release's run
(d3s2.geometry.refine_reference), time and peak memory, and a check that both give the same field and mesh.

Networks: d3s2.models.refiner's SDFRefiner / SignRefiner at their full-size (release) configs with random weights,
in fp16 on CUDA as the release runs them; when that module is missing, a small conv stand-in with the same interface
(recorded as "net": "stand-in"). Input: the SDF band of a sphere (|sdf| < 2 voxels, values in voxels / 2 clamped to
[-1, 1]), 32 random decoder features per voxel at 512.

    python bench/refiners.py --device cuda                  # full size: 512 (patch 192), 1024 (patch 256)
    python bench/refiners.py --device cpu --tiny            # a seconds-long smoke run

Writes bench/results/refiners-<device>[-tiny].json (card, versions, git commit, shapes, median ms, peak memory,
max |lean - reference|, mesh check).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # bench/ (loaded by file path in the tests)
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from d3s2.geometry.lewiner import lewiner_marching_cubes  # noqa: E402
from d3s2.geometry.refine import (refine_sdf_512, refine_signs_1024, refined_sdf_grid,  # noqa: E402
                                  refined_sign_grid)
from d3s2.geometry.refine_reference import refine_sdf_512_reference, refine_signs_1024_reference  # noqa: E402
from timing import timed  # noqa: E402


class StandInSDF(nn.Module):
    def __init__(self, patch: int, channels: int = 32):
        super().__init__()
        self.patch_size = patch
        self.a = nn.Conv3d(1 + channels, 8, 3, padding=1)
        self.b = nn.Conv3d(8, 1, 3, padding=1)

    def forward(self, sdf, features):
        return torch.tanh(self.b(torch.relu(self.a(torch.cat([sdf, features], 1)))) + sdf)


class StandInSign(nn.Module):
    def __init__(self, patch: int):
        super().__init__()
        self.patch_size = patch
        self.a = nn.Conv3d(1, 8, 3, padding=1)
        self.b = nn.Conv3d(8, 1, 3, padding=1)

    def forward(self, sdf):
        return torch.sigmoid(self.b(torch.relu(self.a(sdf))) + 4 * sdf)


def build_nets(tiny: bool, device, dtype):
    """(sdf_net, sign_net, kind): part A's full-size modules when present, else stand-ins."""
    if tiny:
        return StandInSDF(16).to(device, dtype).eval(), StandInSign(10).to(device, dtype).eval(), "stand-in (tiny)"
    try:
        from d3s2.models.refiner import SDFRefiner, SignRefiner  # noqa: PLC0415
        a, b, kind = SDFRefiner(), SignRefiner(), "d3s2.models.refiner (random init)"
    except Exception as e:  # the networks are another helper's part; time the run logic regardless
        print(f"d3s2.models.refiner unavailable ({type(e).__name__}: {e}); using stand-ins", file=sys.stderr)
        a, b, kind = StandInSDF(192), StandInSign(256), "stand-in"
    return a.to(device, dtype).eval(), b.to(device, dtype).eval(), kind


def sphere_band(R: int, device, radius_frac: float = 0.38, width: float = 2.0, channels: int | None = None):
    """Band voxels of a sphere, built slab by slab (no dense R^3 tensor)."""
    ax = torch.arange(R, device=device, dtype=torch.float32)
    centre = (R - 1) / 2 + 0.3
    radius = radius_frac * R
    out = []
    slab = max(1, (1 << 24) // (R * R))
    for x0 in range(0, R, slab):
        xs = ax[x0:x0 + slab]
        g = torch.stack(torch.meshgrid(xs, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        d = (g - centre).norm(dim=1) - radius
        keep = d.abs() < width
        out.append(torch.cat([g[keep].long(), (d[keep] / width).clamp(-1, 1)[:, None].double()], 1))
    t = torch.cat(out)
    coords = torch.cat([torch.zeros(len(t), 1, dtype=torch.long, device=device), t[:, :3].long()], 1)
    sdf = t[:, 3].float()
    feats = None
    if channels:
        feats = torch.randn(len(coords), channels, device=device, generator=torch.Generator(device=device).manual_seed(0))
    return coords, sdf, feats


@torch.no_grad()
def sharpen_sign_refiner(net, margin: float = 3.0, patch: int | None = None) -> tuple[float, float]:
    """Random sign-refiner weights give logits within ~1e-3 of 0: its sign field is noise (every 512 cell changes
    sign, so the lean field is not lean and the 1024 mesh is enormous), which no trained network gives. Scales
    ``conv_out`` in place so that the logits of a sphere-band patch have std ``margin`` and sit at ``+margin``
    (outside) far from the band: the network's structure stays near the band. Returns (scale, new bias)."""
    p = patch or int(net.patch_size)
    w = net.conv_out.weight
    ax = torch.arange(p, device=w.device, dtype=torch.float32)
    g = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), 0)
    d = (g - (p - 1) / 2 + 0.3).norm(dim=0) - 0.35 * p
    band = d.abs() < 2
    x = torch.ones(1, 1, p, p, p, device=w.device)
    x[0, 0][band] = (d[band] / 2).clamp(-1, 1)
    prob = net(x.to(w.dtype)).double().clamp(1e-12, 1 - 1e-12)[0, 0]
    signal = torch.log(prob / (1 - prob)) - float(net.conv_out.bias.double().sum())
    k = margin / max(float(signal.std()), 1e-12)
    bias = margin - k * float(signal[~band].median())
    w.mul_(k)
    net.conv_out.bias.fill_(bias)
    return k, bias


def measure(fn, device, repeats: int):
    """(result, median ms, peak MiB above the baseline) of ``fn()``."""
    times, peak, res = [], None, None
    for _ in range(repeats):
        res = None
        res, seconds, peak = timed(fn, torch.device(device), unit=2**20)
        times.append(seconds * 1e3)
    return res, float(np.median(times)), peak


def mesh_check(field, dense: torch.Tensor, level: float) -> dict:
    """Lewiner MC on the lean sparse field vs skimage Lewiner MC on the reference's dense field."""
    from skimage import measure as skm

    t0 = time.perf_counter()
    vol = dense.float().cpu().numpy()
    if not vol.min() <= level <= vol.max():
        vr, fr = np.zeros((0, 3)), np.zeros((0, 3))
    else:
        vr, fr, _, _ = skm.marching_cubes(vol, level, method="lewiner")
    t_dense = time.perf_counter() - t0
    del vol
    t0 = time.perf_counter()
    vl, fl = lewiner_marching_cubes(**field.to("cpu").mc_kwargs())
    t_sparse = time.perf_counter() - t0
    vl = vl.numpy().astype(np.float64)
    out = {"faces_reference": int(len(fr)), "faces_lean": int(len(fl)), "vertices_reference": int(len(vr)),
           "vertices_lean": int(len(vl)), "dense_mc_s": t_dense, "sparse_mc_s": t_sparse}
    if len(vr) and len(vl):
        from scipy.spatial import cKDTree

        d1, idx = cKDTree(vr).query(vl)
        d2 = cKDTree(vl).query(vr)[0]
        out["max_vertex_diff"] = float(max(d1.max(), d2.max()))
        ta = {tuple(sorted(t)) for t in idx[np.asarray(fl)].tolist()}
        tb = {tuple(sorted(t)) for t in np.asarray(fr).tolist()}
        out["faces_not_shared"] = len(ta ^ tb)
    out["same"] = bool(out["faces_reference"] == out["faces_lean"] and out.get("max_vertex_diff", 0.0) <= 1e-5
                       and len(vr) == len(vl) and out.get("faces_not_shared", 0) == 0)
    return out


class count_calls:
    """Counts the forward calls of ``net`` until ``pop()``."""

    def __init__(self, net):
        self.n = 0
        self.handle = net.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def pop(self) -> int:
        self.handle.remove()
        return self.n


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def run_512(net, device, R, repeats, reference, mc):
    coords, sdf, feats = sphere_band(R, device, channels=32)
    row = {"stage": "refiner_512", "resolution": R, "patch": int(net.patch_size), "voxels": int(len(coords))}
    calls = count_calls(net)
    grid, row["lean_grid_ms"], row["lean_grid_peak_mib"] = measure(
        lambda: refined_sdf_grid(net, coords, sdf, feats, resolution=R), device, 1)
    row["net_calls"] = calls.pop()  # 27 patches minus the empty ones, plus one run of the empty patch
    fields, row["lean_ms"], row["lean_peak_mib"] = measure(
        lambda: refine_sdf_512(net, coords, sdf, feats, resolution=R), device, repeats)
    row["lean_explicit_voxels"] = int(len(fields[0].coords))
    if reference:
        grid = grid.cpu()
        ref, row["reference_ms"], row["reference_peak_mib"] = measure(
            lambda: refine_sdf_512_reference(net, coords, sdf, feats, resolution=R), device, 1)
        ref = ref.cpu()
        row["max_abs_diff"] = float((grid.float() - ref.float()).abs().max())
        row["nan"] = bool(torch.isnan(ref).any() or torch.isnan(grid).any())
        del grid
        if mc:
            row["mesh"] = mesh_check(fields[0], ref[0, 0], fields[0].level)
        del ref
    return row


def run_1024(net, device, R, repeats, reference, mc):
    coords, sdf, _ = sphere_band(R, device)
    row = {"stage": "refiner_1024", "resolution": R, "patch": int(net.patch_size), "voxels": int(len(coords))}
    calls = count_calls(net)
    signs, row["lean_grid_ms"], row["lean_grid_peak_mib"] = measure(
        lambda: refined_sign_grid(net, coords, sdf, resolution=R), device, 1)
    row["net_calls"] = calls.pop()
    signs = signs[0].cpu()
    fields, row["lean_ms"], row["lean_peak_mib"] = measure(
        lambda: refine_signs_1024(net, coords, sdf, resolution=R), device, repeats)
    row["lean_explicit_voxels"] = int(len(fields[0].coords))
    if reference:
        ref, row["reference_ms"], row["reference_peak_mib"] = measure(
            lambda: refine_signs_1024_reference(net, coords, sdf, resolution=R), device, 1)
        f = fields[0]
        # compare at the explicit voxels and at the signs (the whole lean field on a 1024 grid is not built)
        c = f.coords
        row["max_abs_diff_explicit"] = float((f.values.float() - ref[0, 0][c[:, 0], c[:, 1], c[:, 2]].float())
                                             .abs().max()) if len(c) else 0.0
        ref_signs = torch.sign(ref[0, 0, ::2, ::2, ::2]).to(torch.int8)
        ref_signs = ref_signs.cpu()
        band = torch.zeros(R // 2, R // 2, R // 2, dtype=torch.bool)
        cc = coords.cpu()
        band[cc[:, 1] // 2, cc[:, 2] // 2, cc[:, 3] // 2] = True  # parents whose (0,0,0) child may be band
        row["sign_mismatch_off_band"] = int(((signs != ref_signs) & ~band).sum())
        del signs, ref_signs, band
        if mc:
            row["mesh"] = mesh_check(f, ref[0, 0], f.level)
        del ref
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny grids and stand-in networks (CPU smoke run)")
    ap.add_argument("--stages", nargs="+", default=["512", "1024"], choices=["512", "1024"])
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of the whole lean refine (median)")
    ap.add_argument("--no-reference", action="store_true", help="skip the dense reference run and the checks")
    ap.add_argument("--no-mc", action="store_true", help="skip the marching-cubes comparison")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    sdf_net, sign_net, kind = build_nets(a.tiny, device, dtype)
    r512, r1024 = (40, 48) if a.tiny else (512, 1024)
    rows = []
    with torch.inference_mode():
        if "512" in a.stages:
            rows.append(run_512(sdf_net, device, r512, a.repeats, not a.no_reference, not a.no_mc))
            print(json.dumps(rows[-1]), flush=True)
        if "1024" in a.stages:
            rows.append(run_1024(sign_net, device, r1024, a.repeats, not a.no_reference, not a.no_mc))
            print(json.dumps(rows[-1]), flush=True)
    import triton  # noqa: PLC0415

    result = {
        "benchmark": "refiners",
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(),
        "dtype": str(dtype).replace("torch.", ""), "net": kind, "tiny": a.tiny, "rows": rows,
    }
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"refiners-{device.type}{'-tiny' if a.tiny else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
