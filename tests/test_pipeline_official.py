"""Authors'-release loader (d3s2.pipelines.official, release_config): release folders built from the reference's key
file load strictly through the public loader, at full size (meta tensors: every key, every shape) and at tiny size
(real weights round-trip through the release's key layout); version detection reads the config's params; mismatches,
unknown params, unsafe pickles and offline hub ids give one clear error."""

import numpy as np
import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.models.image_encoder import DINOv2Encoder, ImageEncoderConfig
from d3s2.pipelines.image_to_3d import ImageTo3DPipeline
from d3s2.pipelines.official import load_release
from d3s2.pipelines.release_pipeline import load_official_pipeline
from d3s2.pipelines.release_config import read_release_config
from release_fixtures import (KEYS, meta_checkpoints, release_config, release_state_dict, tag, tiny_release,
                              write_release_folder)

COMPONENT_KEYS = {"dense_vae": "dense_vae", "dense_dit": "dense_dit", "ss_vae_512": "ss_vae_512",
                  "ss_dit_512": "ss_dit_{v}_512", "ss_vae_1024": "ss_vae_1024", "ss_dit_1024": "ss_dit_{v}_1024"}


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_full_size_release_folder_loads_every_tensor(version, tmp_path):
    # a renamed folder: the version must come from config.yaml, not from the name
    folder = write_release_folder(tmp_path / "my-weights", release_config(version), meta_checkpoints(version))
    rel = load_release(folder)
    assert rel.version == version
    assert set(rel.models) == set(COMPONENT_KEYS)
    for name, model in rel.models.items():
        ref = KEYS[COMPONENT_KEYS[name].format(v=tag(version))]
        got = release_state_dict(model)
        assert set(got) == set(ref["keys"]), name
        for k, shape in ref["keys"].items():
            assert list(got[k].shape) == shape, (name, k)
        # every tensor is the checkpoint's (meta), none is a fresh initialisation
        assert all(p.device.type == "meta" for p in model.parameters()), name
        assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"], name
        assert {n for n, _ in model.named_buffers() if n in got} == set(ref["persistent_buffers"]), name
    ss = rel.configs["ss_dit_512"][1]
    assert (ss.pool_divisor, ss.cond_pe_after_proj) == ("count_plus_one", True)
    assert ss.cmp_skip == "input" and ss.sparse_conditioning == (version == "v1.0")
    assert rel.configs["ss_vae_512"][1].pool_divisor == "count_plus_one"
    assert rel.configs["ss_dit_1024"][1].pe_factor == 0.5 and rel.configs["ss_vae_1024"][1].resolution == 1024
    assert rel.settings.decode_chunk == 32  # the release decodes the 128^3 latent in 4^3 chunks
    steps = {n: (s.steps, s.cfg_scale, s.shift, s.schedule, s.state_dtype) for n, s in rel.samplers.items()}
    assert steps == {"dense_dit": (50, 7.0, 6.0, "flow_match_euler", "model"),
                     "ss_dit_512": (30, 7.0, 6.0, "flow_match_euler", "model"),
                     "ss_dit_1024": (15, 7.0, 8.0, "flow_match_euler", "model")}
    st = rel.settings
    assert (st.band, st.surface, st.marching_cubes, st.preprocess) == ("release",) * 2 + ("lewiner", "release")
    assert (st.mc_level_512_refined, st.mc_level_512, st.mc_level_1024, st.occupancy_threshold) == (0.4, 0.2, 0.2, 0.1)
    assert st.refine
    # resolution 512 leaves the 1024 files alone
    assert set(load_release(folder, resolution=512).models) == set(COMPONENT_KEYS) - {"ss_vae_1024", "ss_dit_1024"}


def test_version_detection_reads_the_params():
    cfg = release_config("v1.1")
    assert cfg["sparse_dit_512"]["params"]["sparse_conditions"] is False  # the substring that fooled the old test
    assert read_release_config(cfg, with_1024=False).version == "v1.1"
    assert read_release_config(release_config("v1.0"), with_1024=False).version == "v1.0"
    mixed = release_config("v1.1")
    mixed["sparse_dit_512"]["params"]["sparse_conditions"] = True
    with pytest.raises(D3S2Error, match="neither release v1.0"):
        read_release_config(mixed)
    extra = release_config("v1.0")
    extra["sparse_dit_1024"]["params"]["rope_theta"] = 3
    with pytest.raises(D3S2Error, match="sparse_dit_1024: unknown parameter 'rope_theta'"):
        read_release_config(extra)
    odd = release_config("v1.0")
    odd["dense_scheduler"]["params"]["use_karras_sigmas"] = True
    with pytest.raises(D3S2Error, match="use_karras_sigmas"):
        read_release_config(odd)


@pytest.fixture(scope="module", params=["v1.0", "v1.1"])
def tiny_folder(request, tmp_path_factory):
    """A tiny release folder with random weights written in the release's layout, and the d3s2 models they came
    from."""
    version = request.param
    config, ckpts, models = tiny_release(version)
    assert any(v.dim() == 2 and k.endswith("conv.kernel") for k, v in ckpts["model_sparse_512.ckpt"]["vae"].items())
    folder = write_release_folder(tmp_path_factory.mktemp("rel") / f"direct3d-s2-{version}", config, ckpts)
    return version, folder, models


def test_tiny_release_round_trip(tiny_folder):
    version, folder, models = tiny_folder
    enc = DINOv2Encoder(ImageEncoderConfig.tiny())
    # the tiny folder's refiners are full-size meta checkpoints (they load strictly, cannot run): a clear error
    with pytest.raises(D3S2Error, match="refiner_512.*no weights"):
        load_official_pipeline(folder, device="cpu", image_encoder=enc)
    pipe = load_official_pipeline(folder, device="cpu", image_encoder=enc, refiners=False)
    assert "refiner_512" not in pipe.models
    assert pipe.dtype == torch.float32  # fp16 is the release's CUDA dtype; the CPU runs fp32
    for name, m in models.items():
        sd = pipe.models[name].state_dict()
        for k, v in m.state_dict().items():
            assert torch.equal(v.float(), sd[k].float()), (name, k)
    # the structure stage runs end to end on the loaded weights
    img = np.zeros((64, 64, 4), np.uint8)
    img[16:48, 20:44] = (200, 100, 50, 255)
    with torch.no_grad():
        pix = pipe.encode_images([img])
        coords = pipe._structure(pipe._condition(pix), torch.Generator().manual_seed(0), 2, None, None, False)
    assert coords.shape[1] == 4
    # the same folder through the generic entry point
    assert isinstance(ImageTo3DPipeline.from_pretrained(folder, device="cpu", image_encoder=enc, refiners=False),
                      ImageTo3DPipeline)


def test_release_errors(tiny_folder, tmp_path):
    version, folder, _ = tiny_folder
    enc = DINOv2Encoder(ImageEncoderConfig.tiny())
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.yaml").write_text((folder / "config.yaml").read_text())
    for f in ("model_sparse_512.ckpt", "model_sparse_1024.ckpt"):
        (bad / f).write_bytes((folder / f).read_bytes())
    dense = torch.load(folder / "model_dense.ckpt", weights_only=True)
    first = next(iter(dense["dit"]))
    dense["dit"].pop(first)
    torch.save(dense, bad / "model_dense.ckpt")
    with pytest.raises(D3S2Error, match=rf"model_dense.ckpt \[dit\].*1 missing keys.*{first}"):
        load_official_pipeline(bad, image_encoder=enc)
    # a shape that differs: named
    dense = torch.load(folder / "model_dense.ckpt", weights_only=True)
    k = next(k for k in dense["dit"] if k.endswith("weight") and dense["dit"][k].dim() == 2)
    dense["dit"][k] = dense["dit"][k][:, :1]
    torch.save(dense, bad / "model_dense.ckpt")
    with pytest.raises(D3S2Error, match=rf"model_dense.ckpt \[dit\].*first: {k}"):
        load_official_pipeline(bad, image_encoder=enc)
    # pickled objects are refused (weights_only=True)
    torch.save({"vae": _Payload(), "dit": {}}, bad / "model_dense.ckpt")
    with pytest.raises(D3S2Error, match="weights_only"):
        load_official_pipeline(bad, image_encoder=enc)
    # the version asked for is checked against the config
    other = "v1.1" if version == "v1.0" else "v1.0"
    with pytest.raises(D3S2Error, match=f"asked for release {other}"):
        load_release(folder, version=other)
    # hub id offline: says which files to put where
    with pytest.raises(D3S2Error, match="model_sparse_512.ckpt.*huggingface.co/wushuang98/Direct3D-S2/tree/main/"
                                        "direct3d-s2-v-1-0"):
        ImageTo3DPipeline.from_pretrained("wushuang98/Direct3D-S2/direct3d-s2-v-1-0")


class _Payload:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse it."""
