"""Training losses of the sparse SDF VAE (paper Sec. 3.2, Eq. 2-3) and the targets of the decoded voxels.

SDF convention: the VAE works in *scaled* units ``s / tau`` (``tau`` = the band half-width of Eq. 1), so the input
voxels carry values in ``(-1, 1)`` and the decoder's ``tanh`` covers exactly that range (the release decodes tanh
outputs in such units). :func:`scale_sdf` converts dataset values (normalised-cube units, see d3s2.data.sparse_sdf).

Decoded voxels ``V~`` = ``V~_in`` (also in the input set) + ``V~_extra`` (children of latent voxels outside the band).
Targets:

- ``V~_in``: the input SDF.
- ``V~_extra``: the ground truth where the caller gives one (an optional wider ``target`` set, values in the same
  scaled units, so possibly beyond +-1), else the truncation
  value ``sign * 1`` (``|s| >= tau`` there by Eq. 1, i.e. ``|s / tau| >= 1``, clamped to the tanh range). The sign is
  propagated from the band by 6-neighbour flood fill over the decoded voxels (:func:`propagate_band_sign`). That is
  exact whenever ``tau`` is at least one voxel: two face-adjacent voxels of opposite sign have ``|s_a| + |s_b| <= h``,
  so an off-band voxel (``|s| >= tau >= h``) never touches a band voxel -- or another off-band voxel -- of the other
  sign. With a thinner band the fill is approximate.

Each ``L_c`` of Eq. 2 is the mean squared error over the voxels of its set, pooled over the whole batch (an empty set
contributes 0). ``L_KL`` is the mean over latent elements of ``0.5 (mu^2 + sigma^2 - 1 - log sigma^2)``. With learned
pruning on, ``L_prune`` is the binary cross-entropy of the keep logits against "child is a parent of a target voxel".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d3s2.errors import D3S2Error
from d3s2.sparse import SparseTensor, kernel_offsets, neighbor_map
from d3s2.sparse.serialize import pack_keys

__all__ = ["scale_sdf", "lookup_rows", "propagate_band_sign", "decoded_targets", "kl_divergence", "LossWeights",
           "ss_vae_losses"]


def scale_sdf(sdf: torch.Tensor, tau: float) -> torch.Tensor:
    """Dataset SDF (normalised-cube units) -> VAE units ``clamp(s / tau, -1, 1)``."""
    return (sdf / tau).clamp(-1.0, 1.0)


def lookup_rows(query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Row of ``ref`` ([N, 4] unique (batch, x, y, z)) holding each ``query`` coordinate, or -1."""
    if ref.shape[0] == 0 or query.shape[0] == 0:
        return torch.full((query.shape[0],), -1, dtype=torch.long, device=query.device)
    q, r = query.to(torch.int64), ref.to(torch.int64)
    ext = [int(max(q[:, i].max(), r[:, i].max())) + 1 for i in range(4)]
    kq, kr = pack_keys(list(q.unbind(1)), ext), pack_keys(list(r.unbind(1)), ext)
    sk, order = torch.sort(kr)
    pos = torch.searchsorted(sk, kq).clamp(max=sk.numel() - 1)
    hit = sk[pos] == kq
    return torch.where(hit, order[pos], torch.full_like(pos, -1))


def _face_pairs(x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All (neighbour row, row) pairs of face-adjacent voxels, from the (cached) 3^3 submanifold neighbour map."""
    nmap, _ = neighbor_map(x, 3)
    offs = kernel_offsets(3).abs().sum(1).tolist()
    pairs = [nmap.pairs(k) for k in range(nmap.kernel_volume) if offs[k] == 1 and k != nmap.identity_offset]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


@torch.no_grad()
def propagate_band_sign(x: SparseTensor, known: torch.Tensor, sign: torch.Tensor, max_iters: int = 64) -> torch.Tensor:
    """Signs (+-1) of all voxels of ``x`` from the ``known`` ones (flood fill over face neighbours); unreached -> +1."""
    known = known.clone()
    s = torch.where(known, sign.sign().float(), torch.zeros_like(sign, dtype=torch.float32))
    s = torch.where(known & (s == 0), torch.ones_like(s), s)
    src, dst = _face_pairs(x)
    for _ in range(max_iters):
        if bool(known.all()):
            break
        votes = torch.zeros(x.num_voxels, dtype=torch.float32, device=x.device).index_add_(0, dst, s[src])
        reached = torch.zeros_like(known).index_fill_(0, dst[known[src]], True)
        new = ~known & reached
        if not bool(new.any()):
            break
        s = torch.where(new, torch.where(votes >= 0, 1.0, -1.0), s)
        known = known | new
    return torch.where(known, s, torch.ones_like(s))


def decoded_targets(decoded: SparseTensor, inputs: SparseTensor, target: SparseTensor | None = None):
    """Targets of the decoded voxels: ``(value [M], in_rows [M])`` where ``in_rows`` is each decoded voxel's row in
    ``inputs`` (-1 for extra voxels); see the module docstring for the extra voxels' values."""
    in_rows = lookup_rows(decoded.coords, inputs.coords)
    is_in = in_rows >= 0
    value = torch.zeros(decoded.num_voxels, dtype=torch.float32, device=decoded.device)
    value[is_in] = inputs.feats[in_rows[is_in], 0].float()
    known = is_in.clone()
    if target is not None:
        t_rows = lookup_rows(decoded.coords, target.coords)
        extra_gt = ~is_in & (t_rows >= 0)
        value[extra_gt] = target.feats[t_rows[extra_gt], 0].float()
        known |= extra_gt
    if not bool(known.all()):
        sign = propagate_band_sign(decoded, known, value)
        value = torch.where(known, value, sign)
    return value, in_rows


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    mean, logvar = mean.float(), logvar.float()
    if mean.numel() == 0:
        return mean.sum()
    return 0.5 * torch.mean(mean.square() + logvar.exp() - 1.0 - logvar)


@dataclass
class LossWeights:
    """Eq. 3 weights (paper: 1, 0.1, 1, 1e-3); ``prune`` weights the optional pruning BCE."""

    in_: float = 1.0
    ext: float = 0.1
    sharp: float = 1.0
    kl: float = 1e-3
    prune: float = 1.0


def _mse(pred: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not bool(mask.any()):
        return pred.sum() * 0.0
    return F.mse_loss(pred[mask], tgt[mask])


def ss_vae_losses(
    decoded: SparseTensor,
    inputs: SparseTensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    weights: LossWeights,
    sharp: torch.Tensor | None = None,
    target: SparseTensor | None = None,
    prune_logits: list[torch.Tensor] | None = None,
    prune_targets: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. 2-3: ``{"total", "in", "ext", "sharp", "kl"(, "prune")}``; ``sharp`` is a bool mask over ``inputs`` rows."""
    pred = decoded.feats[:, 0].float()
    value, in_rows = decoded_targets(decoded, inputs, target)
    is_in = in_rows >= 0
    losses = {"in": _mse(pred, value, is_in), "ext": _mse(pred, value, ~is_in)}
    if sharp is not None:
        sharp = sharp.to(device=decoded.device, dtype=torch.bool).reshape(-1)
        if sharp.numel() != inputs.num_voxels:
            raise D3S2Error(f"sharp mask has {sharp.numel()} entries but the input has {inputs.num_voxels} voxels "
                            "(give one bool per input row, as collate_sparse_sdf does)")
        is_sharp = is_in & sharp[in_rows.clamp(min=0)]
        losses["sharp"] = _mse(pred, value, is_sharp)
    else:
        losses["sharp"] = pred.sum() * 0.0
    losses["kl"] = kl_divergence(mean, logvar)
    total = (weights.in_ * losses["in"] + weights.ext * losses["ext"] + weights.sharp * losses["sharp"]
             + weights.kl * losses["kl"])
    if prune_logits:
        bce = [F.binary_cross_entropy_with_logits(lg.float(), tg.float())
               for lg, tg in zip(prune_logits, prune_targets)]
        losses["prune"] = torch.stack(bce).mean()
        total = total + weights.prune * losses["prune"]
    losses["total"] = total
    return losses
