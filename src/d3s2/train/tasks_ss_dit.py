"""``ss_dit`` training task: rectified flow (paper Sec. 4.3, Eq. 10-11) on sparse SS-VAE latents (Sec. 4), image-
conditioned (Sec. 4.2; sparse conditioning Eq. 9 when the DiT config has ``sparse_conditioning``), with progressive
resolution phases (Table 1) given as ``phases:`` of the training YAML.

Latents (``task_args.latents``):

* ``vae``: each batch's prepared sparse SDFs (``sdf_<R>.npz``) are encoded by a frozen SS-VAE
  (``task_args.vae`` + ``vae_checkpoint``); ``x_0`` = posterior mean * ``latent_scale``.
* ``files``: precomputed ``latent_<R>.npz`` files (``d3s2 encode-latents``, raw posterior means);
  ``x_0`` = file features * ``latent_scale``. Both paths give the same ``x_0`` for the same VAE.

Image encoder (``task_args.image_encoder``: ``tiny`` trained with the DiT, ``dinov2`` or ``checkpoint`` frozen): see
:mod:`d3s2.train.image_encoders`. Condition dropout for classifier-free
guidance zeroes the tokens with probability ``flow.cond_drop_prob`` (coordinates and key mask kept, the released
models' unconditional input). Gradient checkpointing per DiT block: ``gradient_checkpointing: true`` in the YAML.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from d3s2.errors import D3S2Error
from d3s2.train.config import TrainConfig
from d3s2.train.image_encoders import ENCODER_TASK_ARGS, encoder_input
from d3s2.train.task_base import model_config_from, model_config_of, register_task
from d3s2.train.task_common import ImageDiTTask, ImageViewDataset, data_root, items_tau

__all__ = ["SSDiTTask", "SSDiTTrainModule", "load_frozen_ss_vae"]


def load_frozen_ss_vae(vae_spec: Any, checkpoint: str, device: torch.device) -> nn.Module:
    """An SS-VAE from its model config and a checkpoint of an ``ss_vae`` run (EMA preferred), frozen, in eval mode."""
    from d3s2.config import build_model
    from d3s2.models.ss_vae import load_official_state_dict
    from d3s2.train.checkpoint import load_weights

    cfg = model_config_from(vae_spec, "task_args.vae")
    if cfg.model != "ss_vae":
        raise D3S2Error(f"task_args.vae must be an ss_vae model config, got '{cfg.model}'")
    vae = build_model(cfg)
    sd = load_weights(checkpoint)
    if any(k.startswith("vae.") for k in sd):  # a checkpoint of an ss_vae run (train module keys)
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    try:
        load_official_state_dict(vae, sd, key_map={})
    except RuntimeError as exc:
        raise D3S2Error(f"{checkpoint}: weights do not match task_args.vae ({str(exc).splitlines()[0]})") from exc
    return vae.to(device).eval().requires_grad_(False)


class SSDiTTrainModule(nn.Module):
    """DiT (+ the trainable tiny image encoder). ``forward(batch)`` -> ``{"loss", "t_mean"}``.

    ``batch["x0"]``: the sparse latent; ``batch["cond_tokens"]`` (frozen encoder, computed outside) or
    ``batch["image"]`` + ``batch["mask"]`` (trainable encoder inside)."""

    def __init__(self, dit: nn.Module, encoder: nn.Module | None, flow_cfg, sparse: bool, image_size: int,
                 num_prefix: int) -> None:
        super().__init__()
        self.dit, self.encoder, self.flow_cfg = dit, encoder, flow_cfg
        self.sparse, self.image_size, self.num_prefix = sparse, image_size, num_prefix

    def condition(self, batch: dict) -> tuple[torch.Tensor, dict]:
        from d3s2.models.conditioning import sparse_condition

        pixels = batch.get("pixels")  # framed by prepare_batch when the encoder is frozen
        if pixels is None:
            pixels = encoder_input(batch["image"], batch["mask"], self.image_size)
        tokens = self.encoder(pixels) if self.encoder is not None else batch["cond_tokens"]
        if not self.sparse:
            return tokens, {}
        c = sparse_condition(tokens, pixels[:, 3], self.num_prefix)  # the framed mask, as in the pipeline
        return c.tokens, c.model_kwargs()

    def forward(self, batch: dict, t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        from d3s2.flow.rectified import flow_matching_loss

        cond, kwargs = self.condition(batch)
        out = flow_matching_loss(self.dit, batch["x0"], cond, self.flow_cfg, generator=generator, t=t, eps=eps,
                                 **kwargs)
        return {"loss": out["loss"], "t_mean": out["t"].mean().detach()}


@register_task("ss_dit")
class SSDiTTask(ImageDiTTask):
    """SS-DiT on sparse latents (see the module docstring for ``task_args``)."""

    task_args = {
        "latents": "vae",  # vae | files
        "vae": None,
        "vae_checkpoint": None,
        "tau": None,  # SDF band of the prepared data (default: the items' tau)
        "latent_scale": 1.0,
        **ENCODER_TASK_ARGS,
    }

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        a = self.args
        self.model_cfg = model_config_of(cfg.model, "ss_dit", self.name)
        p = self.model_cfg.params
        if a["latents"] not in ("vae", "files"):
            raise D3S2Error(f"task_args.latents must be 'vae' or 'files', got {a['latents']!r}")
        self.vae = None
        self._tau = a["tau"]
        if a["latents"] == "vae":
            if not a["vae"] or not a["vae_checkpoint"]:
                raise D3S2Error("task ss_dit with latents: vae needs task_args.vae (model config) and "
                                "task_args.vae_checkpoint (trained SS-VAE weights); or use latents: files")
            self.vae = load_frozen_ss_vae(a["vae"], a["vae_checkpoint"], device)
            if self.vae.config.latent_channels != p.in_channels:
                raise D3S2Error(f"the SS-VAE latent has {self.vae.config.latent_channels} channels but the SS-DiT "
                                f"expects in_channels {p.in_channels}")
        self.setup_flow_and_encoder(device)

    # ------------------------------------------------------------------------------------------------------------
    def build_module(self) -> nn.Module:
        dit, encoder = self.build_dit()
        return SSDiTTrainModule(dit, encoder, self.flow_cfg, bool(self.model_cfg.params.sparse_conditioning),
                                self.enc_cfg.image_size, 1 + self.enc_cfg.num_registers)

    def build_dataset(self, split: str = "train"):
        root = data_root(self.cfg, split)
        ds = ImageViewDataset(root, "sdf" if self.vae is not None else "latent", self.cfg.seed, "ss_dit")
        if self.vae is not None and self._tau is None:
            self._tau = items_tau(ds.items, root)
        return ds

    def collate(self, items):
        from d3s2.data.datasets import collate_image_latent

        return collate_image_latent(items, sdf=self.vae is not None)

    def to_device(self, batch: dict) -> dict:
        out = dict(batch)
        for k in ("x", "image", "mask"):
            out[k] = batch[k].to(self.device)
        return out

    @torch.no_grad()
    def prepare_batch(self, batch: dict) -> dict:
        from d3s2.models.ss_vae_losses import scale_sdf

        x = batch.pop("x")
        scale = float(self.args["latent_scale"])
        if self.vae is not None:
            if self._tau is None:
                self.build_dataset("train")
            z, mean, _ = self.vae.encode(x.replace(scale_sdf(x.feats.float(), self._tau)), sample_posterior=False)
            batch["x0"] = z.replace(mean.float() * scale)
        else:
            c = self.model_cfg.params.in_channels
            if x.feats.shape[1] != c:
                raise D3S2Error(f"latent files have {x.feats.shape[1]} channels but the SS-DiT expects {c}; "
                                "re-encode with the matching SS-VAE")
            batch["x0"] = x.replace(x.feats.float() * scale)
        if self.frozen_encoder is not None:
            batch["pixels"] = encoder_input(batch["image"], batch["mask"], self.enc_cfg.image_size)
            batch["cond_tokens"] = self.frozen_encoder(batch["pixels"])
        return batch

    def batch_stats(self, batch):
        x0 = batch["x0"]
        return {"samples": float(x0.batch_size), "tokens": float(x0.feats.shape[0])}
