"""The release's two refiner networks (``model_refiner.ckpt``: 512 SDF refiner; ``model_refiner_1024.ckpt``: 1024
sign refiner), one patch at a time (issue 20; shared/reference/official-release.md "Refiners").

Only the networks live here; tiling a volume into patches, blending and thresholding are the run logic's
(:mod:`d3s2.geometry.refine`).

* :class:`SDFRefiner` (the authors' ``Voxel_RefinerXL``): ``conv_in`` (SDF -> 8) and ``latent_mlp`` (the decoder's 32
  features per voxel -> 8; Linear-ReLU x3, Linear) concatenated into the dense UNet (:class:`~d3s2.nn.unet3d.UNet3d`,
  channels 8/32/128/512), then an adaptive 27-tap filter (:mod:`d3s2.nn.adaptive_filter`), ``mid_conv``, a second
  filter, ``conv_out`` (8 -> 1), a third filter whose taps come from the 8-channel features, and tanh. Input: a patch
  of the dense SDF (1 outside the band) and of the features (0 outside); output: the refined SDF of the patch.
* :class:`SignRefiner` (``Voxel_RefinerXL_sign``): ``conv_in`` (SDF -> 8), the UNet, ``conv_out`` (8 -> 1), sigmoid:
  the probability that a voxel of the (2x mean-pooled) SDF patch is outside.

Both keep the release's state-dict keys (so its checkpoints load with ``strict=True``) and its precision rules under
``.to(torch.float16)`` (convolutions and linears fp16, GroupNorm parameters and statistics fp32). Under
``torch.no_grad`` the forward takes the lean paths of the UNet and of the filter (no full-size fp32 copies; see those
modules); with autograd on, the plain ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.nn.adaptive_filter import adaptive_filter
from d3s2.nn.unet3d import UNet3d

__all__ = ["SDFRefinerConfig", "SignRefinerConfig", "SDFRefiner", "SignRefiner", "REFINERS",
           "load_official_state_dict", "load_refiner_checkpoint", "build_refiner", "check_config"]

# depth slabs of the per-voxel MLP: at most this many voxels through it at once
_MLP_VOXELS = 1 << 21


@dataclass
class SDFRefinerConfig:
    """The 512 SDF refiner (defaults: the release's ``refiner`` params). ``patch_size`` / ``patch_stride`` /
    ``resolution``: the release's tiling of the 512^3 grid (27 patches of 192^3 at stride 160), used by the run
    logic; spatial sizes of a forward must be multiples of ``2 ** (len(block_out_channels) - 1)``."""

    in_channels: int = 1
    out_channels: int = 1
    feature_channels: int = 32
    mlp_hidden: int = 32
    mlp_layers: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [8, 32, 128, 512])
    layers_per_block: int = 2
    layers_mid_block: int = 2
    norm_groups: int = 4
    norm_eps: float = 1e-5
    filter_passes: int = 3
    patch_size: int = 192
    patch_stride: int = 160
    resolution: int = 512


@dataclass
class SignRefinerConfig:
    """The 1024 sign refiner (defaults: the release's ``refiner_1024`` params): runs on the 1024^3 SDF mean-pooled to
    ``resolution`` 512, in 27 patches of 256^3 at stride 128."""

    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: list[int] = field(default_factory=lambda: [8, 32, 128, 512])
    layers_per_block: int = 2
    layers_mid_block: int = 2
    norm_groups: int = 4
    norm_eps: float = 1e-5
    patch_size: int = 256
    patch_stride: int = 128
    resolution: int = 512
    # CUDA only: run the UNet on channels-last 3-D activations (cuDNN's native fp16 layout: no two transposes per
    # convolution; 256^3 patch 0.142 vs 0.162 s on an H200, 2.75 vs 3.75 GiB). Same function, other rounding.
    channels_last: bool = True


def check_config(cfg, where: str) -> None:
    """One-line D3S2Error for a refiner config the UNet cannot build or run."""
    ch = list(cfg.block_out_channels)
    if len(ch) < 1 or any(int(c) <= 0 for c in ch):
        raise D3S2Error(f"{where}: block_out_channels must be positive widths, got {ch}")
    widths = set(ch) | {2 * ch[0]} | {a + b for a, b in zip(ch, ch[1:])} | {2 * c for c in ch}
    bad = sorted(w for w in widths if w % cfg.norm_groups)
    if bad:
        raise D3S2Error(f"{where}: norm_groups {cfg.norm_groups} does not divide the UNet width {bad[0]} "
                        f"(block_out_channels {ch})")
    for name in ("in_channels", "out_channels", "layers_per_block", "patch_size"):
        if int(getattr(cfg, name)) < 1:
            raise D3S2Error(f"{where}: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.layers_mid_block < 0:
        raise D3S2Error(f"{where}: layers_mid_block must be >= 0, got {cfg.layers_mid_block}")
    f = 2 ** (len(ch) - 1)
    if cfg.patch_size % f:
        raise D3S2Error(f"{where}: patch_size {cfg.patch_size} is not a multiple of {f} (the UNet halves it "
                        f"{len(ch) - 1} times)")


def _check_patch(x: torch.Tensor, channels: int, factor: int, name: str, where: str) -> None:
    if x.dim() != 5 or x.shape[1] != channels:
        raise D3S2Error(f"{where}: {name} must be [B, {channels}, D, H, W], got {list(x.shape)}")
    if any(s % factor or s == 0 for s in x.shape[2:]):
        raise D3S2Error(f"{where}: patch size {list(x.shape[2:])} must be a positive multiple of {factor} per axis "
                        "(the UNet's down-sampling)")


class _Refiner(nn.Module):
    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def _unet_in(self, sdf: torch.Tensor) -> torch.Tensor:
        _check_patch(sdf, self.config.in_channels, self.unet3d1.factor, "sdf", type(self).__name__)
        return self.conv_in(sdf.to(self.dtype))


class SDFRefiner(_Refiner):
    """See the module docstring. ``forward(sdf [B, 1, P, P, P], features [B, 32, P, P, P]) -> [B, 1, P, P, P]``:
    the refined SDF of one patch, tanh applied (the release's per-patch output at 512, before blending)."""

    config_class = SDFRefinerConfig

    def __init__(self, config: SDFRefinerConfig | None = None):
        super().__init__()
        cfg = self.config = config or SDFRefinerConfig()
        check_config(cfg, "SDFRefinerConfig")
        if cfg.mlp_layers < 2:
            raise D3S2Error(f"SDFRefinerConfig: mlp_layers must be >= 2, got {cfg.mlp_layers}")
        c = cfg.block_out_channels[0]
        self.feature_channels = cfg.feature_channels
        self.unet3d1 = UNet3d(2 * c, list(cfg.block_out_channels), cfg.layers_per_block, cfg.layers_mid_block,
                              cfg.norm_groups, cfg.norm_eps)
        self.conv_in = nn.Conv3d(cfg.in_channels, c, 3, padding=1)
        dims = [cfg.feature_channels] + [cfg.mlp_hidden] * (cfg.mlp_layers - 1)
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.latent_mlp = nn.Module()
        self.latent_mlp.net = nn.Sequential(*layers, nn.Linear(dims[-1], c))
        for i in (1, 2, 3):
            setattr(self, f"adaptive_conv{i}", nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.ReLU(),
                                                            nn.Conv3d(c, 27, 3, padding=1, bias=False)))
        self.mid_conv = nn.Conv3d(c, c, 3, padding=1)
        self.conv_out = nn.Conv3d(c, cfg.out_channels, 3, padding=1)

    def features_mlp(self, features: torch.Tensor) -> torch.Tensor:
        """The per-voxel MLP on [B, F, D, H, W] features -> [B, 8, D, H, W] (depth slabs without autograd)."""
        net = self.latent_mlp.net
        features = features.to(self.dtype)
        if torch.is_grad_enabled():
            return net(features.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        b, _, d, h, w = features.shape
        out = features.new_empty(b, net[-1].out_features, d, h, w)
        step = max(1, _MLP_VOXELS // max(1, b * h * w))
        for d0 in range(0, d, step):
            out[:, :, d0:d0 + step] = net(features[:, :, d0:d0 + step].permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return out

    def forward(self, sdf: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = self._unet_in(sdf)
        if features.shape[0] != sdf.shape[0] or features.shape[2:] != sdf.shape[2:] or features.dim() != 5 \
                or features.shape[1] != self.feature_channels:
            raise D3S2Error(f"SDFRefiner: features must be [B, {self.feature_channels}, D, H, W] matching the sdf "
                            f"patch {list(sdf.shape)}, got {list(features.shape)}")
        h = self.unet3d1(torch.cat([x, self.features_mlp(features)], 1))
        del x
        h = adaptive_filter(h, self.adaptive_conv1(h), self.config.filter_passes)
        h = self.mid_conv(h)
        h = adaptive_filter(h, self.adaptive_conv2(h), self.config.filter_passes)
        out = adaptive_filter(self.conv_out(h), self.adaptive_conv3(h), self.config.filter_passes)
        return torch.tanh(out)


class SignRefiner(_Refiner):
    """See the module docstring. ``forward(sdf [B, 1, P, P, P]) -> [B, 1, P, P, P]``: the sigmoid probability per
    voxel (the release sets the sign to +1 where it is >= 0.5, else -1)."""

    config_class = SignRefinerConfig

    def __init__(self, config: SignRefinerConfig | None = None):
        super().__init__()
        cfg = self.config = config or SignRefinerConfig()
        check_config(cfg, "SignRefinerConfig")
        c = cfg.block_out_channels[0]
        self.unet3d1 = UNet3d(c, list(cfg.block_out_channels), cfg.layers_per_block, cfg.layers_mid_block,
                              cfg.norm_groups, cfg.norm_eps)
        self.conv_in = nn.Conv3d(cfg.in_channels, c, 3, padding=1)
        self.conv_out = nn.Conv3d(c, cfg.out_channels, 3, padding=1)

    def forward(self, sdf: torch.Tensor) -> torch.Tensor:
        x = self._unet_in(sdf)
        if self.config.channels_last and x.is_cuda and x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)  # every later conv keeps the input's layout
        return torch.sigmoid(self.conv_out(self.unet3d1(x)))


# release component -> (d3s2 class, checkpoint file, dict key)
REFINERS = {"refiner_512": (SDFRefiner, "model_refiner.ckpt", "refiner"),
            "refiner_1024": (SignRefiner, "model_refiner_1024.ckpt", "refiner")}


def load_official_state_dict(model: nn.Module, state_dict: dict, strict: bool = True, assign: bool = False):
    """Load a release refiner state dict (``torch.load(ckpt)["refiner"]``; same keys as d3s2's) strictly; a
    mismatch is one D3S2Error naming the first missing / unexpected / mis-shaped key."""
    if not isinstance(state_dict, dict):
        raise D3S2Error(f"{type(model).__name__}: expected a state dict, got {type(state_dict).__name__}")
    own = model.state_dict()
    name = type(model).__name__
    if strict:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing:
            raise D3S2Error(f"checkpoint does not match {name}: {len(missing)} missing keys (first: {missing[0]}), "
                            f"{len(unexpected)} unexpected; is it the other refiner, or another release?")
        if unexpected:
            raise D3S2Error(f"checkpoint does not match {name}: {len(unexpected)} unexpected keys (first: "
                            f"{unexpected[0]}); is it the other refiner, or another release?")
    for k, v in state_dict.items():
        if k in own and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape)):
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise D3S2Error(f"checkpoint does not match {name}: {k} is {got} in the checkpoint, "
                            f"{list(own[k].shape)} in the model; check the config")
    return model.load_state_dict(state_dict, strict=strict, assign=assign)


def build_refiner(which: str, config=None, empty: bool = False) -> nn.Module:
    """``which``: ``"refiner_512"`` / ``"refiner_1024"``; ``config``: its dataclass (default: the release's);
    ``empty``: parameters on the meta device (to be filled by :func:`load_refiner_checkpoint`)."""
    if which not in REFINERS:
        raise D3S2Error(f"unknown refiner '{which}' (known: {', '.join(REFINERS)})")
    cls = REFINERS[which][0]
    if empty:
        from d3s2.models.loading import empty_weights

        with empty_weights():
            return cls(config)
    return cls(config)


def load_refiner_checkpoint(path_or_state_dict, which: str, config=None) -> nn.Module:
    """A refiner built on the meta device and loaded strictly (the checkpoint's tensors become its parameters: no
    second copy). ``path_or_state_dict``: a release ``.ckpt`` (``{"refiner": state_dict}``), such a dict, or the
    state dict itself. The model stays on the checkpoint's device and dtype; ``.to(device, dtype)`` it."""
    from d3s2.models.loading import load_into_empty, torch_load_weights

    if which not in REFINERS:
        raise D3S2Error(f"unknown refiner '{which}' (known: {', '.join(REFINERS)})")
    where = which
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        where = os.fspath(obj)
        path = Path(obj)
        if not path.is_file():
            raise D3S2Error(f"missing refiner checkpoint {path} (the release names it {REFINERS[which][1]})")
        obj = torch_load_weights(path)
    if not isinstance(obj, dict):
        raise D3S2Error(f"{where}: expected a dict, got {type(obj).__name__}")
    key = REFINERS[which][2]
    sd = obj[key] if key in obj and isinstance(obj[key], dict) else obj
    model = build_refiner(which, config, empty=True)
    try:
        load_into_empty(model, sd, load_official_state_dict)
    except D3S2Error as exc:
        if where == which:
            raise
        raise D3S2Error(f"{where} [{key}]: {exc}") from exc
    return model.eval()
