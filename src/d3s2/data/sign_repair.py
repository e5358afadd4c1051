"""Sign repair on a signed narrow band by the distance bound (issue 25; ``sign="parts"`` / ``"auto"`` of
``d3s2.data.sdf``, paper Eq. 1).

The band holds exact unsigned distances ``d``. If two face-adjacent voxel centres ``a``, ``b`` (``h`` apart) truly lie
on opposite sides of the surface, the segment between them crosses it, so ``d_a + d_b <= h``. A pair with opposite
signs and ``d_a + d_b > h`` therefore holds a wrong sign (or, next to a hole, straddles the winding number's 1/2 level
set, which is no surface). Such pairs are decided by the generalised winding number; where that flips a voxel, its
neighbours are checked next, so a wrongly signed patch is peeled from its border inwards until the winding number
agrees everywhere on the front. This catches what the part-hull test of ``d3s2.data.part_signs`` cannot see cheaply:
self-intersections within one part (a fold of the surface through itself) and wrong patches bordering right ones.
It cannot see a wrong patch whose every border is a legitimate surface crossing or the band's rim (the outer half of
the band around a part buried whole inside another: the hull test's case).

Cost: one neighbour search per band voxel along +x and +y (sorted keys, ``searchsorted``; along z the neighbour is
the next key), then per round only the
voxels next to the last flips; the winding number is asked for the voxels on the front. Runs on the band's device.
"""

from __future__ import annotations

import torch

__all__ = ["repair_signs"]

_AXES = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
_MAX_ROUNDS = 4096


def _keys(c: torch.Tensor, r: int) -> torch.Tensor:
    return (c[:, 0] * r + c[:, 1]) * r + c[:, 2]


def _neighbours(keys, coords, idx, r, offsets):
    """Pairs ``(i, j)``: ``i`` in ``idx``, ``j`` its band neighbour at one of ``offsets``."""
    a_all, b_all = [], []
    n = len(keys)
    for off in offsets:
        o = torch.tensor(off, dtype=torch.int64, device=coords.device)
        c = coords[idx] + o
        ok = ((c >= 0) & (c < r)).all(dim=1)
        i, c = idx[ok], c[ok]
        k = _keys(c, r)
        if off[0] == 0 and off[1] == 0:  # along z the neighbour, if present, is the next / previous key
            j = (i + off[2]).clamp_(0, n - 1)
        else:
            j = torch.searchsorted(keys, k).clamp_max_(n - 1)
        hit = keys[j] == k
        a_all.append(i[hit])
        b_all.append(j[hit])
    return torch.cat(a_all), torch.cat(b_all)


def _forward_pairs(keys, coords, r):
    """All band pairs ``(i, j)`` with ``j`` the +x, +y or +z neighbour of ``i`` (the first pass: whole-band tensor ops,
    no per-voxel gathers of coordinates)."""
    n = len(keys)
    a_all, b_all = [], []
    i = torch.arange(n - 1, device=keys.device)
    z = (keys[1:] == keys[:-1] + 1) & (coords[:-1, 2] < r - 1)  # +z: the next key
    a_all.append(i[z])
    b_all.append(i[z] + 1)
    for axis, step in ((1, r), (0, r * r)):
        ok = coords[:, axis] < r - 1
        src = torch.nonzero(ok).squeeze(1)
        k = keys[src] + step
        j = torch.searchsorted(keys, k).clamp_max_(n - 1)
        hit = keys[j] == k
        a_all.append(src[hit])
        b_all.append(j[hit])
    return torch.cat(a_all), torch.cat(b_all)


def repair_signs(coords, dist, decided, resolution: int, inside):
    """Fix the signs of ``dist`` (float64 [N], signed, voxels ``coords`` int64 [N, 3] sorted lexicographically;
    tensors on one device) where the distance bound shows them wrong (module docstring). ``decided`` (bool [N]): voxels
    whose sign already is the winding number's (never asked again). ``inside(points float64 [M, 3] numpy) -> bool [M]``:
    winding number > 1/2.

    Returns ``(dist, stats)``: the repaired distances and ``{"repair_voxels": voxels asked, "repair_flips": signs
    changed, "repair_rounds": rounds}``."""
    from d3s2.data.sparse_sdf import voxel_size

    stats = {"repair_voxels": 0, "repair_flips": 0, "repair_rounds": 0}
    n = len(dist)
    if n < 2:
        return dist, stats
    r = int(resolution)
    h = voxel_size(r)
    dev = dist.device
    coords = coords.to(torch.int64)
    keys = _keys(coords, r)
    dist = dist.clone()
    asked = decided.clone()
    a, b = _forward_pairs(keys, coords, r)
    both = (-1, 1)
    every = tuple(tuple(s * x for x in ax) for ax in _AXES for s in both)
    for _ in range(_MAX_ROUNDS):
        bad = ((dist[a] < 0) != (dist[b] < 0)) & (dist[a].abs() + dist[b].abs() > h * (1 + 1e-9))
        front = torch.unique(torch.cat([a[bad], b[bad]]))
        front = front[~asked[front]]
        if len(front) == 0:
            break
        stats["repair_rounds"] += 1
        centres = -1.0 + (coords[front].to(torch.float64) + 0.5) * h
        ins = torch.from_numpy(inside(centres.cpu().numpy())).to(dev)
        asked[front] = True
        stats["repair_voxels"] += len(front)
        flip = ins != (dist[front] < 0)
        flipped = front[flip]
        if len(flipped) == 0:
            break
        dist[flipped] = -dist[flipped]
        stats["repair_flips"] += len(flipped)
        a, b = _neighbours(keys, coords, flipped, r, every)
    return dist, stats
