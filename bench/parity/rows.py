"""Rows of the parity table: each runs the authors' function and d3s2's on the same weights and inputs.

A :class:`Harness` holds one release folder (random weights written in the release layout, see official.py), the
authors' models (built from its params, fp32) and d3s2's (through the public loader ``load_release``). Rows return
dicts (see compare.row); a row that cannot run here (no CUDA for the authors' Triton SSA, no torchvision) says why.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from compare import align, face_set_difference, rel_err, row, vertex_distance
from official import build_release, full_params, get_class, has_torchvision, import_official, small_params


def skipped(name: str, why: str) -> dict:
    return {"row": name, "ok": None, "skipped": why}


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """CPU-only debugging runs of code that hard-codes CUDA: the authors' ``mesh2index`` calls ``.cuda()`` and its
    wrapper ``compute_valid_udf`` refuses CPU tensors (it only forwards to the extension, here the udf_ext stand-in),
    and ``get_block_score`` allocates with ``device="cuda"``. Inside this context on a machine without CUDA those
    calls stay on the CPU; with CUDA nothing is changed."""
    if torch.cuda.is_available():
        yield
        return
    import direct3d_s2.utils.mesh as mesh_mod
    import udf_ext

    def valid_udf_cpu(vertices, faces, dim=512, threshold=8.0):  # the wrapper's arithmetic, minus its CUDA check
        udf = torch.zeros(dim ** 3, device=vertices.device).int() + 10000000
        udf_ext.compute_valid_udf(vertices, faces, udf, faces.shape[0], dim, threshold)
        return udf.float() / 10000000.0

    orig_cuda, orig_zeros, orig_udf = torch.Tensor.cuda, torch.zeros, mesh_mod.compute_valid_udf

    def zeros(*a, **k):
        if k.get("device") == "cuda":
            k["device"] = "cpu"
        return orig_zeros(*a, **k)

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.zeros = zeros
    mesh_mod.compute_valid_udf = valid_udf_cpu
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.zeros, mesh_mod.compute_valid_udf = orig_cuda, orig_zeros, orig_udf


class Harness:
    def __init__(self, snapshot: str, workdir: Path, version: str, size: str, device: torch.device,
                 inputs: str | None, seed: int = 0):
        self.official = import_official(snapshot)
        self.version, self.size, self.device = version, size, device
        self.params = full_params(version) if size == "full" else small_params(version)
        self.folder = workdir / f"release-{version}-{size}"
        t0 = time.perf_counter()
        self.theirs = build_release(self.folder, self.params, seed=seed)
        from d3s2.pipelines.official import load_release

        self.ours = load_release(self.folder)
        self.build_seconds = time.perf_counter() - t0
        self.inputs = dict(np.load(inputs)) if inputs else None
        self.gen = torch.Generator().manual_seed(seed + 7)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def pair(self, key: str, ours_name: str, device=None, dtype=torch.float32):
        dev = device or self.device
        return (self.theirs[key].to(dev, dtype) if dtype == torch.float32 else self.theirs[key].to(dev),
                self.ours.models[ours_name].to(dev, dtype))

    def release_fp16(self, key: str):
        """The authors' model as the release runs it (use_fp16: Linear / conv weights fp16, norms fp32)."""
        target, p = self.params[key]
        model = get_class(target)(**{**p, "use_fp16": True})
        sd = torch.load(self.folder / _file_of(key), map_location="cpu", weights_only=True)[_dict_key(key)]
        model.load_state_dict(sd, strict=True)
        return model.eval()


def _file_of(key: str) -> str:
    from official import FILES

    return next(f for f, entries in FILES.items() if any(k == key for _, k in entries))


def _dict_key(key: str) -> str:
    return "refiner" if "refiner" in key else "vae" if "vae" in key else "dit"


# ---------------------------------------------------------------------------------------------------- dense stages
@torch.no_grad()
def dense_vae_decode(h: Harness) -> dict:
    theirs, ours = h.pair("dense_vae", "dense_vae")
    r = h.ours.configs["dense_dit"][1].resolution
    z = h.randn(1, h.ours.configs["dense_vae"][1].latent_channels, r, r, r).to(h.device)
    out = row("dense VAE decode (64^3 occupancy logits)", rel_err(ours.decode(z), theirs.decoder(z)), torch.float32,
              h.device, shape=list(z.shape))
    h.theirs["dense_vae"].cpu(), h.ours.models["dense_vae"].cpu()
    return out


@torch.no_grad()
def dense_dit(h: Harness) -> dict:
    theirs, ours = h.pair("dense_dit", "dense_dit")
    cfg = h.ours.configs["dense_dit"][1]
    x = h.randn(1, cfg.in_channels, cfg.resolution, cfg.resolution, cfg.resolution).to(h.device)
    cond = h.randn(1, 1374, cfg.cond_channels).to(h.device)
    t = torch.tensor([734.0], device=h.device)
    out = row("dense DiT forward (velocity, 4096 tokens)", rel_err(ours(x, t, cond), theirs(x, t, cond)),
              torch.float32, h.device, blocks=cfg.num_blocks, channels=cfg.model_channels)
    h.theirs["dense_dit"].cpu(), h.ours.models["dense_dit"].cpu()
    return out


# ---------------------------------------------------------------------------------------------------- SS-VAE
def synthetic_band(resolution: int, radius: float, tau_voxels: float = 2.0, device="cpu"):
    """Voxels within ``tau_voxels`` of a sphere with a bump (an SDF band the VAE can encode), values s / tau."""
    h = 2.0 / resolution
    lo = int((1 - radius - 4 * tau_voxels * h) / h) - 2
    lo = max(0, resolution // 2 - (resolution // 2 - lo))
    hi = resolution - lo
    g = torch.arange(lo, hi, device=device)
    coords = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    p = -1 + (coords.double() + 0.5) * h
    s = p.norm(dim=1) - radius - 0.08 * torch.exp(-((p - torch.tensor([0.0, 0.0, radius], device=device)) ** 2).sum(1)
                                                 / 0.02)
    tau = tau_voxels * h
    keep = s.abs() < tau
    return coords[keep].int(), (s[keep] / tau).float().clamp(-1, 1)


@torch.no_grad()
def ss_vae(h: Harness, stage: str) -> list[dict]:
    from d3s2.sparse import SparseTensor

    key, name = f"sparse_vae_{stage}", f"ss_vae_{stage}"
    theirs, ours = h.pair(key, name)
    res = h.ours.configs[name][1].resolution
    radius = 0.6 if h.size == "full" else 0.15
    coords, sdf = synthetic_band(res, radius, device=h.device)
    n = len(coords)
    batch = {"sparse_sdf": sdf, "sparse_index": coords, "batch_idx": torch.zeros(n, dtype=torch.int32,
                                                                               device=h.device)}
    z_t, post = theirs.encode(batch, sample_posterior=False)
    x = SparseTensor(sdf[:, None], torch.cat([torch.zeros(n, 1, dtype=torch.int32, device=h.device), coords], 1),
                     batch_size=1, resolution=res)
    z_o, mean, logvar = ours.encode(x, sample_posterior=False)
    zc = z_t.coords
    a, b, st = align(z_o.coords, torch.cat([mean, logvar], 1), zc, torch.cat([post.mean, post.logvar], 1))
    rows = [row(f"SS-VAE-{stage} encode (posterior mean | logvar)", rel_err(a, b), torch.float32, h.device,
                voxels=n, latents=len(zc), **st)]
    # decode the same latent: theirs (chunked at 1024 as the release) vs d3s2's chunked decoder
    t0 = time.perf_counter()
    dec_t = theirs.decoder(z_t)
    t_theirs = time.perf_counter() - t0
    z = SparseTensor(z_t.feats, z_t.coords, batch_size=1, resolution=res // 8)
    chunk = h.ours.settings.decode_chunk
    t0 = time.perf_counter()
    dec_o = ours.decode(z, chunk)
    t_ours = time.perf_counter() - t0
    a, b, st = align(dec_o.coords, dec_o.feats, dec_t.coords, dec_t.feats)
    rows.append(row(f"SS-VAE-{stage} decode (tanh SDF on every child voxel)", rel_err(a, b), torch.float32, h.device,
                    voxels=len(a), chunk=chunk, seconds_ours=t_ours, seconds_theirs=t_theirs, **st))
    h.last_decoded = {stage: (dec_t.coords.cpu(), dec_t.feats.float().cpu(), res)}
    theirs.cpu(), ours.cpu()
    return rows


# ---------------------------------------------------------------------------------------------------- SS-DiT
def _mask_image(size: int = 518) -> torch.Tensor:
    """A foreground mask (an ellipse) of the 518 px conditioning image: ~1/3 of the patches."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((((x - 270) / 170.0) ** 2 + ((y - 250) / 210.0) ** 2) < 1).float()[None]


@torch.no_grad()
def ss_dit(h: Harness, stage: str) -> dict:
    name = f"SS-DiT {h.version} forward at {stage} (velocity, bunny tokens)"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if h.device.type != "cuda" and not interpret:
        return skipped(name, "the authors' SSA kernels (Triton, fp16) need CUDA (or TRITON_INTERPRET=1, tiny sizes)")
    import torch.nn.functional as F

    from d3s2.models.conditioning import sparse_condition
    from d3s2.sparse import SparseTensor
    from direct3d_s2.modules import sparse as sp
    from direct3d_s2.utils import extract_tokens_and_coords, sort_block

    key, cname = f"sparse_dit_{stage}", f"ss_dit_{stage}"
    dev = h.device
    theirs = h.release_fp16(key).to(dev)
    ours = h.ours.models[cname].to(dev, torch.float16)
    cfg = h.ours.configs[cname][1]
    tok = torch.from_numpy(h.inputs[f"tok{stage}"].astype(np.int64))
    if h.device.type != "cuda":  # the interpreter: a patch of the token set
        centre = tok[len(tok) // 2]
        tok = tok[((tok - centre).abs() < 6).all(1)]
    coords = torch.cat([torch.zeros(len(tok), 1, dtype=torch.int64), tok], 1).to(dev)
    coords_t = sort_block(coords, cfg.m_slc)  # the release feeds block-sorted tokens
    feats = h.randn(len(coords), cfg.in_channels).to(dev, torch.float16)
    tokens = torch.nn.functional.layer_norm(h.randn(1, 1374, cfg.cond_channels), (cfg.cond_channels,)).to(dev)
    t = 734.0
    # theirs: a SparseTensor on the block-sorted coords (features moved with them)
    perm = _permutation(coords, coords_t)
    x_t = sp.SparseTensor(feats[perm], coords_t.int())
    t_t = torch.tensor([t], dtype=torch.float16, device=dev)
    extra = {}
    if cfg.sparse_conditioning:
        mask = _mask_image().to(dev)
        patch = F.max_pool2d(mask[:, None], kernel_size=14, stride=14).squeeze(1) > 0
        c_tok, c_coords = extract_tokens_and_coords(tokens.half(), patch)
        cond_t = sp.SparseTensor(c_tok, c_coords.int())
        sc = sparse_condition(tokens, mask, 5)
        kwargs = {"cond_mask": sc.mask, "cond_coords": sc.coords}
        cond_o = sc.tokens.half()
        extra["condition_tokens"] = int(sc.mask.sum())
    else:
        cond_t, cond_o, kwargs = tokens.half(), tokens.half(), {}
    t0 = time.perf_counter()
    with cuda_calls_on_cpu():
        out_t = theirs(x_t, t_t, cond_t)
    _sync(dev)
    sec_t = time.perf_counter() - t0
    x_o = SparseTensor(feats, coords.int(), batch_size=1, resolution=cfg.resolution)
    t0 = time.perf_counter()
    out_o = ours(x_o, torch.tensor([t], device=dev).to(torch.float16).float(), cond_o, **kwargs)
    _sync(dev)
    sec_o = time.perf_counter() - t0
    a, b, st = align(out_o.coords, out_o.feats, out_t.coords, out_t.feats)
    theirs.cpu(), ours.cpu()
    del theirs
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row(name, rel_err(a, b), torch.float16, dev, tokens=len(coords), top_k=cfg.top_k, m_cmp=cfg.m_cmp,
               seconds_ours_first_call=sec_o, seconds_theirs_first_call=sec_t, **st, **extra)


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _permutation(coords: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``perm`` with ``coords[perm] == target`` (same rows, another order)."""
    from compare import keyed

    ka, kb = keyed(coords).numpy(), keyed(target).numpy()
    order = np.argsort(ka)
    return torch.from_numpy(order[np.searchsorted(ka[order], kb)]).to(coords.device)


# ---------------------------------------------------------------------------------------------------- recipe rows
def scheduler() -> list[dict]:
    from d3s2.flow.sampler import euler_timesteps

    try:
        from diffusers import FlowMatchEulerDiscreteScheduler
    except ImportError:
        return [skipped("sampler grid vs diffusers", "diffusers is not installed")]
    out = []
    for name, steps, shift in (("dense", 50, 6.0), ("512", 30, 6.0), ("1024", 15, 8.0)):
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        s.set_timesteps(steps)
        ours = euler_timesteps(steps, shift, schedule="flow_match_euler")
        d_sig = float((s.sigmas.double() - ours).abs().max())
        d_t = float((s.timesteps.double() - (ours[:-1].float() * 1000).double()).abs().max())
        out.append({"row": f"sampler grid, {name} stage ({steps} steps, shift {shift})", "max_abs_sigma": d_sig,
                    "max_abs_timestep": d_t, "last_sigma": float(ours[-2]), "bound": 1e-6,
                    "ok": d_sig <= 1e-6 and d_t <= 1e-3, "device": "cpu"})
    return out


def preprocess(h: Harness) -> list[dict]:
    name = "image preprocessing (RGB + mask, 518 px)"
    if not has_torchvision():
        return [skipped(name, "torchvision is not installed here")]
    from PIL import Image

    from d3s2.pipelines.preprocess import release_frame
    from direct3d_s2.utils import preprocess_image

    examples = sorted((Path(__file__).resolve().parents[2] / "src/d3s2/assets/examples").glob("*.png"))
    rng = np.random.default_rng(0)
    synthetic = np.zeros((300, 420, 4), np.uint8)
    synthetic[..., :3] = rng.integers(0, 256, (300, 420, 3))
    yy, xx = np.mgrid[:300, :420]
    synthetic[..., 3] = np.clip(255 * (1.5 - ((xx - 200) ** 2 / 90 ** 2 + (yy - 160) ** 2 / 70 ** 2)), 0, 255)
    images = [("synthetic soft alpha", synthetic)] + [(p.name, np.asarray(Image.open(p).convert("RGBA")))
                                                       for p in examples]
    out = []
    for label, rgba in images:
        theirs = preprocess_image(rgba.copy())
        ours = release_frame(rgba.copy())
        d = (ours.double() - theirs.double()).abs()
        out.append({"row": f"{name}: {label}", "max_abs": float(d.max()), "pixels_differing": int((d > 0).sum()),
                    "bound": 0.0, "ok": float(d.max()) == 0.0, "device": "cpu"})
    return out


@torch.no_grad()
def condition_tokens(h: Harness) -> dict:
    import torch.nn.functional as F

    from d3s2.models.conditioning import select_sparse_tokens
    from direct3d_s2.utils import extract_tokens_and_coords

    mask = _mask_image()
    tokens = h.randn(1, 1374, 64)
    patch = F.max_pool2d(mask[:, None], kernel_size=14, stride=14).squeeze(1) > 0
    ft, ct = extract_tokens_and_coords(tokens, patch)
    fo, co = select_sparse_tokens(tokens, mask, 5)
    # compare as sets of (coords, features): the release keeps CLS + registers at (0, 0, 1)
    a = sorted(zip(map(tuple, co.tolist()), map(tuple, fo.tolist())))
    b = sorted(zip(map(tuple, ct.long().tolist()), map(tuple, ft.tolist())))
    return {"row": "v1.0 sparse condition tokens (Eq. 9 selection)", "tokens_ours": len(a), "tokens_theirs": len(b),
            "identical": a == b, "bound": "identical", "ok": a == b, "device": "cpu"}


def token_band(h: Harness) -> dict:
    import trimesh

    from d3s2.pipelines.token_band import latent_band_coords, release_band_mesh
    from direct3d_s2.utils import mesh2index, normalize_mesh

    v, f = h.inputs["mesh_v"].astype(np.float64), h.inputs["mesh_f"].astype(np.int64)
    mesh = trimesh.Trimesh(v * 0.8 + 0.03, f, process=False)  # off-centre and smaller: the renormalisation matters
    t0 = time.perf_counter()
    with cuda_calls_on_cpu():
        theirs = mesh2index(normalize_mesh(mesh.copy()), size=1024, factor=8)
    sec_t = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = latent_band_coords(release_band_mesh(mesh.vertices), f, 1024, 4 / 1024, 8, device="cpu", rule="release")
    sec_o = time.perf_counter() - t0
    a = {tuple(r) for r in ours[:, 1:].tolist()}
    b = {tuple(r) for r in theirs[:, 1:].cpu().tolist()}
    return {"row": "1024 token set from the same 512 mesh (normalize_mesh + mesh2index)", "tokens_ours": len(a),
            "tokens_theirs": len(b), "only_ours": len(a - b), "only_theirs": len(b - a), "bound": "identical",
            "ok": a == b, "seconds_ours_cpu": sec_o, "seconds_theirs": sec_t,
            "device": "cpu (ours: libigl octree); theirs: udf_ext stand-in on " + ("cuda" if torch.cuda.is_available()
                                                                                  else "cpu")}


def marching_cubes(h: Harness, stage: str, level: float) -> dict:
    """The release's sparse2mesh (dense grid, fill 1.0, Lewiner) vs d3s2's sparse Lewiner on the same decoded SDF."""
    from d3s2.geometry.lewiner import lewiner_marching_cubes

    name = f"marching cubes at {stage} (level {level}, decoded SDF)"
    dec = getattr(h, "last_decoded", {}).get(stage)
    if dec is None:
        return skipped(name, "needs the SS-VAE decode row of this stage first")
    coords, feats, res = dec  # res: the decoded SDF's voxel resolution
    c, i = np.unique(coords[:, 1:].numpy(), axis=0, return_index=True)
    vals = feats[torch.from_numpy(i), 0]
    vae = h.theirs[f"sparse_vae_{stage}"]
    from direct3d_s2.modules import sparse as sp

    t0 = time.perf_counter()
    theirs = vae.sparse2mesh(sp.SparseTensor(vals[:, None], torch.cat([torch.zeros(len(c), 1, dtype=torch.int32),
                                                                        torch.from_numpy(c).int()], 1)),
                             voxel_resolution=res, mc_threshold=level)[0]
    sec_t = time.perf_counter() - t0
    t0 = time.perf_counter()
    verts, faces = lewiner_marching_cubes(torch.from_numpy(c), vals, res, level, fill=1.0, world=True,
                                          world_offset=0.0)
    sec_o = time.perf_counter() - t0
    vo, fo = verts.double().numpy(), faces.numpy()
    vt, ft = np.asarray(theirs.vertices, dtype=np.float64), np.asarray(theirs.faces)
    dist = vertex_distance(vo, vt)
    diff = face_set_difference(vo, fo, vt, ft)
    return {"row": name, "vertices_ours": len(vo), "vertices_theirs": len(vt), "faces_ours": len(fo),
            "faces_theirs": len(ft), "max_vertex_distance": dist, "faces_not_matched": diff, "bound": 1e-4,
            "ok": dist <= 1e-4 and diff == 0, "seconds_ours": sec_o, "seconds_theirs": sec_t, "device": "cpu",
            "decoded_voxels": len(c)}


del math
