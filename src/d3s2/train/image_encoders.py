"""The image encoder of the DiT training tasks (paper Sec. 4.2: DINOv2 ViT-L/14 with registers, frozen).

One choice shared by the structure DiT (``dense_dit``) and the SS-DiT (``ss_dit``) tasks, so that the two stages of a
pipeline are trained on the tokens of the pipeline's single image encoder. ``task_args.image_encoder``:

* ``tiny``: a small DINOv2-shaped encoder (:meth:`ImageEncoderConfig.tiny`, width = the DiT's ``cond_channels``,
  overridden by ``image_encoder_params``), trained with the DiT; its weights are saved under ``encoder.`` in the run's
  checkpoints.
* ``dinov2``: DINOv2 ViT-L/14-reg, frozen, weights from ``dinov2_weights`` or the local caches.
* ``checkpoint``: frozen, the ``encoder.`` weights of another run (``image_encoder_checkpoint``: its checkpoint dir, a
  ``step_*`` folder or a ``.safetensors`` file; EMA weights preferred), shaped by ``image_encoder_params`` as in that
  run. The demo model trains its encoder with the structure DiT and reuses it, frozen, for the SS-DiT.

A frozen encoder runs outside the trainable module (in ``prepare_batch``), so it is neither checkpointed nor sharded.
The encoder sees RGB + mask ``[B, 4, S, S]`` (:func:`encoder_input`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from d3s2.errors import D3S2Error

__all__ = ["ENCODER_TASK_ARGS", "EncoderChoice", "setup_image_encoder", "trainable_encoder", "encoder_input"]

ENCODER_TASK_ARGS: dict[str, Any] = {
    "image_encoder": "tiny",  # tiny | dinov2 | checkpoint
    "image_encoder_params": {},  # ImageEncoderConfig overrides
    "dinov2_weights": None,
    "image_encoder_checkpoint": None,
}
_KINDS = ("tiny", "dinov2", "checkpoint")


@dataclass
class EncoderChoice:
    config: Any  # ImageEncoderConfig
    frozen: nn.Module | None  # None: a trainable encoder lives inside the train module

    @property
    def num_prefix(self) -> int:
        return 1 + int(self.config.num_registers)


def encoder_input(image: torch.Tensor, mask: torch.Tensor, size: int, pad: int | None = None) -> torch.Tensor:
    """Straight RGB ``[B, 3, H, W]`` + mask ``[B, 1, H, W]`` (a prepared render) -> ``[B, 4, size, size]`` for the image
    encoder, framed per image exactly as the pipeline frames its input (:func:`d3s2.pipelines.preprocess.frame_object`:
    crop to the object, white background, ``pad`` margin): training and inference see the same images."""
    from d3s2.pipelines.preprocess import frame_object

    x = torch.cat([image, mask], dim=1).float()
    return torch.stack([frame_object(xi, size, pad) for xi in x])


def trainable_encoder(config) -> nn.Module:
    from d3s2.models.image_encoder import DINOv2Encoder

    encoder = DINOv2Encoder(config)
    # kept for DINOv2's key layout but never used in forward: frozen, so DDP sees no parameter without a grad
    encoder.mask_token.requires_grad_(False)
    encoder.norm.requires_grad_(False)
    return encoder


def setup_image_encoder(args: dict, cond_channels: int, device: torch.device, task: str) -> EncoderChoice:
    """Validate the encoder ``task_args`` of ``task`` and build the frozen encoder when there is one."""
    from d3s2.config import from_dict
    from d3s2.models.image_encoder import DINOv2Encoder, ImageEncoderConfig

    kind = args["image_encoder"]
    if kind not in _KINDS:
        raise D3S2Error(f"task {task}: task_args.image_encoder must be one of {', '.join(_KINDS)}, got {kind!r}")
    if not isinstance(args["image_encoder_params"], dict):
        raise D3S2Error(f"task {task}: task_args.image_encoder_params must be a mapping of ImageEncoderConfig fields")
    base = ImageEncoderConfig() if kind == "dinov2" else ImageEncoderConfig.tiny(embed_dim=cond_channels)
    cfg = from_dict(ImageEncoderConfig, {**base.__dict__, **args["image_encoder_params"]},
                    "task_args.image_encoder_params")
    if cfg.embed_dim != cond_channels:
        raise D3S2Error(f"task {task}: image encoder width {cfg.embed_dim} != the DiT's cond_channels {cond_channels}")
    frozen = None
    if kind == "dinov2":
        frozen = DINOv2Encoder(cfg, weights=args["dinov2_weights"], load_weights=True)
    elif kind == "checkpoint":
        from d3s2.train.checkpoint import load_weights

        ckpt = args["image_encoder_checkpoint"]
        if not ckpt:
            raise D3S2Error(f"task {task}: image_encoder: checkpoint needs task_args.image_encoder_checkpoint (the "
                            "checkpoint dir of the run that trained the encoder)")
        frozen = DINOv2Encoder(cfg)
        sd = load_weights(ckpt, prefix="encoder.")
        try:
            missing, unexpected = frozen.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # shape mismatch
            missing, unexpected = [str(exc).split("size mismatch for ")[-1].split(":")[0]], []
        if missing or unexpected:
            raise D3S2Error(f"{ckpt}: encoder weights do not match task_args.image_encoder_params (missing "
                            f"{list(missing)[:2]}, unexpected {list(unexpected)[:2]}); use the params of the run "
                            "that trained it")
    if frozen is not None:
        frozen.to(device).eval().requires_grad_(False)
    return EncoderChoice(cfg, frozen)
