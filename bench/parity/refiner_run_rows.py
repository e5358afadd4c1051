"""Parity rows of the refiners' whole run (issue 20 part B): the authors' ``Voxel_RefinerXL.run`` /
``Voxel_RefinerXL_sign.run`` (their dense 512^3 / 1024^3 grids, patches, blending, their skimage Lewiner marching
cubes) against d3s2's lean ``refine_sdf_512`` / ``refine_signs_1024`` (d3s2.geometry.refine) with d3s2's networks
(d3s2.models.refiner) loaded strictly from the same random release-layout weights, then d3s2's sparse Lewiner.

Their run returns trimesh meshes only; the dense field it meshes is captured by wrapping the ``measure`` their module
calls (the very array handed to skimage). Without trimesh installed, an import-only stand-in holds their vertices and
faces. Rows:

- ``refiner_512_run``: bumpy-sphere band at 512 (rows.synthetic_band) with 32 random decoder features; the refined
  field (theirs: the captured volume; ours: ``refined_sdf_grid``) and the mesh at level 0.4.
- ``refiner_1024_run``: the band at 1024; the field at d3s2's explicit voxels, the off-band signs (all 8 children of
  every 512 voxel), and the mesh at level 0.2.

fp32 (bounds: field 1e-4 relative, mesh 1e-4 in vertex position and no unmatched face); on CUDA also fp16 as the
release runs (bound 1e-2 on the field; the mesh is reported). Only meant for the H200 (their run hard-codes the full
sizes: 8 GiB of features at 512, 1024^3 grids); ``--smoke`` checks this file's wiring on the CPU with tiny
stand-ins for both sides (no authors' code).

    PYTHONPATH=src python bench/parity/refiner_run_rows.py --snapshot .snapshots/Direct3D-S2 --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))

from compare import face_set_difference, rel_err, row, vertex_distance  # noqa: E402

if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))  # bench/, for timing.py
from timing import timed  # noqa: E402

ROWS = {"refiner_512_run": ("refiner", "refiner_512", 0.4), "refiner_1024_run": ("refiner_1024", "refiner_1024", 0.2)}


def stub_trimesh() -> None:
    """Their module imports trimesh at the top and wraps its output in ``trimesh.Trimesh``; the GPU box may lack it."""
    if "trimesh" in sys.modules or importlib.util.find_spec("trimesh") is not None:
        return
    tm = types.ModuleType("trimesh")

    class Trimesh:
        def __init__(self, vertices=None, faces=None, **_):
            self.vertices, self.faces = np.asarray(vertices), np.asarray(faces)

    tm.Trimesh = Trimesh
    sys.modules["trimesh"] = tm


class CaptureMC:
    """Stands in for skimage.measure in their module: records each volume given to marching_cubes, then runs it."""

    def __init__(self, measure, skip: bool = False):
        self.measure, self.volumes, self.skip = measure, [], skip

    def __getattr__(self, name):
        return getattr(self.measure, name)

    def marching_cubes(self, volume, *a, **k):
        self.volumes.append(np.asarray(volume))
        if self.skip:  # skimage on a 1024^3 grid takes minutes: the caller meshes the captured grid itself
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32), \
                np.zeros(0, np.float32)
        return self.measure.marching_cubes(volume, *a, **k)


class _Mesh:
    def __init__(self, vertices, faces):
        self.vertices, self.faces = vertices, faces


def _mesh_stats(field, theirs_mesh) -> dict:
    from d3s2.geometry.lewiner import lewiner_marching_cubes

    t0 = time.perf_counter()
    v, f = lewiner_marching_cubes(**field.to("cpu").mc_kwargs(), world=True)
    sec = time.perf_counter() - t0
    vo, fo = v.double().numpy(), f.numpy()
    vt, ft = np.asarray(theirs_mesh.vertices, dtype=np.float64), np.asarray(theirs_mesh.faces)
    dist = vertex_distance(vo, vt)
    diff = face_set_difference(vo, fo, vt, ft)
    return {"vertices_ours": len(vo), "vertices_theirs": len(vt), "faces_ours": len(fo), "faces_theirs": len(ft),
            "max_vertex_distance": dist, "faces_not_matched": diff, "mesh_ok": bool(dist <= 1e-4 and diff == 0),
            "seconds_mc_ours": sec}


def run_row(name: str, theirs, ours, coords: torch.Tensor, sdf: torch.Tensor, feats: torch.Tensor | None,
            dtype: torch.dtype, dev: torch.device, mc_module, sp, skip_their_mc: bool = False,
            meshes_too: bool = True) -> dict:
    """One row: ``theirs`` an authors' refiner (its ``run``), ``ours`` d3s2's network of the same weights, both in
    ``dtype`` on ``dev``; ``coords`` [N, 3] of one sample; ``mc_module``: their unet_refiner module (its ``measure``
    is wrapped); ``sp``: their ``direct3d_s2.modules.sparse``."""
    from d3s2.geometry.refine import refine_sdf_512, refine_signs_1024, refined_sdf_grid, refined_sign_grid

    _, _, level = ROWS[name]
    c4 = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32, device=dev), coords.int().to(dev)], 1)
    s = sdf.to(dev, dtype)
    f = feats.to(dev, dtype) if feats is not None else None
    level_note = "the release's"
    if f is not None:  # random weights: the refined SDF may not cross 0.4 at all (an empty mesh compares nothing)
        with torch.inference_mode():
            g = refined_sdf_grid(ours, c4, s, f, resolution=512 if not isinstance(theirs, _SmokeRun) else theirs.res)
            vals = g[0, 0][c4[:, 1].long(), c4[:, 2].long(), c4[:, 3].long()].float()
            del g
        lo, hi = (float(q) for q in torch.quantile(vals[:: max(1, len(vals) // 100000)].cpu(),
                                                    torch.tensor([0.1, 0.9])))
        if not lo <= level <= hi:
            level, level_note = round(float(vals.median()), 4), "median of the refined band (0.4 not crossed)"
    cap = CaptureMC(mc_module.measure, skip=skip_their_mc or not meshes_too)
    mc_module.measure = cap
    try:
        if f is not None:
            with torch.no_grad():  # the release's pipeline calls run() under @torch.no_grad()
                meshes, t_theirs, m_theirs = timed(lambda: theirs.run(sp.SparseTensor(s[:, None], c4),
                                                                      sp.SparseTensor(f, c4), mc_threshold=level),
                                                   dev)
        else:
            with torch.no_grad():
                meshes, t_theirs, m_theirs = timed(lambda: theirs.run(sp.SparseTensor(s[:, None], c4),
                                                                      mc_threshold=level), dev)
    finally:
        mc_module.measure = cap.measure
    vol = cap.volumes[0]
    del cap
    print(f"# {name} {dtype}: their run {t_theirs:.1f} s", flush=True)
    with torch.inference_mode():
        if f is not None:
            fields, t_ours, m_ours = timed(lambda: refine_sdf_512(ours, c4, s, f, resolution=vol.shape[0],
                                                                  level=level), dev)
        else:
            fields, t_ours, m_ours = timed(lambda: refine_signs_1024(ours, c4, s, resolution=vol.shape[0],
                                                                     level=level), dev)
    print(f"# {name} {dtype}: our run {t_ours:.1f} s", flush=True)
    extra = {"resolution": int(vol.shape[0]), "band_voxels": int(len(coords)), "explicit_voxels":
             int(len(fields[0].coords)), "seconds_theirs": t_theirs, "seconds_ours": t_ours,
             "peak_gib_theirs": m_theirs, "peak_gib_ours": m_ours, "level": level, "level_note": level_note}
    field = fields[0]
    cmp, npcmp = (torch.float64, np.float64) if dtype == torch.float64 else (torch.float32, np.float32)
    with torch.inference_mode():
        if f is not None:
            grid = refined_sdf_grid(ours, c4, s, f, resolution=vol.shape[0])[0, 0].to(cmp).cpu()
            err = rel_err(grid, torch.from_numpy(vol.astype(npcmp)))
            del grid
        else:
            cc = field.coords.cpu().numpy()
            err = rel_err(field.values.to(cmp).cpu(), torch.from_numpy(vol[cc[:, 0], cc[:, 1], cc[:, 2]]
                                                                        .astype(npcmp)))
            signs = refined_sign_grid(ours, c4, s, resolution=vol.shape[0])[0].cpu().numpy()
            band = coords.long().cpu().numpy()
            flips = 0
            for d in np.ndindex(2, 2, 2):
                t = np.sign(vol[d[0]::2, d[1]::2, d[2]::2])
                off = np.ones(signs.shape, dtype=bool)
                b = band[(band % 2 == np.array(d)).all(1)] // 2
                off[b[:, 0], b[:, 1], b[:, 2]] = False
                flips += int(((t != signs) & off).sum())
            extra["sign_flips_off_band"] = flips
            del signs
    if not meshes_too:
        extra["meshes"] = "not compared (--fields-only)"
        r = row(f"{name} ({'SDF 512' if f is not None else 'signs 1024'}): whole run, field", err, dtype, dev,
                **extra)
        r["row_id"] = name
        if dtype in (torch.float32, torch.float64):
            r["ok"] = bool(r["ok"] and extra.get("sign_flips_off_band", 0) == 0)
        return r
    from d3s2.geometry.lewiner import lewiner_marching_cubes
    from d3s2.geometry.refine import field_from_grid

    if skip_their_mc:
        # their grid meshed by d3s2's sparse Lewiner stands in for skimage's mesh of it (that the two agree on the
        # same grid is what the 512 row's their_grid_* columns and the marching-cubes row measure)
        with torch.inference_mode():
            grid_field = field_from_grid(torch.from_numpy(vol).to(dev), level).to("cpu")
        v, f_ = lewiner_marching_cubes(**grid_field.mc_kwargs(), world=True)
        del grid_field
        meshes = [_Mesh(v.double().numpy(), f_.numpy())]
        extra["their_mc"] = "skipped: their grid meshed by d3s2's Lewiner"
    extra.update(_mesh_stats(field, meshes[0]))
    if not skip_their_mc:
        # marching-cubes semantics alone: d3s2's lean form of THEIR dense grid through d3s2's sparse Lewiner gives
        # their mesh (no network rounding involved; the network's own mesh above can differ where a voxel sits
        # within fp32 rounding of the level)
        own = _mesh_stats(field_from_grid(torch.from_numpy(vol), level), meshes[0])
        extra.update({f"their_grid_{k}": v for k, v in own.items()})
    vt = torch.from_numpy(vol)
    extra["voxels_near_level"] = int(((vt - level).abs() < 1e-5 * max(1.0, float(vt.abs().max()))).sum())
    del vt
    r = row(f"{name} ({'SDF 512, level 0.4' if f is not None else 'signs 1024, level 0.2'}): whole run", err,
            dtype, dev, **extra)
    r["row_id"] = name
    if dtype in (torch.float32, torch.float64):
        r["ok"] = bool(r["ok"] and extra.get("their_grid_mesh_ok", extra["mesh_ok"])
                       and extra.get("sign_flips_off_band", 0) == 0)
    return r


def build_pair(key: str, which: str, seed: int, dtype: torch.dtype, dev: torch.device, sharpen: bool = True):
    """Their refiner (``use_fp16`` for fp16, as released) and d3s2's, on the same random release weights;
    ``sharpen``: scale the output layer so that the field crosses the level near the band (meshes to compare). The
    SDF refiner's scale is about 1e5 on random weights: it multiplies every rounding difference by as much, so the
    field rows are measured unsharpened (``--fields-only``)."""
    from official import full_params, get_class, random_state_dict

    from d3s2.models.refiner import load_refiner_checkpoint

    target, p = full_params("v1.1")[key]
    theirs = get_class(target)(**{**p, "use_fp16": dtype == torch.float16})
    sd = random_state_dict(get_class(target)(**{**p, "use_fp16": False}), seed)
    note = None
    if sharpen:
        sd, note = (sharpen_sign_weights if which == "refiner_1024" else sharpen_sdf_weights)(sd, which, dev)
    theirs.load_state_dict(sd, strict=True)
    ours = load_refiner_checkpoint({"refiner": sd}, which).to(dev, dtype).eval()
    theirs = theirs.eval().to(dev)
    if dtype == torch.float64:  # both sides in fp64: the formula alone, no rounding (their run takes the input's dtype)
        theirs = theirs.double()
    return theirs, ours, note


def sharpen_sign_weights(sd: dict, which: str, dev: torch.device) -> tuple[dict, dict]:
    """Random weights give logits within ~1e-3 of 0 (sigmoid ~0.5 everywhere): the whole-run sign field would be
    noise, its 1024^3 mesh enormous and fp32 rounding would flip signs. ``conv_out`` is scaled as
    ``bench/refiners.sharpen_sign_refiner`` does (same weights into both sides)."""
    from d3s2.models.refiner import load_refiner_checkpoint

    sys.path.insert(0, str(HERE.parent))
    from refiners import sharpen_sign_refiner

    net = load_refiner_checkpoint({"refiner": sd}, which).to(dev).eval()
    k, bias = sharpen_sign_refiner(net)
    del net
    sd = dict(sd)
    sd["conv_out.weight"] = sd["conv_out.weight"] * k
    sd["conv_out.bias"] = torch.full_like(sd["conv_out.bias"], bias)
    return sd, {"conv_out_scale": k, "conv_out_bias": bias}


def sharpen_sdf_weights(sd: dict, which: str, dev: torch.device, target: float = 0.6,
                        patch: int | None = None) -> tuple[dict, dict]:
    """The random 512 refiner's three L1-normalised filters shrink its output to ~1e-4: a flat field that crosses
    no level (or crosses 0 everywhere in noise). Its output is linear in ``conv_out`` (the third filter's taps come
    from the features before it), so ``conv_out`` is scaled to give a band patch's output a spread of ``target``."""
    from d3s2.models.refiner import load_refiner_checkpoint
    from refiner_rows import band_patch

    net = load_refiner_checkpoint({"refiner": sd}, which).to(dev).eval()
    x, feats, _ = band_patch(patch or net.config.patch_size, net.feature_channels)
    band = x[0, 0] < 1
    with torch.inference_mode():
        out = net(x.to(dev), feats.to(dev))[0, 0].cpu()
    v = torch.atanh(out[band].double().clamp(-0.999, 0.999))
    del net
    k = target / max(float(v.std()), 1e-12)
    sd = dict(sd)
    sd["conv_out.weight"] = sd["conv_out.weight"] * k
    sd["conv_out.bias"] = sd["conv_out.bias"] * k
    return sd, {"conv_out_scale": k}


class _SmokeRun:
    """``--smoke``: a stand-in for their refiner with their run's interface and output (the dense reference of
    d3s2.geometry.refine_reference + skimage through the captured ``measure``), to check this file's wiring."""

    def __init__(self, net, resolution, mc_module):
        self.net, self.res, self.mc = net, resolution, mc_module

    def run(self, reconst_x, feat=None, mc_threshold=0.0):
        from d3s2.geometry.refine_reference import refine_sdf_512_reference, refine_signs_1024_reference

        c, s = reconst_x.coords, reconst_x.feats[:, 0]
        if feat is not None:
            vol = refine_sdf_512_reference(self.net, c, s, feat.feats, resolution=self.res)
        else:
            vol = refine_signs_1024_reference(self.net, c, s, resolution=self.res)
        v, f, _, _ = self.mc.measure.marching_cubes(vol[0, 0].cpu().numpy(), level=mc_threshold, method="lewiner")
        return [types.SimpleNamespace(vertices=v / self.res * 2 - 1, faces=f)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshot", default=str(HERE.parents[1] / ".snapshots" / "Direct3D-S2"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["fp64", "fp32", "fp16"],
                    help="default: fp32, and fp16 on CUDA; fp64: both sides in fp64 (the formula without rounding)")
    ap.add_argument("--radius", type=float, default=0.6, help="sphere radius of the band (world units)")
    ap.add_argument("--skip-their-mc", nargs="*", default=[], choices=list(ROWS),
                    help="rows whose authors' skimage marching cubes is replaced by d3s2's Lewiner of their grid "
                         "(minutes at 1024^3)")
    ap.add_argument("--fields-only", action="store_true",
                    help="compare the refined fields / signs only (no marching cubes on either side)")
    ap.add_argument("--smoke", action="store_true", help="tiny stand-ins instead of their code (CPU wiring check)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE.parents[1] / "bench" / "results")))
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from rows import synthetic_band

    if args.smoke:
        from skimage import measure

        sys.path.insert(0, str(HERE.parent))
        from refiners import StandInSDF, StandInSign

        mc_module = types.SimpleNamespace(measure=measure)
        sp = types.SimpleNamespace(SparseTensor=lambda feats, coords: types.SimpleNamespace(feats=feats, coords=coords))
    else:
        stub_trimesh()
        from official import import_official

        import_official(args.snapshot)
        import direct3d_s2.models.refiner.unet_refiner as mc_module
        from direct3d_s2.modules import sparse as sp

    dev = torch.device(args.device)
    dtypes = [{"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16}[d] for d in (args.dtypes or
                                                                         (["fp32", "fp16"] if dev.type == "cuda"
                                                                          else ["fp32"]))]
    results = []
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out = Path(args.out) / (f"parity-refiner-run-{'h200' if 'H200' in card else dev.type}"
                            f"{'-smoke' if args.smoke else ''}.json")

    def save():
        doc = {"card": card, "torch": torch.__version__, "rows": results, "smoke": args.smoke,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out)

    for name in args.rows:
        key, which, _ = ROWS[name]
        res = (512 if which == "refiner_512" else 1024) if not args.smoke else (40 if which == "refiner_512" else 48)
        coords, sdf = synthetic_band(res, args.radius, device=dev)
        feats = (torch.randn(len(coords), 32, generator=torch.Generator().manual_seed(3)).to(dev)
                 if which == "refiner_512" else None)
        for dt in dtypes:
            t0 = time.perf_counter()
            try:
                if args.smoke:
                    torch.manual_seed(0)
                    ours = (StandInSDF(16) if feats is not None else StandInSign(10)).to(dev, dt).eval()
                    theirs = _SmokeRun(ours, res, mc_module)
                else:
                    theirs, ours, note = build_pair(key, which, 11, dt, dev, sharpen=not args.fields_only)
                r = run_row(name, theirs, ours, coords, sdf, feats, dt, dev, mc_module, sp,
                            skip_their_mc=name in args.skip_their_mc, meshes_too=not args.fields_only)
                if not args.smoke and note:
                    r["weights_note"] = note
                del theirs, ours
            except Exception as exc:  # a failing row is reported, the others still run
                import traceback

                r = {"row": name, "dtype": str(dt), "ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-3000:]}
            r["seconds_row"] = time.perf_counter() - t0
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "traceback"}), flush=True)
            save()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
