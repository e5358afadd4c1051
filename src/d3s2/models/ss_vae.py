"""Sparse SDF VAE, SS-VAE (paper Sec. 3, 3.1-3.3, Eq. 1-3; Fig. 2 upper half).

A sparse SDF volume (voxels with ``|s| < tau``, Eq. 1; values in scaled units ``s / tau``, see
:mod:`d3s2.models.ss_vae_losses`) at resolution R is encoded to a 16-channel sparse latent at R/8 (latent voxels = the
unique ``input coords // 8``) and decoded back to R, where the decoder predicts the SDF on every child of every latent
voxel: the input voxels plus "extra" voxels. Same network for the 512 (64^3 latent) and 1024 (128^3 latent) models.

Architecture (shared/reference/official-release.md), state-dict keys::

    encoder.input_layer1.{weight,bias}                 Linear(1, 32) on the SDF value
    encoder.downsample.{0,1,2}.*                       SparseDownBlock3d 32->64->128->512 (GN+SiLU, mean-pool x2,
                                                       conv3-GN-SiLU-conv3 + 1x1 skip on the pooled input)
    encoder.input_layer.{weight,bias}                  Linear(512, 512), then + APE of the latent coordinates
    encoder.blocks.{i}.attn.{to_qkv,to_out}.*          window attention, window 8, shift 4 on odd blocks, 8 x 64
    encoder.blocks.{i}.mlp.mlp.{0,2}.*                 GELU(tanh) MLP, ratio 4; norms non-affine (no keys)
    encoder.out_layer.{weight,bias}                    non-affine LayerNorm, then Linear(512, 32) = [mean | logvar]
    decoder.input_layer.{weight,bias}                  Linear(16, 512), then + APE
    decoder.blocks.{i}.*                               as the encoder's
    decoder.upsample.{0,1,2}.*                         SparseSubdivideBlock3d 512->128->64->32 (conv3+SiLU,
                                                       subdivide x2, conv3+SiLU)
    decoder.out_layer.{weight,bias}                    Linear(32, 1), then tanh

The ``encoder.`` / ``decoder.`` prefixes and the names inside the conv blocks (see
:mod:`d3s2.models.ss_vae_blocks`) are PROVISIONAL until checked against a real ``model_sparse_512.ckpt["vae"]``;
if they differ, fill :data:`OFFICIAL_KEY_MAP` (prefix renames applied by :func:`load_official_state_dict`). Also
unverified: the APE factor of the VAE (config ``pe_factor``, 1.0), whether the decoder normalises before up-sampling
(``decoder_out_norm``, off), LayerNorm epsilon (1e-6) and the ``[mean | logvar]`` channel order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.models.dense_vae import load_official_state_dict as _load
from d3s2.models.ss_vae_blocks import SparseDownBlock3d, SparseSubdivideBlock3d, SparseWindowTransformerBlock
from d3s2.models.ss_vae_losses import LossWeights, lookup_rows, scale_sdf, ss_vae_losses
from d3s2.nn.embeddings import AbsolutePositionEmbedder
from d3s2.sparse import SparseLinear, SparseTensor, child_offsets

__all__ = ["SSVAEConfig", "SSVAE", "SSVAEEncoder", "SSVAEDecoder", "SSVAEOutput", "OFFICIAL_KEY_MAP",
           "load_official_state_dict"]


@dataclass
class SSVAEConfig:
    """SS-VAE (defaults: the paper / release model at 512^3, latent 64^3)."""

    resolution: int = 512
    latent_channels: int = 16
    model_channels: int = 512
    encoder_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 512])
    decoder_channels: list[int] = field(default_factory=lambda: [128, 64, 32])
    num_encoder_blocks: int = 4
    num_decoder_blocks: int = 4
    num_heads: int = 8
    head_dim: int = 64
    mlp_ratio: float = 4.0
    window: int = 8
    num_groups: int = 32
    pool_divisor: str = "count"  # encoder mean pooling: "count" | "count_plus_one" (the release, d3s2.sparse.pool)
    encoder_out_eps: float = 1e-6  # epsilon of the encoder's final LayerNorm (the release: 1e-5, torch's default)
    qkv_bias: bool = True
    pe_factor: float = 1.0
    decoder_out_norm: bool = False
    prune_children: bool = False
    attn_backend: str = "auto"
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    lambda_in: float = 1.0
    lambda_ext: float = 0.1
    lambda_sharp: float = 1.0
    kl_weight: float = 1e-3
    prune_weight: float = 1.0
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        if len(self.encoder_channels) < 2:
            raise D3S2Error("SS-VAE: encoder_channels needs the input width and at least one down-sampling level")
        if len(self.decoder_channels) != len(self.encoder_channels) - 1:
            raise D3S2Error(f"SS-VAE: {len(self.encoder_channels) - 1} down-sampling levels need as many "
                            f"decoder_channels (up-sampling levels), got {len(self.decoder_channels)}")
        if self.resolution % self.downsample_factor:
            raise D3S2Error(f"SS-VAE: resolution {self.resolution} is not divisible by {self.downsample_factor}")
        if self.window < 1 or self.window % 2:
            raise D3S2Error(f"SS-VAE: window must be a positive even number (shift = window / 2), got {self.window}")
        for c in [*self.encoder_channels[:-1], *self.encoder_channels[1:]]:
            if c % self.num_groups:
                raise D3S2Error(f"SS-VAE: GroupNorm({self.num_groups}) cannot split {c} encoder channels")
        if self.attn_backend not in ("auto", "triton", "reference"):
            raise D3S2Error(f"SS-VAE: attn_backend must be auto, triton or reference, got {self.attn_backend!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_channels) - 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.downsample_factor

    def loss_weights(self) -> LossWeights:
        return LossWeights(self.lambda_in, self.lambda_ext, self.lambda_sharp, self.kl_weight, self.prune_weight)


def _blocks(cfg: SSVAEConfig, n: int) -> nn.ModuleList:
    return nn.ModuleList(
        SparseWindowTransformerBlock(cfg.model_channels, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio, window=cfg.window,
                                     shift=cfg.window // 2 if i % 2 else 0, qkv_bias=cfg.qkv_bias,
                                     attn_backend=cfg.attn_backend, use_checkpoint=cfg.use_checkpoint)
        for i in range(n)
    )


def _layer_norm(x: SparseTensor, eps: float = 1e-6) -> SparseTensor:
    return x.replace(F.layer_norm(x.feats.float(), x.feats.shape[-1:], eps=eps).to(x.dtype))


class SSVAEEncoder(nn.Module):
    """Sparse SDF ``[N, 1]`` at R -> ``mean``, ``logvar`` ``[M, latent]`` on the latent voxels at R / 8."""

    def __init__(self, cfg: SSVAEConfig) -> None:
        super().__init__()
        ch = cfg.encoder_channels
        self.input_layer1 = SparseLinear(1, ch[0])
        self.downsample = nn.ModuleList(SparseDownBlock3d(a, b, cfg.num_groups, cfg.pool_divisor)
                                        for a, b in zip(ch[:-1], ch[1:]))
        self.input_layer = SparseLinear(ch[-1], cfg.model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(cfg.model_channels, 3, cfg.pe_factor)
        self.blocks = _blocks(cfg, cfg.num_encoder_blocks)
        self.out_layer = SparseLinear(cfg.model_channels, 2 * cfg.latent_channels)
        self.out_eps = cfg.encoder_out_eps

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != 1:
            raise D3S2Error(f"SS-VAE encoder expects one SDF value per voxel, got {x.num_channels} channels")
        h = self.input_layer1(x)
        for block in self.downsample:
            h = block(h)
        h = self.input_layer(h)
        h = h + self.pos_embedder(h.coords[:, 1:]).to(h.dtype)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(_layer_norm(h, self.out_eps))


class SSVAEDecoder(nn.Module):
    """Latent ``[M, latent]`` at R / 8 -> SDF ``[M', 1]`` in [-1, 1] on all children at R (or the kept ones)."""

    def __init__(self, cfg: SSVAEConfig) -> None:
        super().__init__()
        self.out_norm = cfg.decoder_out_norm
        ch = [cfg.model_channels, *cfg.decoder_channels]
        self.input_layer = SparseLinear(cfg.latent_channels, cfg.model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(cfg.model_channels, 3, cfg.pe_factor)
        self.blocks = _blocks(cfg, cfg.num_decoder_blocks)
        self.upsample = nn.ModuleList(SparseSubdivideBlock3d(a, b, cfg.prune_children) for a, b in zip(ch[:-1], ch[1:]))
        self.out_layer = SparseLinear(ch[-1], 1)

    def transform(self, z: SparseTensor) -> SparseTensor:
        """The latent-level part: input layer, APE, transformer blocks (and the optional norm), ``[M, C]``."""
        h = self.input_layer(z)
        h = h + self.pos_embedder(h.coords[:, 1:]).to(h.dtype)
        for block in self.blocks:
            h = block(h)
        if self.out_norm:
            h = _layer_norm(h)
        return h

    def forward(self, z: SparseTensor, keep=None, return_features: bool = False):
        """``keep``: optional callable ``(level, h) -> [N_level, 8]`` bool mask of the children to keep at each
        up-sampling level (teacher forcing of the pruning while training); only used with ``prune_children``.
        Returns the decoded SDF and the keep logits of every level (empty without pruning); with
        ``return_features`` also the last up-sampling block's features ``[M', C]`` (the release's ``return_feat``,
        the 512 SDF refiner's input)."""
        h = self.transform(z)
        logits = []
        for i, block in enumerate(self.upsample):
            k = keep(i, h) if callable(keep) else None
            h, lg = block(h, k)
            if lg is not None:
                logits.append(lg)
        out = h.replace(torch.tanh(self.out_layer(h).feats))
        return (out, logits, h.feats) if return_features else (out, logits)

    def forward_chunked(self, z: SparseTensor, chunk: int, halo: int = 3, return_features: bool = False):
        """The decode with the up-sampling stack run in spatial chunks of ``chunk`` latent voxels per side (see
        :meth:`SSVAE.decode`); no pruning. Returns the decoded SDF (children grouped by chunk), with
        ``return_features`` a pair ``(decoded, features [M', C])``."""
        h = self.transform(z)
        coords = h.coords.long()
        cell = torch.div(coords[:, 1:], chunk, rounding_mode="floor")
        keys = torch.unique(torch.cat([coords[:, :1], cell], 1), dim=0)
        factor = 2 ** len(self.upsample)
        feats_out, coords_out, last = [], [], []
        for key in keys:
            b, lo = int(key[0]), key[1:] * chunk
            hi = lo + chunk
            in_b = coords[:, 0] == b
            near = in_b & ((coords[:, 1:] >= lo - halo) & (coords[:, 1:] < hi + halo)).all(1)
            idx = torch.nonzero(near).squeeze(1)
            part = SparseTensor(h.feats[idx], h.coords[idx], h.batch_size, h.resolution, h.stride)
            for block in self.upsample:
                part, _ = block(part)
            out = self.out_layer(part)
            parent = torch.div(out.coords[:, 1:].long(), factor, rounding_mode="floor")
            core = ((parent >= lo) & (parent < hi)).all(1)
            feats_out.append(torch.tanh(out.feats[core]))
            coords_out.append(out.coords[core])
            if return_features:
                last.append(part.feats[core])
            del part, out
        decoded = SparseTensor(torch.cat(feats_out), torch.cat(coords_out), h.batch_size,
                               h.resolution * factor if h.resolution is not None else None)
        return (decoded, torch.cat(last)) if return_features else decoded


@dataclass
class SSVAEOutput:
    decoded: SparseTensor  # [M', 1] SDF in scaled units at the input resolution
    latent: SparseTensor  # [M, latent] sampled (or mean) latent at R / 8
    mean: torch.Tensor
    logvar: torch.Tensor
    prune_logits: list[torch.Tensor]
    prune_targets: list[torch.Tensor]


def _children_in(h: SparseTensor, target_coords: torch.Tensor, level_factor: int) -> torch.Tensor:
    """``[N, 8]`` bool: child j of voxel n (at the next resolution) is the parent of some target voxel."""
    n = h.num_voxels
    cc = h.coords.unsqueeze(1).repeat(1, 8, 1)
    cc[:, :, 1:] = cc[:, :, 1:] * 2 + child_offsets(h.device)
    t = target_coords.clone()
    t[:, 1:] = torch.div(t[:, 1:], level_factor, rounding_mode="floor")
    t = torch.unique(t, dim=0)
    return (lookup_rows(cc.reshape(n * 8, 4), t) >= 0).view(n, 8)


class SSVAE(nn.Module):
    """Encoder + decoder + diagonal Gaussian latent (paper Sec. 3); any input resolution divisible by 8 (Sec. 3.3)."""

    config_class = SSVAEConfig

    def __init__(self, config: SSVAEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SSVAEConfig()
        self.encoder = SSVAEEncoder(cfg)
        self.decoder = SSVAEDecoder(cfg)

    def encode(self, x: SparseTensor, sample_posterior: bool = True, generator: torch.Generator | None = None
               ) -> tuple[SparseTensor, torch.Tensor, torch.Tensor]:
        """``x``: SDF ``[N, 1]`` in scaled units. Returns ``(z, mean, logvar)``; ``z`` = mean without sampling."""
        if x.num_voxels == 0:
            raise D3S2Error("SS-VAE: the input has no voxels (an empty SDF band); check the mesh and tau")
        moments = self.encoder(x)
        mean, logvar = moments.feats.float().chunk(2, dim=1)
        logvar = logvar.clamp(self.config.logvar_min, self.config.logvar_max)
        z = mean
        if sample_posterior:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return moments.replace(z.to(moments.dtype)), mean, logvar

    def decode(self, z: SparseTensor, chunk: int | None = None, halo: int = 3, return_features: bool = False, *,
               keep=None):
        """Latent -> SDF ``[M', 1]`` in [-1, 1] (scaled units) at ``8 x`` the latent resolution; with
        ``return_features`` a pair ``(sdf, features [M', C])`` (the decoder's last features, per decoded voxel).

        ``chunk``: run the up-sampling stack in spatial chunks of ``chunk`` latent voxels per side (the 1024 stage's
        memory). The transformer blocks run once on all latent tokens (their attention windows span chunks); only the
        conv / subdivide stack, where the memory goes (8^3 children per latent voxel), is chunked. Its receptive field
        is under 3 latent voxels (conv3 at the latent level, then half, quarter, eighth voxels per level), so a
        ``halo`` of 3 latent voxels makes every kept output identical to the one-shot decode (there are no norms in
        that stack); the decoded voxels come grouped by chunk. ``chunk=None`` (or pruning: ``keep``, or
        ``prune_children``) decodes in one piece. ``keep``: see :meth:`SSVAEDecoder.forward`."""
        dec = self.decoder
        if chunk is not None and keep is None and not any(b.prune is not None for b in dec.upsample):
            return dec.forward_chunked(z, chunk, halo, return_features)
        out = dec(z, keep, return_features)
        return (out[0], out[2]) if return_features else out[0]

    def forward(self, x: SparseTensor, sample_posterior: bool = True, target: SparseTensor | None = None,
                generator: torch.Generator | None = None) -> SSVAEOutput:
        z, mean, logvar = self.encode(x, sample_posterior, generator)
        targets: list[torch.Tensor] = []
        keep = None
        if self.config.prune_children and self.training:
            ref = (target if target is not None else x).coords
            levels = len(self.decoder.upsample)

            def keep(i, h):  # teacher forcing: keep the children that lead to target voxels
                k = _children_in(h, ref, 2 ** (levels - i - 1))
                targets.append(k)
                return k

        decoded, logits = self.decoder(z, keep)
        return SSVAEOutput(decoded, z, mean, logvar, logits, targets)

    def training_losses(self, x: SparseTensor, sharp: torch.Tensor | None = None,
                        target: SparseTensor | None = None, generator: torch.Generator | None = None
                        ) -> dict[str, torch.Tensor]:
        """Eq. 2-3 on one batch: ``{"total", "in", "ext", "sharp", "kl"(, "prune")}`` (see ss_vae_losses)."""
        out = self(x, sample_posterior=True, target=target, generator=generator)
        return ss_vae_losses(out.decoded, x, out.mean, out.logvar, self.config.loss_weights(), sharp=sharp,
                             target=target, prune_logits=out.prune_logits or None,
                             prune_targets=out.prune_targets or None)

    def loss(self, x: SparseTensor, sharp: torch.Tensor | None = None, target: SparseTensor | None = None,
             tau: float | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Trainer entry point (``{"loss": total, "in", "ext", "sharp", "kl"(, "prune")}``, like the dense VAE's).

        ``tau``: when given, ``x`` (and ``target``) hold dataset SDF values (normalised-cube units, as
        ``d3s2.data.collate_sparse_sdf`` yields them) and are scaled to ``s / tau`` here."""
        if tau is not None:
            x = x.replace(scale_sdf(x.feats.float(), tau))
            if target is not None:
                target = target.replace(target.feats.float() / tau)
        out = self.training_losses(x, sharp=sharp, target=target, generator=generator)
        out["loss"] = out.pop("total")
        return out


# Prefix renames from the authors' checkpoint keys to ours; empty until a real checkpoint is inspected.
OFFICIAL_KEY_MAP: dict[str, str] = {}


def load_official_state_dict(model: SSVAE, state_dict: dict[str, torch.Tensor], key_map=None, strict: bool = True,
                             assign: bool = False):
    """Load the authors' ``torch.load(model_sparse_512.ckpt)["vae"]`` after :data:`OFFICIAL_KEY_MAP` renames
    (torchsparse 1x1 kernels ``[Cin, Cout]`` are reshaped by ``SparseConv3d`` on load)."""
    return _load(model, state_dict, OFFICIAL_KEY_MAP if key_map is None else key_map, strict=strict, assign=assign)
