"""Fake folders in the authors' release layout, for loader tests (no real weights are reachable here).

``tests/data/official_state_dict_keys.json`` is the reference's list of every released component's state-dict keys,
shapes and constructor params, read off the authors' own classes. :func:`release_config` writes the release's
``config.yaml`` from those params (``target`` / ``params`` per component, ``use_fp16: true`` as the release stores
it); :func:`meta_checkpoints` gives the checkpoints as meta tensors of the listed shapes (a full-size release
folder of a few kilobytes); :func:`release_state_dict` turns a d3s2 model's weights into the release's key layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

KEYS = json.loads((Path(__file__).parent / "data" / "official_state_dict_keys.json").read_text())["components"]
FILES = {"model_dense.ckpt": (("vae", "dense_vae"), ("dit", "dense_dit")),
         "model_sparse_512.ckpt": (("vae", "ss_vae_512"), ("dit", "ss_dit_{v}_512")),
         "model_sparse_1024.ckpt": (("vae", "ss_vae_1024"), ("dit", "ss_dit_{v}_1024")),
         "model_refiner.ckpt": (("refiner", "refiner"),), "model_refiner_1024.ckpt": (("refiner", "refiner_1024"),)}
RELEASE_KEYS = {"dense_vae": "dense_vae", "dense_dit": "dense_dit", "sparse_vae_512": "ss_vae_512",
                "sparse_dit_512": "ss_dit_{v}_512", "sparse_vae_1024": "ss_vae_1024",
                "sparse_dit_1024": "ss_dit_{v}_1024", "refiner": "refiner", "refiner_1024": "refiner_1024"}
SHIFTS = {"dense_scheduler": 6.0, "sparse_scheduler_512": 6.0, "sparse_scheduler_1024": 8.0}


def tag(version: str) -> str:
    return version.replace(".", "_")


def release_config(version: str, params: dict | None = None) -> dict:
    """The release's config.yaml for ``version`` ("v1.0" / "v1.1"); ``params``: per release key, params that replace
    the full-size ones (tiny test models)."""
    cfg = {}
    for key, comp in RELEASE_KEYS.items():
        entry = KEYS[comp.format(v=tag(version))]
        p = dict(entry["params"]) if not params or key not in params else dict(params[key])
        cfg[key] = {"target": entry["class"].split(" ")[0], "params": {**p, "use_fp16": True}}
    for key, shift in SHIFTS.items():
        cfg[key] = {"target": "diffusers.FlowMatchEulerDiscreteScheduler",
                    "params": {"num_train_timesteps": 1000, "shift": shift}}
    for key in ("dense_image_encoder", "sparse_image_encoder"):
        cfg[key] = {"target": "direct3d_s2.models.conditioner.DinoEncoder",
                    "params": {"model": "facebookresearch/dinov2", "version": "dinov2_vitl14_reg", "size": 518}}
    return cfg


def meta_checkpoints(version: str) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """file -> {dict key -> state dict of meta tensors with the release's shapes}."""
    out = {}
    for fname, entries in FILES.items():
        out[fname] = {key: {k: torch.empty(shape, device="meta")
                            for k, shape in KEYS[comp.format(v=tag(version))]["keys"].items()}
                      for key, comp in entries}
    return out


def write_release_folder(folder: Path, config: dict, checkpoints: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for fname, ckpt in checkpoints.items():
        torch.save(ckpt, folder / fname)
    return folder


def release_state_dict(model) -> dict[str, torch.Tensor]:
    """A d3s2 model's weights in the release's key layout (SS-DiT compression names, torchsparse [Cin, Cout] 1x1
    kernels)."""
    from d3s2.models.ss_dit import OFFICIAL_KEY_MAP, SSDiT

    renames = {}
    if isinstance(model, SSDiT):
        renames = {new: old for old, new in OFFICIAL_KEY_MAP[model.config.version].items()}
    out = {}
    for k, v in model.state_dict().items():
        for net in (".compression_key.", ".compression_value."):
            i = k.find(net)
            if i >= 0:
                head, tail = k[:i + len(net)], k[i + len(net):]
                for new, old in renames.items():
                    if tail.startswith(new):
                        k = head + old + tail[len(new):]
                        break
        if k.endswith(".conv.kernel") and v.dim() == 3 and v.shape[0] == 1:
            v = v[0]
        out[k] = v.detach().clone()
    return out


def tiny_params(version: str) -> dict:
    """Release params at tiny width / depth (GroupNorm 32 needs the SS-VAE at its released width, one block each)."""
    v10 = version == "v1.0"
    dit = dict(in_channels=16, out_channels=16, model_channels=64, cond_channels=32, num_blocks=2, num_heads=4,
               num_kv_heads=2, selection_block_size=8, pe_mode="ape", qk_rms_norm=True, use_shift=True,
               compression_block_size=4 if v10 else 8, compression_version="v2" if v10 else "v1",
               sparse_conditions=v10, topk=2)
    vae = dict(embed_dim=16, model_channels_encoder=512, num_heads_encoder=8, num_head_channels_encoder=64,
               num_blocks_encoder=1, model_channels_decoder=512, num_heads_decoder=8, num_head_channels_decoder=64,
               num_blocks_decoder=1, out_channels=1, latents_scale=1.0, latents_shift=0.0)
    return {"dense_vae": dict(embed_dim=4, in_channels=1, out_channels=1, model_channels_encoder=[4, 8, 16],
                              num_res_blocks_encoder=1, num_res_blocks_middle_encoder=1,
                              model_channels_decoder=[16, 8, 4], num_res_blocks_decoder=1,
                              num_res_blocks_middle_decoder=1, latents_scale=1.0, latents_shift=0.0),
            "dense_dit": dict(resolution=8, in_channels=4, out_channels=4, model_channels=64, cond_channels=32,
                              num_blocks=1, num_heads=4, mlp_ratio=4, patch_size=1, pe_mode="ape", qk_rms_norm=True,
                              latent_shape=[4, 8, 8, 8]),
            "sparse_vae_512": dict(vae, resolution=32), "sparse_vae_1024": dict(vae, resolution=64, chunk_size=4),
            "sparse_dit_512": dict(dit, resolution=32, factor=1.0),
            "sparse_dit_1024": dict(dit, resolution=64, factor=0.5)}


def tiny_release(version: str, seed: int = 3):
    """A tiny release: (config.yaml dict, {file: checkpoint dict}, d3s2 models the weights came from)."""
    from d3s2.config import model_class
    from d3s2.pipelines.release_config import read_release_config

    config = release_config(version, tiny_params(version))
    rel = read_release_config(config)
    torch.manual_seed(seed)
    models = {n: model_class(kind)(cfg) for n, (kind, cfg) in rel.models.items()}
    ckpts = {"model_dense.ckpt": {"vae": release_state_dict(models["dense_vae"]),
                                  "dit": release_state_dict(models["dense_dit"])},
             "model_sparse_512.ckpt": {"vae": release_state_dict(models["ss_vae_512"]),
                                       "dit": release_state_dict(models["ss_dit_512"])},
             "model_sparse_1024.ckpt": {"vae": release_state_dict(models["ss_vae_1024"]),
                                        "dit": release_state_dict(models["ss_dit_1024"])}}
    # the refiners' widths are fixed by the release class (no tiny release params): full-size meta checkpoints
    # (a few kilobytes; they load strictly, but cannot run; see tiny_refiners for runnable ones)
    meta = meta_checkpoints(version)
    ckpts.update({f: meta[f] for f in ("model_refiner.ckpt", "model_refiner_1024.ckpt")})
    return config, ckpts, models


def tiny_refiners(seed: int = 5) -> dict:
    """Runnable tiny refiners (d3s2 configs, not expressible as release params): widths 4 / 8, one block per level,
    16^3 patches at stride 12 on a 40^3 grid (SDF) and 16^3 at stride 12 (sign)."""
    from d3s2.models.refiner import SDFRefiner, SDFRefinerConfig, SignRefiner, SignRefinerConfig

    torch.manual_seed(seed)
    common = dict(block_out_channels=[4, 8], layers_per_block=1, layers_mid_block=0, norm_groups=2, patch_size=16,
                  patch_stride=12, resolution=40)
    return {"refiner_512": SDFRefiner(SDFRefinerConfig(feature_channels=8, mlp_hidden=8, **common)).eval(),
            "refiner_1024": SignRefiner(SignRefinerConfig(**common)).eval()}


def sphere_hooks(pipe, radius: float = 0.5):
    """Benchmark hooks for a tiny release pipeline: a small latent shell replaces the structure stage's output and a
    sphere's SDF the decoded values (random tiny weights give no surface at the release's levels); every stage still
    runs. Returns ``{"structure_coords": ..., "hooks": ...}`` for ``pipe(...)``."""
    r = pipe.models["dense_vae"].config.resolution
    g = torch.arange(r)
    c = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3).double()
    d = ((c + 0.5) / r * 2 - 1).norm(dim=1) - radius
    shell = c[d.abs() < 1.5 * 2 / r].long()
    coords = torch.cat([torch.zeros(len(shell), 1, dtype=torch.long), shell], 1).int()

    def decoded(stage, dec):
        res = pipe.resolution_512 if stage == "512" else pipe.resolution_1024
        p = dec.coords[:, 1:].double() / res * 2 - 1
        s = ((p.norm(dim=1) - radius) / (4 / res)).clamp(-1, 1)
        return dec.replace(s[:, None].to(dec.feats.dtype))

    return {"structure_coords": coords, "hooks": {"decoded": decoded}}
