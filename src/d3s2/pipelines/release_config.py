"""The authors' release ``config.yaml`` -> d3s2 component configs (release parity, shared/reference/official-release.md).

A release folder's ``config.yaml`` (OmegaConf, plain YAML) names one ``target:`` class and its ``params:`` per
component (dense_vae, dense_dit, sparse_vae_512, sparse_dit_512, sparse_vae_1024, sparse_dit_1024, the schedulers,
the image encoders and the two refiners). This module reads those params, never the class names' code, and builds the
d3s2 configs that compute the same functions:

* the version comes from the SS-DiT's params (``compression_version`` "v2" = v1.0's GN-SiLU-pool-conv compression,
  "v1" = v1.1's 1x1 conv + pool; ``sparse_conditions``), not from the folder name, so a renamed folder loads right;
* every parameter of a release class is either translated, required to equal the only value d3s2 implements (one
  clear error otherwise), or listed as irrelevant to the computation (``use_checkpoint``, ``use_fp16`` is recorded);
  an unknown parameter is an error: d3s2 would otherwise compute something else silently;
* the release's own computations are switched on explicitly: SSA block pooling divides by n + 1 (its
  ``scatter_reduce(mean)`` includes the zero it starts from), the v1.0 compression skip adds the pooled raw input,
  v1.0 condition tokens are ``cond_proj(tokens) + PE(coords)``, the SS-VAE's encoder pools the same way, the samplers
  follow diffusers' ``FlowMatchEulerDiscreteScheduler`` grid with latents and timesteps in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from d3s2.errors import D3S2Error

__all__ = ["ReleaseConfig", "read_release_config", "RELEASE_STEPS", "RELEASE_GUIDANCE", "release_version"]

# The release's __call__ defaults (not part of config.yaml): steps per stage and the guidance scale.
RELEASE_STEPS = {"dense_dit": 50, "ss_dit_512": 30, "ss_dit_1024": 15}
RELEASE_GUIDANCE = 7.0

_IRRELEVANT = {"use_checkpoint", "use_fp16"}


@dataclass
class ReleaseConfig:
    """What d3s2 needs from a release ``config.yaml``: per component a d3s2 model name and config, the samplers, the
    version tag and the release's fp16 flags."""

    version: str
    models: dict[str, tuple[str, Any]] = field(default_factory=dict)  # component -> (registry name, config)
    samplers: dict[str, Any] = field(default_factory=dict)
    use_fp16: dict[str, bool] = field(default_factory=dict)
    decode_chunk_1024: int | None = None
    # "refiner_512" / "refiner_1024" -> (registry name, config), for the refiners config.yaml names
    refiners: dict[str, tuple[str, Any]] = field(default_factory=dict)


def _params(config: dict, key: str, where: str) -> dict:
    entry = config.get(key)
    if not isinstance(entry, dict):
        raise D3S2Error(f"{where}: no '{key}' component (an authors' release config.yaml names dense_vae, dense_dit, "
                        "sparse_vae_512, sparse_dit_512, ...)")
    params = entry.get("params") or {}
    if not isinstance(params, dict):
        raise D3S2Error(f"{where}: {key}.params must be a mapping")
    return params


class _Reader:
    """Consumes one component's params: every key must be used, checked or known to be irrelevant."""

    def __init__(self, params: dict, where: str, defaults: dict):
        self.params, self.where, self.defaults, self.used = params, where, defaults, set()

    def get(self, key: str):
        self.used.add(key)
        if key in self.params:
            return self.params[key]
        if key not in self.defaults:
            raise D3S2Error(f"{self.where}: missing parameter '{key}'")
        return self.defaults[key]

    def require(self, key: str, allowed, why: str):
        value = self.get(key)
        if value not in allowed:
            raise D3S2Error(f"{self.where}: {key}={value!r} is not supported by d3s2 ({why}); "
                            f"supported: {', '.join(map(repr, allowed))}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.params) - self.used - _IRRELEVANT)
        if unknown:
            raise D3S2Error(f"{self.where}: unknown parameter '{unknown[0]}' for this release component; d3s2 cannot "
                            "tell what it changes (please report it with the folder's config.yaml)")


def release_version(config: dict, where: str = "config.yaml") -> str:
    """``"v1.0"`` or ``"v1.1"`` from the 512 SS-DiT's params (compression network and conditioning)."""
    p = _params(config, "sparse_dit_512", where)
    comp = p.get("compression_version", "v2")
    sparse = bool(p.get("sparse_conditions", False))
    if comp == "v2" and sparse:
        return "v1.0"
    if comp == "v1" and not sparse:
        return "v1.1"
    raise D3S2Error(f"{where}: sparse_dit_512 has compression_version={comp!r} with sparse_conditions={sparse}: "
                    "neither release v1.0 (v2, sparse) nor v1.1 (v1, dense)")


def _ss_dit(p: dict, where: str):
    from d3s2.models.ss_dit import SSDiTConfig

    r = _Reader(p, where, {"num_head_channels": 64, "num_kv_heads": 2, "compression_block_size": 4,
                           "selection_block_size": 8, "topk": 8, "compression_version": "v2", "mlp_ratio": 4,
                           "pe_mode": "ape", "share_mod": False, "qk_rms_norm": False, "qk_rms_norm_cross": False,
                           "sparse_conditions": False, "factor": 1.0, "window_size": 8, "use_shift": True,
                           "num_heads": None})
    channels = int(r.get("model_channels"))
    heads = r.get("num_heads")
    heads = int(heads) if heads is not None else channels // int(r.get("num_head_channels"))
    r.get("num_head_channels")
    r.require("pe_mode", ("ape",), "absolute position embedding only")
    r.require("share_mod", (False,), "per-block adaLN")
    r.require("use_shift", (True,), "windows shifted by half a window on odd blocks")
    r.require("qk_rms_norm_cross", (False,), "no RMS norm in the cross-attention")
    r.get("qk_rms_norm")  # the release's SSA self-attention has no q/k norm: the flag changes nothing
    comp = r.require("compression_version", ("v1", "v2"), "v1 = 1x1 conv + pool, v2 = GN-SiLU-pool-conv")
    window = int(r.get("window_size"))
    cfg = SSDiTConfig(
        resolution=int(r.get("resolution")), in_channels=int(r.get("in_channels")),
        out_channels=int(r.get("out_channels")), model_channels=channels, cond_channels=int(r.get("cond_channels")),
        num_blocks=int(r.get("num_blocks")), num_heads=heads, num_kv_heads=int(r.get("num_kv_heads")),
        head_dim=channels // heads, mlp_ratio=float(r.get("mlp_ratio")), pe_factor=float(r.get("factor")),
        qkv_bias=True, version="v1.0" if comp == "v2" else "v1.1", m_cmp=int(r.get("compression_block_size")),
        m_slc=int(r.get("selection_block_size")), m_win=window, top_k=int(r.get("topk")), window_shift=window // 2,
        sparse_conditioning=bool(r.get("sparse_conditions")), cond_pe_after_proj=True,
        pool_divisor="count_plus_one", cmp_skip="input",
    )
    r.finish()
    return cfg


def _ss_vae(p: dict, where: str):
    from d3s2.models.ss_vae import SSVAEConfig

    r = _Reader(p, where, {"embed_dim": 0, "resolution": 64, "model_channels_encoder": 512, "num_blocks_encoder": 4,
                           "num_heads_encoder": 8, "num_head_channels_encoder": 64, "model_channels_decoder": 512,
                           "num_blocks_decoder": 4, "num_heads_decoder": 8, "num_head_channels_decoder": 64,
                           "out_channels": 1, "chunk_size": 1, "latents_scale": 1.0, "latents_shift": 0.0})
    enc_c, dec_c = int(r.get("model_channels_encoder")), int(r.get("model_channels_decoder"))
    if enc_c != dec_c:
        raise D3S2Error(f"{where}: model_channels_encoder {enc_c} != model_channels_decoder {dec_c} is not supported")
    heads = int(r.get("num_heads_encoder"))
    if (heads, int(r.get("num_head_channels_encoder"))) != (int(r.get("num_heads_decoder")),
                                                            int(r.get("num_head_channels_decoder"))):
        raise D3S2Error(f"{where}: encoder and decoder attention heads differ; d3s2 uses one setting for both")
    if int(r.get("num_blocks_encoder")) < 0 or int(r.get("num_blocks_decoder")) < 0:
        raise D3S2Error(f"{where}: negative block counts")
    r.require("out_channels", (1,), "one SDF channel")
    r.require("latents_scale", (1.0, 1), "latents decoded as sampled")
    r.require("latents_shift", (0.0, 0), "latents decoded as sampled")
    chunk = int(r.get("chunk_size"))
    latent_res = int(r.get("resolution"))
    cfg = SSVAEConfig(
        resolution=latent_res * 8, latent_channels=int(r.get("embed_dim")), model_channels=enc_c,
        encoder_channels=[enc_c // 16, enc_c // 8, enc_c // 4, enc_c], decoder_channels=[dec_c // 4, dec_c // 8,
                                                                                         dec_c // 16],
        num_encoder_blocks=int(r.get("num_blocks_encoder")), num_decoder_blocks=int(r.get("num_blocks_decoder")),
        num_heads=heads, head_dim=enc_c // heads, pool_divisor="count_plus_one", encoder_out_eps=1e-5,
    )
    r.finish()
    return cfg, (latent_res // chunk if chunk > 1 else None)


def _dense_vae(p: dict, where: str, latent_resolution: int):
    from d3s2.models.dense_vae import DenseShapeVAEConfig

    r = _Reader(p, where, {"embed_dim": 0, "model_channels_encoder": [32, 128, 512],
                           "model_channels_decoder": [512, 128, 32], "num_res_blocks_encoder": 2,
                           "num_res_blocks_middle_encoder": 2, "num_res_blocks_decoder": 2,
                           "num_res_blocks_middle_decoder": 2, "in_channels": 1, "out_channels": 1,
                           "latents_scale": 1.0, "latents_shift": 0.0})
    r.require("latents_scale", (1.0, 1), "latents decoded as sampled")
    r.require("latents_shift", (0.0, 0), "latents decoded as sampled")
    enc = [int(c) for c in r.get("model_channels_encoder")]
    cfg = DenseShapeVAEConfig(  # the occupancy grid: the DiT's latent grid, doubled per encoder level
        resolution=latent_resolution * 2 ** (len(enc) - 1), in_channels=int(r.get("in_channels")), out_channels=int(r.get("out_channels")),
        latent_channels=int(r.get("embed_dim")), encoder_channels=enc,
        encoder_res_blocks=int(r.get("num_res_blocks_encoder")),
        encoder_middle_blocks=int(r.get("num_res_blocks_middle_encoder")),
        decoder_channels=[int(c) for c in r.get("model_channels_decoder")],
        decoder_res_blocks=int(r.get("num_res_blocks_decoder")),
        decoder_middle_blocks=int(r.get("num_res_blocks_middle_decoder")),
    )
    r.finish()
    return cfg


def _dense_dit(p: dict, where: str):
    from d3s2.models.dense_dit import DenseDiTConfig

    r = _Reader(p, where, {"num_heads": None, "num_head_channels": 64, "mlp_ratio": 4, "patch_size": 2,
                           "pe_mode": "ape", "share_mod": False, "qk_rms_norm": False, "qk_rms_norm_cross": False,
                           "latent_shape": None})
    channels = int(r.get("model_channels"))
    heads = r.get("num_heads")
    heads = int(heads) if heads is not None else channels // int(r.get("num_head_channels"))
    r.get("num_head_channels")
    r.require("pe_mode", ("ape",), "absolute position embedding only")
    r.require("share_mod", (False,), "per-block adaLN")
    res, cin = int(r.get("resolution")), int(r.get("in_channels"))
    shape = r.get("latent_shape")
    if shape is not None and [int(s) for s in shape] != [cin, res, res, res]:
        raise D3S2Error(f"{where}: latent_shape {shape} does not match in_channels {cin} at resolution {res}")
    cfg = DenseDiTConfig(
        resolution=res, in_channels=cin, out_channels=int(r.get("out_channels")), model_channels=channels,
        cond_channels=int(r.get("cond_channels")), num_blocks=int(r.get("num_blocks")), num_heads=heads,
        head_dim=channels // heads, mlp_ratio=float(r.get("mlp_ratio")), patch_size=int(r.get("patch_size")),
        qk_rms_norm=bool(r.get("qk_rms_norm")), qk_rms_norm_cross=bool(r.get("qk_rms_norm_cross")), qkv_bias=True,
    )
    r.finish()
    return cfg


def _scheduler(config: dict, key: str, steps: int, where: str):
    from d3s2.flow.sampler import SamplerConfig

    entry = config.get(key)
    if not isinstance(entry, dict):
        raise D3S2Error(f"{where}: no '{key}' (the release's FlowMatchEulerDiscreteScheduler settings)")
    target = str(entry.get("target", ""))
    if not target.endswith("FlowMatchEulerDiscreteScheduler"):
        raise D3S2Error(f"{where}: {key} is {target!r}; d3s2 implements the release's FlowMatchEulerDiscreteScheduler")
    r = _Reader(_params(config, key, where), f"{where}:{key}", {"num_train_timesteps": 1000, "shift": 1.0,
                                                                "use_dynamic_shifting": False,
                                                                "invert_sigmas": False, "shift_terminal": None,
                                                                "use_karras_sigmas": False,
                                                                "use_exponential_sigmas": False,
                                                                "use_beta_sigmas": False,
                                                                "stochastic_sampling": False})
    for flag in ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                 "use_beta_sigmas", "stochastic_sampling"):
        r.require(flag, (False,), "the release's plain shifted Euler grid")
    r.require("shift_terminal", (None,), "the release's plain shifted Euler grid")
    cfg = SamplerConfig(steps=steps, cfg_scale=RELEASE_GUIDANCE, shift=float(r.get("shift")),
                        t_scale=float(r.get("num_train_timesteps")), schedule="flow_match_euler",
                        state_dtype="model")
    r.finish()
    return cfg


def _refiner(p: dict, where: str, sign: bool):
    """``Voxel_RefinerXL`` (512 SDF refiner) / ``Voxel_RefinerXL_sign`` (1024 sign refiner) params. Their UNet widths
    (8/32/128/512), MLP and filters are fixed in the class; ``res`` is the grid the 512 refiner tiles (its blending is
    written for 512); ``infer_patch_size`` of the sign refiner is never read by the release."""
    from d3s2.models.refiner import SDFRefinerConfig, SignRefinerConfig, check_config

    defaults = {"in_channels": 1, "out_channels": 1, "layers_per_block": 2, "layers_mid_block": 2,
                "patch_size": 192, "res": 512}
    if sign:
        defaults["infer_patch_size"] = 192
    r = _Reader(p, where, defaults)
    r.require("in_channels", (1,), "one SDF channel in")
    r.require("out_channels", (1,), "one SDF / sign channel out")
    r.require("res", (512,), "the release tiles a 512^3 grid")
    if sign:
        r.get("infer_patch_size")
    kw = dict(layers_per_block=int(r.get("layers_per_block")), layers_mid_block=int(r.get("layers_mid_block")),
              patch_size=int(r.get("patch_size")))
    cfg = SignRefinerConfig(**kw) if sign else SDFRefinerConfig(**kw)
    check_config(cfg, where)
    r.finish()
    return ("sign_refiner" if sign else "sdf_refiner"), cfg


_COMPONENTS = {  # release key -> (d3s2 component, registry name)
    "dense_vae": ("dense_vae", "dense_vae"), "dense_dit": ("dense_dit", "dense_dit"),
    "sparse_vae_512": ("ss_vae_512", "ss_vae"), "sparse_dit_512": ("ss_dit_512", "ss_dit"),
    "sparse_vae_1024": ("ss_vae_1024", "ss_vae"), "sparse_dit_1024": ("ss_dit_1024", "ss_dit"),
}


def read_release_config(config: dict, where: str = "config.yaml", with_1024: bool = True) -> ReleaseConfig:
    """Translate a parsed release ``config.yaml`` (see the module docstring). ``with_1024``: also the 1024 stage."""
    if not isinstance(config, dict):
        raise D3S2Error(f"{where}: expected the release's config mapping")
    version = release_version(config, where)
    out = ReleaseConfig(version=version)
    for key, (name, kind) in _COMPONENTS.items():
        if key.endswith("1024") and not with_1024:
            continue
        loc = f"{where}:{key}"
        p = _params(config, key, where)
        fp16 = p.get("use_fp16", False)
        out.use_fp16[name] = bool(fp16)
        if kind == "ss_dit":
            cfg = _ss_dit(p, loc)
            if cfg.version != version:
                raise D3S2Error(f"{loc}: compression network of {cfg.version} in a {version} release")
        elif kind == "ss_vae":
            cfg, chunk = _ss_vae(p, loc)
            if key.endswith("1024"):
                out.decode_chunk_1024 = chunk
        elif kind == "dense_vae":
            cfg = _dense_vae(p, loc, int(_params(config, "dense_dit", where).get("resolution", 16)))
        else:
            cfg = _dense_dit(p, loc)
        out.models[name] = (kind, cfg)
    for key, name in (("refiner", "refiner_512"), ("refiner_1024", "refiner_1024")):
        if key not in config or (name == "refiner_1024" and not with_1024):
            continue  # the refiners are optional: a config without them loads without them
        p = _params(config, key, where)
        out.use_fp16[name] = bool(p.get("use_fp16", False))
        out.refiners[name] = _refiner(p, f"{where}:{key}", sign=name == "refiner_1024")
    for key, name in (("dense_scheduler", "dense_dit"), ("sparse_scheduler_512", "ss_dit_512"),
                      ("sparse_scheduler_1024", "ss_dit_1024")):
        if name in out.models:
            out.samplers[name] = _scheduler(config, key, RELEASE_STEPS[name], where)
    return out


def load_release_yaml(path: Path) -> dict:
    """Parse a release ``config.yaml`` with one-line errors."""
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise D3S2Error(f"{path}: not a readable YAML file ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise D3S2Error(f"{path}: expected the release's config mapping (dense_vae, dense_dit, sparse_vae_512, ...)")
    return data

