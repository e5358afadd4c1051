"""Parity rows of the release's two refiner networks, one patch each (issue 20 part A).

``refiner_512_patch``: the authors' ``Voxel_RefinerXL`` per-patch sequence inside its ``run()`` (``conv_in``,
``latent_mlp`` on the channels-last features, ``unet3d1`` on their concatenation, adaptive blocks 1 / 2 with
``mid_conv`` between, ``conv_out``, adaptive block 3 with taps from the 8-channel features, tanh), called on its
submodules, against :class:`d3s2.models.refiner.SDFRefiner` loaded by ``load_release`` from the same release folder.
``refiner_1024_patch``: ``Voxel_RefinerXL_sign``'s ``conv_in``, ``unet3d1``, ``conv_out``, sigmoid against
:class:`~d3s2.models.refiner.SignRefiner`; also counts the voxels whose sign (``p >= 0.5``) differs.

Inputs are what the run feeds a patch: a densified SDF band (1 everywhere but within two voxels of a bumpy sphere,
where it is ``s / tau``) and, at 512, the decoder's 32 features (random in the band, 0 elsewhere). Patch side: the
release's (192 / 256) with ``--size full``, 32 with ``--size small`` (the UNet halves it three times). fp32 always
(bound 1e-4 relative); on CUDA also fp16 as the release runs (``use_fp16``: convs / linears fp16, GroupNorm fp32;
bound 1e-2), with each side's peak memory above its weights and its time. The 512 row also reports the UNet's
output alone (``unet_max_rel``): with random weights the three L1-normalised filters shrink the SDF towards
``conv_out``'s bias, so the UNet is compared where its signal is large.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from compare import rel_err, row

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for timing.py
from timing import timed  # noqa: E402

NAMES = {"refiner_512_patch": ("refiner", "refiner_512"), "refiner_1024_patch": ("refiner_1024", "refiner_1024")}


def band_patch(p: int, features: int, seed: int = 0):
    """A patch as densified from a decoded band: SDF 1 outside the band, ``s / tau`` inside; features in the band."""
    g = torch.Generator().manual_seed(seed)
    c = (torch.arange(p, dtype=torch.float64) + 0.5) / p * 2 - 1
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.sqrt((x + 0.3) ** 2 + (y - 0.2) ** 2 + z ** 2)
    s = r - 0.7 - 0.1 * torch.sin(5 * x) * torch.cos(4 * y)
    tau = 2 * 2.0 / p
    band = s.abs() < tau
    sdf = torch.ones(1, 1, p, p, p)
    sdf[0, 0][band] = (s[band] / tau).float()
    feats = None
    if features:
        feats = torch.zeros(1, features, p, p, p)
        feats[0][:, band] = torch.randn(features, int(band.sum()), generator=g)
    return sdf, feats, int(band.sum())


def theirs_sdf_patch(m, sdf, feats):
    from direct3d_s2.models.refiner.unet_refiner import adaptive_block

    inputs = m.conv_in(sdf)
    crop = m.latent_mlp(feats.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
    mid = m.unet3d1(torch.cat([inputs, crop], dim=1))
    del inputs, crop
    mid = adaptive_block(mid, m.adaptive_conv1)
    mid = m.mid_conv(mid)
    mid = adaptive_block(mid, m.adaptive_conv2)
    final = m.conv_out(mid)
    final = adaptive_block(final, m.adaptive_conv3, weights_=mid)
    return torch.tanh(final)


def theirs_sign_patch(m, sdf):
    return torch.sigmoid(m.conv_out(m.unet3d1(m.conv_in(sdf))))


def _fp64_truth(theirs, model, args_t, args_o, got, want, sign: bool) -> dict:
    """Both sides again in fp64 (cuDNN's fp32 3-D convolutions choose algorithms per shape, and the split
    convolutions of d3s2's lean path give it other shapes than the release's: their fp32 results differ by more
    than rounding of one formula; their blocks round each norm's input to fp32 even here). Reports fp64 ours vs fp64 theirs (the formula) and each fp32 side vs that truth."""
    t64 = copy.deepcopy(theirs).double()
    for m in t64.modules():  # their blocks call norm(x.float()): the norms read the (fp32-rounded) input in fp64
        if isinstance(m, torch.nn.GroupNorm):
            m.forward = types.MethodType(lambda self, x: F.group_norm(x.to(self.weight.dtype), self.num_groups,
                                                                      self.weight, self.bias, self.eps), m)
    o64 = copy.deepcopy(model).double()
    a_t = [a.double() for a in args_t]
    truth = (theirs_sign_patch(t64, *a_t) if sign else theirs_sdf_patch(t64, *a_t))
    del t64
    ours64 = o64(*[a.double() for a in args_o])
    del o64
    e = rel_err(ours64, truth)
    out = {"fp64_max_rel": e["max_rel"], "fp64_fro_rel": e["fro_rel"],
           "ours_fp32_vs_fp64_max_rel": rel_err(got, truth)["max_rel"],
           "theirs_fp32_vs_fp64_max_rel": rel_err(want, truth)["max_rel"]}
    if sign:
        out["fp64_sign_flips"] = int(((ours64 >= 0.5) != (truth >= 0.5)).sum())
    del ours64, truth
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def refiner_patch(h, name: str, patch: int | None = None) -> list[dict]:
    """Both precisions of one refiner row (see the module docstring); ``h``: a rows.Harness."""
    key, ours_name = NAMES[name]
    ours = getattr(h.ours, ours_name)
    if ours is None:
        raise RuntimeError(f"load_release did not load {ours_name} from {h.folder}")
    p = patch or (ours.config.patch_size if h.size == "full" else 32)
    sign = ours_name == "refiner_1024"
    sdf, feats, band = band_patch(p, 0 if sign else ours.feature_channels)
    dev = h.device
    dtypes = [torch.float32] + ([torch.float16] if dev.type == "cuda" else [])
    rows = []
    for dt in dtypes:
        theirs = (h.theirs[key] if dt == torch.float32 else h.release_fp16(key)).to(dev)
        model = (ours if dt == torch.float32 else copy.deepcopy(ours)).to(dev, dt)  # fp16: keep the fp32 weights
        x = sdf.to(dev, dt)
        f = feats.to(dev, dt) if feats is not None else None
        args_t = (theirs, x) if sign else (theirs, x, f)
        args_o = (x,) if sign else (x, f)
        want, t_theirs, m_theirs = timed(theirs_sign_patch if sign else theirs_sdf_patch, dev, *args_t)
        got, t_ours, m_ours = timed(model, dev, *args_o)
        extra = {"patch": p, "band_voxels": band, "seconds_theirs": t_theirs, "seconds_ours": t_ours,
                 "peak_gib_theirs": m_theirs, "peak_gib_ours": m_ours}
        if not sign:  # the UNet features alone (the filters shrink random-weight outputs towards conv_out's bias)
            u = torch.cat([theirs.conv_in(x), theirs.latent_mlp(f.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)], 1)
            e = rel_err(model.unet3d1(u), theirs.unet3d1(u))
            extra.update(unet_max_rel=e["max_rel"], unet_ref_max=e["ref_max"])
            del u
        if sign:
            extra["sign_flips"] = int(((got >= 0.5) != (want >= 0.5)).sum())
            extra["near_half"] = int(((want.float() - 0.5).abs() < 1e-3).sum())
        if dt == torch.float32:
            extra.update(_fp64_truth(theirs, model, args_t[1:], args_o, got, want, sign))
        label = (f"refiner 1024 (sign) patch {p}^3: sigmoid" if sign else
                 f"refiner 512 (SDF) patch {p}^3: tanh SDF")
        rows.append(row(label, rel_err(got, want), dt, dev, **extra))
        rows[-1]["row_id"] = name
        del want, got, theirs, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    h.theirs[key].cpu()
    ours.cpu()
    return rows
