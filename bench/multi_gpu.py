"""Multi-GPU training benchmark (issue 10): ``d3s2 train`` under ``torchrun`` on 1 GPU and on N GPUs of one machine, in
one call: SS-DiT (paper size, DDP and FSDP2) and SS-VAE (paper size, DDP), and a stop + ``--resume`` check on N GPUs.

    bash bench/multi_gpu.sh                                           # device machine (wheels + meshes from .whl/)
    PYTHONPATH=src python3 bench/multi_gpu.py --out $OUT --wheels .whl --meshes-tgz .whl/demo_meshes.tgz
    PYTHONPATH=src python bench/multi_gpu.py --cpu --out /tmp/mg      # CPU check: gloo, tiny configs, 1 vs 2 processes

Steps (each recorded in the JSON; a failing step is recorded and the rest still runs):

1. Data: ``--num-meshes`` pybullet meshes (duck, mug + random_urdfs of demo/split.json's training list; on the
   GPU machine from the ``demo/pack_meshes.sh`` tarball) -> ``d3s2 prepare --resolutions 512 --views 2 --image-size
   518 --device cpu`` (libigl SDFs, one worker per mesh) -> random-init SS-VAE (``ss_vae_v1``) and DINOv2
   ViT-L/14-reg weight files -> ``d3s2 encode-latents --resolutions 512`` (64^3 latent grid; the token count per
   sample is whatever the meshes give, reported; Table 1's 512^3 phase averages ~10655).
2. Runs, in this order (``bench/configs/multi_gpu_*.yaml``; every rank logs ``metrics_rank<r>.jsonl``):
   ``dit_1gpu`` (one process: the trainer wraps nothing at world size 1, so it is the baseline of DDP and FSDP2),
   ``dit_ddp_<N>gpu``, ``dit_fsdp_<N>gpu``, the resume check ``resume_ddp_<N>gpu`` = ``--stop-at K/2`` (writes a
   checkpoint) then ``--resume --stop-at K`` in one log folder, whose per-step losses are compared with the first K
   steps of ``dit_ddp_<N>gpu`` (the same config: same ``max_steps``, seed, data), then ``vae_1gpu`` and
   ``vae_ddp_<N>gpu``. Optional (``--fsdp-resume``, last): the resume check under FSDP2.
3. Parsing (per step, from every rank's log): step time ``dt = batch * world / samples_per_s`` (the trainer's own
   interval), tokens of each rank ``tokens_per_s * dt / world``; steady state = the steps after ``--warmup``.
   Throughput = all ranks' tokens / summed step time; scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU)
   (weak scaling: the per-GPU batch is fixed, as in Table 1). Peak memory: each rank's ``max_memory_allocated``
   (the trainer's ``gpu_mem_gb``) and the driver's view (nvidia-smi ``memory.used``, sampled each second).

A time budget (``--budget-s``) is kept: before each run the remaining runs are planned from measured start-up and step
times; step counts shrink to fit (never below warmup + 3 measured steps) and a run that cannot fit is skipped and
recorded. The JSON (``multi_gpu-<card>x<N>.json``) and a Markdown summary are rewritten after every step. NCCL's NVLink
multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1) in every child.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CPU_MESHES = ["duck.obj", "random_urdfs/000/000.obj", "random_urdfs/001/001.obj"]
# + evenly spaced random_urdfs of the train split (not teddy2_VHACD_CHs: overlapping convex hulls, slow winding sign)
GPU_NAMED = ["duck.obj", "objects/mug.obj"]


# ---------------------------------------------------------------------------------------------------------------------
# Log parsing (pure functions: tests/test_multi_gpu_smoke.py)


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: ignore it
                pass
    return out


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def run_metrics(log_dir: str | Path, world: int, batch_size: int, warmup: int) -> dict[str, Any]:
    """Per-step and steady-state numbers of one run from its ``metrics_rank<r>.jsonl`` files (``log.all_ranks``).

    The trainer logs, per rank and step (``log.every: 1``), the rank's own ``rank_tokens`` and its step interval
    ``interval_s`` (``samples_per_s`` / ``tokens_per_s`` are the whole job's, summed over ranks)."""
    ranks = [[r for r in read_jsonl(Path(log_dir) / f"metrics_rank{k}.jsonl") if r.get("kind") == "train"]
             for k in range(world)]
    # checkpoint / resume events go to the main log (metrics.jsonl, rank 0); the rank logs only get "end"
    main_log = Path(log_dir) / "metrics.jsonl"
    events = [r for r in read_jsonl(main_log if main_log.is_file() else Path(log_dir) / "metrics_rank0.jsonl")
              if r.get("kind") == "event"]
    out: dict[str, Any] = {"world": world, "batch_per_gpu": batch_size, "warmup_steps": warmup,
                           "events": [{k: v for k, v in e.items() if k != "kind"} for e in events]}
    if not ranks or not ranks[0]:
        out["steps_logged"] = 0
        return out
    by_step = [{r["step"]: r for r in rk} for rk in ranks]
    steps = sorted(set(by_step[0]).intersection(*[set(b) for b in by_step[1:]]))
    out["steps_logged"] = len(steps)
    out["losses"] = [[s, by_step[0][s]["loss"]] for s in steps]
    per_step = []
    for s in steps:
        recs = [b[s] for b in by_step]
        dts = [r["interval_s"] for r in recs if r.get("interval_s")]
        dt = dts[0] if dts else float("nan")
        toks = [float(r.get("rank_tokens", 0.0)) for r in recs]
        per_step.append({"step": s, "dt": dt, "tokens": [round(t, 3) for t in toks],
                         "mem_gib": [r.get("gpu_mem_gb") for r in recs]})
    out["per_step"] = [{"step": p["step"], "seconds": round(p["dt"], 4), "tokens_per_rank": [round(t) for t in
                        p["tokens"]]} for p in per_step]
    first = steps[0]
    window = [p for p in per_step if p["step"] - first >= warmup]  # steps of this launch after its warm-up
    out["window_steps"] = len(window)
    if window:
        dts = [p["dt"] for p in window]
        toks = [sum(p["tokens"]) for p in window]
        samples = batch_size * world * len(window)
        total = sum(dts)
        out.update(
            seconds_per_step_median=statistics.median(dts),
            seconds_per_step_mean=total / len(dts),
            seconds_per_step_p10_p90=[_q(dts, 0.1), _q(dts, 0.9)],
            tokens_per_step_mean=sum(toks) / len(toks),
            tokens_per_sample_mean=sum(toks) / samples,
            tokens_per_s=sum(toks) / total,
            tokens_per_s_per_gpu=sum(toks) / total / world,
            samples_per_s=samples / total,
            # the slowest rank sets the pace: mean over steps of max(rank tokens) / mean(rank tokens)
            token_imbalance=statistics.mean(max(p["tokens"]) / max(1e-9, sum(p["tokens"]) / world) for p in window),
        )
    mems = [[r.get("gpu_mem_gb") for r in rk if r.get("gpu_mem_gb") is not None] for rk in ranks]
    if all(mems):
        out["peak_alloc_gib_per_rank"] = [round(max(m), 3) for m in mems]
    end = [e for e in events if e.get("event") == "end"]
    if end:
        out["end_weights_digest"] = end[-1].get("weights")
    return out


def compare_losses(ref: list, other: list, split_step: int, rel_tol: float = 1e-2) -> dict[str, Any]:
    """Per-step losses of an uninterrupted run (``ref``) vs a run stopped after ``split_step`` and resumed
    (``other``), both ``[[step, loss], ...]``. Before the stop both runs are plain runs of the same config, so their
    difference there is the run-to-run noise (nondeterministic GPU reductions); after it, the resume's."""
    r, o = {int(s): float(v) for s, v in ref}, {int(s): float(v) for s, v in other}
    common = sorted(set(r) & set(o))
    pre = [s for s in common if s <= split_step]
    post = [s for s in common if s > split_step]

    def stats(ss: list[int]) -> dict[str, Any]:
        d = [abs(r[s] - o[s]) for s in ss]
        rel = [abs(r[s] - o[s]) / max(1e-12, abs(r[s])) for s in ss]
        return {"steps": len(ss), "bit_exact": sum(r[s] == o[s] for s in ss),
                "max_abs_diff": max(d) if d else None, "max_rel_diff": max(rel) if rel else None}

    res = {"split_step": split_step, "steps_compared": len(common), "missing_steps": sorted(set(r) - set(o)),
           "before_stop": stats(pre), "after_resume": stats(post),
           "ref_losses": [[s, r[s]] for s in common], "resumed_losses": [[s, o[s]] for s in common]}
    a = res["after_resume"]
    if not post:
        res["verdict"] = "no steps after the resume to compare"
    elif a["bit_exact"] == len(post) and res["before_stop"]["bit_exact"] == len(pre):
        res["verdict"] = "bit-exact"
    elif a["max_rel_diff"] <= rel_tol and pre and res["before_stop"]["bit_exact"] == len(pre):
        res["verdict"] = (f"same losses within {rel_tol:g} relative, but not bit-exact after the resume although the "
                          "uninterrupted steps before the stop were: check what the checkpoint does not restore")
    elif a["max_rel_diff"] <= rel_tol:
        res["verdict"] = (f"same losses within {rel_tol:g} relative (not bit-exact; before_stop shows the run-to-run "
                          "noise of two plain runs)")
    else:
        res["verdict"] = f"DIFFERENT: max relative loss difference {a['max_rel_diff']:.3g} after the resume"
    res["ok"] = bool(post) and (a["max_rel_diff"] or 0.0) <= rel_tol
    return res


def scaling(base: dict, other: dict) -> dict[str, Any]:
    """Weak scaling of ``other`` (N ranks) against ``base`` (1 rank), both :func:`run_metrics` results."""
    if not base.get("tokens_per_s") or not other.get("tokens_per_s"):
        return {}
    n = other["world"] / base["world"]
    return {"gpus": other["world"], "speedup_tokens_per_s": other["tokens_per_s"] / base["tokens_per_s"],
            "efficiency": other["tokens_per_s"] / (n * base["tokens_per_s"]),
            "step_time_ratio": other["seconds_per_step_mean"] / base["seconds_per_step_mean"]}


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def now() -> float:
    return time.time()


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def git_commit() -> str:
    """HEAD read from .git without running git (read-only; the working tree may hold uncommitted changes)."""
    try:
        g = ROOT / ".git"
        head = (g / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            if (g / ref).is_file():
                return (g / ref).read_text().strip()
            packed = g / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
            return "unknown"
        return head
    except OSError:
        return "unknown"


def tail(path: Path, n: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def first_error(text: str) -> str:
    """The first line of a log that names an error (the trainer's one-line D3S2Error, an exception, OOM)."""
    keys = ("error:", "Error:", "out of memory")
    for line in text.splitlines():
        if any(k in line for k in keys) and "elastic/multiprocessing" not in line and "ChildFailedError" not in line:
            return " ".join(line.split())[:300]
    return ""


class GpuMemSampler:
    """nvidia-smi ``memory.used`` of every GPU once a second (the driver's view: allocator cache, CUDA context and
    NCCL buffers included)."""

    def __init__(self, period: float = 1.0) -> None:
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.ok = shutil.which("nvidia-smi") is not None
        self._t = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "GpuMemSampler":
        if self.ok:
            self._t.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                o = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True, timeout=10).stdout
                t = now()
                for line in o.strip().splitlines():
                    i, m = (x.strip() for x in line.split(","))
                    self.samples.append((t, int(i), float(m)))
            except Exception:  # noqa: BLE001 - a missed sample is harmless
                pass
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()

    def peak(self, t0: float, t1: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for t, i, m in list(self.samples):
            if t0 <= t <= t1:
                out[str(i)] = max(out.get(str(i), 0.0), m)
        return out


# ---------------------------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args) -> None:
        self.a = args
        self.t0 = now()
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.py = sys.executable
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(NVLS_OFF, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "4" if not args.cpu else "1")
        if args.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        self.env = env
        self.doc: dict[str, Any] = {"bench": "multi_gpu", "mode": "cpu-gloo" if args.cpu else "gpu",
                                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "commit": git_commit(), "args": vars(args), "env": dict(NVLS_OFF),
                                    "steps": {}, "runs": {}, "scaling": {}, "resume": {}, "notes": []}
        self.sampler = GpuMemSampler().start() if not args.cpu else None
        # start-up / step estimates (seconds) for the planner; replaced by measured values as runs finish
        if args.cpu:
            self.est = {"dit": {"startup": 15.0, "step": 1.0}, "vae": {"startup": 10.0, "step": 1.0},
                        "save": 2.0, "load": 2.0}
        else:
            self.est = {"dit": {"startup": 35.0, "step": 2.5}, "vae": {"startup": 25.0, "step": 3.5},
                        "save": 30.0, "load": 20.0}
        self.name = "multi_gpu"

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return now() - self.t0

    def remaining(self) -> float:
        return self.a.budget_s - self.elapsed()

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        atomic_write(self.out / f"{self.name}.json", json.dumps(self.doc, indent=1, default=str))
        atomic_write(self.out / f"{self.name}.md", summary_markdown(self.doc))

    def log(self, msg: str) -> None:
        print(f"[multi_gpu {self.elapsed():6.1f}s] {msg}", flush=True)

    def sh(self, step: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict[str, Any]:
        """Run a command (own process group, killed as a group on timeout); record it under doc['steps']."""
        logf = self.work / "logs" / f"{step}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        rec: dict[str, Any] = {"cmd": " ".join(cmd), "timeout_s": round(timeout, 1)}
        self.log(f"{step}: {' '.join(cmd)[:300]}")
        t = now()
        rc = self._spawn(cmd, logf, timeout, env or self.env)
        rec.update(rc=rc, seconds=round(now() - t, 1))
        if rc != 0:
            why = first_error(tail(logf, 200_000))
            rec["error"] = ("timeout" if rc == -999 else f"exit {rc}") + (f": {why}" if why else "")
            rec["log_tail"] = tail(logf)
            self.log(f"{step}: FAILED ({rec['error']})\n{tail(logf, 1500)}")
        self.doc["steps"][step] = rec
        self.save()
        return rec

    def _spawn(self, cmd: list[str], logf: Path, timeout: float, env: dict) -> int:
        with open(logf, "wb") as fh:
            p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
            try:
                return p.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                    try:
                        os.killpg(p.pid, sig)  # the group this script started (torchrun and its ranks)
                    except ProcessLookupError:
                        break
                    try:
                        p.wait(timeout=grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                return -999

    # -- environment ------------------------------------------------------------------------------------------
    def environment(self) -> None:
        code = ("import json, platform, torch\n"
                "try:\n import triton; tv = triton.__version__\nexcept Exception: tv = None\n"
                "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
                "try:\n v = torch.cuda.nccl.version()\n"
                " nccl = '.'.join(map(str, v)) if isinstance(v, tuple) else str(v)\n"
                "except Exception: nccl = None\n"
                "print(json.dumps({'torch': torch.__version__, 'triton': tv, 'cuda': torch.version.cuda,"
                " 'python': platform.python_version(), 'gpus': n, 'cpus': __import__('os').cpu_count(),"
                " 'gpu_names': [torch.cuda.get_device_name(i) for i in range(n)], 'nccl': nccl if n else None}))")
        try:
            o = subprocess.run([self.py, "-c", code], capture_output=True, text=True, env=self.env, timeout=120)
            info = json.loads(o.stdout.strip().splitlines()[-1])
        except Exception as exc:  # noqa: BLE001
            info = {"error": f"{type(exc).__name__}: {exc}"}
        self.doc.update(info)
        if self.a.cpu:
            self.gpus = 2
            self.doc["card"] = "cpu-gloo"
        else:
            n = int(info.get("gpus") or 0)
            self.gpus = self.a.gpus or n
            if n < 2 or self.gpus > n or self.gpus < 2:
                msg = (f"{n} GPU(s) visible, need >= 2 (asked for {self.gpus or 'all'}); use --cpu on a machine "
                       "without GPUs")
                self.doc["notes"].append(msg)
                self.save()
                raise RuntimeError(msg)
            name = (info.get("gpu_names") or ["gpu"])[0].lower()
            self.doc["card"] = next((k for k in ("h200", "h100", "a100", "l40", "4090") if k in name),
                                    name.replace(" ", "-"))
            try:
                self.doc["nvidia_smi_topo"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True,
                                                             text=True, timeout=30).stdout[-2000:]
            except Exception:  # noqa: BLE001
                pass
        self.name = f"multi_gpu-{self.doc['card']}x{self.gpus}"
        self.doc["nproc"] = self.gpus
        self.log(f"environment: {json.dumps(info)[:400]}; writing {self.out / (self.name + '.json')}")
        self.save()

    # -- data ---------------------------------------------------------------------------------------------------
    def install_wheels(self) -> None:
        chk = [self.py, "-c", "import trimesh, igl"]
        if subprocess.run(chk, capture_output=True, env=self.env).returncode == 0:
            return
        wheels = sorted(glob.glob(str(Path(self.a.wheels or ROOT / ".whl") / "*.whl")))
        if not wheels:
            self.doc["notes"].append("trimesh / libigl missing and no wheels found (--wheels)")
            return
        rec = self.sh("install_wheels", [self.py, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *wheels],
                      180)
        if rec["rc"] != 0 and shutil.which("pip"):
            self.sh("install_wheels_pip", ["pip", "install", "--no-index", "--no-deps", "-q", *wheels], 180)

    def mesh_list(self) -> tuple[Path, list[str]]:
        if self.a.cpu:
            import pybullet_data  # CPU machine: the installed package (nothing copied into the repo)

            return Path(pybullet_data.getDataPath()), CPU_MESHES[: self.a.num_meshes]
        if self.a.meshes_tgz and not Path(self.a.meshes_tgz).is_file():
            self.doc["notes"].append(f"{self.a.meshes_tgz} not found: meshes from pybullet_data instead")
        if self.a.meshes_tgz and Path(self.a.meshes_tgz).is_file():
            root = self.work / "mesh_src"
            if not (root / "duck.obj").is_file():
                root.mkdir(parents=True, exist_ok=True)
                with tarfile.open(self.a.meshes_tgz) as tf:
                    if hasattr(tarfile, "data_filter"):  # Python >= 3.12: refuse links / paths out of root
                        tf.extractall(root, filter="data")
                    else:
                        tf.extractall(root)
        else:
            import pybullet_data

            root = Path(pybullet_data.getDataPath())
        train = json.loads((ROOT / "demo" / "split.json").read_text())["train"]
        urdfs = sorted(p for p in train if p.startswith("random_urdfs/"))
        k = max(0, self.a.num_meshes - len(GPU_NAMED))
        picked = [urdfs[int(i * len(urdfs) / k)] for i in range(k)] if k else []
        return root, (GPU_NAMED + picked)[: self.a.num_meshes]

    def data(self) -> bool:
        a = self.a
        self.install_wheels()
        root, rels = self.mesh_list()
        stage = self.work / "meshes"
        for rel in rels:
            for src in (root / rel, (root / rel).with_suffix(".mtl")):
                dst = stage / src.relative_to(root)
                if src.is_file() and not dst.is_symlink():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(src, dst)
        self.data_dir = self.work / "data"
        # GPU: 512^3 only, for both models (the SS-VAE runs at a fixed 512^3: the same work per voxel on 1 and N GPUs;
        # multi-resolution batches from a 512^3 file would also be resampled on a CPU core, 4-13 s per item)
        res = ["64"] if a.cpu else ["512"]
        cmd = [self.py, "-m", "d3s2.cli", "prepare", str(stage), str(self.data_dir), "--glob", "*.obj",
               "--resolutions", *res, "--views", "2", "--image-size", "28" if a.cpu else "518", "--supersample", "1",
               "--workers", str(a.prepare_workers), "--device", "cpu", "--no-progress"]
        if a.cpu:
            cmd += ["--tau", "0.0625"]
        self.sh("prepare", cmd, min(self.remaining() - 60, 240))
        items = read_jsonl(self.data_dir / "manifest.jsonl")
        r = int(res[-1])
        self.doc["data"] = {"meshes": rels, "items": len(items), "resolution": r,
                            "failed": len(read_jsonl(self.data_dir / "failures.jsonl")),
                            "sdf_voxels_per_item": {it["item_id"]: it["sdf"][str(r)]["voxels"] for it in items
                                                    if str(r) in it.get("sdf", {})},
                            "prepare_seconds_per_item": {it["item_id"]: it.get("seconds") for it in items}}
        if len(items) < 2:
            self.doc["notes"].append("too few prepared items: no training runs")
            self.save()
            return False
        # random-init weights: the frozen SS-VAE that encodes the latents and the frozen DINOv2 of the SS-DiT task
        self.vae_weights = self.work / "ss_vae_random.safetensors"
        self.dino_weights = self.work / "dinov2_random.safetensors"
        if not (self.vae_weights.is_file() and self.dino_weights.is_file()):
            env = dict(self.env, CUDA_VISIBLE_DEVICES="")
            self.sh("make_weights", [self.py, str(Path(__file__).resolve()), "--make-weights", "--work",
                                     str(self.work)] + (["--cpu"] if a.cpu else []), 300, env=env)
        vae = "ss_vae_tiny" if a.cpu else "ss_vae_v1"
        env = dict(self.env) if a.cpu else dict(self.env, CUDA_VISIBLE_DEVICES="0")
        self.sh("encode_latents", [self.py, "-m", "d3s2.cli", "encode-latents", str(self.data_dir), "--vae", vae,
                                   "--checkpoint", str(self.vae_weights), "--resolutions", str(r),
                                   "--device", "cpu" if a.cpu else "cuda"], min(self.remaining() - 60, 240), env=env)
        toks = {}
        import numpy as np

        for f in sorted(self.data_dir.glob(f"*/latent_{r}.npz")):
            with np.load(f) as z:
                toks[f.parent.name] = int(z["coords"].shape[0])
        self.doc["data"]["latent_tokens_per_item"] = toks
        if toks:
            v = list(toks.values())
            self.doc["data"]["latent_tokens_mean"] = sum(v) / len(v)
            self.doc["data"]["latent_tokens_min_max"] = [min(v), max(v)]
        self.save()
        return len(toks) >= 2

    # -- runs ---------------------------------------------------------------------------------------------------
    def run_specs(self) -> list[dict]:
        a, n = self.a, self.gpus
        sfx = "_cpu" if a.cpu else ""
        dit_cfg = str(HERE / "configs" / f"multi_gpu_ss_dit{sfx}.yaml")
        vae_cfg = str(HERE / "configs" / f"multi_gpu_ss_vae{sfx}.yaml")
        dit_bs, vae_bs = (2, 2) if a.cpu else (8, 2)
        for x in a.set_dit:  # the per-GPU batch is needed to read the logs
            dit_bs = int(x.split("=", 1)[1]) if x.startswith("data.batch_size=") else dit_bs
        for x in a.set_vae:
            vae_bs = int(x.split("=", 1)[1]) if x.startswith("data.batch_size=") else vae_bs
        specs = [
            dict(name="dit_1gpu", fam="dit", cfg=dit_cfg, strategy="ddp", nproc=1, steps=a.dit_steps, bs=dit_bs),
            dict(name=f"dit_ddp_{n}gpu", fam="dit", cfg=dit_cfg, strategy="ddp", nproc=n, steps=a.dit_steps,
                 bs=dit_bs),
            dict(name=f"dit_fsdp_{n}gpu", fam="dit", cfg=dit_cfg, strategy="fsdp", nproc=n, steps=a.dit_steps,
                 bs=dit_bs),
            dict(name=f"resume_ddp_{n}gpu", fam="dit", resume_of=f"dit_ddp_{n}gpu", strategy="ddp", nproc=n,
                 steps=a.resume_steps, bs=dit_bs, cfg=dit_cfg),
            dict(name="vae_1gpu", fam="vae", cfg=vae_cfg, strategy="ddp", nproc=1, steps=a.vae_steps, bs=vae_bs),
            dict(name=f"vae_ddp_{n}gpu", fam="vae", cfg=vae_cfg, strategy="ddp", nproc=n, steps=a.vae_steps,
                 bs=vae_bs),
        ]
        if a.fsdp_resume:
            specs.append(dict(name=f"resume_fsdp_{n}gpu", fam="dit", resume_of=f"dit_fsdp_{n}gpu", strategy="fsdp",
                              nproc=n, steps=a.resume_steps, bs=dit_bs, cfg=dit_cfg))
        try:  # the configs as shipped (each run's resolved config: multi_gpu_logs/<run>/config.json)
            import yaml

            self.doc["configs"] = {"dit": {"file": dit_cfg, **yaml.safe_load(Path(dit_cfg).read_text())},
                                   "vae": {"file": vae_cfg, **yaml.safe_load(Path(vae_cfg).read_text())},
                                   "extra_sets": {"dit": a.set_dit, "vae": a.set_vae}}
        except Exception as exc:  # noqa: BLE001 - documentation only
            self.doc["configs"] = {"error": str(exc)}
        only = set(a.runs.split(",")) if a.runs else None
        return [s for s in specs if only is None or s["name"].rsplit("_", 1)[0] in only or s["name"] in only]

    def cost(self, spec: dict, steps: int) -> float:
        e = self.est[spec["fam"]]
        if "resume_of" in spec:  # two launches, a checkpoint written and read
            return 2 * e["startup"] + steps * e["step"] + self.est["save"] + self.est["load"]
        return e["startup"] + steps * e["step"]

    def plan_steps(self, spec: dict, later: list[dict]) -> int:
        """Steps for this run so that it and the runs after it fit the remaining budget (all measured windows
        scaled by the same factor)."""
        w = self.a.warmup
        floor = w + 3 if "resume_of" not in spec else 2
        rem = self.remaining() - 10
        runs = [spec] + later
        fixed = sum(self.cost(s, 0) for s in runs)
        var = sum(self.cost(s, s["steps"]) - self.cost(s, 0) for s in runs)
        if fixed + var <= rem:
            return spec["steps"]
        f = max(0.0, (rem - fixed) / var) if var > 0 else 0.0
        base = 0 if "resume_of" in spec else w
        steps = max(floor, base + int((spec["steps"] - base) * f))
        if self.cost(spec, steps) > self.remaining() - 5:
            return 0
        return min(spec["steps"], steps)

    def sets(self, spec: dict, run_dir: Path, steps: int) -> list[str]:
        s = [f"data.root={self.data_dir}", f"log.dir={run_dir}", f"checkpoint.dir={run_dir / 'checkpoints'}",
             f"max_steps={steps}", f"distributed.strategy={spec['strategy']}"]
        if spec["fam"] == "dit":
            s.append(f"task_args.dinov2_weights={self.dino_weights}")
        return s + list(self.a.set_dit if spec["fam"] == "dit" else self.a.set_vae)

    def torchrun(self, spec: dict, name: str, sets: list[str], extra: list[str], timeout: float) -> dict:
        n = spec["nproc"]
        env = dict(self.env)
        if not self.a.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
        cmd = [self.py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "d3s2.cli", "train", spec["cfg"]]
        for x in sets:
            cmd += ["--set", x]
        cmd += extra
        t = now()
        rec = self.sh(name, cmd, timeout, env=env)
        rec["t_start"], rec["t_end"] = t, now()
        return rec

    def do_run(self, spec: dict, later: list[dict]) -> None:
        name = spec["name"]
        steps = self.plan_steps(spec, later)
        if steps <= 0:
            self.doc["runs"][name] = {"status": "skipped", "reason": f"time budget ({self.remaining():.0f} s left)"}
            self.log(f"{name}: skipped (budget)")
            self.save()
            return
        if steps < spec["steps"]:
            self.doc["notes"].append(f"{name}: {steps} steps instead of {spec['steps']} (time budget)")
        run_dir = self.work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        timeout = min(self.remaining() - 3, max(90.0, 2.0 * self.cost(spec, steps) + 60))  # + first-launch JIT
        rec = self.torchrun(spec, name, self.sets(spec, run_dir, steps), [], timeout)
        m = run_metrics(run_dir, spec["nproc"], spec["bs"], self.a.warmup)
        res = {"status": "ok" if rec["rc"] == 0 else ("timeout" if rec["rc"] == -999 else "failed"),
               "family": spec["fam"], "strategy": spec["strategy"] if spec["nproc"] > 1 else "none (1 process)",
               "gpus": spec["nproc"], "steps": steps, "wall_s": rec["seconds"], **m}
        if rec["rc"] != 0:
            res["error"] = rec.get("error")
            res["log_tail"] = rec.get("log_tail", "")[-1500:]
        if self.sampler is not None:
            res["nvidia_smi_peak_mib_per_gpu"] = self.sampler.peak(rec["t_start"], rec["t_end"])
        ps = m.get("per_step") or []
        if ps:
            stepsum = sum(p["seconds"] for p in ps)
            res["overhead_s"] = round(rec["seconds"] - stepsum, 1)  # start-up + teardown (digest, exit)
            e = self.est[spec["fam"]]
            if m.get("seconds_per_step_mean"):  # a run cut by its time limit still measured its steps
                e["step"] = m["seconds_per_step_mean"] * 1.05
            if res["status"] == "ok":
                e["startup"] = max(5.0, res["overhead_s"])
        self.doc["runs"][name] = res
        self.copy_logs(name, run_dir)
        self.log(f"{name}: {res['status']}, {m.get('steps_logged', 0)} steps, "
                 f"{m.get('seconds_per_step_median', float('nan')):.3f} s/step, "
                 f"{m.get('tokens_per_s', float('nan')):.0f} tokens/s, mem {m.get('peak_alloc_gib_per_rank')}")
        self.update_scaling()
        self.save()

    def do_resume(self, spec: dict, later: list[dict]) -> None:
        name, ref_name = spec["name"], spec["resume_of"]
        ref = self.doc["runs"].get(ref_name, {})
        if ref.get("status") != "ok" or not ref.get("losses"):
            self.doc["resume"][name] = {"status": "skipped", "reason": f"reference run {ref_name} did not finish"}
            self.save()
            return
        k = min(self.plan_steps(spec, later), ref["steps"])
        k -= k % 2
        if k < 2:
            self.doc["resume"][name] = {"status": "skipped", "reason": f"time budget ({self.remaining():.0f} s left)"}
            self.save()
            return
        run_dir = self.work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        # the reference's exact config (same max_steps: same schedule), only the folders and the exit checkpoint differ
        base = self.sets(spec, run_dir, ref["steps"])
        per = self.cost(spec, k) / 2 + 30
        t = now()
        r1 = self.torchrun(spec, f"{name}_stop", base + ["checkpoint.at_exit=true"], ["--stop-at", str(k // 2)],
                           min(self.remaining() - 3, 2 * per))
        r2 = None
        if r1["rc"] == 0:
            r2 = self.torchrun(spec, f"{name}_resume", base + ["checkpoint.at_exit=false"],
                               ["--resume", "--stop-at", str(k)], min(self.remaining() - 3, 2 * per))
        m = run_metrics(run_dir, spec["nproc"], spec["bs"], 0)
        res: dict[str, Any] = {"status": "ok" if r2 is not None and r2["rc"] == 0 else "failed",
                               "reference": ref_name, "strategy": spec["strategy"], "gpus": spec["nproc"],
                               "steps": k, "stop_at": k // 2, "stop_wall_s": r1["seconds"],
                               "resume_wall_s": r2["seconds"] if r2 else None, "events": m.get("events", [])}
        if res["status"] != "ok":
            res["error"] = (r2 or r1).get("error")
            res["log_tail"] = (r2 or r1).get("log_tail", "")[-1500:]
        ref_losses = [x for x in ref["losses"] if x[0] <= k]
        if m.get("losses"):
            res.update(compare_losses(ref_losses, m["losses"], k // 2, self.a.resume_rel_tol))
        ev = m.get("events", [])
        res["checkpoint_written_at"] = [e["step"] for e in ev if e.get("event") == "checkpoint"]
        res["resumed_from"] = [e["step"] for e in ev if e.get("event") == "resume"]
        if k == ref["steps"] and ref.get("end_weights_digest") and m.get("end_weights_digest"):
            res["end_weights_equal"] = ref["end_weights_digest"] == m["end_weights_digest"]
        if self.sampler is not None:
            res["nvidia_smi_peak_mib_per_gpu"] = self.sampler.peak(t, now())
        self.est["save"] = max(5.0, r1["seconds"] - self.est[spec["fam"]]["startup"] -
                               (k // 2) * self.est[spec["fam"]]["step"])
        self.doc["resume"][name] = res
        self.copy_logs(name, run_dir)
        self.log(f"{name}: {res['status']}, {res.get('verdict')}")
        self.save()

    def copy_logs(self, name: str, run_dir: Path) -> None:
        dst = self.out / "multi_gpu_logs" / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(run_dir.glob("metrics*.jsonl")) + sorted(run_dir.glob("config.json")):
            shutil.copy(f, dst / f.name)
        for f in sorted((self.work / "logs").glob(f"{name}*.log")):  # the launch's stdout / stderr (last 200 kB)
            (dst / f.name).write_text(tail(f, 200_000))

    def update_scaling(self) -> None:
        runs, n = self.doc["runs"], self.gpus
        for fam, others in (("dit", [f"dit_ddp_{n}gpu", f"dit_fsdp_{n}gpu"]), ("vae", [f"vae_ddp_{n}gpu"])):
            base = runs.get(f"{fam}_1gpu", {})
            for o in others:
                s = scaling(base, runs.get(o, {}))
                if s:
                    self.doc["scaling"][o] = {"baseline": f"{fam}_1gpu", **s}

    def main(self) -> int:
        try:
            self.environment()
            ok = self.data()
        except Exception as exc:  # noqa: BLE001 - record and stop: nothing can run without data
            self.doc["notes"].append(f"setup / data step failed: {type(exc).__name__}: {exc}")
            self.save()
            self.log(f"setup / data step failed: {type(exc).__name__}: {exc}")
            ok = False
        if ok:
            specs = self.run_specs()
            for i, spec in enumerate(specs):
                try:
                    (self.do_resume if "resume_of" in spec else self.do_run)(spec, specs[i + 1:])
                except Exception as exc:  # noqa: BLE001 - one broken run must not lose the others
                    self.doc["runs"][spec["name"]] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                    self.save()
        if self.sampler is not None:
            self.sampler.stop()
        self.doc["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.save()
        if not self.a.keep_work:
            for ck in (self.work / "runs").glob("*/checkpoints"):
                shutil.rmtree(ck, ignore_errors=True)
        print(summary_markdown(self.doc), flush=True)
        bad = [k for k, v in {**self.doc["runs"], **self.doc["resume"]}.items() if v.get("status") not in ("ok",)]
        return 1 if bad or not ok else 0


# ---------------------------------------------------------------------------------------------------------------------


def _fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, (list, tuple)):
        return " / ".join(_fmt(v, spec) for v in x)
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def summary_markdown(doc: dict) -> str:
    steps = doc.get("steps", {})
    nvls = ", ".join(f"{k}={v}" for k, v in doc.get("env", {}).items())
    L = [f"# Multi-GPU training benchmark ({doc.get('card', '?')} x {doc.get('nproc', '?')}, {doc.get('mode')})", "",
         f"torch {doc.get('torch')}, triton {doc.get('triton')}, CUDA {doc.get('cuda')}, NCCL {doc.get('nccl')}, "
         f"GPUs {', '.join(doc.get('gpu_names') or []) or '-'}; commit {doc.get('commit')}; "
         f"{doc.get('elapsed_s')} s in all. NVLink multicast off ({nvls}).", ""]
    d = doc.get("data")
    if d:
        L += [f"Data: {d.get('items')} prepared meshes at {d.get('resolution')}^3 ({d.get('failed')} failed); SS-DiT "
              f"latent tokens per sample: mean {_fmt(d.get('latent_tokens_mean'), '.0f')}, min / max "
              f"{_fmt(d.get('latent_tokens_min_max'), '.0f')}; prepare {_fmt(steps.get('prepare', {}).get('seconds'))}"
              f" s, encode-latents {_fmt(steps.get('encode_latents', {}).get('seconds'))} s. Tokens: SS-DiT latent "
              "tokens, SS-VAE input SDF voxels.", ""]
    L += ["| run | GPUs | strategy | steps (measured) | s/step median (p10 / p90) | tokens per GPU-step "
          "| tokens/s (all) | tokens/s per GPU | scaling eff. | imbalance | peak alloc GiB per rank "
          "| nvidia-smi peak MiB per GPU | status |", "|" + "---|" * 13]
    for name, r in doc.get("runs", {}).items():
        sc = doc.get("scaling", {}).get(name, {})
        smi = r.get("nvidia_smi_peak_mib_per_gpu") or {}
        per_gpu_step = (r.get("tokens_per_step_mean") or 0) / max(1, r.get("gpus") or 1) or None
        status = r.get("status")
        if status != "ok":
            status = f"{status}: {r.get('error') or r.get('reason')}"
        L.append(" | ".join([
            f"| {name}", str(r.get("gpus", "-")), str(r.get("strategy", "-")),
            f"{r.get('steps', '-')} ({r.get('window_steps', '-')})",
            f"{_fmt(r.get('seconds_per_step_median'))} ({_fmt(r.get('seconds_per_step_p10_p90'))})",
            _fmt(per_gpu_step, ".0f"), _fmt(r.get("tokens_per_s"), ".4g"), _fmt(r.get("tokens_per_s_per_gpu"), ".4g"),
            _fmt(sc.get("efficiency"), ".1%") if sc else "-", _fmt(r.get("token_imbalance")),
            _fmt(r.get("peak_alloc_gib_per_rank"), ".1f"),
            " / ".join(f"{v:.0f}" for _, v in sorted(smi.items())) or "-", f"{status} |"]))
    for name, r in doc.get("resume", {}).items():
        if r.get("status") == "skipped":
            L += ["", f"Resume check `{name}`: skipped ({r.get('reason')})"]
            continue
        L += ["", f"Resume check `{name}` ({r.get('strategy')}, {r.get('gpus')} GPUs): {r.get('status')}; "
              f"{r.get('steps')} steps, stopped after {r.get('stop_at')} (checkpoint at "
              f"{r.get('checkpoint_written_at')}, resumed from {r.get('resumed_from')}), compared with "
              f"`{r.get('reference')}`: **{r.get('verdict')}**"]
        if r.get("after_resume"):
            b, a = r["before_stop"], r["after_resume"]
            L.append(f"before the stop: {b['bit_exact']}/{b['steps']} steps bit-exact, max |diff| "
                     f"{_fmt(b['max_abs_diff'])}; after the resume: {a['bit_exact']}/{a['steps']} bit-exact, "
                     f"max |diff| {_fmt(a['max_abs_diff'])} (rel {_fmt(a['max_rel_diff'])})"
                     + (f"; end weights equal: {r['end_weights_equal']}" if "end_weights_equal" in r else ""))
        if r.get("error"):
            L.append(f"({r.get('error')})")
    if doc.get("notes"):
        L += ["", "Notes:"] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(L) + "\n"


def make_weights(work: Path, cpu: bool) -> int:
    """Random-init weight files (seed 0): the frozen SS-VAE for encode-latents and the frozen DINOv2 encoder."""
    import torch
    from safetensors.torch import save_file

    from d3s2.config import build_model
    from d3s2.models.image_encoder import DINOv2Encoder, ImageEncoderConfig

    torch.manual_seed(0)
    vae = build_model("ss_vae_tiny" if cpu else "ss_vae_v1")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(work / "ss_vae_random.safetensors"))
    cfg = ImageEncoderConfig(image_size=28, embed_dim=16, depth=1, num_heads=2, pos_grid=2) if cpu else \
        ImageEncoderConfig()
    enc = DINOv2Encoder(cfg)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(work / "dinov2_random.safetensors"))
    print(f"wrote {work}/ss_vae_random.safetensors and dinov2_random.safetensors")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    ap.add_argument("--cpu", action="store_true", help="CPU check: gloo, tiny configs, 1 vs 2 processes")
    ap.add_argument("--work", default=None, help="scratch folder (data, runs; default /tmp/d3s2_multi_gpu[_cpu])")
    ap.add_argument("--gpus", type=int, default=0, help="N of the N-GPU runs (default: all visible)")
    ap.add_argument("--budget-s", type=float, default=None, help="time for everything (GPU 530 s, CPU 1500 s)")
    ap.add_argument("--wheels", default=None, help="folder of trimesh / libigl wheels to install when missing")
    ap.add_argument("--meshes-tgz", default=None, help="demo/pack_meshes.sh tarball (GPU machine: no pybullet)")
    ap.add_argument("--num-meshes", type=int, default=None, help="meshes to prepare (GPU 16, CPU 3)")
    ap.add_argument("--prepare-workers", type=int, default=None, help="d3s2 prepare --workers (GPU 16, CPU 2)")
    ap.add_argument("--dit-steps", type=int, default=None, help="steps per SS-DiT timing run (GPU 14, CPU 4)")
    ap.add_argument("--vae-steps", type=int, default=None, help="steps per SS-VAE timing run (GPU 9, CPU 3)")
    ap.add_argument("--warmup", type=int, default=None, help="first steps left out of the timing (GPU 3, CPU 1)")
    ap.add_argument("--resume-steps", type=int, default=None, help="K of the resume check, even (GPU 6, CPU 4)")
    ap.add_argument("--resume-rel-tol", type=float, default=1e-2,
                    help="largest relative loss difference after the resume counted as the same (GPU nondeterminism)")
    ap.add_argument("--fsdp-resume", action="store_true", help="also check stop + resume under FSDP2 (last)")
    ap.add_argument("--runs", default=None,
                    help="comma list of runs to do (dit_1gpu, dit_ddp, dit_fsdp, vae_1gpu, vae_ddp, resume_ddp, ...)")
    ap.add_argument("--set-dit", action="append", default=[], metavar="KEY=VALUE",
                    help="extra `d3s2 train --set` for the SS-DiT runs (repeatable; e.g. data.workers=8)")
    ap.add_argument("--set-vae", action="append", default=[], metavar="KEY=VALUE",
                    help="extra `d3s2 train --set` for the SS-VAE runs (repeatable)")
    ap.add_argument("--keep-work", action="store_true", help="keep the checkpoints under --work")
    ap.add_argument("--make-weights", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    gpu = not a.cpu
    a.work = a.work or ("/tmp/d3s2_multi_gpu" if gpu else "/tmp/d3s2_multi_gpu_cpu")
    if a.make_weights:
        return make_weights(Path(a.work), a.cpu)
    for k, g, c in (("budget_s", 530.0, 1500.0), ("num_meshes", 16, 3), ("prepare_workers", 16, 2),
                    ("dit_steps", 14, 4), ("vae_steps", 9, 3), ("warmup", 3, 1), ("resume_steps", 6, 4)):
        if getattr(a, k) is None:
            setattr(a, k, g if gpu else c)
    return Bench(a).main()


if __name__ == "__main__":
    sys.exit(main())
