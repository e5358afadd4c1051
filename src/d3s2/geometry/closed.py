"""Closed surfaces from a sparse SDF band without a dense ``R^3`` grid (issue 24; paper Sec. 4.3 inference, where the
decoded band may stop where a structure cell is missing or the band is thin).

Sparse marching cubes emits triangles only in cells whose 8 corners all exist, so the surface stops wherever it
reaches the edge of the active set. Here every voxel of the grid gets an inside / outside *label* (the sign of
``value - level`` for decoded voxels, a decision for absent ones), and the absent voxels that are corners of a cell
whose labels differ are added with the value ``level +/- c`` (``c`` = the band's largest ``|value - level|``). Every
cell whose corners change sign is then complete, so marching cubes extracts the whole zero set of a function defined
on the full grid: a closed surface by construction (up to the grid border, which is handled by a one-voxel padding
labelled outside).

Labels of absent voxels, coarse to fine:

1. a coarse grid of ``factor^3``-voxel cells (at most ~128^3): cells holding decoded voxels, dilated ``close`` times
   (this bridges holes in the band up to about ``close`` coarse cells wide), form the *shell*;
2. a flood fill from the coarse grid's border over the other cells (26-connected) labels them *outside*; what it does
   not reach is enclosed by the shell: *inside*. Outside and inside cells are never neighbours, so no cell away from
   the shell changes sign: no second, inner surface is made there;
3. inside the shell, absent voxels take the majority label of their 6 neighbours, propagated from the decoded voxels
   and the coarse labels around the shell (ties: outside), until every voxel is labelled: the band's outer edge
   (``value > level``) extends outwards, its inner edge inwards, a hole in the band is split between its rims.

Cost: the coarse grid (dense, ``(R / factor)^3``), and per shell coarse cell a dense ``(factor + 2)^3`` brick of
labels and gather indices (int8 + int64); e.g. ~25k bricks of 11^3 at 1024 for a 1.2M-face band. Limit: a hole
wider than the dilation lets the flood fill in; the object's inside is then labelled outside and the result is still
closed, but it has a wall on both sides of the band, joined at the hole (raise ``close``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d3s2.errors import D3S2Error

__all__ = ["closed_band", "default_factor", "PAD"]

PAD = 1  # voxels of padding on every side, labelled outside: the surface closes at the grid border too


def default_factor(resolution: int) -> int:
    """Coarse cell size in voxels: coarse grid at most ~128^3, cells of at least 4 voxels."""
    return max(4, -(-(resolution + 2 * PAD) // 128))


def _dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(x, 3, stride=1, padding=1)


def _outside_flood(shell: torch.Tensor) -> torch.Tensor:
    """Coarse cells reachable from the grid border through non-shell cells (26-connected); ``shell`` [C, C, C]
    bool."""
    free = (~shell).float()[None, None]
    seed = torch.zeros_like(free)
    for axis in range(3):
        idx = [slice(None)] * 5
        idx[2 + axis] = 0
        seed[tuple(idx)] = 1
        idx[2 + axis] = -1
        seed[tuple(idx)] = 1
    reach = seed * free
    count = int(reach.sum())
    while True:
        for _ in range(4):  # check convergence (a host sync) every few steps
            reach = _dilate(reach) * free
        new = int(reach.sum())
        if new == count:
            return reach[0, 0] > 0
        count = new


def closed_band(coords, values, resolution: int, level: float = 0.0, *, factor: int | None = None,
                close: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded voxels plus the absent voxels that close the surface (see the module docstring).

    ``coords`` int ``[N, 3]`` unique voxel coordinates in ``[0, resolution)``, ``values`` ``[N]`` (SDF, negative
    inside). Returns ``(coords [M, 3] int64, values [M] float32)`` in the *padded* frame (coordinates shifted by
    :data:`PAD`, grid size ``resolution + 2 * PAD``) on ``coords``' device; feed them to
    :func:`d3s2.geometry.marching_cubes.sparse_marching_cubes` with resolution ``resolution + 2 * PAD`` and subtract
    ``PAD`` from the vertices.
    """
    device = coords.device if isinstance(coords, torch.Tensor) else torch.device("cpu")
    coords = torch.as_tensor(coords, device=device).to(torch.int64).reshape(-1, 3)
    values = torch.as_tensor(values, device=device).to(torch.float32).reshape(-1)
    if len(values) != len(coords):
        raise D3S2Error(f"closed surface got {len(coords)} coordinates but {len(values)} values")
    if close < 0:
        raise D3S2Error(f"close must be >= 0 coarse cells, got {close}")
    if len(coords) == 0:
        return coords, values
    if not torch.isfinite(values).all():
        raise D3S2Error("closed surface got NaN/inf SDF values; fix the decoder output or drop those voxels")
    if int(coords.min()) < 0 or int(coords.max()) >= resolution:
        raise D3S2Error(f"voxel coordinates must lie in [0, {resolution}) for resolution {resolution}")
    f = int(factor) if factor is not None else default_factor(resolution)
    if f < 1:
        raise D3S2Error(f"coarse factor must be a positive number of voxels, got {factor}")
    P = resolution + 2 * PAD
    C = -(-P // f)
    level = float(level)
    c = float((values.double() - level).abs().max().clamp_min(1e-6))

    q = coords + PAD
    cc = torch.div(q, f, rounding_mode="floor")
    ckey = (cc[:, 0] * C + cc[:, 1]) * C + cc[:, 2]
    occ = torch.zeros(C**3, dtype=torch.float32, device=device)
    occ[ckey] = 1.0
    shell = occ.view(1, 1, C, C, C)
    for _ in range(close):
        shell = _dilate(shell)
    shell = shell[0, 0] > 0
    outside = _outside_flood(shell)  # non-shell cells not reached are inside

    shell_keys = torch.nonzero(shell.reshape(-1)).squeeze(1)
    M = len(shell_keys)
    brick_of = torch.full((C**3,), -1, dtype=torch.int64, device=device)
    brick_of[shell_keys] = torch.arange(M, device=device)
    # int32 coordinates of the bricks' voxels: the per-brick tensors dominate the memory
    shell_cc = torch.stack([shell_keys // (C * C), (shell_keys // C) % C, shell_keys % C], 1).to(torch.int32)
    n_in = M * f**3
    PLUS, MINUS = n_in, n_in + 1  # constant entries of the label table

    # labels of the shell bricks' voxels (+1 outside, -1 inside, 0 unknown), then the two constants
    lab = torch.zeros(n_in + 2, dtype=torch.int8, device=device)
    lab[PLUS], lab[MINUS] = 1, -1
    loc = q - cc * f
    b = brick_of[ckey]
    flat = ((b * f + loc[:, 0]) * f + loc[:, 1]) * f + loc[:, 2]
    active = torch.zeros(n_in + 2, dtype=torch.bool, device=device)
    active[flat] = True
    lab[flat] = torch.where(values > level, 1, -1).to(torch.int8)
    local = torch.stack(torch.meshgrid(*[torch.arange(f, device=device, dtype=torch.int32)] * 3, indexing="ij"),
                        -1).reshape(-1, 3)
    g_in = (shell_cc[:, None, :] * f + local[None]).reshape(-1, 3)
    pad_voxel = ((g_in < PAD) | (g_in >= P - PAD)).any(1)  # padding (and beyond the grid): outside
    lab[:n_in][pad_voxel & ~active[:n_in]] = 1
    del g_in, pad_voxel

    # gather index of every brick's voxels with a one-voxel halo: [M, f+2, f+2, f+2] into `lab`
    e = f + 2
    ext_local = torch.stack(torch.meshgrid(*[torch.arange(-1, f + 1, device=device, dtype=torch.int32)] * 3,
                                            indexing="ij"), -1)
    G = (shell_cc[:, None, :] * f + ext_local.reshape(1, -1, 3)).reshape(-1, 3)
    gc = torch.div(G, f, rounding_mode="floor")
    in_grid = ((gc >= 0) & (gc < C)).all(1)
    gkey = (gc[:, 0].long() * C + gc[:, 1]) * C + gc[:, 2]
    gkey = torch.where(in_grid, gkey, torch.zeros_like(gkey))
    gb = torch.where(in_grid, brick_of[gkey], torch.full_like(gkey, -1))
    gl = G - gc * f
    ext_idx = ((gb * f + gl[:, 0]) * f + gl[:, 1]) * f + gl[:, 2]  # int64 (gb)
    const = torch.where(in_grid & ~outside.reshape(-1)[gkey], MINUS, PLUS)
    ext_idx = torch.where(gb >= 0, ext_idx, const)
    del gc, gkey, gb, gl, const, in_grid

    for _ in range(3 * e * max(1, close) + 8):
        x = lab[ext_idx].view(M, e, e, e)
        nb = [x[:, :-2, 1:-1, 1:-1], x[:, 2:, 1:-1, 1:-1], x[:, 1:-1, :-2, 1:-1], x[:, 1:-1, 2:, 1:-1],
              x[:, 1:-1, 1:-1, :-2], x[:, 1:-1, 1:-1, 2:]]
        s = sum(t.to(torch.int16) for t in nb).reshape(-1)
        known_nb = sum((t != 0).to(torch.int16) for t in nb).reshape(-1)
        upd = (lab[:n_in] == 0) & (known_nb > 0)
        if not bool(upd.any()):
            break
        lab[:n_in] = torch.where(upd, torch.where(s >= 0, 1, -1).to(torch.int8), lab[:n_in])
    lab[:n_in][lab[:n_in] == 0] = 1  # unreachable pockets cannot occur (every brick borders a known voxel)

    # cells (bases at halo positions 0..f) whose corner labels differ, and their corners
    x = lab[ext_idx].view(M, e, e, e).float()[:, None]
    change = (F.max_pool3d(x, 2, stride=1) != -F.max_pool3d(-x, 2, stride=1)).float()
    corner = F.max_pool3d(change, 2, stride=1, padding=1)[:, 0] > 0  # [M, e, e, e]
    del x, change
    need = corner.reshape(-1)
    idx = ext_idx[need]
    absent = ~active[idx]
    Gn = G[need][absent]
    lab_n = lab[idx[absent]].to(torch.float32)
    del G, ext_idx, need, idx
    inside_grid = ((Gn >= 0) & (Gn < P)).all(1)
    Gn, lab_n = Gn[inside_grid], lab_n[inside_grid]
    nkey = (Gn[:, 0].long() * P + Gn[:, 1]) * P + Gn[:, 2]
    nkey, first = torch.unique(nkey, return_inverse=True)
    pick = torch.zeros(len(nkey), dtype=torch.int64, device=device)
    pick[first] = torch.arange(len(first), device=device)
    add_c = Gn[pick].long()
    add_v = level + c * lab_n[pick]
    return torch.cat([q, add_c]), torch.cat([values, add_v])
