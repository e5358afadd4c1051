"""Benchmark: submanifold sparse conv 3^3 at ~1M voxels of a real mesh shell vs dense ``F.conv3d`` (paper Sec. 3.1).

The coordinates are a voxelised surface of pybullet_data's duck (``--make-data`` builds them here, where pybullet is
installed, into ``bench/data/duck_shell_<R>.npz``: int16 [N, 3]). On the GPU: channels 32/64/128, fp16 and bf16,
forward and forward+backward, median ms (``triton.testing.do_bench``), effective TFLOP/s counted on the real pairs
(``2 * pairs * Cin * Cout`` per forward, 3x that for forward+backward), next to ``F.conv3d`` on the dense grid of the
same extent wherever it fits in memory. A correctness check against dense ``conv3d`` on a crop runs first.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 bench/sparse_conv.py --out $OUT

``--triton`` (issue 9) times the implicit-GEMM Triton path against the gather-scatter reference in the same run on
three sets built from the same shell (100k: downscaled x0.3; 1M: the shell; 10M: resampled to 1024^3 and dilated,
see ``shell_sets``), channels 32/64/128, fp16/bf16, forward and forward+backward, with spconv if it imports, dense
conv3d where it fits (``--dense``), a tile-config sweep (``--sweep``) and the paper-size SS-VAE decode of a 46k-token
latent to 1024^3 (``--decode``); writes ``sparse_conv-triton-<card>.json``:

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 bench/sparse_conv.py --triton --sweep --dense --decode --out $OUT
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
if "--cpu-smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # this script's own process: Triton kernels in the interpreter

from d3s2.sparse import (  # noqa: E402
    SparseConv3d,
    SparseTensor,
    dense_padding,
    kernel_to_dense_weight,
    neighbor_map,
)
from timing import timed  # noqa: E402

DATA = ROOT / "bench" / "data"
DEFAULT_RES = 560


def make_data(resolution: int, mesh: str = "duck") -> Path:
    from d3s2.selfcheck import load_pybullet_mesh, surface_voxels

    vox = surface_voxels(load_pybullet_mesh(mesh), resolution, points_per_voxel=12.0)
    path = DATA / f"{mesh}_shell_{resolution}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, coords=vox.astype(np.int16), resolution=np.int32(resolution), mesh=mesh)
    os.replace(tmp, path)
    print(f"wrote {path}: {len(vox)} voxels at {resolution}^3, {path.stat().st_size / 1e6:.1f} MB")
    return path


def load_data(path: Path, device) -> tuple[torch.Tensor, int]:
    d = np.load(path)
    xyz = torch.from_numpy(d["coords"].astype(np.int32))
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int32), xyz], 1).to(device)
    return coords, int(d["resolution"])


def bench_ms(fn) -> float:
    if not torch.cuda.is_available():  # CPU smoke run of the script itself
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    # a single slow call (a dense fallback path) is reported as is rather than repeated
    fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    if s.elapsed_time(e) > 1000:
        return float(s.elapsed_time(e))
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    except ImportError:  # CUDA events
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return float(np.median(times))


def check_crop(coords: torch.Tensor, device) -> dict:
    """fp32 sparse conv (k3 s1, k2 s2) + gradients vs dense conv3d on a 96^3 crop of the shell."""
    lo = coords[:, 1:].float().mean(0).long() - 48
    sel = ((coords[:, 1:] >= lo) & (coords[:, 1:] < lo + 96)).all(1)
    c = coords[sel].clone()
    c[:, 1:] -= lo.to(c.dtype)
    torch.manual_seed(0)
    x = SparseTensor(torch.randn(len(c), 8, device=device), c, 1, 96)
    out = {"crop_voxels": int(len(c))}
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    for (k, s), backend in [(ks, b) for ks in [(3, 1), (2, 2)] for b in ("reference", "triton")]:
        if backend == "triton" and device.type != "cuda":  # the interpreter is far too slow for this crop
            continue
        conv = SparseConv3d(8, 16, k, s, backend=backend).to(device)
        feats = x.feats.clone().requires_grad_(True)
        y = conv(x.replace(feats))
        g = torch.randn_like(y.feats)
        (y.feats * g).sum().backward()
        y = y.detach()
        dense = x.to_dense().requires_grad_(True)
        w = kernel_to_dense_weight(conv.kernel.detach()).requires_grad_(True)
        ref = F.conv3d(dense, w, conv.bias.detach(), stride=s, padding=dense_padding(k))
        yc = y.coords.long()
        ref_rows = ref[0, :, yc[:, 1], yc[:, 2], yc[:, 3]].t()
        (ref_rows * g).sum().backward()
        xc = x.coords.long()
        gx_ref = dense.grad[0, :, xc[:, 1], xc[:, 2], xc[:, 3]].t()
        rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))  # noqa: E731
        key = f"k{k}s{s}" + ("" if backend == "reference" else "_triton")
        out[key] = {"fwd_rel_err": rel(y.feats, ref_rows.detach()), "dx_rel_err": rel(feats.grad, gx_ref)}
        for dt in (torch.float16, torch.bfloat16):
            with torch.no_grad():
                yh = conv.to(dt)(x.to(dt)).feats.float()
            out[key][f"{dt}".replace("torch.", "") + "_vs_fp32_rel"] = float(
                (yh - y.feats).norm() / y.feats.norm())
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # the device copy of the tree has no .git: pass --commit
        return "unknown"


def write_json(result: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


# ==================================================================================================================
# Implicit-GEMM Triton path vs the gather-scatter reference (issue 9): --triton
# ==================================================================================================================
def _unique_rows(xyz: torch.Tensor) -> torch.Tensor:
    side = int(xyz.max()) + 1
    key = (xyz[:, 0] * side + xyz[:, 1]) * side + xyz[:, 2]
    u = torch.unique(key)
    return torch.stack([u // (side * side), (u // side) % side, u % side], 1)


def resample_shell(xyz: torch.Tensor, factor: float) -> torch.Tensor:
    """Voxels of a grid ``factor`` times finer whose centre lies in an active voxel of ``xyz`` ([N, 3] int64):
    voxel j is active when ``floor((j + 0.5) / factor)`` is (nearest-neighbour resampling of the shell)."""
    lo = torch.ceil(xyz.double() * factor - 0.5).long()
    hi = torch.ceil((xyz + 1).double() * factor - 0.5).long()
    span = int((hi - lo).max())
    r = torch.arange(span, device=xyz.device)
    offs = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    out = []
    for o in offs:  # per offset keeps the temporaries at N rows
        cand = lo + o
        out.append(cand[(cand < hi).all(1)])
    return torch.cat(out)


def shell_sets(xyz560: torch.Tensor, res: int) -> dict:
    """The three benchmark sets from the one real shell (documented in the JSON):
    100k: the shell downscaled by 0.3 (unique floor(c * 0.3)); 1M: the shell itself; 10M: the shell resampled
    to 1024^3 at 92% of the grid (``resample_shell``) and dilated once by the 6-neighbourhood, i.e. a 1024^3-scale
    surface band a few voxels thick."""
    sets = {}
    small = _unique_rows(torch.floor(xyz560.double() * 0.3).long())
    sets["100k"] = (small, int(small.max()) + 1, "duck shell 560^3 downscaled x0.3: unique(floor(c*0.3))")
    sets["1M"] = (xyz560, res, "duck shell 560^3 (bench/data/duck_shell_560.npz)")
    fine = resample_shell(xyz560, 1024 * 0.92 / res)
    six = torch.tensor([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                       device=xyz560.device)
    dil = torch.cat([fine + o for o in six]).clamp_(0, 1023)
    big = _unique_rows(dil)
    sets["10M"] = (big, 1024, "duck shell resampled to 1024^3 at 92% of the grid (centre-in-voxel), dilated by the "
                              "6-neighbourhood")
    return sets


def _tensor(xyz: torch.Tensor, res: int, c: int, dt, dev) -> SparseTensor:
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int32, device=dev), xyz.to(dev, torch.int32)], 1)
    return SparseTensor(torch.zeros(len(xyz), c, device=dev, dtype=dt), coords, 1, res)


def _time_conv(conv, x: SparseTensor) -> tuple[float, float]:
    with torch.no_grad():
        fwd = bench_ms(lambda: conv(x))
    feats = x.feats.clone().requires_grad_(True)
    xg = x.replace(feats)
    g = torch.randn_like(x.feats[:, : conv.out_channels].contiguous()) if conv.stride == 1 else None
    if g is None:
        g = torch.randn_like(conv(x).feats)

    def fb():
        conv(xg).feats.backward(g)
        feats.grad = conv.kernel.grad = conv.bias.grad = None

    return fwd, bench_ms(fb)


def sweep_configs(x: SparseTensor, c: int, budget_s: float) -> dict:
    """Time forward / weight-gradient tile configs of the implicit GEMM on one shape; returns all timings."""
    from d3s2.sparse.kernels import implicit_gemm as ig
    from d3s2.sparse.kernels.conv_function import conv_plan

    plan = conv_plan(x, x, 3, 1)
    dev = x.device
    w = torch.randn(27, c, c, device=dev, dtype=x.dtype) / (27 * c) ** 0.5
    feats = torch.randn(x.num_voxels, c, device=dev, dtype=x.dtype)
    ref = ig.igemm_forward(feats, w, None, plan.table, plan.order, plan.num_out)
    t0 = time.perf_counter()
    res = {"fwd": [], "wgrad": []}
    base = ig.default_config(c, c, dev)
    cands = [base]  # the current default first, then a grid around it
    for bm, warps in ((128, 4), (128, 8), (64, 4), (256, 8)):
        for bn in sorted({min(c, 128), min(c, 64)}, reverse=True):
            for bk in sorted({min(c, 32), min(c, 64)}, reverse=True):
                for stages in (3, 2):
                    cfg = ig.KernelConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
                    if cfg not in cands:
                        cands.append(cfg)
    for cfg in cands:
        if time.perf_counter() - t0 > budget_s:
            break
        try:
            out = ig.igemm_forward(feats, w, None, plan.table, plan.order, plan.num_out, cfg)
            err = float((out.float() - ref.float()).abs().max())
            ms = bench_ms(lambda: ig.igemm_forward(feats, w, None, plan.table, plan.order, plan.num_out, cfg))
            res["fwd"].append({"cfg": cfg.__dict__, "ms": ms, "max_abs_diff": err})
        except Exception as exc:  # e.g. out of shared memory for a large tile
            res["fwd"].append({"cfg": cfg.__dict__, "error": str(exc).splitlines()[0][:160]})
    pin, pout, ptr = plan.pairs()
    g = torch.randn_like(feats)
    wref = ig.igemm_wgrad(feats, g, pin, pout, ptr, 27)
    wc = [base]
    for trans in (True, False):
        for bm in (128, 256, 64):
            for pps in (8, 16, 32):
                for bc in sorted({min(c, 64), min(c, 128)}):
                    cfg = ig.KernelConfig(wg_block_m=bm, wg_block_ci=bc, wg_block_co=bc, wg_programs_per_sm=pps,
                                          wg_warps=4 if bc * bc * bm <= 64 * 64 * 128 else 8, wg_trans_load=trans)
                    if cfg not in wc:
                        wc.append(cfg)
    t1 = time.perf_counter()
    for cfg in wc:
        if time.perf_counter() - t1 > 0.6 * budget_s:
            break
        try:
            dw = ig.igemm_wgrad(feats, g, pin, pout, ptr, 27, cfg)
            err = float((dw - wref).abs().max() / wref.abs().max())
            ms = bench_ms(lambda: ig.igemm_wgrad(feats, g, pin, pout, ptr, 27, cfg))
            res["wgrad"].append({"cfg": cfg.__dict__, "ms": ms, "rel_diff": err})
        except Exception as exc:
            res["wgrad"].append({"cfg": cfg.__dict__, "error": str(exc).splitlines()[0][:160]})
    for key in ("fwd", "wgrad"):
        ok = [r for r in res[key] if "ms" in r]
        res[f"best_{key}"] = min(ok, key=lambda r: r["ms"]) if ok else None
    res["default_cfg"] = ig.default_config(c, c, dev).__dict__
    return res


def spconv_rows(x: SparseTensor, c: int, dt) -> dict:
    """spconv 2.x SubMConv3d on the same voxels (indices built once, cached like our plan), if it imports."""
    import spconv.pytorch as spconv  # noqa: F401

    res = x.resolution
    st = spconv.SparseConvTensor(x.feats.new_zeros(x.num_voxels, c), x.coords.int().contiguous(), [res] * 3, 1)
    conv = spconv.SubMConv3d(c, c, 3, bias=True, indice_key="b").to(x.device, dt)
    warm = conv(st)  # builds the index pairs into warm.indice_dict
    feats = torch.randn(x.num_voxels, c, device=x.device, dtype=dt)
    xin = warm.replace_feature(feats)
    row = {}
    with torch.no_grad():
        row["spconv_fwd_ms"] = bench_ms(lambda: conv(xin))
    fg = feats.clone().requires_grad_(True)
    xg = warm.replace_feature(fg)
    g = torch.randn_like(feats)

    def fb():
        conv(xg).features.backward(g)
        fg.grad = conv.weight.grad = conv.bias.grad = None

    row["spconv_fwd_bwd_ms"] = bench_ms(fb)
    return row


def decode_rows(xyz560: torch.Tensor, res: int, dev, dt, scale: float = 0.88,
                backends=("triton", "reference"), reps: int = 3) -> dict:
    """SS-VAE (paper size, ``ss_vae_v1_1024``, random weights) decoding the latent of the duck shell to 1024^3: the
    latent tokens are the 128^3 cells of the shell scaled to ``scale`` of the grid (unique floor(c * 128 s / R))."""
    from d3s2.config import build_model

    lat = _unique_rows(torch.div(xyz560 * int(128 * scale * 1000), res * 1000, rounding_mode="floor"))
    torch.manual_seed(0)
    vae = build_model("ss_vae_v1_1024").eval().to(dev, dt)
    z_feats = torch.randn(len(lat), 16, device=dev, dtype=dt)
    out = {"latent_tokens": int(len(lat)), "latent_scale": scale, "dtype": str(dt).replace("torch.", ""),
           "model": "ss_vae_v1_1024 (random weights)"}
    cuda = dev.type == "cuda"
    for backend in backends:
        for m in vae.modules():
            if isinstance(m, SparseConv3d):
                m.backend = backend
        times = []
        peak = None
        for rep in range(reps):  # first run compiles / warms the allocator; every run builds its own maps
            z = _tensor(lat, 128, 16, dt, dev).replace(z_feats)
            with torch.no_grad():
                y, seconds, peak = timed(vae.decode, dev, z)
            times.append(seconds)
            nvox = y.num_voxels
            del y, z
        out[backend] = {"seconds": times, "median_s": float(np.median(times[1:] or times)), "peak_gib": peak,
                        "output_voxels": int(nvox)}
        if cuda:  # one more run with synchronising hooks: where the time goes (convs incl. their map/plan builds)
            spent: dict = {}
            hooks = []
            for name, m in vae.decoder.named_modules():
                if isinstance(m, SparseConv3d) or name.count(".") == 1 and name.startswith("blocks."):
                    key = "conv" if isinstance(m, SparseConv3d) else "transformer_blocks"

                    def pre(mod, inp, key=key):
                        sync(dev)
                        mod._t0 = time.perf_counter()

                    def post(mod, inp, outp, key=key):
                        sync(dev)
                        spent[key] = spent.get(key, 0.0) + time.perf_counter() - mod._t0

                    hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
            z = _tensor(lat, 128, 16, dt, dev).replace(z_feats)
            sync(dev)
            t = time.perf_counter()
            with torch.no_grad():
                y = vae.decode(z)
            sync(dev)
            spent["total"] = time.perf_counter() - t
            for h in hooks:
                h.remove()
            del y, z
            out[backend]["breakdown_s"] = spent
        print(f"decode {backend}: {out[backend]}", flush=True)
    return out


def order_ablation(xyz: torch.Tensor, res: int, dev, c: int = 64) -> dict:
    """Forward ms of the implicit GEMM with rows processed in Morton order (the default), in the data file's order
    (raster: x, y, z sorted) and in a random order: what the locality ordering buys."""
    from d3s2.sparse.kernels.conv_function import _build_plan
    from d3s2.sparse.kernels.implicit_gemm import igemm_forward

    out = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for name in ("morton", "raster", "random"):
        sx = xyz[torch.randperm(len(xyz), generator=g).to(dev)] if name == "random" else xyz
        x = _tensor(sx, res, c, torch.bfloat16, dev)
        plan = _build_plan(x, x, 3, 1, locality=name == "morton")
        feats = torch.randn(x.num_voxels, c, device=dev, dtype=torch.bfloat16)
        w = torch.randn(27, c, c, device=dev, dtype=torch.bfloat16) / (27 * c) ** 0.5
        out[f"{name}_fwd_ms"] = bench_ms(lambda: igemm_forward(feats, w, None, plan.table, plan.order, plan.num_out))
    return out


def triton_main(args, dev) -> int:
    card = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    slug = card.replace("NVIDIA ", "").replace(" ", "-").split("-")[0].lower()
    import triton

    path = args.data or DATA / f"duck_shell_{args.resolution}.npz"
    coords, res = load_data(path, dev)
    xyz = coords[:, 1:].long()
    result = {
        "benchmark": "sparse_conv-triton", "card": card, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": args.commit or git_commit(),
        "kernel": 3, "timing": "median ms, triton.testing.do_bench (warmup 25 ms, rep 200 ms); reference = "
        "gather-GEMM-scatter (backend='reference'), triton = implicit GEMM (backend='triton')",
        "flops": "effective: 2 * pairs * Cin * Cout per forward (real pairs only), 3x for forward+backward",
        "sets": {}, "rows": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / f"sparse_conv-triton-{slug}.json"
    t_start = time.perf_counter()
    if args.cpu_smoke:
        xyz = xyz[: 3000]
    sets = shell_sets(xyz, res)
    sets = {k: sets[k] for k in (args.sets or ["1M", "100k", "10M"])}  # the target size first
    if args.cpu_smoke:
        sets = {k: (v[0][:400], v[1], v[2]) for k, v in sets.items()}
    try:
        import spconv.pytorch  # noqa: F401
        have_spconv = True
        import spconv
        result["spconv"] = getattr(spconv, "__version__", "?")
    except Exception as exc:
        have_spconv = False
        result["spconv"] = f"not available: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"
    print(f"{card}, torch {torch.__version__}, triton {triton.__version__}, spconv: {result['spconv']}", flush=True)

    if args.sweep and dev.type == "cuda":
        xs, rs, _ = sets.get("1M", next(iter(sets.values())))
        result["sweep"] = {}
        for c in args.sweep_channels or args.channels:
            result["sweep"][c] = sweep_configs(_tensor(xs, rs, c, torch.bfloat16, dev), c, args.sweep_budget_s)
            b = result["sweep"][c]
            print(f"sweep C={c}: best fwd {b['best_fwd']}\n  best wgrad {b['best_wgrad']}", flush=True)
            write_json(result, out_json)
        if args.apply_sweep:
            from d3s2.sparse.kernels import implicit_gemm as ig

            tuned = {}
            for c, b in result["sweep"].items():
                if b["best_fwd"] and b["best_wgrad"]:
                    f = {k: v for k, v in b["best_fwd"]["cfg"].items() if not k.startswith("wg_")}
                    w = {k: v for k, v in b["best_wgrad"]["cfg"].items() if k.startswith("wg_")}
                    tuned[(c, c)] = ig.KernelConfig(**f, **w)
            ig.TUNING["gpu"] = lambda cin, cout: tuned.get((cin, cout))
            result["applied_configs"] = {f"{k[0]}x{k[1]}": v.__dict__ for k, v in tuned.items()}
            print("rows below use the sweep's best configs:", result["applied_configs"], flush=True)

    from d3s2.sparse.kernels.conv_function import conv_plan

    if dev.type == "cuda" and "1M" in sets:
        result["order_ablation"] = order_ablation(sets["1M"][0], sets["1M"][1], dev)
        print("row order ablation (1M, C64 bf16, forward):", result["order_ablation"], flush=True)
    for name, (sx, sres, how) in sets.items():
        x0 = _tensor(sx, sres, 1, torch.float32, dev)
        sync(dev)
        t = time.perf_counter()
        nmap, _ = neighbor_map(x0, 3)
        sync(dev)
        ref_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        plan = conv_plan(x0, x0, 3, 1)
        sync(dev)
        plan_ms = (time.perf_counter() - t) * 1e3
        pairs = nmap.num_pairs
        assert plan.num_pairs == pairs, (plan.num_pairs, pairs)
        result["sets"][name] = {"voxels": int(x0.num_voxels), "resolution": sres, "how": how, "pairs": pairs,
                                "pairs_per_voxel": pairs / max(1, x0.num_voxels), "reference_map_ms": ref_ms,
                                "triton_plan_ms": plan_ms}
        print(f"[{name}] {x0.num_voxels} voxels at {sres}^3, {pairs / max(1, x0.num_voxels):.2f} pairs/voxel; "
              f"map {ref_ms:.1f} ms (reference), plan {plan_ms:.1f} ms (triton)", flush=True)
        for c in args.channels:
            for dname in args.dtypes:
                dt = getattr(torch, dname)
                x = x0.replace(torch.randn(x0.num_voxels, c, device=dev, dtype=dt))
                row = {"set": name, "voxels": int(x0.num_voxels), "channels": c, "dtype": dname}
                conv = SparseConv3d(c, c, 3).to(dev, dt)
                with torch.no_grad():
                    conv.backend = "triton"
                    yt = conv(x).feats.float()
                    conv.backend = "reference"
                    yr = conv(x).feats.float()
                row["rel_err_vs_reference"] = float((yt - yr).norm() / yr.norm().clamp(min=1e-12))
                del yt, yr
                fwd_flop = 2.0 * pairs * c * c
                for backend in ("triton", "reference"):
                    if backend == "reference" and dname != "bfloat16" and not args.reference_all_dtypes:
                        continue
                    if time.perf_counter() - t_start > args.time_budget_s:
                        row[f"{backend}_note"] = "skipped: time budget"
                        continue
                    conv.backend = backend
                    f, fb = _time_conv(conv, x)
                    row[f"{backend}_fwd_ms"], row[f"{backend}_fwd_bwd_ms"] = f, fb
                    row[f"{backend}_fwd_tflops"] = fwd_flop / f / 1e9
                    row[f"{backend}_fwd_bwd_tflops"] = 3 * fwd_flop / fb / 1e9
                if "triton_fwd_ms" in row:
                    from d3s2.sparse.kernels.implicit_gemm import igemm_wgrad

                    pl = conv_plan(x, x, 3, 1)
                    pin, pout, ptr = pl.pairs()
                    gg = torch.randn_like(x.feats)
                    row["triton_wgrad_ms"] = bench_ms(lambda: igemm_wgrad(x.feats, gg, pin, pout, ptr, 27))
                    del gg
                if row.get("reference_fwd_ms") and row.get("triton_fwd_ms"):
                    row["speedup_fwd"] = row["reference_fwd_ms"] / row["triton_fwd_ms"]
                    row["speedup_fwd_bwd"] = row["reference_fwd_bwd_ms"] / row["triton_fwd_bwd_ms"]
                if have_spconv and dev.type == "cuda" and (name != "10M" or c == 64):
                    try:
                        row.update(spconv_rows(x, c, dt))
                    except Exception as exc:
                        row["spconv_note"] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                if args.dense and dev.type == "cuda" and (name == "100k" or (name == "1M" and c == 64)) \
                        and dname == "bfloat16":
                    try:
                        dense = torch.randn(1, c, sres, sres, sres, device=dev, dtype=dt)
                        w = torch.randn(c, c, 3, 3, 3, device=dev, dtype=dt)
                        with torch.no_grad():
                            row["dense_fwd_ms"] = bench_ms(lambda: F.conv3d(dense, w, padding=1))
                        dense.requires_grad_(True)
                        w.requires_grad_(True)
                        gd = torch.randn_like(dense)

                        def dfb():
                            F.conv3d(dense, w, padding=1).backward(gd)
                            dense.grad = w.grad = None

                        row["dense_fwd_bwd_ms"] = bench_ms(dfb)
                        row["dense_grid"] = sres
                    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                        row["dense_note"] = str(exc).splitlines()[0][:200]
                    finally:
                        dense = w = gd = None
                        torch.cuda.empty_cache()
                elif name == "10M":
                    row["dense_note"] = "1024^3 x C dense grid does not fit (>= 64 GiB at C 32 bf16)"
                result["rows"].append(row)
                write_json(result, out_json)
                fmt = lambda v: "  n/a " if v is None else f"{v:7.2f}"  # noqa: E731
                print(f"[{name}] C={c:3d} {dname:8s} triton fwd {fmt(row.get('triton_fwd_ms'))} fb "
                      f"{fmt(row.get('triton_fwd_bwd_ms'))} | ref fwd {fmt(row.get('reference_fwd_ms'))} fb "
                      f"{fmt(row.get('reference_fwd_bwd_ms'))} | spconv fwd {fmt(row.get('spconv_fwd_ms'))} fb "
                      f"{fmt(row.get('spconv_fwd_bwd_ms'))} | err {row['rel_err_vs_reference']:.1e}", flush=True)
                del x, conv
        del x0, nmap, plan
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if args.decode and dev.type == "cuda":
        try:
            result["decode"] = decode_rows(xyz, res, dev, torch.bfloat16)
        except Exception as exc:
            result["decode"] = {"error": str(exc).splitlines()[0][:300]}
            print("decode failed:", exc, flush=True)
    result["total_s"] = time.perf_counter() - t_start
    write_json(result, out_json)
    print(f"wrote {out_json}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-data", action="store_true", help="voxelise the mesh here (needs pybullet) and exit")
    ap.add_argument("--resolution", type=int, default=DEFAULT_RES)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--commit", default=None, help="git commit to record (the device copy has no .git)")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--dense-budget-s", type=float, default=90.0, help="stop starting dense runs after this long")
    ap.add_argument("--cpu-smoke", action="store_true", help="run on the CPU (tiny data) to test the script")
    ap.add_argument("--triton", action="store_true", help="implicit-GEMM Triton path vs the reference (issue 9): "
                    "100k / 1M / 10M voxels, spconv if installed, SS-VAE decode to 1024^3")
    ap.add_argument("--sets", nargs="+", default=None, help="with --triton: subset of 100k 1M 10M")
    ap.add_argument("--sweep", action="store_true", help="with --triton: time tile configs first")
    ap.add_argument("--sweep-budget-s", type=float, default=20.0)
    ap.add_argument("--sweep-channels", type=int, nargs="+", default=None)
    ap.add_argument("--apply-sweep", action="store_true", help="time the rows with the sweep's best configs")
    ap.add_argument("--time-budget-s", type=float, default=240.0, help="with --triton: stop starting timings")
    ap.add_argument("--reference-all-dtypes", action="store_true", help="time the reference in fp16 too")
    ap.add_argument("--dense", action="store_true", help="with --triton: dense conv3d where it fits")
    ap.add_argument("--decode", action="store_true", help="with --triton: SS-VAE decode of a 46k latent to 1024^3")
    args = ap.parse_args()
    if args.make_data:
        make_data(args.resolution)
        return 0
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("this benchmark needs a CUDA device (--cpu-smoke runs it tiny on the CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.triton:
        return triton_main(args, dev)
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    slug = card.replace("NVIDIA ", "").replace(" ", "-").split("-")[0].lower()  # e.g. h100
    path = args.data or DATA / f"duck_shell_{args.resolution}.npz"
    coords, res = load_data(path, dev)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "benchmark": "sparse_conv", "card": card, "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": args.commit or git_commit(),
        "data": path.name, "resolution": res, "voxels": int(len(coords)), "kernel": 3,
        "timing": "median ms, triton.testing.do_bench (warmup 25 ms, rep 200 ms)", "rows": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / f"sparse_conv-{slug}.json"
    print(f"{card}, torch {torch.__version__}, triton {triton_version}; {len(coords)} voxels at {res}^3")

    result["check"] = check_crop(coords, dev)
    print("check vs dense conv3d on a crop (fp32):", json.dumps(result["check"]))

    x0 = SparseTensor(torch.zeros(len(coords), 1, device=dev), coords, 1, res)
    sync(dev)
    t = time.perf_counter()
    nmap, _ = neighbor_map(x0, 3)
    sync(dev)
    result["map_build_ms"] = (time.perf_counter() - t) * 1e3
    pairs = nmap.num_pairs
    result["pairs"] = pairs
    print(f"neighbour map: {pairs} pairs ({pairs / len(coords):.2f} per voxel), "
          f"built in {result['map_build_ms']:.1f} ms")
    t = time.perf_counter()
    x_sorted = SparseTensor(torch.zeros(len(coords), 1, device=dev), coords, 1, res)  # construction incl. dup check
    sync(dev)
    result["tensor_build_ms"] = (time.perf_counter() - t) * 1e3
    del x_sorted

    free_bytes = torch.cuda.mem_get_info()[0] if dev.type == "cuda" else 2**30
    rows = {}
    for c in args.channels:  # sparse first: the numbers this benchmark exists for
        for dname in args.dtypes:
            dt = getattr(torch, dname)
            row = {"channels": c, "dtype": dname}
            conv = SparseConv3d(c, c, 3, backend="reference").to(dev, dt)
            x = x0.replace(torch.randn(len(coords), c, device=dev, dtype=dt))
            fwd_flop = 2.0 * pairs * c * c
            with torch.no_grad():
                row["sparse_fwd_ms"] = bench_ms(lambda: conv(x))
            feats = x.feats.clone().requires_grad_(True)
            xg = x.replace(feats)
            g = torch.randn(len(coords), c, device=dev, dtype=dt)

            def fb():
                conv(xg).feats.backward(g)
                feats.grad = conv.kernel.grad = conv.bias.grad = None

            row["sparse_fwd_bwd_ms"] = bench_ms(fb)
            row["sparse_fwd_tflops"] = fwd_flop / row["sparse_fwd_ms"] / 1e9
            row["sparse_fwd_bwd_tflops"] = 3 * fwd_flop / row["sparse_fwd_bwd_ms"] / 1e9
            del feats, xg, x, conv, g
            rows[(c, dname)] = row
            result["rows"].append(row)
            write_json(result, out_json)
            print(f"C={c:4d} {dname:9s} sparse fwd {row['sparse_fwd_ms']:7.2f} ms "
                  f"({row['sparse_fwd_tflops']:5.1f} TF/s)"
                  f"  fwd+bwd {row['sparse_fwd_bwd_ms']:7.2f} ms ({row['sparse_fwd_bwd_tflops']:5.1f} TF/s)")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        free_bytes = torch.cuda.mem_get_info()[0]
    # cuDNN's exhaustive search spent minutes on the 560^3 backward (first H100 run): use its heuristics
    torch.backends.cudnn.benchmark = False
    t_dense = time.perf_counter()
    for (c, dname), row in rows.items():  # dense conv3d on the full grid: x, y (+ grad y, grad x) in dt
        dt = getattr(torch, dname)
        elem = res**3 * c * torch.finfo(dt).bits // 8
        dense_flop = 2.0 * res**3 * 27 * c * c
        row["dense_grid"] = res
        for name, ntens in (("fwd", 2), ("fwd_bwd", 4)):
            key = f"dense_{name}_ms"
            row[key] = None
            if args.no_dense:
                continue
            if ntens * elem > 0.7 * free_bytes:
                row[f"dense_{name}_note"] = f"does not fit ({ntens} x {elem / 2**30:.1f} GiB)"
                continue
            if time.perf_counter() - t_dense > args.dense_budget_s:
                row[f"dense_{name}_note"] = "skipped: dense time budget spent"
                continue
            dense = w = gd = None
            try:
                dense = torch.randn(1, c, res, res, res, device=dev, dtype=dt)
                w = torch.randn(c, c, 3, 3, 3, device=dev, dtype=dt)
                if name == "fwd":
                    with torch.no_grad():
                        row[key] = bench_ms(lambda: F.conv3d(dense, w, padding=1))
                else:
                    dense.requires_grad_(True)
                    w.requires_grad_(True)
                    gd = torch.randn(1, c, res, res, res, device=dev, dtype=dt)

                    def dfb():
                        F.conv3d(dense, w, padding=1).backward(gd)
                        dense.grad = w.grad = None

                    row[key] = bench_ms(dfb)
                row[f"dense_{name}_tflops"] = (dense_flop if name == "fwd" else 3 * dense_flop) / row[key] / 1e9
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:  # e.g. > 2^31 elements for cuDNN
                row[key] = None
                row[f"dense_{name}_note"] = str(exc).splitlines()[0][:200]
            finally:
                dense = w = gd = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            write_json(result, out_json)
    print(f"\n{'C':>4} {'dtype':9} {'sparse fwd ms':>13} {'TF/s':>6} {'fwd+bwd ms':>11} {'TF/s':>6} | "
          f"{'dense fwd ms':>12} {'fwd+bwd ms':>11}")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for (c, dname), row in rows.items():
        print(f"{c:4d} {dname:9} {row['sparse_fwd_ms']:13.2f} {row['sparse_fwd_tflops']:6.1f} "
              f"{row['sparse_fwd_bwd_ms']:11.2f} {row['sparse_fwd_bwd_tflops']:6.1f} | "
              f"{fmt(row.get('dense_fwd_ms')):>12} {fmt(row.get('dense_fwd_bwd_ms')):>11}")
    if dev.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    write_json(result, out_json)
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
