"""Z-buffer rasterisation of triangles in plain PyTorch (same code on CPU and CUDA): per pixel the nearest face and
its depth. Used by the dataset renders (``d3s2.data.render``), the previews and the interior-shell test of clean-up
(``d3s2.geometry.cleanup``: the nearest face of a pixel is the first hit of that pixel's ray).

How it works (one view):

1. Project the vertices with the pinhole camera (OpenCV frame, see d3s2.geometry.cameras). Faces with a vertex closer
   than ``near`` are culled (the cameras of d3s2 always sit outside the object's bounding sphere, so none are).
2. Per face, the pixel bounding box of its screen triangle. Every (face, pixel-in-box) pair is one candidate; pairs are
   generated in chunks of at most ``max_pairs`` so memory stays bounded whatever the triangle sizes.
3. Barycentrics by edge functions, set up per face relative to its box origin (small numbers, so float32 is accurate)
   at pixel centres. Faces are double sided. Inverse depth is affine in screen space, so the depth of a pair is exact.
4. Depth test: a key ``(float bits of depth) << 32 | face`` per inside pair and one ``scatter_reduce(amin)`` per
   chunk into a per-pixel key buffer (positive float bits order like the floats, so the smallest key is the nearest
   face; ties go to the lower face index, deterministic on any device).

The per-face planes come back with the fragments (``Fragments.setup`` / ``origin``), so a shader evaluates the
barycentrics of the winning pixels only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Fragments", "rasterize"]

_KEY_EMPTY = torch.iinfo(torch.int64).max


@dataclass
class Fragments:
    """Per-pixel result of rasterisation: nearest face (-1: background) and its camera-space depth (inf: background)."""

    face: torch.Tensor  # [H, W] int64
    depth: torch.Tensor  # [H, W] float32
    setup: torch.Tensor  # [F, 12] per-face barycentric / inverse-depth planes (see _face_setup)
    origin: torch.Tensor  # [F, 2] int64 pixel origin of each face's box


def _face_setup(p: torch.Tensor, invz: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Affine planes of the three barycentrics and of 1/z over pixel offsets (dx, dy) from the face's box origin.

    Row layout: [c0, a0, b0, c1, a1, b1, c2, a2, b2, cz, az, bz] so that b_i = c_i + a_i*dx + b_i*dy at the pixel centre
    (origin + (dx, dy) + 0.5). Computed in float64 and stored in float32.
    """
    p = p.double()
    o = origin.double() + 0.5
    q = p - o[:, None, :]  # vertices relative to the first pixel centre of the box
    x, y = q[..., 0], q[..., 1]
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    inv_area = 1.0 / area
    cols = []
    for i in range(3):
        j, k = (i + 1) % 3, (i + 2) % 3
        # edge function of edge (j, k) evaluated at (dx, dy): opposite vertex i gets weight 1
        a = -(y[:, k] - y[:, j])
        b = x[:, k] - x[:, j]
        c = (x[:, k] - x[:, j]) * (0 - y[:, j]) - (y[:, k] - y[:, j]) * (0 - x[:, j])
        cols += [c * inv_area, a * inv_area, b * inv_area]
    bary = torch.stack(cols, dim=1).view(-1, 3, 3)  # [F, 3 (vertex), 3 (c, a, b)]
    z = (bary * invz.double()[:, :, None]).sum(1)  # 1/z is affine in screen space: same combination of the planes
    return torch.cat([bary.reshape(-1, 9), z], dim=1).float()


def rasterize(
    verts_cam: torch.Tensor,
    faces: torch.Tensor,
    K: torch.Tensor,
    height: int,
    width: int,
    near: float = 1e-4,
    max_pairs: int | None = None,
    eps: float = 1e-6,
) -> Fragments:
    """Z-buffer rasterisation of triangles given in OpenCV camera coordinates (x right, y down, z forward).

    Pixel (i, j) covers [i, i+1) x [j, j+1) and is sampled at its centre. Returns the nearest face per pixel.
    """
    device = verts_cam.device
    if max_pairs is None:
        max_pairs = 1 << 24 if device.type == "cuda" else 1 << 21
    K = K.to(device=device, dtype=torch.float32)
    z = verts_cam[:, 2]
    zs = z.clamp_min(near)
    u = K[0, 0] * verts_cam[:, 0] / zs + K[0, 2]
    v = K[1, 1] * verts_cam[:, 1] / zs + K[1, 2]
    scr = torch.stack([u, v], dim=1)[faces]  # [F, 3, 2]
    zf = z[faces]
    valid = (zf > near).all(1) & torch.isfinite(scr).all(2).all(1)
    lo = scr.amin(1)
    hi = scr.amax(1)
    i0 = torch.ceil(lo[:, 0] - 0.5).clamp(0, width).long()
    i1 = torch.floor(hi[:, 0] - 0.5).clamp(-1, width - 1).long()
    j0 = torch.ceil(lo[:, 1] - 0.5).clamp(0, height).long()
    j1 = torch.floor(hi[:, 1] - 0.5).clamp(-1, height - 1).long()
    bw = (i1 - i0 + 1).clamp_min(0)
    bh = (j1 - j0 + 1).clamp_min(0)
    origin = torch.stack([i0, j0], dim=1)
    setup = _face_setup(scr, 1.0 / zf.clamp_min(near), origin)
    valid &= torch.isfinite(setup).all(1)
    count = torch.where(valid, bw * bh, torch.zeros_like(bw))

    keys = torch.full((height * width,), _KEY_EMPTY, dtype=torch.int64, device=device)
    sel = torch.nonzero(count > 0).squeeze(1)
    if sel.numel():
        cnt = count[sel]
        cum = torch.cumsum(cnt, 0).cpu()
        # chunks of whole faces with at most max_pairs candidates (a single larger face gets a chunk of its own)
        bounds, start, n = [], 0, len(sel)
        while start < n:
            before = int(cum[start - 1]) if start else 0
            end = int(torch.searchsorted(cum, before + max_pairs, right=True))
            end = max(end, start + 1)
            bounds.append((start, end, int(cum[end - 1]) - before))
            start = end
        # one gather per pair from compact per-face tables (gathers dominate the cost on CPU)
        itab_all = torch.stack([i0, j0, bw], dim=1)
        for s, e, total in bounds:
            f = sel[s:e]
            c = cnt[s:e]
            local_face = torch.repeat_interleave(torch.arange(e - s, device=device), c, output_size=total)
            itab = torch.cat([itab_all[f], (torch.cumsum(c, 0) - c)[:, None], f[:, None]], dim=1)[local_face]
            st = setup[f][local_face].view(-1, 4, 3)
            local = torch.arange(total, device=device) - itab[:, 3]
            dy = torch.div(local, itab[:, 2], rounding_mode="floor")
            dx = local - dy * itab[:, 2]
            # planes (3 barycentrics, 1/z) evaluated at (dx, dy): c + a*dx + b*dy
            vals = st[:, :, 0] + st[:, :, 1] * dx.float()[:, None] + st[:, :, 2] * dy.float()[:, None]
            inside = torch.nonzero(((vals[:, :3] >= -eps).all(1) & (vals[:, 3] > 0))).squeeze(1)
            if inside.numel() == 0:
                continue
            it = itab[inside]
            pix = (it[:, 1] + dy[inside]) * width + (it[:, 0] + dx[inside])
            depth = 1.0 / vals[inside, 3]
            key = (depth.view(torch.int32).long() << 32) | it[:, 4]
            keys.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)
    empty = keys == _KEY_EMPTY
    face = torch.where(empty, torch.full_like(keys, -1), keys & 0xFFFFFFFF)
    depth = torch.where(empty, torch.zeros_like(keys), keys >> 32).int().view(torch.float32)
    depth = torch.where(empty, torch.full_like(depth, math.inf), depth)
    return Fragments(face.view(height, width), depth.view(height, width), setup, origin)
