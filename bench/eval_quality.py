"""Honest quality report of the demo model on held-out meshes (issue 7), written as JSON under bench/results/.

1. SS-VAE reconstruction at the SS-VAE's top resolution (256^3 for the demo): encode the prepared sparse SDF of each
   held-out item (posterior mean), decode, sparse marching cubes at level 0 on both, Chamfer distance and F-score
   (threshold 1 voxel = 2 / R) between the two surfaces, as in the SS-VAE task's validation (d3s2.train.tasks).
2. Image to 3D: each held-out mesh (normalised into [-1, 1]^3 like d3s2 prepare) is rendered from one fixed camera;
   the pipeline generates a mesh from the render, conditionally (the render's image tokens, CFG as configured) and
   unconditionally (the image encoder's tokens replaced by zeros, i.e. the "dropped" condition the DiTs are trained
   with); volume IoU and F-score (thresholds 0.01 / 0.02) against the ground-truth mesh (d3s2.geometry.metrics).

    python bench/eval_quality.py --pipeline src/d3s2/assets/demo --data runs/demo/heldout --limit 20
    python bench/eval_quality.py --cpu-smoke --out /tmp/q.json        # random tiny weights, 1 item, minutes on a CPU

Held-out items only: the meshes listed under ``heldout`` in demo/split.json (``--data`` must be prepared from them:
demo/prepare.sh OUT heldout); items of the training split are refused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SPLIT = REPO / "demo" / "split.json"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - no git on the device machine
        return "unknown"


def heldout_paths(split_path: Path = SPLIT) -> list[str]:
    return list(json.loads(Path(split_path).read_text())["heldout"])


def mesh_root() -> Path:
    env = os.environ.get("DEMO_MESH_ROOT")
    if env:
        return Path(env)
    import pybullet_data

    return Path(pybullet_data.getDataPath())


def load_gt(rel: str):
    from d3s2.data.mesh_io import load_mesh, normalize_mesh

    mesh, _ = normalize_mesh(load_mesh(mesh_root() / rel))
    return mesh


def render_view(mesh, size: int = 128) -> np.ndarray:
    """One RGBA uint8 render from a fixed camera (elevation 20, azimuth 30, 50 mm)."""
    from d3s2.data.render import RenderSettings, Renderer, render_mesh_from_trimesh
    from d3s2.geometry.cameras import Camera, fit_distance

    rm = render_mesh_from_trimesh(mesh)
    cam = Camera(elevation_deg=20.0, azimuth_deg=30.0, focal_mm=50.0,
                 distance=fit_distance(rm.bounding_radius(), 50.0), resolution=size)
    return Renderer(rm, RenderSettings(size=size, supersample=2)).render(cam).rgba_uint8()


# ----------------------------------------------------------------------------------------------------------------------
# 1. SS-VAE reconstruction


@torch.no_grad()
def vae_reconstruction(vae, sdf_path: Path, device, n_points: int, seed: int = 0) -> dict:
    from d3s2.data.sparse_sdf import load_sparse_sdf
    from d3s2.geometry.metrics import chamfer_distance, f_score
    from d3s2.models.ss_vae_losses import scale_sdf
    from d3s2.sparse import SparseTensor
    from d3s2.train.tasks import surface_samples

    s = load_sparse_sdf(sdf_path)
    r = int(s.resolution)
    coords = torch.from_numpy(s.coords.astype(np.int64))
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1)
    feats = scale_sdf(torch.from_numpy(s.sdf.astype(np.float32))[:, None], float(s.tau))
    dtype = next(vae.parameters()).dtype
    x = SparseTensor(feats.to(device, dtype), coords.to(device), batch_size=1, resolution=r)
    z, _, _ = vae.encode(x, sample_posterior=False)
    dec = vae.decode(z)
    g = torch.Generator().manual_seed(seed)
    p = surface_samples(dec.coords[:, 1:].cpu(), dec.feats[:, 0].float().cpu(), r, n_points, g)
    q = surface_samples(x.coords[:, 1:].cpu(), x.feats[:, 0].float().cpu(), r, n_points, g)
    out = {"resolution": r, "input_voxels": int(len(coords)), "decoded_voxels": int(len(dec.coords))}
    if len(p) and len(q):
        out.update(chamfer=float(chamfer_distance(p, q)), fscore_1vox=float(f_score(p, q, 2.0 / r)))
    else:
        out.update(chamfer=None, fscore_1vox=0.0)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 2. Image to 3D, conditional vs unconditional


class ZeroCondition:
    """Context manager: the image encoder returns zeros (the unconditional input of CFG) while active."""

    def __init__(self, encoder: torch.nn.Module):
        self.encoder, self.handle = encoder, None

    def __enter__(self):
        self.handle = self.encoder.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def generation_metrics(pipe, rgba: np.ndarray, gt, n_points: int, seed: int, structure_coords=None,
                       steps: int | None = None) -> dict:
    from d3s2.geometry.metrics import surface_metrics, volume_iou

    out = {}
    for mode in ("conditional", "unconditional"):
        kw = dict(generator=torch.Generator().manual_seed(seed), progress=False, structure_coords=structure_coords)
        if steps is not None:
            kw["num_inference_steps"] = steps
        t0 = time.perf_counter()
        try:
            if mode == "conditional":
                mesh = pipe(rgba, **kw)[0]
            else:
                with ZeroCondition(pipe.models["image_encoder"]):
                    mesh = pipe(rgba, **kw)[0]
        except Exception as exc:  # noqa: BLE001 - "no shape found" and the like score zero, with the reason kept
            out[mode] = {"error": str(exc).splitlines()[0][:300], "volume_iou": 0.0, "fscore_0.01": 0.0,
                         "fscore_0.02": 0.0, "seconds": time.perf_counter() - t0}
            continue
        m = surface_metrics(mesh, gt, thresholds=(0.01, 0.02), n_points=n_points, seed=seed)
        res = {"faces": int(len(mesh.faces)), "chamfer": float(m["chamfer"]) if "chamfer" in m else None,
               "fscore_0.01": float(m["fscore@0.01"]), "fscore_0.02": float(m["fscore@0.02"]),
               "seconds": time.perf_counter() - t0}
        try:
            res["volume_iou"] = float(volume_iou(mesh, gt, n_points=n_points, seed=seed))
        except Exception as exc:  # noqa: BLE001 - an open generated mesh has no inside
            res["volume_iou"], res["volume_iou_error"] = 0.0, str(exc).splitlines()[0][:200]
        res["metrics"] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
        out[mode] = res
    return out


def _mean(rows: list[dict], *keys) -> float | None:
    vals = []
    for r in rows:
        v = r
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            vals.append(float(v))
    return float(np.mean(vals)) if vals else None


# ----------------------------------------------------------------------------------------------------------------------


def _items(data: Path, limit: int) -> list[tuple[str, Path]]:
    """(source path, item folder) of the prepared held-out items; training items are an error."""
    from d3s2.data.datasets import load_items
    from d3s2.errors import D3S2Error

    held = set(heldout_paths())
    out = []
    for it in load_items(data):
        src = it.get("source")
        if src not in held:
            raise D3S2Error(f"{data}: item {src!r} is not in demo/split.json's held-out set; prepare the held-out "
                            "meshes only (demo/prepare.sh OUT heldout)")
        out.append((src, data / it["item_id"]))
    return sorted(out)[:limit]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default=None, help="pipeline folder (from_pretrained); default: the bundled demo")
    ap.add_argument("--data", default=None, help="prepared held-out items (demo/prepare.sh OUT heldout)")
    ap.add_argument("--limit", type=int, default=20, help="at most this many held-out meshes (default 20)")
    ap.add_argument("--points", type=int, default=20000, help="surface / volume sample points (default 20000)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/eval_quality-<card>.json)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="random tiny weights (pipeline_tiny), 1 held-out mesh, the structure stage replaced by the "
                         "mesh's latent shell, no --data needed (SDF computed here at 64^3): tests the script only")
    args = ap.parse_args(argv)
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline, latent_shell_coords

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_all = time.perf_counter()
    vae_rows, gen_rows = [], []
    if args.cpu_smoke:
        pipe = ImageTo3DPipeline.from_config("pipeline_tiny", seed=args.seed, device="cpu")
        # random weights decode an SDF on one side of the level: centre it (as tests/test_pipeline.py does) so that
        # marching cubes and the metrics run on real surfaces
        pipe.models["ss_vae_512"].decoder.out_layer.register_forward_hook(
            lambda mod, inp, out: out.replace(out.feats - out.feats.median()))
        rel = heldout_paths()[0]
        gt = load_gt(rel)
        r = pipe.resolution_512
        vae_rows.append({"source": rel, **_smoke_vae(pipe, gt, r, args.points)})
        from d3s2.data.sdf import unsigned_band

        coords, _ = unsigned_band(gt, r, 1.5 / r)
        shell = latent_shell_coords(coords, r // pipe.models["ss_vae_512"].config.downsample_factor)
        rgba = render_view(gt, size=64)
        gen_rows.append({"source": rel, **generation_metrics(pipe, rgba, gt, args.points, args.seed,
                                                             structure_coords=shell)})
        tag = "cpu-smoke"
    else:
        from d3s2.errors import D3S2Error

        if not args.data:
            raise D3S2Error("--data is required (prepared held-out items: demo/prepare.sh OUT heldout), "
                            "or use --cpu-smoke")
        folder = args.pipeline or str(REPO / "src" / "d3s2" / "assets" / "demo")
        pipe = ImageTo3DPipeline.from_pretrained(folder, device=str(device))
        vae = pipe.models["ss_vae_512"]
        for rel, item in _items(Path(args.data), args.limit):
            sdfs = sorted(item.glob("sdf_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
            if sdfs:
                vae_rows.append({"source": rel, **vae_reconstruction(vae, sdfs[-1], device, args.points, args.seed)})
            gt = load_gt(rel)
            gen_rows.append({"source": rel, **generation_metrics(pipe, render_view(gt, args.image_size), gt,
                                                                 args.points, args.seed)})
            print(json.dumps(gen_rows[-1])[:300], flush=True)
        tag = torch.cuda.get_device_name(0).split()[1].lower() if device.type == "cuda" else "cpu"
    summary = {
        "ss_vae_chamfer": _mean(vae_rows, "chamfer"),
        "ss_vae_fscore_1vox": _mean(vae_rows, "fscore_1vox"),
        **{f"{m}_{k}": _mean(gen_rows, m, k) for m in ("conditional", "unconditional")
           for k in ("volume_iou", "fscore_0.01", "fscore_0.02")},
    }
    result = {
        "bench": "eval_quality", "mode": "cpu_smoke" if args.cpu_smoke else "heldout",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "commit": _git_commit(),
        "args": vars(args), "items": len(gen_rows), "summary": summary,
        "ss_vae": vae_rows, "generation": gen_rows, "seconds": time.perf_counter() - t_all,
    }
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"eval_quality-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


def _smoke_vae(pipe, gt, r: int, n_points: int) -> dict:
    """The reconstruction path of part 1 on a sparse SDF computed here (no prepared data in the smoke mode)."""
    import tempfile

    from d3s2.data.sdf import mesh_to_sparse_sdf
    from d3s2.data.sparse_sdf import save_sparse_sdf

    with tempfile.TemporaryDirectory() as d:
        path = save_sparse_sdf(Path(d) / f"sdf_{r}.npz", mesh_to_sparse_sdf(gt, r, tau=4.0 / r, device="cpu"))
        return vae_reconstruction(pipe.models["ss_vae_512"], Path(path), torch.device("cpu"), n_points)


if __name__ == "__main__":
    sys.exit(main())
