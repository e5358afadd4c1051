"""Training-step benchmark (issue 5): SS-DiT at the paper's 1024^3 token count and SS-VAE at 512^3 / 1024^3.

    PYTHONPATH=src PYTHONUNBUFFERED=1 python3 bench/train_step.py --out $OUT     # device machine (H100)
    PYTHONPATH=src python3 bench/train_step.py --cpu-smoke --out /tmp/x          # CPU check of the script itself

SS-DiT: the release v1.1 1024 config (``ss_dit_v1_1_1024``: 24 blocks, C 1024, GQA 32 x 32 heads / 2 KV heads, SSA),
one training step = flow-matching forward (Eq. 10-11, logit-normal t, CFG dropout 0.1) + backward + grad-norm clip +
AdamW, fp32 master weights under bf16 autocast, gradient checkpointing per block, as ``d3s2 train`` does it. Batch 2,
each sample ~45904 tokens (Table 1's 1024^3 average): a real latent shell from ``bench/data/ssa_shells.npz``
(``<mesh>_65536``, the cells of a 128^3-class grid near the surface of bunny / duck) cropped to the ``--tokens`` cells
lowest along x (a spatial crop keeps the per-block token density of a real shell; random dropping would thin it).
Condition: 1374 x 1024 tokens (DINOv2 at 518 px; the frozen encoder is not part of the step). The SSA layout is built
inside every step (a fresh coordinate set, as in training with new batches) and also reported alone. Both modes run in
the same process: ``ssa`` and ``full`` (dense attention per sample through SDPA, FlashAttention-2 backend preferred).

SS-VAE: ``ss_vae_v1`` (512^3) and ``ss_vae_v1_1024``, batch 1, one step of Eq. 2-3 (+ KL) with gradient checkpointing.
Input: an analytic sphere's narrow band (|d| < tau = 1/128, the ``d3s2 prepare`` default), radius chosen so the band
holds about as many voxels as the prepared bunny (2.2M at 512^3, 17.7M at 1024^3: bench/results/prepare_sdf_h100.json);
~0.4% voxels marked sharp. With ``--vae-mesh MESH.npz`` (vertices / faces, e.g. written by
``bench/pipeline.py --export-mesh bunny``) the input is instead that real mesh's sparse SDF as ``d3s2 prepare`` makes it
(``mesh_to_sparse_sdf``: normalised to [-0.95, 0.95]^3, |s| < 1/128, auto sign, real sharp-edge mask; warp on the GPU),
computed on the run's machine at each resolution; ``--vae-crops N ...`` (1024 only) also measures spatial crops of it
(the N voxels lowest along x, a training-crop size; 0 = the whole shell), smallest first, so that an out-of-memory full
shell still leaves the crop numbers. ``--only vae`` skips the SS-DiT part; ``--tag T`` names the result
``train_step-T-<card>.json``.

Timing: ``--warmup`` steps (Triton compilation, autotuning, allocator), then the median of ``--steps`` steps, each
synchronised; peak memory = ``torch.cuda.max_memory_allocated`` over the timed steps (model + optimizer state +
activations). An out-of-memory step is recorded as ``"oom": true``. Writes ``train_step-<card>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SMOKE = False


def git_commit() -> str:
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=HERE,
                                       stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.call(["git", "diff", "--quiet"], cwd=HERE, stderr=subprocess.DEVNULL) != 0
        return head + (" + uncommitted changes" if dirty else "")
    except Exception:
        return "unknown"


def card_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu-smoke" if SMOKE else "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for k in ("h200", "h100", "a100", "l40", "4090"):
        if k in name:
            return k
    return name.replace(" ", "-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU smoke: fp32 (the trainer's 'auto' precision on CPU)


def timed_steps(step, device: torch.device, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"seconds_per_step": statistics.median(times), "all_seconds": times, "peak_gib": peak_gib(device)}


def record_failure(res: dict, exc: Exception, device) -> None:
    """Record why a timed step failed (out of memory, or the error in one line) and the peak memory reached."""
    if is_oom(exc):
        res["oom"] = True
    else:
        res["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
    res["peak_gib"] = peak_gib(device)

def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------------------------------
# SS-DiT


def shell_coords(names: list[str], tokens: int) -> list[np.ndarray]:
    """Per sample: the ``tokens`` cells of the mesh's 65536-cell latent shell lowest along x (ties: y, z)."""
    out = []
    with np.load(os.path.join(HERE, "data", "ssa_shells.npz")) as z:
        for name in names:
            key = f"{name}_65536"
            if key not in z.files:
                raise SystemExit(f"bench/data/ssa_shells.npz has no '{key}' (have: {', '.join(z.files)})")
            c = z[key].astype(np.int64)
            order = np.lexsort((c[:, 2], c[:, 1], c[:, 0]))
            out.append(c[order[:tokens]])
    return out


def batch_latent(coords: list[np.ndarray], channels: int, device: torch.device, seed: int):
    from d3s2.sparse import SparseTensor

    bc = torch.cat([torch.cat([torch.full((len(c), 1), b, dtype=torch.int32), torch.from_numpy(c).int()], 1)
                    for b, c in enumerate(coords)]).to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    feats = torch.randn(len(bc), channels, generator=g).to(device)
    return SparseTensor(feats, bc, batch_size=len(coords))


def dit_bench(model_name: str, mode: str, coords: list[np.ndarray], cond_tokens: int, device: torch.device,
              warmup: int, steps: int) -> dict:
    from d3s2.config import build_model, load_model_config
    from d3s2.flow.rectified import FlowConfig, flow_matching_loss

    mcfg = load_model_config(model_name)
    mcfg = replace(mcfg, params=replace(mcfg.params, ssa_mode=mode, use_checkpoint=True))
    flow = mcfg.flow or FlowConfig()
    p = mcfg.params
    res: dict = {"mode": mode, "model": model_name, "batch": len(coords), "tokens_per_sample": [len(c) for c in coords],
                 "cond_tokens": cond_tokens, "gradient_checkpointing": True,
                 "precision": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32"}
    model = opt = None
    try:
        reset_peak(device)
        model = build_model(mcfg).to(device)
        model.set_gradient_checkpointing(True)
        model.train()
        res["params_millions"] = sum(x.numel() for x in model.parameters()) / 1e6
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        g = torch.Generator(device="cpu").manual_seed(0)
        cond = torch.randn(len(coords), cond_tokens, p.cond_channels, generator=g).to(device)
        counter = [0]

        def step():
            counter[0] += 1
            x0 = batch_latent(coords, p.in_channels, device, counter[0])  # fresh coordinate cache: layout per step
            with autocast(device):
                loss = flow_matching_loss(model, x0, cond, flow)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            res["last_loss"] = float(loss.detach())

        sdpa = contextlib.nullcontext()
        if mode == "full" and device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            sdpa = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
            res["sdpa_backends"] = ["flash", "efficient"]
        with sdpa:
            res.update(timed_steps(step, device, warmup, steps))
        n_tok = sum(len(c) for c in coords)
        res["tokens_per_second"] = n_tok / res["seconds_per_step"]
        # the layout alone (built once per coordinate set, shared by all blocks)
        x0 = batch_latent(coords, p.in_channels, device, 0)
        lay = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            model.make_layout(x0.coords, batch_size=len(coords))
            sync(device)
            lay.append(time.perf_counter() - t0)
        res["layout_ms"] = statistics.median(lay) * 1e3
        res["finite_loss"] = bool(math.isfinite(res["last_loss"]))
    except Exception as exc:  # noqa: BLE001 - one failing mode must not lose the other's numbers
        record_failure(res, exc, device)
    finally:
        del model, opt
        reset_peak(device)
    return res


# ---------------------------------------------------------------------------------------------------------------------
# SS-VAE


def sphere_band(resolution: int, radius: float, tau: float, device: torch.device, seed: int = 0):
    """Voxels (integer coords of a resolution^3 grid over [-1, 1]^3) whose centre is within tau of a sphere, their
    signed distance and a sparse random 'sharp' mask; built slice by slice."""
    vs = 2.0 / resolution
    ax = -1.0 + (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) * vs
    yy, zz = torch.meshgrid(ax, ax, indexing="ij")
    r2 = yy * yy + zz * zz
    cs, ds = [], []
    for i in range(resolution):
        d = torch.sqrt(ax[i] * ax[i] + r2) - radius
        m = d.abs() < tau
        if m.any():
            idx = m.nonzero()
            cs.append(torch.cat([torch.full((len(idx), 1), i, device=device, dtype=torch.long), idx], 1))
            ds.append(d[m])
    coords, sdf = torch.cat(cs), torch.cat(ds)
    g = torch.Generator(device="cpu").manual_seed(seed)
    sharp = (torch.rand(len(coords), generator=g) < 0.004).to(device)
    return coords, sdf, sharp


def mesh_band(mesh_npz: str, resolution: int, tau: float, device: torch.device):
    """The real mesh's sparse SDF (``d3s2 prepare``'s ``mesh_to_sparse_sdf``) as device tensors + a description."""
    import trimesh

    from d3s2.data.sdf import mesh_to_sparse_sdf

    with np.load(mesh_npz) as z:
        v, f = z["vertices"].astype(np.float64), z["faces"].astype(np.int64)
        name = str(z["name"]) if "name" in z.files else os.path.basename(mesh_npz)
    t0 = time.perf_counter()
    mesh = trimesh.Trimesh(v, f, process=False)
    info = {"mesh": name, "mesh_faces": len(f), "sdf_backend": "warp" if device.type == "cuda" else "cpu"}
    try:
        s = mesh_to_sparse_sdf(mesh, resolution, tau, backend="auto" if device.type == "cuda" else "cpu",
                               device="cuda" if device.type == "cuda" else None)
    except Exception as exc:  # noqa: BLE001 - warp missing or broken there: libigl on the host
        info.update(sdf_backend="cpu", warp_error=f"{type(exc).__name__}: {exc}"[:300])
        s = mesh_to_sparse_sdf(mesh, resolution, tau, backend="cpu")
    info.update(sdf_seconds=time.perf_counter() - t0, shell_voxels=len(s.coords))
    coords = torch.from_numpy(s.coords.astype(np.int64)).to(device)
    sdf = torch.from_numpy(s.sdf.astype(np.float32)).to(device)
    sharp = torch.from_numpy(np.asarray(s.sharp, dtype=bool)).to(device)
    return coords, sdf, sharp, info


def crop_lowest_x(coords, sdf, sharp, n: int):
    """The ``n`` voxels lowest along x (ties: y, z): a spatial crop with the shell's real local structure."""
    if not n or n >= len(coords):
        return coords, sdf, sharp
    r = int(coords.max()) + 1
    key = (coords[:, 0] * r + coords[:, 1]) * r + coords[:, 2]
    idx = torch.sort(torch.topk(key, n, largest=False).indices).values
    return coords[idx], sdf[idx], sharp[idx]


CONV_BACKEND = "auto"


def set_conv_backend(model, backend: str, device: torch.device) -> str:
    """Every SparseConv3d of ``model`` uses ``backend``; returns the implementation that runs on ``device``."""
    from d3s2.sparse.conv import SparseConv3d

    for mod in model.modules():
        if isinstance(mod, SparseConv3d):
            mod.backend = backend
    try:
        from d3s2.sparse.conv import resolve_conv_backend
    except ImportError:
        return "reference"
    return resolve_conv_backend(backend, device)


def vae_bench(model_name: str, resolution: int, voxels_target: int, tau: float, device: torch.device,
              warmup: int, steps: int, shell=None, crop: int = 0) -> dict:
    from d3s2.config import build_model, load_model_config
    from d3s2.sparse import SparseTensor

    res: dict = {"model": model_name, "resolution": resolution, "batch": 1, "tau": tau, "gradient_checkpointing": True,
                 "precision": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32"}
    model = opt = None
    try:
        reset_peak(device)
        if shell is not None:  # a real mesh's shell (mesh_band), optionally cropped
            coords, sdf, sharp = crop_lowest_x(*shell[:3], crop)
            res.update(input=dict(shell[3]), crop_voxels=crop or None, voxels=int(len(coords)),
                       sharp_voxels=int(sharp.sum()))
        else:
            # band volume ~ 4 pi r^2 * 2 tau / voxel^3: pick r for the target voxel count (capped inside the cube)
            vs = 2.0 / resolution
            radius = min(0.95, math.sqrt(voxels_target * vs**3 / (4 * math.pi * 2 * tau)))
            coords, sdf, sharp = sphere_band(resolution, radius, tau, device)
            res.update(input="sphere band", voxels=int(len(coords)), radius=radius)
        bc = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32, device=device), coords.int()], 1)
        x = SparseTensor(sdf[:, None], bc, batch_size=1, resolution=resolution)
        mcfg = load_model_config(model_name)
        mcfg = replace(mcfg, params=replace(mcfg.params, use_checkpoint=True))
        model = build_model(mcfg).to(device)
        model.train()
        res["conv_backend"] = set_conv_backend(model, CONV_BACKEND, device)
        res["params_millions"] = sum(p.numel() for p in model.parameters()) / 1e6
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            with autocast(device):
                out = model.loss(x, sharp=sharp, tau=tau)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            res["last_loss"] = float(out["loss"].detach())

        res.update(timed_steps(step, device, warmup, steps))
        res["voxels_per_second"] = res["voxels"] / res["seconds_per_step"]
        res["finite_loss"] = bool(math.isfinite(res["last_loss"]))
    except Exception as exc:  # noqa: BLE001 - one failing step must not lose the other numbers
        record_failure(res, exc, device)
    finally:
        del model, opt
        reset_peak(device)
    return res


# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    global SMOKE, CONV_BACKEND
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "results")))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU: checks the script, no numbers")
    ap.add_argument("--tokens", type=int, default=45904, help="tokens per sample (Table 1, 1024^3: ~45904)")
    ap.add_argument("--meshes", nargs="+", default=["bunny", "duck"], help="one shell per sample (batch size)")
    ap.add_argument("--modes", nargs="+", default=["ssa", "full"])
    ap.add_argument("--vae-resolutions", type=int, nargs="*", default=[512, 1024])
    ap.add_argument("--vae-voxels-512", type=int, default=2_200_000, help="band voxels at 512^3 (bunny: ~2.2M)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--only", choices=["all", "dit", "vae"], default="all", help="run only one of the two parts")
    ap.add_argument("--vae-mesh", default=None, help="npz (vertices, faces): the VAE input is this mesh's shell")
    ap.add_argument("--vae-crops", type=int, nargs="*", default=[0],
                    help="with --vae-mesh, at 1024: voxel counts of spatial crops to measure (0 = whole shell)")
    ap.add_argument("--vae-steps", type=int, default=None, help="timed VAE steps (default: max(3, steps - 2))")
    ap.add_argument("--tag", default=None, help="result file train_step-TAG-<card>.json")
    ap.add_argument("--conv-backend", choices=["auto", "triton", "reference"], default="auto",
                    help="SS-VAE sparse conv implementation (auto: Triton on CUDA when present)")
    args = ap.parse_args(argv)
    SMOKE = args.cpu_smoke
    CONV_BACKEND = args.conv_backend
    if SMOKE:
        device = torch.device("cpu")
        dit_model, cond_tokens = "ss_dit_tiny", 21
        tokens, warmup, steps = min(args.tokens, 150), 1, 1
        vae_models = {32: "ss_vae_tiny", 64: "ss_vae_tiny"}
        vae_targets = {32: 3000, 64: 12000}
        tau = 1.0 / 16
        if args.vae_mesh:  # a mesh's shell at the tiny resolutions
            vae_models = {r: "ss_vae_tiny" for r in (32, 64) if r in args.vae_resolutions} or {32: "ss_vae_tiny"}
            tau = 1.5 / min(vae_models)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or pass --cpu-smoke to check the script on a CPU")
        device = torch.device("cuda")
        dit_model, cond_tokens = "ss_dit_v1_1_1024", 1374
        tokens, warmup, steps = args.tokens, args.warmup, args.steps
        vae_models = {r: ("ss_vae_v1_1024" if r >= 1024 else "ss_vae_v1") for r in args.vae_resolutions}
        # tau is fixed in cube units: the band's voxel count grows as R^3 (area x R^2, thickness x R)
        vae_targets = {r: int(args.vae_voxels_512 * (r / 512) ** 3) for r in args.vae_resolutions}
        tau = 1.0 / 128
    import triton

    doc = {
        "bench": "train_step",
        "card": card_slug(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": str(torch.__version__),
        "triton": str(triton.__version__),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "args": vars(args),
        "dit": [],
        "vae": [],
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train_step-{args.tag + '-' if args.tag else ''}{doc['card']}.json")

    def write():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)

    if args.only in ("all", "dit"):
        coords = shell_coords(args.meshes, tokens)
        if SMOKE:  # keep the tiny shells on the tiny model's latent grid scale
            coords = [c - c.min(0) for c in coords]
        doc["dit_shells"] = {m: {"tokens": len(c), "extent": (c.max(0) - c.min(0) + 1).tolist()}
                             for m, c in zip(args.meshes, coords)}
        for mode in args.modes:
            r = dit_bench(dit_model, mode, coords, cond_tokens, device, warmup, steps)
            doc["dit"].append(r)
            print("dit", json.dumps({k: v for k, v in r.items() if k != "all_seconds"}), flush=True)
            write()
        by = {r["mode"]: r for r in doc["dit"] if "tokens_per_second" in r}
        if "ssa" in by and "full" in by:
            doc["ssa_vs_full_throughput"] = by["ssa"]["tokens_per_second"] / by["full"]["tokens_per_second"]
    if args.only in ("all", "vae"):
        vae_warmup = 1 if SMOKE else max(1, warmup - 1)
        vae_steps = 1 if SMOKE else (args.vae_steps or max(3, steps - 2))
        for r_, name in vae_models.items():
            shell, crops = None, [0]
            if args.vae_mesh:
                shell = mesh_band(args.vae_mesh, r_, tau, device)
                print("shell", r_, json.dumps(shell[3]), flush=True)
                if r_ >= 1024 or SMOKE:
                    crops = sorted(args.vae_crops, key=lambda n: n if n > 0 else float("inf"))
            for crop in crops:
                r = vae_bench(name, r_, vae_targets[r_], tau, device, vae_warmup, vae_steps, shell, crop)
                if "error" in r and r.get("conv_backend") == "triton":  # a kernel in progress: keep a number
                    print("vae", json.dumps(r), "-> again with the reference sparse conv", flush=True)
                    CONV_BACKEND = "reference"
                    failed = r
                    r = vae_bench(name, r_, vae_targets[r_], tau, device, vae_warmup, vae_steps, shell, crop)
                    r["triton_conv_error"] = failed["error"]
                doc["vae"].append(r)
                print("vae", json.dumps({k: v for k, v in r.items() if k != "all_seconds"}), flush=True)
                write()
            del shell
            reset_peak(device)
    write()
    print("wrote", path, flush=True)
    failed = [r for r in doc["dit"] + doc["vae"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
