"""Image-to-3D pipeline benchmark (issue 6): seconds and peak GPU memory per stage at 512^3 and 1024^3.

    python bench/pipeline.py --export-mesh bunny .pipe_carry/bunny.npz          # once, on a machine with [data]
    PYTHONPATH=src PYTHONUNBUFFERED=1 python3 bench/pipeline.py --mesh .pipe_carry/bunny.npz --out $OUT   # GPU
    python bench/pipeline.py --smoke --out /tmp/x                                # CPU check of the script (< 60 s)

The GPU machine needs warp-lang (GPU band and true SDF), trimesh and libigl as wheels in the carried folder
(``.pipe_carry/``: bunny.npz, warp_lang-1.2.2, trimesh-4.6.8, libigl-2.6.3), installed with
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .pipe_carry/*.whl`` and
``PYTHONPATH=src:/tmp/site``.

Models: the paper-size release v1.1 pipeline (DINOv2 ViT-L/14-reg 304 M, dense VAE 193 M + dense DiT 556 M, SS-VAE
37.9 M + SS-DiT v1.1 509 M at 512 and again at 1024) with RANDOM weights, built directly on the GPU (default device
context, no CPU init of 2.7 B parameters) and cast to ``--dtype`` (bf16; the image encoder stays fp32). The DiTs'
zero-initialised layers (adaLN modulation, output layer) get N(0, 0.02) weights so that every block computes
non-trivial values. Sampling recipe of the release: 50 / 30 / 15 Euler steps, CFG 7 (every step evaluates the
conditional and the unconditional branch), shift 6 / 6 / 8; marching cubes at 0 (512) and 0.2 (1024); no decimation
(``faces=None``, the ``d3s2 generate`` default).

What is injected (random weights give random structures and random SDFs, which would make the token counts, the
marching-cubes work and the 1024 band meaningless): a real mesh, by default the Stanford bunny of pymeshfix repaired
by MeshFix (watertight; exported with ``--export-mesh`` because the GPU machine has no mesh packages), normalised to
[-0.95, 0.95]^3 and scaled about the origin so that its 1024 token set has about ``--target-tokens`` tokens (45,904,
the paper's Table 1 average at 1024^3). For the repaired bunny (computed on a CPU with libigl): full size 62,451
tokens at 1024 (band 4/1024, // 8), scale 0.857 gives 45,565 tokens at 1024 and 11,365 tokens at 512 (band 1/128,
// 8). Through ``ImageTo3DPipeline``'s benchmark hooks, every stage still runs in full and only its result is
replaced:

- ``structure``: the dense DiT (50 steps) + dense VAE run; their 64^3 occupancy is replaced by the mesh's latent
  shell at 512 (latent cells of the voxels within tau = 1/128 of the surface, the SS-VAE's input band);
- ``decoded`` (512 and 1024): the SS-DiT samples and the SS-VAE decodes every child voxel; the decoded values are
  replaced by the mesh's true SDF at those voxel centres in the decoder's units (``clamp(sdf / tau, -1, 1)``,
  tau = 1/128; pseudo-normal sign; warp on the GPU). Marching cubes then extracts a real bunny at 512, the pipeline's
  own GPU band of that mesh (4/1024, // 8) gives the 1024 tokens, and marching cubes / clean-up at 1024 see a real
  surface. The true SDF is computed in the warm-up run and cached (host memory, pinned); in the timed runs the hook
  only checks the coordinates (count + checksum) and uploads the cached values: its time is the part ``hook``.

Runs: one warm-up at 1024 (Triton compilation, caches; excluded), then ``--repeats`` runs at each resolution with
``low_vram`` off (all models resident on the GPU) and on (each model uploaded for its stage from pinned host memory).
Reported per run: total seconds, per stage seconds + peak GPU bytes (``torch.cuda.max_memory_allocated``; peak
reserved also given) and per-stage ``parts`` (dit, decode, marching_cubes, band, clean_mesh, to_device, offload, hook).
Writes ``pipeline-<card>.json`` (after every run, atomically).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_TAU = 1.0 / 128  # the SS-VAE's SDF band / unit (d3s2 prepare default), in [-1, 1] cube units
TARGETS = {"1024": {"seconds": 15.0, "peak_gb": 12.0}, "512": {"seconds": 6.0, "peak_gb": 8.0}}

PAPER_PIPELINE = {
    "format": "d3s2-pipeline/1",
    "image_encoder": "release",
    "components": {
        "dense_vae": "dense_vae_v1",
        "dense_dit": "dense_dit_v1",
        "ss_vae_512": "ss_vae_v1",
        "ss_dit_512": "ss_dit_v1_1_512",
        "ss_vae_1024": "ss_vae_v1_1024",
        "ss_dit_1024": "ss_dit_v1_1_1024",
    },
    "settings": {"occupancy_threshold": 0.1, "mc_level_512": 0.0, "mc_level_1024": 0.2, "band_voxels": 4.0,
                 "decode_chunk": 64},
}


def git_commit() -> str:
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=HERE, stderr=subprocess.DEVNULL).decode()
        dirty = subprocess.call(["git", "diff", "--quiet"], cwd=HERE, stderr=subprocess.DEVNULL) != 0
        return head.strip() + (" + uncommitted changes" if dirty else "")
    except Exception:
        return "unknown"


def card_slug(device: torch.device, smoke: bool) -> str:
    if device.type != "cuda":
        return "cpu-smoke" if smoke else "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for k in ("h200", "h100", "a100", "l40", "4090"):
        if k in name:
            return k
    return name.replace(" ", "-")


def atomic_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# the injected mesh


def export_mesh(name: str, path: str) -> None:
    """Write ``vertices`` / ``faces`` of an installed example mesh to ``path`` (npz): ``bunny`` = pymeshfix's
    Stanford bunny repaired by MeshFix (watertight), ``duck`` = pybullet_data's duck.obj."""
    v, f = load_named_mesh(name)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    np.savez_compressed(path, vertices=v.astype(np.float64), faces=f.astype(np.int64), name=np.array(name))
    print(f"wrote {path}: {len(v)} vertices, {len(f)} faces")


def load_named_mesh(name: str) -> tuple[np.ndarray, np.ndarray]:
    from d3s2.data.mesh_io import load_mesh

    if name == "bunny":
        import pymeshfix

        mesh = load_mesh(os.path.join(os.path.dirname(pymeshfix.__file__), "examples", "StanfordBunny.ply"))
        fix = pymeshfix.MeshFix(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int32))
        fix.repair()
        return np.asarray(fix.points, dtype=np.float64), np.asarray(fix.faces, dtype=np.int64)
    if name == "duck":
        import pybullet_data

        mesh = load_mesh(os.path.join(pybullet_data.getDataPath(), "duck.obj"))
        return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    raise SystemExit(f"unknown mesh {name!r} (bunny, duck, or an .npz with vertices / faces)")


def load_mesh_arrays(spec: str) -> tuple[np.ndarray, np.ndarray, str]:
    if spec.endswith(".npz"):
        with np.load(spec) as z:
            name = str(z["name"]) if "name" in z.files else os.path.basename(spec)
            return z["vertices"].astype(np.float64), z["faces"].astype(np.int64), name
    v, f = load_named_mesh(spec)
    return v, f, spec


def normalized(v: np.ndarray, f: np.ndarray, margin: float = 0.95) -> np.ndarray:
    used = v[np.unique(f)]
    lo, hi = used.min(0), used.max(0)
    return (v - (lo + hi) / 2) * (2 * margin / float((hi - lo).max()))


class TrueSDF:
    """Signed distance of the injected mesh at voxel centres (negative inside), in the SS-VAE decoder's units."""

    def __init__(self, v: np.ndarray, f: np.ndarray, device: torch.device):
        self.v, self.f, self.device = v, f, device
        self.queries = None
        if device.type == "cuda":
            try:
                from d3s2.geometry.queries import WarpQueries

                self.queries = WarpQueries(v, f, device=str(device))
                self(torch.zeros(1, 3, dtype=torch.float64, device=device))  # probe
            except Exception as exc:  # noqa: BLE001 - libigl on the host instead (slower, warm-up only)
                print(f"warp SDF queries failed ({type(exc).__name__}: {exc}); using libigl", flush=True)
                self.queries = None
        if self.queries is None:
            import trimesh

            self.mesh = trimesh.Trimesh(v, f, process=False)

    def __call__(self, points: torch.Tensor, far: float = 0.25) -> torch.Tensor:
        """float64 [N, 3] points (on ``device``) -> float64 [N] signed distance (|d| capped at ``far``)."""
        if self.queries is None:
            from d3s2.data.sdf import signed_distance

            d = signed_distance(points.cpu().numpy(), self.mesh, sign="pseudonormal", backend="cpu")
            return torch.from_numpy(d).clamp(-far, far)
        from d3s2.geometry.pseudo_normal import pseudo_normal_sign

        q, out = self.queries, []
        tables = q.pseudo_normal_tables()
        for s in range(0, len(points), 1 << 23):
            p = points[s: s + (1 << 23)]
            d, face = q.closest_torch(p, upper_bound=far)
            sign = torch.ones(len(p), dtype=torch.float64, device=p.device)
            hit = torch.nonzero(face >= 0).squeeze(1)
            sg, _ = pseudo_normal_sign(tables, p[hit], face[hit])
            sg = sg.to(torch.float64)
            amb = torch.nonzero(sg == 0).squeeze(1)
            if len(amb):  # warp's winding number decides the few ambiguous points
                inside = q.inside(p[hit[amb]].cpu().numpy())
                sg[amb] = torch.from_numpy(np.where(inside, -1.0, 1.0)).to(p.device)
            sign[hit] = sg
            miss = torch.nonzero(face < 0).squeeze(1)
            if len(miss):  # farther than ``far``: only the side matters (winding number)
                inside = q.inside(p[miss].cpu().numpy())
                sign[miss] = torch.from_numpy(np.where(inside, -1.0, 1.0)).to(p.device)
            out.append(torch.where(face >= 0, d, torch.full_like(d, far)) * sign)
        return torch.cat(out)


class Injector:
    """The pipeline hooks (module docstring): real structure and real decoded SDF, cached after the first call."""

    def __init__(self, sdf: TrueSDF, structure: torch.Tensor, resolutions: dict[str, int]):
        self.sdf, self.structure, self.resolutions = sdf, structure, resolutions
        self.cache: dict[str, tuple[int, int, torch.Tensor]] = {}
        self.seen: dict[str, dict] = {}
        self.band: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.field_cache: dict[str, tuple] = {}

    def structure_hook(self, coords: torch.Tensor) -> torch.Tensor:
        self.seen["structure"] = {"structure_stage_voxels": int(len(coords)), "injected_tokens": len(self.structure)}
        return self.structure

    @staticmethod
    def _checksum(coords: torch.Tensor) -> int:
        c = coords.to(torch.int64)
        w = torch.tensor([1, 1_000_003, 1_000_033, 1_000_037], device=c.device, dtype=torch.int64)
        return int(((c * w).sum(1) % 2_147_483_647).sum())

    def decoded_hook(self, stage: str, decoded):
        n, key = decoded.num_voxels, self._checksum(decoded.coords)
        hit = self.cache.get(stage)
        if hit is None or hit[0] != n or hit[1] != key:
            r = self.resolutions[stage]
            centres = -1.0 + (decoded.coords[:, 1:].to(torch.float64) + 0.5) * (2.0 / r)
            t0 = time.perf_counter()
            vals = (self.sdf(centres) / DATA_TAU).clamp(-1, 1).to(torch.float32).cpu()
            if torch.cuda.is_available() and decoded.device.type == "cuda":
                vals = vals.pin_memory()
            hit = self.cache[stage] = (n, key, vals)
            self.seen[f"sdf_compute_seconds_{stage}"] = time.perf_counter() - t0
            self.seen["sdf_computations"] = self.seen.get("sdf_computations", 0) + 1
            self.seen[f"decoded_voxels_{stage}"] = n
            self.seen[f"tokens_{stage}"] = n // 8**3  # every latent token decodes to its 8^3 children (no pruning)
        vals = hit[2].to(decoded.device, non_blocking=True)
        self.band[stage] = (decoded.coords, vals)
        return decoded.replace(vals[:, None].to(decoded.dtype))

    def refined_hook(self, stage: str, fields: list) -> list:
        """Random refiner weights give no shape: each refined field becomes the release's field of the injected
        mesh (its decoded band with the true SDF, and the side of every other voxel by a flood fill of the outside
        from the grid's border), so that marching cubes and the 1024 band see the real surface. Cached."""
        coords, vals = self.band[stage]
        key = (stage, self._checksum(coords), len(coords))
        hit = self.field_cache.get(stage)
        if hit is None or hit[0] != key:
            t0 = time.perf_counter()
            hit = self.field_cache[stage] = (key, [self._true_field(stage, coords, vals, f, b)
                                                   for b, f in enumerate(fields)])
            self.seen[f"refined_field_seconds_{stage}"] = time.perf_counter() - t0
        return [f.to(coords.device) for f in hit[1]]

    def _true_field(self, stage, coords, vals, field, b):
        from scipy import ndimage

        from d3s2.geometry.refine import RefinedField, SideBits

        R, scale = field.resolution, field.scale
        sel = coords[:, 0] == b
        c, v = coords[sel, 1:].long(), vals.to(coords.device)[sel].float()
        order = torch.argsort((c[:, 0] * R + c[:, 1]) * R + c[:, 2])
        c, v = c[order], v[order]
        G = R // scale
        cell = torch.div(c, scale, rounding_mode="floor")
        band = torch.zeros(G, G, G, dtype=torch.bool, device=c.device)
        band[cell[:, 0], cell[:, 1], cell[:, 2]] = True
        mean = torch.zeros(G, G, G, dtype=torch.float32, device=c.device)
        cnt = torch.zeros_like(mean)
        mean.index_put_((cell[:, 0], cell[:, 1], cell[:, 2]), v, accumulate=True)
        cnt.index_put_((cell[:, 0], cell[:, 1], cell[:, 2]), torch.ones_like(v), accumulate=True)
        free = (~band).cpu().numpy()
        labels, _ = ndimage.label(free)
        border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(),
                                           labels[:, :, [0, -1]].ravel()]))
        outside = torch.from_numpy(np.isin(labels, border[border > 0])).to(c.device)
        above = outside | (band & (mean > field.level * cnt))
        return RefinedField(c, v.to(field.values.dtype), R, field.level, SideBits(above), scale, field.fill_above,
                            field.fill_below)


# ---------------------------------------------------------------------------------------------------------------------
# models


def build_pipeline(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random-weight pipeline built on ``device`` directly (default-device context)."""
    from d3s2.pipelines import ImageTo3DPipeline

    torch.manual_seed(seed)
    with torch.device(device):
        pipe = ImageTo3DPipeline.from_config(config, seed=seed, device=device, dtype=dtype, low_vram=False)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, m in pipe.models.items():
            if "dit" not in name:
                continue
            for p in m.parameters():  # DiT init zeroes adaLN / output layers: give them weights, as training would
                if p.dim() >= 1 and not bool(p.any()):
                    p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02))
    return pipe


def with_refiners(pipe, device: torch.device, dtype: torch.dtype, smoke: bool, seed: int = 0):
    """The pipeline plus the release's two refiners (random weights, built on ``device``): full size, or for the
    smoke run tiny ones tiling pipeline_tiny's 64^3 / 128^3 grids."""
    from d3s2.models.refiner import SDFRefiner, SDFRefinerConfig, SignRefiner, SignRefinerConfig
    from d3s2.pipelines import ImageTo3DPipeline

    torch.manual_seed(seed + 1)
    small = dict(block_out_channels=[4, 8], layers_per_block=1, layers_mid_block=0, norm_groups=2, patch_size=32,
                 patch_stride=16, resolution=64) if smoke else {}
    feat = pipe.models["ss_vae_512"].config.decoder_channels[-1]
    with torch.device(device):
        nets = {"refiner_512": SDFRefiner(SDFRefinerConfig(feature_channels=feat, **small)),
                "refiner_1024": SignRefiner(SignRefinerConfig(**small))}
    sys.path.insert(0, HERE)
    from refiners import sharpen_sign_refiner

    sharpen_sign_refiner(nets["refiner_1024"].eval())  # random signs are noise: the lean 1024 field would not be lean
    return ImageTo3DPipeline({**pipe.models, **nets}, pipe.samplers, pipe.settings, device=pipe.device,
                             dtype=dtype, low_vram=False, component_configs=pipe.component_configs,
                             encoder_config=pipe.encoder_config)


def set_conv_backend(models: dict, backend: str) -> int:
    """Every SparseConv3d of the models uses ``backend``; returns how many there are."""
    from d3s2.sparse.conv import SparseConv3d

    n = 0
    for m in models.values():
        for mod in m.modules():
            if isinstance(mod, SparseConv3d):
                mod.backend = backend
                n += 1
    return n


def conv_backend_in_use(device: torch.device, backend: str) -> str:
    try:
        from d3s2.sparse.conv import resolve_conv_backend
    except ImportError:  # older sparse core: the reference path only
        return "reference"
    return resolve_conv_backend(backend, device)


def clone_pipeline(pipe, low_vram: bool):
    from d3s2.pipelines import ImageTo3DPipeline

    return ImageTo3DPipeline(pipe.models, pipe.samplers, pipe.settings, device=pipe.device, dtype=pipe.dtype,
                             low_vram=low_vram, component_configs=pipe.component_configs,
                             encoder_config=pipe.encoder_config)


def test_image(size: int = 518) -> np.ndarray:
    """An RGBA image with an object-like alpha mask (the content does not matter with random weights)."""
    yy, xx = np.mgrid[:size, :size] / size
    mask = ((xx - 0.5) ** 2 / 0.12 + (yy - 0.55) ** 2 / 0.09) < 1.0
    img = np.zeros((size, size, 4), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200 * xx, 160 * yy, 90
    img[..., 3] = mask * 255
    return img


# ---------------------------------------------------------------------------------------------------------------------


def summarize(run: dict) -> str:
    parts = []
    for s in run["stages"]:
        gb = f" {s['peak_gpu_bytes'] / 1e9:.2f} GB" if s.get("peak_gpu_bytes") else ""
        parts.append(f"{s['stage']} {s['seconds']:.2f}s{gb}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "results")))
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU: checks the script, no numbers")
    ap.add_argument("--export-mesh", nargs=2, metavar=("NAME", "NPZ"), help="write an example mesh for the GPU run")
    ap.add_argument("--mesh", default=None, help="npz (vertices, faces) or bunny / duck (default: bunny; smoke: duck)")
    ap.add_argument("--target-tokens", type=int, default=45904, help="scale the mesh to about this many 1024 tokens")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--low-vram", choices=["off", "on", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, nargs=3, default=[50, 30, 15], metavar=("DENSE", "S512", "S1024"))
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refiners", choices=["on", "off"], default="on",
                    help="the release's 512 SDF refiner and 1024 sign refiner (random weights; the field they give "
                         "is replaced by the injected mesh's, their compute is timed)")
    ap.add_argument("--conv-backend", choices=["auto", "triton", "reference"], default="auto",
                    help="sparse conv implementation (auto: Triton on CUDA; falls back to reference if the warm-up "
                         "fails with it)")
    args = ap.parse_args(argv)
    if args.export_mesh:
        export_mesh(*args.export_mesh)
        return 0

    from d3s2.pipelines.image_to_3d import latent_band_coords

    if args.smoke:
        # tiny tensors: one thread (on a busy 2-core machine, intra-op threads spin-wait for most of the run)
        torch.set_num_threads(1)
        device, config = torch.device("cpu"), "pipeline_tiny"
        mesh_spec = args.mesh or "duck"
        steps = [min(s, 2) for s in args.steps]
        target_tokens = min(args.target_tokens, 150)  # a few hundred tokens keep the CPU run short
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or pass --smoke to check the script on a CPU")
        device, config = torch.device("cuda"), PAPER_PIPELINE
        mesh_spec = args.mesh or "bunny"
        steps, target_tokens = args.steps, args.target_tokens
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if device.type == "cpu":
        dtype = torch.float32
    if args.smoke:  # one decoding chunk spans the tiny latent grids: pipeline_tiny's 8^3 chunks + halo cost ~6x
        from d3s2.config import load_yaml, resolve_config_path

        config = load_yaml(resolve_config_path(config))
        config["settings"]["decode_chunk"] = 16
    import triton

    doc: dict = {
        "bench": "pipeline",
        "card": card_slug(device, args.smoke),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": str(torch.__version__),
        "triton": str(triton.__version__),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "args": vars(args),
        "targets": TARGETS,
        "runs": [],
    }
    path = os.path.join(args.out, f"pipeline-{doc['card']}{'-refiners' if args.refiners == 'on' else ''}.json")

    t0 = time.perf_counter()
    pipe = build_pipeline(config, device, dtype, args.seed)
    if args.refiners == "on":
        pipe = with_refiners(pipe, device, dtype, args.smoke, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    doc["build_seconds"] = time.perf_counter() - t0
    doc["params_millions"] = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in pipe.models.items()}
    doc["dtype"] = str(dtype)
    doc["sparse_convs"] = set_conv_backend(pipe.models, args.conv_backend)
    doc["conv_backend"] = conv_backend_in_use(device, args.conv_backend)
    r512, r1024 = pipe.resolution_512, pipe.resolution_1024
    factor = pipe.models["ss_vae_512"].config.downsample_factor
    print(f"built in {doc['build_seconds']:.1f} s: {doc['params_millions']}", flush=True)

    # the injected mesh, scaled to the target token count at 1024
    v, f, mesh_name = load_mesh_arrays(mesh_spec)
    v = normalized(v, f)
    tau1024 = pipe.settings.band_voxels / r1024
    t0 = time.perf_counter()
    scale = 1.0
    if target_tokens:
        full = len(latent_band_coords(v, f, r1024, tau1024, factor, device=device))
        scale = min(1.0, math.sqrt(target_tokens / full))
        doc["full_size_tokens_1024"] = full
    vs = v * scale
    structure = latent_band_coords(vs, f, r512, DATA_TAU, factor, device=device)
    expect_1024 = len(latent_band_coords(vs, f, r1024, tau1024, factor, device=device))
    injected = {"mesh": mesh_name, "vertices": len(v), "faces": len(f), "scale": scale,
                "extent": (vs[np.unique(f)].max(0) - vs[np.unique(f)].min(0)).tolist(),
                "tokens_512": len(structure), "tokens_1024_of_true_mesh": expect_1024,
                "setup_seconds": time.perf_counter() - t0}
    doc["injected"] = injected
    print("injected", json.dumps(injected), flush=True)
    inj = Injector(TrueSDF(vs, f, device), structure, {"512": r512, "1024": r1024})
    hooks = {"structure": inj.structure_hook, "decoded": inj.decoded_hook, "refined": inj.refined_hook}
    image = test_image(518 if not args.smoke else 64)
    kw = dict(num_inference_steps={"dense": steps[0], "512": steps[1], "1024": steps[2]},
              guidance_scale=args.cfg, progress=False, hooks=hooks)

    stage_1024 = [n for n in ("ss_vae_1024", "ss_dit_1024", "refiner_1024") if n in pipe.models]

    def one(p, res: int, label: str) -> dict:
        parked = []
        if res == 512 and not p.low_vram and device.type == "cuda":
            # a 512 pipeline holds no 1024-stage weights (--resolution 512 does not even load them)
            for n in stage_1024:
                p.models[n].to("cpu")
                parked.append(n)
        try:
            return _one(p, res, label, parked)
        finally:
            for n in parked:
                p.models[n].to(device)

    def _one(p, res: int, label: str, parked: list) -> dict:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = p(image, generator=torch.Generator().manual_seed(args.seed), resolution=res, **kw)
        mesh = out.meshes[0]
        wall = time.perf_counter() - t
        run = {"label": label, "resolution": res, "low_vram": p.low_vram, "wall_seconds": wall,
               "total_seconds": out.stats[-1]["seconds"], "stages": out.stats,
               "peak_gpu_gb": (out.stats[-1]["peak_gpu_bytes"] or 0) / 1e9 if device.type == "cuda" else None,
               "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if device.type == "cuda" else None,
               "mesh_vertices": len(mesh.vertices), "mesh_faces": len(mesh.faces),
               "mesh_extent": (np.asarray(mesh.vertices).max(0) - np.asarray(mesh.vertices).min(0)).tolist(),
               "injected_seen": dict(inj.seen), "off_gpu_during_run": parked}
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            run["device_used_gb_after"] = (total - free) / 1e9
        print(f"{label} res {res} low_vram {p.low_vram}: total {run['total_seconds']:.2f} s, peak "
              f"{run['peak_gpu_gb'] or 0:.2f} GB, {run['mesh_faces']} faces :: {summarize(run)}", flush=True)
        return run

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.low_vram]
    resident = pipe
    try:
        t = time.perf_counter()
        first = pipe if not modes[0] else clone_pipeline(pipe, True)
        try:
            doc["warmup"] = one(first, max(args.resolutions), "warmup")
        except Exception as exc:  # noqa: BLE001 - a sparse-conv kernel in progress must not cost the whole run
            if doc["conv_backend"] == "reference" or "out of memory" in str(exc).lower():
                raise
            doc["warmup_error"] = f"{doc['conv_backend']} conv: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
            print("warm-up failed, retrying with the reference sparse conv:", doc["warmup_error"], flush=True)
            set_conv_backend(pipe.models, "reference")
            doc["conv_backend"] = "reference"
            doc["warmup"] = one(first, max(args.resolutions), "warmup")
        doc["warmup"]["note"] = "excluded: Triton compilation, autotuning, allocator, the true-SDF cache"
        print(f"warm-up {time.perf_counter() - t:.1f} s", flush=True)
        for lv in modes:
            p = resident if not lv else clone_pipeline(resident, True)
            for res in args.resolutions:
                for rep in range(args.repeats):
                    doc["runs"].append(one(p, res, f"run{rep}"))
                    atomic_json(path, doc)
    except Exception as exc:  # noqa: BLE001 - keep what was measured
        doc["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}"
        print("ERROR", doc["error"], flush=True)
        import traceback

        traceback.print_exc()

    summary = []
    for lv in modes:
        for res in args.resolutions:
            runs = [r for r in doc["runs"] if r["resolution"] == res and r["low_vram"] == lv]
            if not runs:
                continue
            best = sorted(runs, key=lambda r: r["total_seconds"])[len(runs) // 2]
            stages = {s["stage"]: round(s["seconds"], 3) for s in best["stages"]}
            row = {"resolution": res, "low_vram": lv, "total_seconds": best["total_seconds"],
                   "peak_gpu_gb": best["peak_gpu_gb"], "stages_seconds": stages}
            tgt = TARGETS.get(str(res))
            if tgt and device.type == "cuda":
                row["meets_time_target"] = best["total_seconds"] <= tgt["seconds"]
                if "peak_gb" in tgt:
                    row["meets_memory_target"] = (best["peak_gpu_gb"] or 0) <= tgt["peak_gb"]
            summary.append(row)
    doc["summary"] = summary
    atomic_json(path, doc)
    print("summary", json.dumps(summary, indent=1), flush=True)
    print("wrote", path, flush=True)
    return 1 if "error" in doc else 0


if __name__ == "__main__":
    sys.exit(main())
