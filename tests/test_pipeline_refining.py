"""The release's refiners inside the pipeline (d3s2.pipelines.refining): a tiny release pipeline with stand-in
refiners meshes exactly the dense reference of the release's refiner runs, at 512 and 1024; refine off meshes the
SS-VAE's output; refiners travel with save_pretrained."""

import numpy as np
import pytest
import torch
from release_fixtures import sphere_hooks
from skimage import measure
from test_geometry_refine import SDFNet, SignNet

from d3s2.geometry.refine_reference import refine_sdf_512_reference, refine_signs_1024_reference
from d3s2.models.refiner import SDFRefiner, SDFRefinerConfig, SignRefiner, SignRefinerConfig
from d3s2.pipelines import refining
from d3s2.pipelines.image_to_3d import ImageTo3DPipeline


@pytest.fixture(scope="module")
def base():
    """The tiny pipeline (grids 64^3 / 128^3, decoder features of 8 channels) with the release's meshing settings."""
    import dataclasses

    pipe = ImageTo3DPipeline.from_config("pipeline_tiny", seed=0, device="cpu")
    pipe.settings = dataclasses.replace(pipe.settings, surface="release", marching_cubes="lewiner", mc_level_1024=0.2,
                                        remove_enclosed=False)  # clean-up off: compare the raw surface
    assert pipe.settings.refine and pipe.settings.mc_level_512_refined == 0.4
    return pipe


def _with(base, nets, **settings):
    import dataclasses

    return ImageTo3DPipeline({**base.models, **nets}, base.samplers, dataclasses.replace(base.settings, **settings),
                             device="cpu", component_configs=base.component_configs, matting="border")


def _image():
    img = np.zeros((64, 64, 4), np.uint8)
    img[16:48, 20:44] = (200, 100, 50, 255)
    return img


def _run(pipe, resolution, monkeypatch):
    seen = {}
    real = refining.refine_decoded

    def spy(net, stage, decoded, features, *a, **k):
        seen[stage] = (decoded, features)
        return real(net, stage, decoded, features, *a, **k)

    monkeypatch.setattr(refining, "refine_decoded", spy)
    mesh = pipe(_image(), generator=torch.Generator().manual_seed(0), resolution=resolution, progress=False,
                num_inference_steps={"dense": 2, "512": 2, "1024": 1}, **sphere_hooks(pipe))[0]
    return mesh, seen


def _release_mesh(field: torch.Tensor, level: float):
    """skimage's Lewiner on the release's dense field, in the release's world frame."""
    v, f, _, _ = measure.marching_cubes(field.numpy(), level)
    return v / field.shape[0] * 2 - 1, f


def _same_mesh(mesh, want_v, want_f):
    # the same triangles; vertex lists compared as sets (skimage can emit a vertex twice where d3s2 welds it)
    assert len(mesh.faces) == len(want_f) > 0
    got = np.unique(np.round(np.asarray(mesh.vertices, np.float64), 5), axis=0)
    want = np.unique(np.round(want_v.astype(np.float64), 5), axis=0)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5)
    area = np.linalg.norm(np.cross(*(want_v[want_f[:, 1:]] - want_v[want_f[:, :1]]).transpose(1, 0, 2)), axis=-1)
    assert abs(mesh.area - area.sum() / 2) <= 1e-4 * mesh.area


def test_the_512_refiner_runs_and_its_field_is_meshed(base, monkeypatch):
    net = SDFNet(32, channels=8)
    pipe = _with(base, {"refiner_512": net})
    mesh, seen = _run(pipe, 512, monkeypatch)
    dec, feats = seen["512"]
    assert feats.shape == (dec.num_voxels, 8) and feats.abs().max() > 0 and net.calls > 0
    want = refine_sdf_512_reference(net, dec.coords, dec.feats[:, 0], feats, resolution=pipe.resolution_512)
    _same_mesh(mesh, *_release_mesh(want[0, 0], 0.4))
    parts = next(s for s in pipe.last_stats if s["stage"] == "sparse_512")["parts"]
    assert "refiner" in parts and "1024" not in seen
    # refine off: the SS-VAE's output at mc_level_512 (0.2), the refiner not called
    calls = net.calls
    off = _with(base, {"refiner_512": net}, refine=False)
    plain, seen = _run(off, 512, monkeypatch)
    assert net.calls == calls and not seen and len(plain.faces) > 0
    assert len(plain.faces) != len(mesh.faces) or not np.allclose(plain.vertices, mesh.vertices)


@pytest.mark.slow
def test_the_1024_sign_refiner_fills_the_interior(base, monkeypatch):
    sdf_net, sign_net = SDFNet(32, channels=8), SignNet(32)
    pipe = _with(base, {"refiner_512": sdf_net, "refiner_1024": sign_net})
    mesh, seen = _run(pipe, 1024, monkeypatch)
    dec, feats = seen["1024"]
    assert feats is None and sign_net.calls > 0
    want = refine_signs_1024_reference(sign_net, dec.coords, dec.feats[:, 0], resolution=pipe.resolution_1024)
    _same_mesh(mesh, *_release_mesh(want[0, 0], 0.2))
    assert mesh.metadata["d3s2_report"]["closed"]


def test_refiners_travel_with_save_pretrained(base, tmp_path):
    common = dict(block_out_channels=[4, 8], layers_per_block=1, layers_mid_block=0, norm_groups=2, patch_size=32,
                  patch_stride=16, resolution=64)
    torch.manual_seed(0)
    nets = {"refiner_512": SDFRefiner(SDFRefinerConfig(feature_channels=8, mlp_hidden=8, **common)),
            "refiner_1024": SignRefiner(SignRefinerConfig(**common))}
    pipe = _with(base, nets)
    pipe.save_pretrained(tmp_path / "p")
    back = ImageTo3DPipeline.from_pretrained(tmp_path / "p", device="cpu")
    for name, net in nets.items():
        assert back.models[name].config == net.config
        for k, v in net.state_dict().items():
            assert torch.equal(back.models[name].state_dict()[k], v), (name, k)
    assert back.settings.mc_level_512_refined == 0.4 and back.settings.refine
    # resolution 512 leaves the 1024 stage's components (its refiner too) out, keeps the 512 refiner
    half = ImageTo3DPipeline.from_pretrained(tmp_path / "p", device="cpu", resolution=512)
    assert "refiner_512" in half.models and "refiner_1024" not in half.models
    assert not {"refiner_512", "refiner_1024"} & set(ImageTo3DPipeline.from_pretrained(tmp_path / "p", device="cpu",
                                                                                     refiners=False).models)
