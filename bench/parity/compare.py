"""Error measures of the parity harness and sparse-tensor alignment by coordinates."""

from __future__ import annotations

import numpy as np
import torch

BOUNDS = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """``max |a - b| / max |b|`` (the bound's measure), the relative Frobenius error, and NaN counts."""
    a, b = ours.detach().double().cpu(), theirs.detach().double().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: ours {tuple(a.shape)}, theirs {tuple(b.shape)}")
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = (a - b).abs()
    return {"max_rel": float(diff.max()) / scale if scale > 0 and finite else (0.0 if finite else float("nan")),
            "fro_rel": float(diff.norm() / b.norm()) if finite and float(b.norm()) > 0 else 0.0,
            "max_abs": float(diff.max()) if diff.numel() else 0.0, "ref_max": scale, "finite": finite,
            "n": int(b.numel())}


def row(name: str, err: dict, dtype: torch.dtype, device, **extra) -> dict:
    bound = BOUNDS[dtype]
    ok = err.get("finite", True) and err["max_rel"] <= bound
    return {"row": name, **err, "bound": bound, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "ok": bool(ok), **extra}


def keyed(coords: torch.Tensor) -> torch.Tensor:
    c = coords.long().cpu()
    return ((c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]) * 4096 + c[:, 3]


def align(coords_a, feats_a, coords_b, feats_b) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rows of two sparse tensors matched by coordinate (duplicates in b, e.g. the release's overlapping decoding
    chunks, are checked to agree and dropped). Returns (a, b) features in one order and set statistics."""
    ka, kb = keyed(coords_a), keyed(coords_b)
    ub, first = np.unique(kb.numpy(), return_index=True)
    dup = len(kb) - len(ub)
    fb = feats_b.detach().cpu()
    dup_err = 0.0
    if dup:
        order = np.argsort(kb.numpy(), kind="stable")
        ks = kb.numpy()[order]
        same = ks[1:] == ks[:-1]
        fo = fb[torch.from_numpy(order)]
        dup_err = float((fo[1:][torch.from_numpy(same)] - fo[:-1][torch.from_numpy(same)]).abs().max())
    ua = ka.numpy()
    if len(np.unique(ua)) != len(ua):
        raise AssertionError("our sparse tensor has duplicate coordinates")
    common, ia, ib = np.intersect1d(ua, ub, return_indices=True)
    stats = {"rows_ours": len(ua), "rows_theirs": len(ub), "rows_only_ours": len(ua) - len(common),
             "rows_only_theirs": len(ub) - len(common), "theirs_duplicates": int(dup), "duplicate_max_diff": dup_err}
    return feats_a.detach().cpu()[torch.from_numpy(ia)], fb[torch.from_numpy(first[ib])], stats


def vertex_distance(va: np.ndarray, vb: np.ndarray) -> float:
    """Symmetric max nearest-vertex distance between two vertex sets."""
    from scipy.spatial import cKDTree

    if len(va) == 0 or len(vb) == 0:
        return 0.0 if len(va) == len(vb) else float("inf")
    d1 = cKDTree(vb).query(va)[0].max()
    d2 = cKDTree(va).query(vb)[0].max()
    return float(max(d1, d2))


def face_set_difference(va, fa, vb, fb) -> int:
    """Triangles of mesh a not in mesh b (and vice versa), vertices matched to their nearest counterpart."""
    from scipy.spatial import cKDTree

    if len(fa) == 0 or len(fb) == 0:
        return abs(len(fa) - len(fb))
    idx = cKDTree(vb).query(va)[1]
    ta = {tuple(sorted(t)) for t in idx[fa].tolist()}
    tb = {tuple(sorted(t)) for t in np.asarray(fb).tolist()}
    return len(ta ^ tb)
