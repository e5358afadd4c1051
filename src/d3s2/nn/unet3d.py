"""Dense 3D UNet of the release's two refiners (``model_refiner.ckpt`` / ``model_refiner_1024.ckpt``).

The release refines the decoded SDF with a dense UNet over 192^3 / 256^3 patches (shared/reference/official-release.md,
"Refiners"). Its layout, read off the authors' classes (facts only, written anew here):

* ``conv_in`` Conv3d 3^3 to ``channels[0]``; per level a down block of ``layers_per_block`` residual blocks and, but on
  the last level, a stride-2 Conv3d(k=2) down-sampler; a middle block of ``layers_mid_block + 1`` residual blocks at
  the last width; up blocks of ``layers_per_block + 1`` residual blocks on ``cat(hidden, skip)`` and, but on the last,
  a ConvTranspose3d(k=2, s=2) up-sampler; ``conv_norm_out`` GroupNorm + SiLU; no output conv.
* residual block: GroupNorm (computed in fp32, cast back) -> SiLU -> Conv3d 3^3 -> GroupNorm -> SiLU -> Conv3d 3^3,
  plus the input (through a 1x1x1 conv when the width changes); GroupNorm with 4 groups, eps 1e-5.
* fp16 as released (``use_fp16``): convolutions in fp16, GroupNorm parameters stay fp32. :class:`FP32GroupNorm`
  keeps that under ``module.to(torch.float16)``.

Parameter names equal the release's (``down_blocks.{i}.resnets.{j}.norm1``, ``...downsamplers.0.conv``,
``mid_block.resnets.{j}``, ``up_blocks.{i}.upsamplers.0.conv``, ``conv_norm_out``), so its state dicts load strictly.

Memory. A 256^3 patch at width 40 is 1.3 GB in fp16, and GroupNorm done as ``norm(x.float()).half()`` holds three
such tensors (fp32 copy, fp32 result, fp16 result). Without autograd (``torch.no_grad``) the blocks take a lean path:
GroupNorm statistics are computed in fp32 over depth slabs of bounded size and the normalisation in fp32 straight
into an output of the input's dtype (:func:`group_norm_silu`), the second normalisation and the residual sum are in
place, the up blocks never build ``cat(hidden, skip)`` (:meth:`ResnetBlock3d.forward_cat`: statistics per part,
normalisation in place, convolutions split by input channels) and skip tensors are released as soon as their up
block has used them. With autograd on, the plain PyTorch path (:func:`group_norm_silu_reference`)
runs; tests compare the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d3s2.ops.volume import channel_stats, norm_apply, resolve_volume_backend

__all__ = ["FP32GroupNorm", "group_norm_silu", "group_norm_silu_parts", "group_norm_silu_reference", "ResnetBlock3d", "DownBlock3d",
           "UpBlock3d", "MidBlock3d", "UNet3d"]

# elements (of all channels and samples) per slab of the lean GroupNorm's statistics: 128 MiB of fp32 temporaries
SLAB_ELEMENTS = 1 << 25


class FP32GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose parameters stay fp32 when the module is cast to fp16 / bf16 (the release's
    ``use_fp16`` converts convolutions only); device moves apply as usual."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for p in self.parameters(recurse=False):
            if p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self


def group_norm_silu_reference(x: torch.Tensor, norm: nn.GroupNorm, act: bool = True) -> torch.Tensor:
    """The release's ``silu(norm(x.float()).to(x.dtype))`` (plain PyTorch; autograd-safe)."""
    y = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)
    return F.silu(y) if act else y


def _slab(x: torch.Tensor) -> int:
    per_depth = max(1, x.numel() // max(1, x.shape[2]))
    return max(1, SLAB_ELEMENTS // per_depth)


def _channel_stats(x: torch.Tensor, slab: int | None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per (sample, channel) mean and sum of squared deviations (fp64) and the voxel count: the Triton kernel of
    :func:`d3s2.ops.volume.channel_stats` where ``backend`` resolves to it (``slab`` unset), else fp32 ``var_mean``
    of depth slabs combined with Chan et al.'s pairwise update (one read of ``x``, no full-size fp32 copy)."""
    if slab is None and resolve_volume_backend(backend, x, channels_last=True) == "triton":
        return channel_stats(x, backend="triton")
    b, c = x.shape[:2]
    if slab is None and x.dtype in (torch.float32, torch.float64) and x.is_contiguous():
        var, mean = torch.var_mean(x.reshape(b, c, -1), dim=-1, correction=0)
        n = x.numel() // (b * c)
        return mean.double(), var.double() * n, n
    step = slab or _slab(x)
    count, mean, m2 = 0, None, None
    for d0 in range(0, x.shape[2], step):
        chunk = x[:, :, d0:d0 + step].to(torch.float64 if x.dtype == torch.float64 else torch.float32).reshape(b, c, -1)
        v, m = torch.var_mean(chunk, dim=-1, correction=0)
        n = chunk.shape[-1]
        m, v = m.double(), v.double()
        if mean is None:
            count, mean, m2 = n, m, v * n
            continue
        delta = m - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + v * n + delta.square() * (count * n / total)
        count = total
    return mean, m2, count


def _affine(parts: list[torch.Tensor], norm: nn.GroupNorm, slab: int | None,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of ``cat(parts, 1)`` as a per-channel affine map ``y = x * scale + shift`` ([B, C] fp64 each;
    F.group_norm's form), groups spanning the parts' channels as they would in the concatenation."""
    stats = [_channel_stats(p, slab, backend) for p in parts]
    n = stats[0][2]
    mean = torch.cat([m for m, _, _ in stats], 1)
    m2 = torch.cat([q for _, q, _ in stats], 1)
    b, c = mean.shape
    g = norm.num_groups
    gm = mean.reshape(b, g, -1)
    group_mean = gm.mean(-1, keepdim=True)  # equal counts per channel
    group_var = (m2.reshape(b, g, -1).sum(-1, keepdim=True) + n * (gm - group_mean).square().sum(-1, keepdim=True)) \
        / (n * gm.shape[-1])
    rstd = torch.rsqrt(group_var + norm.eps)
    scale = (rstd * torch.ones_like(gm)).reshape(b, c) * norm.weight.double()
    shift = norm.bias.double() - (group_mean * torch.ones_like(gm)).reshape(b, c) * scale
    return scale, shift


@torch.no_grad()
def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm, act: bool = True, out: torch.Tensor | None = None,
                    slab: int | None = None, backend: str = "auto") -> torch.Tensor:
    """:func:`group_norm_silu_reference` without full-size fp32 temporaries: statistics from fp32 depth slabs
    (``slab`` depths per slab; default: bounded by :data:`SLAB_ELEMENTS`, one pass without slabs for contiguous
    fp32), then ``x * scale + shift`` per channel computed in fp32 and written in ``x.dtype``. ``out``: where to write
    (may be ``x``: in place). ``x``: [B, C, D, ...] with C divisible by the groups. ``backend``: of
    :mod:`d3s2.ops.volume` (``auto``: its Triton kernels for contiguous CUDA tensors, both passes)."""
    if x.numel() == 0:
        return x.clone() if out is None else out
    return norm_apply(x, *_affine([x], norm, slab, backend), act, out, backend=backend)


@torch.no_grad()
def group_norm_silu_parts(parts: list[torch.Tensor], norm: nn.GroupNorm, act: bool = True,
                          slab: int | None = None, backend: str = "auto") -> list[torch.Tensor]:
    """GroupNorm(+SiLU) of ``torch.cat(parts, 1)`` returned as the normalised parts, written IN PLACE into the
    parts (the concatenation is never built)."""
    scale, shift = _affine(parts, norm, slab, backend)
    out, c0 = [], 0
    for p in parts:
        c1 = c0 + p.shape[1]
        out.append(norm_apply(p, scale[:, c0:c1], shift[:, c0:c1], act, p, backend=backend))
        c0 = c1
    return out


def _norm_act(x: torch.Tensor, norm: nn.GroupNorm, in_place: bool = False) -> torch.Tensor:
    if torch.is_grad_enabled():
        return group_norm_silu_reference(x, norm)
    return group_norm_silu(x, norm, out=x if in_place else None)


class ResnetBlock3d(nn.Module):
    """GN-SiLU-conv3 twice plus the (1x1x1-projected when the width changes) input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = FP32GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = FP32GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_norm_act(x, self.norm1))
        h = self.conv2(_norm_act(h, self.norm2, in_place=True))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h + skip if torch.is_grad_enabled() else h.add_(skip)

    def forward_cat(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``forward(torch.cat([x, skip], 1))`` without building the concatenation; without autograd both inputs
        are overwritten (the up blocks own them). The convolutions over the concatenation are split by input
        channels (``conv(cat(a, b), W) = conv(a, W_a) + conv(b, W_b)``)."""
        if torch.is_grad_enabled() or self.conv_shortcut is None:
            return self(torch.cat([x, skip], 1))
        ca = x.shape[1]
        res = _conv_split(self.conv_shortcut, x, skip, ca)
        x, skip = group_norm_silu_parts([x, skip], self.norm1)
        h = _conv_split(self.conv1, x, skip, ca)
        del x, skip
        h = self.conv2(_norm_act(h, self.norm2, in_place=True))
        return h.add_(res)


def _conv_split(conv: nn.Conv3d, a: torch.Tensor, b: torch.Tensor, ca: int) -> torch.Tensor:
    w = conv.weight
    out = F.conv3d(a, w[:, :ca], conv.bias, conv.stride, conv.padding)
    return out.add_(F.conv3d(b, w[:, ca:], None, conv.stride, conv.padding))


class DownBlock3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, downsample: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3d(in_channels if i == 0 else out_channels, out_channels, groups, eps)
                                     for i in range(layers))
        self.downsamplers = nn.ModuleList([_Down(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class _Down(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


class _Up(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose3d(channels, channels, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


class UpBlock3d(nn.Module):
    """``layers`` residual blocks on ``cat(hidden, skip)`` (skips taken from the end of the list and dropped)."""

    def __init__(self, prev_channels: int, out_channels: int, skip_last: int, layers: int, upsample: bool,
                 groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3d((prev_channels if i == 0 else out_channels) + (skip_last if i == layers - 1 else
                                                                         out_channels), out_channels, groups, eps)
            for i in range(layers))
        self.upsamplers = nn.ModuleList([_Up(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for r in self.resnets:
            x = r.forward_cat(x, skips.pop())
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock3d(nn.Module):
    def __init__(self, channels: int, layers: int, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3d(channels, channels, groups, eps) for _ in range(layers + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return x


class UNet3d(nn.Module):
    """The refiners' UNet (module docstring): [B, in, D, H, W] -> [B, channels[0], D, H, W] (GN-SiLU applied); each
    spatial size must be a multiple of ``2 ** (len(channels) - 1)``."""

    def __init__(self, in_channels: int, channels: list[int], layers_per_block: int, layers_mid_block: int,
                 groups: int = 4, eps: float = 1e-5):
        super().__init__()
        n = len(channels)
        self.factor = 2 ** (n - 1)
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock3d(channels[max(i - 1, 0)], channels[i], layers_per_block, i < n - 1, groups, eps)
            for i in range(n))
        self.mid_block = MidBlock3d(channels[-1], layers_mid_block, groups, eps)
        rev = list(reversed(channels))
        self.up_blocks = nn.ModuleList(
            UpBlock3d(rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)], layers_per_block + 1, i < n - 1, groups,
                      eps)
            for i in range(n))
        self.conv_norm_out = FP32GroupNorm(groups, channels[0], eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, skips)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x, skips)
        return _norm_act(x, self.conv_norm_out, in_place=True)
