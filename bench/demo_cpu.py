"""CPU time of the demo pipeline's design (issue 7): ``demo_pipeline`` with random weights on held-out example
images, the structure stage's output replaced by a real held-out mesh's latent shell (so the SS-DiT sees a realistic
token set) and each decoded SDF by a sphere (so marching cubes has a surface). Per-stage seconds and their parts.

    python bench/demo_cpu.py [--threads 1] [--images 2] [--steps 10] [--out bench/results]

Writes ``demo_cpu-<host>.json`` (machine, torch, commit, tokens, seconds per stage). Random weights: this times the
design (token counts, model sizes, step counts), not the quality of a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAU = 1 / 64  # the band of the demo's prepared data (demo/prepare.sh --tau)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="sampler steps of both stages (make demo's CPU setting)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import pybullet_data
    from PIL import Image

    from d3s2.data.mesh_io import load_mesh, normalize_mesh
    from d3s2.data.sdf import unsigned_band
    from d3s2.fileio import atomic_write_text
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

    pipe = ImageTo3DPipeline.from_config("demo_pipeline", device="cpu")
    factor = pipe.models["ss_vae_512"].config.downsample_factor
    with open(os.path.join(REPO, "src", "d3s2", "assets", "examples", "examples.json")) as fh:
        items = list(json.load(fh)["examples"].values())
    images, shells = [], []
    for b, ex in enumerate(items[: args.images]):
        mesh, _ = normalize_mesh(load_mesh(os.path.join(pybullet_data.getDataPath(), ex["source"])))
        coords, _ = unsigned_band(mesh, pipe.resolution_512, tau=TAU, backend="cpu")
        lat = torch.unique(torch.from_numpy(coords) // factor, dim=0)
        shells.append(torch.cat([torch.full((len(lat), 1), b), lat], 1))
        images.append(Image.open(os.path.join(REPO, "src", "d3s2", "assets", "examples", ex["image"])))
    structure = torch.cat(shells).int()

    def sphere(stage, x):
        c = x.coords[:, 1:].float()
        r = (c - c.mean(0)).norm(dim=1)
        return x.replace(((r - 0.6 * r.max()) / 4).clamp(-1, 1)[:, None].to(x.feats.dtype).expand_as(x.feats)
                         .contiguous())

    t0 = time.perf_counter()
    out = pipe(images, generator=torch.Generator().manual_seed(0), num_inference_steps={"dense": args.steps,
         "512": args.steps}, progress=False, hooks={"structure": lambda _: structure, "decoded": sphere})
    total = time.perf_counter() - t0
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    doc = {"bench": "demo_cpu", "machine": {"host": platform.node(), "cpus": os.cpu_count(), "threads": args.threads,
                                            "loadavg": os.getloadavg(), "python": platform.python_version(),
                                            "torch": torch.__version__, "commit": commit},
           "config": "demo_pipeline (random weights)", "grid": pipe.resolution_512, "steps": args.steps, "cfg": True,
           "images": [ex["source"] for ex in items[: args.images]],
           "tokens_per_image": [len(s) for s in shells], "total_s": total,
           "seconds_per_image": total / len(images), "stages": out.stats}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"demo_cpu-{platform.node() or 'host'}.json")
    atomic_write_text(path, json.dumps(doc, indent=1, default=float))
    print(f"{len(images)} images, tokens {doc['tokens_per_image']}, {total:.1f} s ({total / len(images):.1f} s per "
          f"image) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
