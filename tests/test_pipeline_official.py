"""Authors'-release loader (d3s2.pipelines.official): a synthetic release folder in the published layout (config.yaml,
``{"vae", "dit"}`` .ckpt files, torchsparse ``[Cin, Cout]`` 1x1 kernels) built from tiny models loads back into the
same weights and outputs; mismatches, unsafe pickles and offline hub ids give clear errors."""

import numpy as np
import pytest
import torch
import yaml

from d3s2.config import load_yaml, resolve_config_path
from d3s2.errors import D3S2Error
from d3s2.pipelines.image_to_3d import ImageTo3DPipeline
from d3s2.pipelines.official import load_official_pipeline


class _Payload:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse it."""


def _release_sd(model):
    """Our state dict in the release's conventions: 1x1 sparse-conv kernels stored torchsparse-style as [Cin, Cout]."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith(".conv.kernel") and v.shape[0] == 1:
            v = v[0]
        out[k] = v.clone()
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    pipe = ImageTo3DPipeline.from_config("pipeline_tiny", seed=5)
    folder = tmp_path_factory.mktemp("rel") / "direct3d-s2-v-1-1"
    folder.mkdir()
    keys = ["dense_vae", "dense_dit", "dense_image_encoder", "dense_scheduler", "sparse_vae_512", "sparse_dit_512",
            "sparse_scheduler_512", "sparse_vae_1024", "sparse_dit_1024", "sparse_scheduler_1024",
            "sparse_image_encoder", "refiner", "refiner_1024"]
    (folder / "config.yaml").write_text(yaml.safe_dump({k: {"target": f"x.{k}", "params": {}} for k in keys}))
    m = pipe.models
    torch.save({"vae": _release_sd(m["dense_vae"]), "dit": _release_sd(m["dense_dit"])}, folder / "model_dense.ckpt")
    torch.save({"vae": _release_sd(m["ss_vae_512"]), "dit": _release_sd(m["ss_dit_512"])},
               folder / "model_sparse_512.ckpt")
    torch.save({"vae": _release_sd(m["ss_vae_1024"]), "dit": _release_sd(m["ss_dit_1024"])},
               folder / "model_sparse_1024.ckpt")
    assert any(v.dim() == 2 and k.endswith("conv.kernel") for k, v in _release_sd(m["ss_vae_512"]).items())
    specs = load_yaml(resolve_config_path("pipeline_tiny"))["components"]
    return pipe, folder, specs


def test_release_folder_loads_the_same_weights(release):
    pipe, folder, specs = release
    loaded = ImageTo3DPipeline.from_pretrained(folder, components=specs, image_encoder=pipe.models["image_encoder"])
    assert set(loaded.models) == set(pipe.models)
    for name, m in pipe.models.items():
        sd = loaded.models[name].state_dict()
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)
    assert loaded.settings.mc_level_1024 == 0.2 and loaded.settings.mc_level_512 == 0.0
    # same weights, same generator -> same structure coordinates (the dense stage runs end to end)
    img = np.zeros((64, 64, 4), np.uint8)
    img[16:48, 20:44] = (200, 100, 50, 255)
    with torch.no_grad():
        pix = pipe.encode_images([img])
        a = pipe._structure(pipe._condition(pix), torch.Generator().manual_seed(0), 2, None, None, False)
        b = loaded._structure(loaded._condition(pix), torch.Generator().manual_seed(0), 2, None, None, False)
    assert torch.equal(a, b) and len(a) > 0


def test_release_errors(release, tmp_path):
    pipe, folder, specs = release
    enc = pipe.models["image_encoder"]
    # a missing key (strict loading)
    bad = tmp_path / "direct3d-s2-v-1-1"
    bad.mkdir()
    (bad / "config.yaml").write_text((folder / "config.yaml").read_text())
    dense = torch.load(folder / "model_dense.ckpt", weights_only=True)
    dense["dit"].pop(next(iter(dense["dit"])))
    torch.save(dense, bad / "model_dense.ckpt")
    with pytest.raises(D3S2Error, match=r"model_dense.ckpt \[dit\].*missing"):
        load_official_pipeline(bad, components=specs, image_encoder=enc)
    # pickled objects are refused (weights_only=True)
    torch.save({"vae": _Payload(), "dit": {}}, bad / "model_dense.ckpt")
    with pytest.raises(D3S2Error, match="weights_only"):
        load_official_pipeline(bad, components=specs, image_encoder=enc)
    # hub id offline: says which files to put where
    with pytest.raises(D3S2Error, match="model_sparse_512.ckpt.*huggingface.co/wushuang98/Direct3D-S2/tree/main/"
                                        "direct3d-s2-v-1-0"):
        ImageTo3DPipeline.from_pretrained("wushuang98/Direct3D-S2/direct3d-s2-v-1-0")
