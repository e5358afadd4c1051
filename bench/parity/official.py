"""The authors' code, imported from a local snapshot, and release folders with shared random weights.

``import_official(snapshot)`` puts the snapshot (a checkout of the public DreamTechAI/Direct3D-S2, kept outside git,
e.g. ``.snapshots/Direct3D-S2``) and ``bench/parity/stubs`` (torchsparse / flash_attn / udf_ext stand-ins) on
``sys.path`` and imports ``direct3d_s2``. Packages the authors import at module level but that no compared path
calls (``utils3d``, ``igraph``, ``pyvista`` of their remeshing, ``transformers`` of BiRefNet) are replaced by empty
modules when missing; a compared path that needs one fails loudly.

``build_release(...)`` builds each compared component with the authors' class and the release config's params,
fills its state dict with random weights (deterministic per key; persistent buffers such as the dense DiT's
``pos_emb`` keep the authors' values), loads them into the authors' model (strict) and writes the release folder
(``config.yaml`` + ``.ckpt`` files), so that d3s2's public loader reads the very same tensors.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
import zlib
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KEY_FILE = REPO / "tests" / "data" / "official_state_dict_keys.json"
UNUSED = ("utils3d", "igraph", "pyvista", "transformers")


def import_official(snapshot: str | Path):
    """Import ``direct3d_s2`` from ``snapshot`` (see the module docstring); returns the package."""
    snap = Path(snapshot).resolve()
    if not (snap / "direct3d_s2" / "pipeline.py").is_file():
        raise SystemExit(f"{snap}: not a snapshot of DreamTechAI/Direct3D-S2 (no direct3d_s2/pipeline.py); fetch the "
                         "public repository and pass its folder with --snapshot")
    for p in (str(HERE / "stubs"), str(snap)):
        if p not in sys.path:
            sys.path.insert(0, p)
    for name in UNUSED:
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
    if "pymeshfix" not in sys.modules and importlib.util.find_spec("pymeshfix") is None:
        pm = types.ModuleType("pymeshfix")
        pm._meshfix = types.ModuleType("pymeshfix._meshfix")
        sys.modules["pymeshfix"], sys.modules["pymeshfix._meshfix"] = pm, pm._meshfix
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        _stub_torchvision()
    return importlib.import_module("direct3d_s2")


def _stub_torchvision() -> None:
    """Import-only stand-in: the authors' image utilities import torchvision at module level; the rows that run
    them (preprocessing) are skipped when the real package is missing."""
    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    fn = types.ModuleType("torchvision.transforms.functional")

    def missing(*_a, **_k):
        raise RuntimeError("torchvision is not installed: this row needs the real package")

    for name in ("Compose", "Resize", "CenterCrop", "Normalize", "RandomCrop", "InterpolationMode"):
        setattr(tr, name, missing)
    def attr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return missing

    fn.__getattr__ = attr
    tr.functional = fn
    tv.transforms = tr
    tv.__stub__ = True
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn})


def has_torchvision() -> bool:
    tv = sys.modules.get("torchvision")
    return tv is not None and not getattr(tv, "__stub__", False)


def get_class(target: str):
    module, name = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with sane scales, deterministic per key: matrices / kernels N(0, 1/fan_in) (scaled 0.5), the
    weights of normalisation layers (LayerNorm, GroupNorm, RMS-norm gammas) 1 + N(0, 0.05), biases and other vectors
    N(0, 0.02), the SSA intra-block PE N(0, 0.1); persistent buffers keep their values."""
    buffers = {n for n, _ in model.named_buffers()}
    norms = set()
    for mname, m in model.named_modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "Norm" in type(m).__name__:
            norms.update(f"{mname}.{p}" if mname else p for p, _ in m.named_parameters(recurse=False))
    out = {}
    for name, t in model.state_dict().items():
        if name in buffers:
            out[name] = t.detach().float().clone()
            continue
        h = int(hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(h)
        shape = tuple(t.shape)
        if name in norms and not name.endswith("bias"):
            v = 1 + 0.05 * torch.randn(shape, generator=g)
        elif name.endswith("intra_block_pe"):
            v = torch.randn(shape, generator=g) * 0.1
        elif len(shape) >= 2:
            fan = shape[:-1] if name.endswith("kernel") else shape[1:]  # torchsparse kernels: [K^3, Cin, Cout]
            v = torch.randn(shape, generator=g) * (0.5 / max(1, int(torch.tensor(fan).prod())) ** 0.5)
        else:
            v = 0.02 * torch.randn(shape, generator=g)
        out[name] = v
    return out


def release_config(params: dict[str, dict], shifts=(6.0, 6.0, 8.0)) -> dict:
    """config.yaml of a release folder: ``params`` per release key (dense_vae, dense_dit, sparse_vae_512, ...) with
    their ``target`` classes; schedulers and image encoders as the release names them."""
    import json

    keys = json.loads(KEY_FILE.read_text())["components"]
    cfg = {}
    for key, (target, p) in params.items():
        cfg[key] = {"target": target, "params": dict(p)}
    for key, shift in zip(("dense_scheduler", "sparse_scheduler_512", "sparse_scheduler_1024"), shifts):
        cfg[key] = {"target": "diffusers.FlowMatchEulerDiscreteScheduler",
                    "params": {"num_train_timesteps": 1000, "shift": shift}}
    for key in ("dense_image_encoder", "sparse_image_encoder"):
        cfg[key] = {"target": "direct3d_s2.models.conditioner.DinoEncoder", "params": {}}
    for key in ("refiner", "refiner_1024"):
        entry = keys[key]
        cfg.setdefault(key, {"target": entry["class"].split(" ")[0], "params": {**entry["params"], "use_fp16": True}})
    return cfg


def full_params(version: str) -> dict[str, tuple[str, dict]]:
    """The release's params per release key (from the reference key file), ``use_fp16: true`` as released."""
    import json

    keys = json.loads(KEY_FILE.read_text())["components"]
    tag = version.replace(".", "_")
    names = {"dense_vae": "dense_vae", "dense_dit": "dense_dit", "sparse_vae_512": "ss_vae_512",
             "sparse_dit_512": f"ss_dit_{tag}_512", "sparse_vae_1024": "ss_vae_1024",
             "sparse_dit_1024": f"ss_dit_{tag}_1024", "refiner": "refiner", "refiner_1024": "refiner_1024"}
    return {k: (keys[c]["class"].split(" ")[0], {**keys[c]["params"], "use_fp16": True}) for k, c in names.items()}


def small_params(version: str) -> dict[str, tuple[str, dict]]:
    """Reduced depth/width of the same architectures (CPU runs): the key set is the release's."""
    p = full_params(version)
    out = {}
    for k, (target, q) in p.items():
        q = dict(q)
        if "refiner" in k:
            pass  # dense 3D UNets: their patch sizes are fixed by their run(); no smaller variant
        elif "dit" in k:
            q.update(num_blocks=2)
            if "dense" in k:
                q.update(model_channels=256, num_heads=4)
        else:
            if "sparse" in k:
                q.update(num_blocks_encoder=2, num_blocks_decoder=2)
        out[k] = (target, q)
    return out


FILES = {"model_dense.ckpt": (("vae", "dense_vae"), ("dit", "dense_dit")),
         "model_sparse_512.ckpt": (("vae", "sparse_vae_512"), ("dit", "sparse_dit_512")),
         "model_sparse_1024.ckpt": (("vae", "sparse_vae_1024"), ("dit", "sparse_dit_1024")),
         "model_refiner.ckpt": (("refiner", "refiner"),), "model_refiner_1024.ckpt": (("refiner", "refiner_1024"),)}


def build_release(folder: Path, params: dict[str, tuple[str, dict]], seed: int = 0, only: set[str] | None = None,
                  keep: set[str] | None = None, fp16: bool = False) -> dict[str, torch.nn.Module]:
    """Write a release folder for ``params`` (see the module docstring); returns the authors' models named in
    ``keep`` (others are freed after their weights are written). ``only``: the release keys to build (files whose
    components are all skipped are not written). ``fp16``: build the authors' models with ``use_fp16`` as
    configured (the release's precision) instead of fp32."""
    folder.mkdir(parents=True, exist_ok=True)
    models = {}
    for fname, entries in FILES.items():
        if only is not None and not any(k in only for _, k in entries):
            continue
        ckpt = {}
        for key, rel_key in entries:
            target, p = params[rel_key]
            p = dict(p)
            if not fp16:
                p["use_fp16"] = False
            model = get_class(target)(**p)
            sd = random_state_dict(model, seed * 1000 + zlib.crc32(rel_key.encode()) % 1000)
            model.load_state_dict(sd, strict=True)
            model.eval()
            ckpt[key] = sd
            if keep is None or rel_key in keep:
                models[rel_key] = model
        torch.save(ckpt, folder / fname)
    (folder / "config.yaml").write_text(yaml.safe_dump(release_config(params), sort_keys=False))
    return models
