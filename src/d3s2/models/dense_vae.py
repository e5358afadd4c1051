"""Dense occupancy VAE of the structure stage (paper Sec. 5.2: "an extra DiT to predict the indices"; Trellis-style).

A 64^3 occupancy grid (the active 8^3-blocks of a 512^3 SDF band) is encoded to an 8-channel latent at 16^3 and decoded
back to 64^3 occupancy logits; ``sigmoid(logits) >= 0.1`` gives the sparse latent indices of the 512 stage.

Architecture (shared/reference/official-release.md): input ``occ * 2 - 1``; encoder channels [32, 128, 512] with 2 res
blocks per level and 2 middle blocks; decoder [512, 128, 64] with 4 per level and 4 middle; ResBlock3d =
(ChannelLayerNorm, SiLU, Conv3d 3^3) x 2 with the second conv zero-initialised; down = Conv3d(k=2, s=2); up = Conv3d(c,
c_out * 8, 3) + 3D pixel shuffle; diagonal-Gaussian latent with a KL term.

Parameter names. The release fixes the architecture but we have not seen the VAE's state-dict keys. The names below are
PROVISIONAL (chosen to be the natural ones for this architecture):

    encoder.input_layer.{weight,bias}                      Conv3d(in, ch[0], 3)
    encoder.blocks.{i}.{norm1,conv1,norm2,conv2}.*         ResBlock3d (skip_connection.* only if channels change)
    encoder.blocks.{i}.conv.*                              down-sampling Conv3d(k2, s2)
    encoder.middle_block.{j}.*                             ResBlock3d
    encoder.out_layer.{0: ChannelLayerNorm, 2: Conv3d(ch[-1], 2 * latent, 3)}
    decoder.input_layer.*, decoder.middle_block.{j}.*, decoder.blocks.{i}.* (res blocks and up-sampling ``conv``),
    decoder.out_layer.{0, 2}

When a real checkpoint is at hand, verify them; if they differ, fill :data:`OFFICIAL_KEY_MAP` (prefix renames applied by
:func:`load_official_state_dict`) instead of renaming modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from d3s2.errors import D3S2Error
from d3s2.nn.norms import ChannelLayerNorm3d

__all__ = [
    "DenseShapeVAEConfig",
    "DenseShapeVAE",
    "DenseEncoder3d",
    "DenseDecoder3d",
    "ResBlock3d",
    "pixel_shuffle_3d",
    "occupancy_to_coords",
    "OFFICIAL_KEY_MAP",
    "remap_state_dict",
    "load_official_state_dict",
]


@dataclass
class DenseShapeVAEConfig:
    """Dense structure VAE (defaults: the paper / release model)."""

    resolution: int = 64
    in_channels: int = 1
    out_channels: int = 1
    latent_channels: int = 8
    encoder_channels: list[int] = field(default_factory=lambda: [32, 128, 512])
    encoder_res_blocks: int = 2
    encoder_middle_blocks: int = 2
    decoder_channels: list[int] = field(default_factory=lambda: [512, 128, 64])
    decoder_res_blocks: int = 4
    decoder_middle_blocks: int = 4
    kl_weight: float = 1e-3
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        if len(self.encoder_channels) != len(self.decoder_channels):
            raise D3S2Error("dense VAE: encoder_channels and decoder_channels must have the same number of levels")
        factor = 2 ** (len(self.encoder_channels) - 1)
        if self.resolution % factor:
            raise D3S2Error(f"dense VAE: resolution {self.resolution} is not divisible by the down-sampling {factor}")

    @property
    def latent_resolution(self) -> int:
        return self.resolution // 2 ** (len(self.encoder_channels) - 1)


def pixel_shuffle_3d(x: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """``[B, C * s^3, D, H, W]`` -> ``[B, C, sD, sH, sW]``; channel ``c * s^3 + i * s^2 + j * s + k`` goes to offset (i, j, k)."""
    b, c, d, h, w = x.shape
    co = c // scale**3
    x = x.view(b, co, scale, scale, scale, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, co, d * scale, h * scale, w * scale)


class ResBlock3d(nn.Module):
    """(ChannelLayerNorm, SiLU, Conv3d 3^3) x 2 plus identity (or 1x1 conv) skip; conv2 starts at zero."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = ChannelLayerNorm3d(channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if out_channels != channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class DownsampleBlock3d(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpsampleBlock3d(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, out_channels * 8, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


def _run(modules: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    for m in modules:
        if use_checkpoint and torch.is_grad_enabled() and m.training:
            x = checkpoint(m, x, use_reentrant=False)
        else:
            x = m(x)
    return x


class DenseEncoder3d(nn.Module):
    """``[B, in, R, R, R]`` -> mean and log-variance ``[B, latent, R/f, R/f, R/f]``."""

    def __init__(self, cfg: DenseShapeVAEConfig) -> None:
        super().__init__()
        ch = list(cfg.encoder_channels)
        self.use_checkpoint = cfg.use_checkpoint
        self.input_layer = nn.Conv3d(cfg.in_channels, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(cfg.encoder_res_blocks)]
            if i < len(ch) - 1:
                blocks.append(DownsampleBlock3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[-1]) for _ in range(cfg.encoder_middle_blocks)])
        self.out_layer = nn.Sequential(
            ChannelLayerNorm3d(ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.input_layer(x)
        h = _run(self.blocks, h, self.use_checkpoint)
        h = _run(self.middle_block, h, self.use_checkpoint)
        mean, logvar = self.out_layer(h).float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class DenseDecoder3d(nn.Module):
    """Latent ``[B, latent, r, r, r]`` -> logits ``[B, out, r*f, r*f, r*f]``."""

    def __init__(self, cfg: DenseShapeVAEConfig) -> None:
        super().__init__()
        ch = list(cfg.decoder_channels)
        self.use_checkpoint = cfg.use_checkpoint
        self.input_layer = nn.Conv3d(cfg.latent_channels, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[0]) for _ in range(cfg.decoder_middle_blocks)])
        blocks: list[nn.Module] = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(cfg.decoder_res_blocks)]
            if i < len(ch) - 1:
                blocks.append(UpsampleBlock3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(
            ChannelLayerNorm3d(ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], cfg.out_channels, 3, padding=1)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(z)
        h = _run(self.middle_block, h, self.use_checkpoint)
        h = _run(self.blocks, h, self.use_checkpoint)
        return self.out_layer(h)


class DenseShapeVAE(nn.Module):
    """Occupancy VAE: :meth:`encode` (occupancy in {0, 1}) -> latent; :meth:`decode` -> occupancy logits."""

    config_class = DenseShapeVAEConfig

    def __init__(self, config: DenseShapeVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or DenseShapeVAEConfig()
        self.encoder = DenseEncoder3d(self.config)
        self.decoder = DenseDecoder3d(self.config)

    def _check_input(self, occ: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if occ.ndim == 4:
            occ = occ.unsqueeze(1)
        expected = (cfg.in_channels, cfg.resolution, cfg.resolution, cfg.resolution)
        if occ.ndim != 5 or tuple(occ.shape[1:]) != expected:
            raise D3S2Error(f"dense VAE expects occupancy [B, {', '.join(map(str, expected))}], got {tuple(occ.shape)}")
        return occ

    def encode(
        self, occ: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Occupancy ``[B, (1,) R, R, R]`` in {0, 1} -> ``(z, mean, logvar)``; ``z = mean`` when ``sample`` is False."""
        occ = self._check_input(occ)
        x = occ.to(self.encoder.input_layer.weight.dtype) * 2 - 1
        mean, logvar = self.encoder(x)
        if not sample:
            return mean, mean, logvar
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise, mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.to(self.decoder.input_layer.weight.dtype))

    def forward(self, occ: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        z, mean, logvar = self.encode(occ, sample=sample)
        return {"logits": self.decode(z), "z": z, "mean": mean, "logvar": logvar}

    def loss(self, occ: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        """Binary cross-entropy on occupancy + ``kl_weight`` * KL(q(z|x) || N(0, I)) (mean over latent elements)."""
        occ = self._check_input(occ)
        out = self(occ, sample=sample)
        bce = F.binary_cross_entropy_with_logits(out["logits"].float(), occ.float())
        mean, logvar = out["mean"], out["logvar"]
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return {"loss": bce + self.config.kl_weight * kl, "bce": bce, "kl": kl, "logits": out["logits"]}


def occupancy_to_coords(logits: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Occupancy logits ``[B, 1, R, R, R]`` -> int coords ``[N, 4]`` (batch, x, y, z) where ``sigmoid >= threshold``."""
    return torch.nonzero(torch.sigmoid(logits.float())[:, 0] >= threshold).to(torch.int32)


# Prefix renames from the authors' checkpoint keys to ours; empty until verified against a real checkpoint.
OFFICIAL_KEY_MAP: dict[str, str] = {}


def remap_state_dict(state_dict: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by prefix (longest matching prefix wins)."""
    prefixes = sorted(key_map, key=len, reverse=True)
    out = {}
    for key, value in state_dict.items():
        for p in prefixes:
            if key.startswith(p):
                key = key_map[p] + key[len(p):]
                break
        out[key] = value
    return out


def load_official_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], key_map: dict[str, str] | None = None, strict: bool = True,
    assign: bool = False,
):
    """Load an authors' state dict (e.g. ``torch.load(ckpt)["vae"]``) after applying ``key_map`` renames.
    ``assign=True`` makes the checkpoint's tensors the model's parameters (no copy; for models built on the meta
    device)."""
    sd = remap_state_dict(state_dict, OFFICIAL_KEY_MAP if key_map is None else key_map)
    if strict:
        own = set(model.state_dict())
        missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
        if missing or unexpected:
            raise D3S2Error(
                f"checkpoint does not match {type(model).__name__}: {len(missing)} missing keys (first: "
                f"{missing[:3]}), {len(unexpected)} unexpected keys (first: {unexpected[:3]}); check the config, "
                "or fill the model's OFFICIAL_KEY_MAP"
            )
    if strict:
        own = model.state_dict()
        # torchsparse stores 1x1x1 kernels as [Cin, Cout]; d3s2's SparseConv3d reshapes them on load
        bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)
               and not (k.endswith("kernel") and tuple(own[k].shape) == (1, *sd[k].shape))]
        if bad:
            k = bad[0]
            raise D3S2Error(f"checkpoint does not match {type(model).__name__}: {len(bad)} tensors differ in shape "
                            f"(first: {k} is {list(sd[k].shape)} in the checkpoint, {list(own[k].shape)} in the "
                            "model); check the config")
    try:
        return model.load_state_dict(sd, strict=strict, assign=assign)
    except RuntimeError as exc:  # shape mismatches
        msg = " ".join(str(exc).split())
        raise D3S2Error(f"checkpoint does not match {type(model).__name__}: {msg[:400]}") from exc
