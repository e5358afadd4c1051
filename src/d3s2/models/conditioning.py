"""Image conditions of the SS-DiT: sparse conditioning (paper Sec. 4.2, Eq. 9; release v1.0) and dense conditioning
(release v1.1).

Eq. 9: ``c = Linear(f(E_DINO(I)) + PE(f(E_DINO(I))))``. ``f`` keeps the DINOv2 patch tokens whose patch contains
foreground (the image mask max-pooled to the 37 x 37 patch grid, kept where > 0) plus the CLS and register tokens.
Coordinates (shared/reference/official-release.md): ``[b, w, h, 0]`` for a patch in column ``w`` and row ``h`` of the
patch grid, ``[b, 0, 0, 1]`` for CLS and registers (which of row/column comes first is unverified). This module does
the selection and the padding: per-sample token sets are ragged, so they are padded to the longest one with a key
mask for cross-attention. The ``Linear`` (``cond_proj``) and the 3D sinusoidal PE live in the v1.0
:class:`~d3s2.models.ss_dit.SSDiT` (``embed_condition``) so that their weights sit in the DiT checkpoint.

Dense conditioning (v1.1) passes all 1374 tokens (1 CLS + 4 registers + 37^2 patches) unchanged, no mask.
The unconditional input for classifier-free guidance is ``zeros_like(tokens)`` with the same coordinates and mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d3s2.errors import D3S2Error

__all__ = ["SparseCondition", "patch_mask", "select_sparse_tokens", "pad_condition", "sparse_condition",
           "dense_condition", "image_condition"]


@dataclass
class SparseCondition:
    """Padded sparse condition: ``tokens [B, L, C]``, ``coords [B, L, 3]`` (w, h, z), ``mask [B, L]`` (True = real).

    Feed it to a v1.0 SS-DiT as ``model(x, t, cond.tokens, cond_mask=cond.mask, cond_coords=cond.coords)``.
    """

    tokens: torch.Tensor
    coords: torch.Tensor
    mask: torch.Tensor

    def model_kwargs(self) -> dict:
        return {"cond_mask": self.mask, "cond_coords": self.coords}


def patch_mask(mask: torch.Tensor, grid: int = 37) -> torch.Tensor:
    """Foreground mask ``[B, H, W]`` or ``[B, 1, H, W]`` -> ``[B, grid, grid]`` bool: max over each patch, kept if > 0.

    At 518 px and patch 14 this is a 14 x 14 max-pool; other sizes are max-pooled adaptively onto the same grid.
    """
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise D3S2Error(f"mask must be [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise D3S2Error(f"mask must be [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
    m = mask.float()[:, None]
    h, w = m.shape[-2:]
    if h % grid == 0 and w % grid == 0:
        pooled = F.max_pool2d(m, kernel_size=(h // grid, w // grid))
    else:
        pooled = F.adaptive_max_pool2d(m, grid)
    return pooled[:, 0] > 0


def select_sparse_tokens(tokens: torch.Tensor, mask: torch.Tensor, num_prefix: int = 5
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``f`` of Eq. 9. ``tokens [B, num_prefix + G^2, C]`` (CLS, registers, patches row-major), ``mask`` an image mask
    or an already pooled ``[B, G, G]`` patch mask. Returns ragged ``feats [M, C]`` and ``coords [M, 4]`` (b, w, h, z),
    per sample the prefix tokens first, then the kept patches in token order."""
    if tokens.dim() != 3:
        raise D3S2Error(f"condition tokens must be [B, L, C], got {tuple(tokens.shape)}")
    b, n, _ = tokens.shape
    g = int(round((n - num_prefix) ** 0.5))
    if g * g != n - num_prefix or g == 0:
        raise D3S2Error(f"condition tokens: {n} tokens are not {num_prefix} prefix tokens + a square patch grid")
    if mask.shape[0] != b:
        raise D3S2Error(f"mask batch {mask.shape[0]} != token batch {b}")
    pm = mask.bool() if mask.dim() == 3 and tuple(mask.shape[1:]) == (g, g) else patch_mask(mask, g)
    pm = pm.to(tokens.device)
    dev = tokens.device
    hh, ww = torch.meshgrid(torch.arange(g, device=dev), torch.arange(g, device=dev), indexing="ij")
    patch_xyz = torch.stack([ww.reshape(-1), hh.reshape(-1), torch.zeros(g * g, dtype=torch.long, device=dev)], 1)
    prefix_xyz = torch.tensor([[0, 0, 1]], device=dev).expand(num_prefix, 3)
    all_xyz = torch.cat([prefix_xyz, patch_xyz])  # [n, 3]
    keep = torch.cat([torch.ones(b, num_prefix, dtype=torch.bool, device=dev), pm.reshape(b, g * g)], 1)  # [B, n]
    bi, ti = keep.nonzero(as_tuple=True)  # row-major: sorted by sample, then token order
    coords = torch.cat([bi[:, None], all_xyz[ti]], 1)
    return tokens[bi, ti], coords


def pad_condition(feats: torch.Tensor, coords: torch.Tensor, batch_size: int) -> SparseCondition:
    """Ragged rows sorted by sample -> :class:`SparseCondition` padded to the longest sample (zeros, mask False)."""
    counts = torch.bincount(coords[:, 0].long(), minlength=batch_size)
    length = int(counts.max()) if counts.numel() else 0
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    slot = torch.arange(coords.shape[0], device=coords.device) - offsets[coords[:, 0].long()]
    tokens = feats.new_zeros(batch_size, length, feats.shape[1])
    xyz = coords.new_zeros(batch_size, length, 3)
    mask = torch.zeros(batch_size, length, dtype=torch.bool, device=feats.device)
    b = coords[:, 0].long()
    tokens[b, slot] = feats
    xyz[b, slot] = coords[:, 1:]
    mask[b, slot] = True
    return SparseCondition(tokens, xyz, mask)


def sparse_condition(tokens: torch.Tensor, mask: torch.Tensor, num_prefix: int = 5) -> SparseCondition:
    """Eq. 9's token selection and padding for a v1.0 SS-DiT (the Linear + PE run inside the model)."""
    feats, coords = select_sparse_tokens(tokens, mask, num_prefix)
    return pad_condition(feats, coords, tokens.shape[0])


def dense_condition(tokens: torch.Tensor) -> torch.Tensor:
    """v1.1: all tokens, as they come from the image encoder (``[B, 1374, 1024]`` at 518 px)."""
    if tokens.dim() != 3:
        raise D3S2Error(f"condition tokens must be [B, L, C], got {tuple(tokens.shape)}")
    return tokens


def image_condition(encoder, image: torch.Tensor, sparse: bool, mask: torch.Tensor | None = None):
    """Image ``[B, 4, H, W]`` (RGB + mask in [0, 1]) -> the SS-DiT condition: a :class:`SparseCondition` (v1.0) or the
    dense tokens (v1.1). ``encoder``: a :class:`~d3s2.models.image_encoder.DINOv2Encoder` (or any module mapping the
    image to ``[B, 1 + registers + G^2, C]``). ``mask`` overrides the image's 4th channel."""
    tokens = encoder(image)
    if not sparse:
        return dense_condition(tokens)
    if mask is None:
        if image.shape[1] != 4:
            raise D3S2Error("sparse conditioning needs a foreground mask: pass an RGB + mask image [B, 4, H, W] "
                            "or mask=")
        mask = image[:, 3]
    num_prefix = 1 + int(getattr(getattr(encoder, "config", None), "num_registers", 4))
    return sparse_condition(tokens, mask, num_prefix)
