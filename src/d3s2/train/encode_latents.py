"""``d3s2 encode-latents``: sparse latents of prepared items for SS-DiT training (paper Sec. 4: the DiT learns the
SS-VAE's latent distribution).

For each prepared item with ``sdf_<R>.npz`` the frozen SS-VAE encodes the SDF (scaled ``clamp(s / tau, -1, 1)`` as
in training) and the posterior *mean* is written to ``<item>/latent_<R>.npz`` (``coords`` int32 [N, 3] on the latent
grid R / 8, ``feats`` float32 [N, C]), atomically; :class:`~d3s2.data.datasets.ImageLatentDataset` reads it and the
``ss_dit`` task (``latents: files``) multiplies by its ``latent_scale``. A bad item is logged and skipped.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from d3s2.errors import D3S2Error

__all__ = ["encode_item", "encode_latents", "add_parser"]


@torch.no_grad()
def encode_item(vae, coords: np.ndarray, sdf: np.ndarray, resolution: int, tau: float, device: torch.device
                ) -> tuple[np.ndarray, np.ndarray]:
    """One sparse SDF -> (latent coords int32 [N, 3], posterior mean float32 [N, C])."""
    from d3s2.models.ss_vae_losses import scale_sdf
    from d3s2.sparse import SparseTensor

    c = torch.from_numpy(np.asarray(coords, dtype=np.int64))
    bc = torch.cat([torch.zeros(len(c), 1, dtype=torch.int32), c.to(torch.int32)], 1).to(device)
    feats = scale_sdf(torch.from_numpy(np.asarray(sdf, dtype=np.float32)).reshape(-1, 1), tau).to(device)
    x = SparseTensor(feats, bc, batch_size=1, resolution=resolution)
    z, mean, _ = vae.encode(x, sample_posterior=False)
    return z.coords[:, 1:].cpu().numpy().astype(np.int32), mean.float().cpu().numpy().astype(np.float32)


def encode_latents(root: str | Path, vae_spec, checkpoint: str, resolutions: list[int], tau: float | None = None,
                   device: str = "auto", overwrite: bool = False, log=print) -> dict[str, int]:
    """Encode every prepared item at each resolution; returns ``{"done", "skipped", "failed"}`` counts."""
    from d3s2.data.datasets import load_items
    from d3s2.data.sparse_sdf import load_sparse_sdf
    from d3s2.fileio import atomic_open
    from d3s2.train.task_common import items_tau
    from d3s2.train.tasks_ss_dit import load_frozen_ss_vae

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    items = [it for it in load_items(root) if it.get("sdf")]
    if not items:
        raise D3S2Error(f"{root}: no item has a sparse SDF; run `d3s2 prepare` first")
    if tau is None:
        tau = items_tau(items, str(root))
    vae = load_frozen_ss_vae(vae_spec, checkpoint, dev)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for it in items:
        have = {int(r): v["file"] for r, v in it["sdf"].items()}
        for r in resolutions:
            out = Path(it["dir"]) / f"latent_{r}.npz"
            if r not in have:
                log(f"encode-latents: {it['item_id']}: no sdf_{r}.npz, skipped")
                counts["skipped"] += 1
                continue
            if out.is_file() and not overwrite:
                counts["skipped"] += 1
                continue
            try:
                s = load_sparse_sdf(Path(it["dir"]) / have[r])
                coords, feats = encode_item(vae, s.coords, s.sdf, r, tau, dev)
                buf = io.BytesIO()
                np.savez(buf, coords=coords, feats=feats, resolution=np.int64(r), tau=np.float64(tau))
                with atomic_open(out, "wb") as fh:
                    fh.write(buf.getvalue())
                counts["done"] += 1
            except (D3S2Error, OSError, ValueError, KeyError, RuntimeError) as exc:
                log(f"encode-latents: {it['item_id']} at {r}: failed ({' '.join(str(exc).split())[:200]}), skipped")
                counts["failed"] += 1
    return counts


def _cmd(args) -> int:
    counts = encode_latents(args.root, args.vae, args.checkpoint, args.resolutions, tau=args.tau,
                            device=args.device, overwrite=args.overwrite,
                            log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(counts))
    return 1 if counts["failed"] and not counts["done"] else 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "encode-latents",
        help="encode prepared sparse SDFs with a trained SS-VAE into latent_<R>.npz (SS-DiT training data)",
        description="For each item of a `d3s2 prepare` folder, encode sdf_<R>.npz with a frozen SS-VAE and write the "
        "posterior mean to latent_<R>.npz (atomically). Bad items are logged and skipped.",
    )
    p.add_argument("root", help="folder written by `d3s2 prepare`")
    p.add_argument("--vae", required=True, help="SS-VAE model config (shipped name such as ss_vae_tiny, or a YAML)")
    p.add_argument("--checkpoint", required=True,
                   help="SS-VAE weights: a .safetensors, a step_* folder or the checkpoint dir of an ss_vae run")
    p.add_argument("--resolutions", type=int, nargs="+", required=True, metavar="R", help="SDF resolutions to encode")
    p.add_argument("--tau", type=float, default=None, help="SDF band of the data (default: the items' tau)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--overwrite", action="store_true", help="re-encode items that already have latent_<R>.npz")
    p.set_defaults(func=_cmd)

