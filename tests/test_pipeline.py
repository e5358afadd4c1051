"""Image-to-3D pipeline (d3s2.pipelines.image_to_3d) on the tiny configs with random weights: save/load round trip,
end to end on a rendered pybullet mesh with an injected structure, exact chunked decoding, the 1024 stage, and the
"no shape" error.

Random weights give random SDFs that are usually all on one side of the level, so :func:`_centre_decoder_output`
shifts each SS-VAE decoder's output by its median (a forward hook on ``decoder.out_layer``): the decoded SDF then has
a surface and marching cubes, clean-up and export run on real data.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.pipelines.image_to_3d import ImageTo3DPipeline, latent_shell_coords


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU runs: 1 thread is faster on a busy machine


def _centre_decoder_output(pipe):
    def hook(mod, inp, out):
        return out.replace(out.feats - out.feats.median())

    for name in ("ss_vae_512", "ss_vae_1024"):
        if name in pipe.models:
            pipe.models[name].decoder.out_layer.register_forward_hook(hook)
    return pipe


def _square_image():
    a = np.zeros((64, 64, 4), np.uint8)
    a[16:48, 20:44] = (200, 100, 50, 255)
    return a


@pytest.fixture(scope="module")
def duck():
    import pybullet_data

    from d3s2.data.mesh_io import load_mesh, normalize_mesh

    mesh, _ = normalize_mesh(load_mesh(os.path.join(pybullet_data.getDataPath(), "duck_vhacd.obj")))
    return mesh


def _render(mesh, size=64):
    from d3s2.data.render import RenderSettings, Renderer, render_mesh_from_trimesh
    from d3s2.geometry.cameras import Camera, fit_distance

    rm = render_mesh_from_trimesh(mesh)
    cam = Camera(elevation_deg=20.0, azimuth_deg=30.0, focal_mm=50.0,
                 distance=fit_distance(rm.bounding_radius(), 50.0), resolution=size)
    return Renderer(rm, RenderSettings(size=size, supersample=1)).render(cam).rgba_uint8()


@pytest.mark.slow
def test_save_load_round_trip_gives_identical_meshes(tmp_path):
    pipe = _centre_decoder_output(ImageTo3DPipeline.from_config("pipeline_tiny", seed=1))
    img = _square_image()
    a = pipe(img, generator=torch.Generator().manual_seed(3), progress=False)[0]
    assert len(a.faces) > 0
    assert [s["stage"] for s in pipe.last_stats] == ["preprocess", "condition", "structure", "sparse_512", "cleanup",
                                                      "total"]
    assert all(s["seconds"] >= 0 and s["peak_gpu_bytes"] is None for s in pipe.last_stats)
    out = pipe.save_pretrained(tmp_path / "tiny")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["pipeline.yaml", "image_encoder.safetensors", "dense_vae.safetensors",
                            "dense_dit.safetensors", "ss_vae_512.safetensors", "ss_dit_512.safetensors",
                            "ss_vae_1024.safetensors", "ss_dit_1024.safetensors"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    loaded = _centre_decoder_output(ImageTo3DPipeline.from_pretrained(out))
    for name, m in pipe.models.items():
        sd = loaded.models[name].state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items()), name
    b = loaded(img, generator=torch.Generator().manual_seed(3), progress=False)[0]
    assert np.array_equal(np.asarray(a.faces), np.asarray(b.faces))
    assert np.array_equal(np.asarray(a.vertices), np.asarray(b.vertices))
    # another seed gives another shape (the generator is really used)
    c = loaded(img, generator=torch.Generator().manual_seed(4), progress=False)[0]
    assert len(c.vertices) != len(a.vertices) or not np.allclose(np.asarray(c.vertices), np.asarray(a.vertices))
    # saving over an existing folder replaces it
    pipe.save_pretrained(out)
    assert (out / "pipeline.yaml").is_file()


@pytest.mark.slow
def test_end_to_end_on_rendered_mesh_with_injected_structure(tmp_path, duck):
    import trimesh

    from d3s2.data.sdf import unsigned_band
    from d3s2.geometry.export import save_mesh

    pipe = _centre_decoder_output(ImageTo3DPipeline.from_config("pipeline_tiny", seed=0))
    # the open extraction on the decoded children only (the closed default also closes past the active set)
    pipe.settings = dataclasses.replace(pipe.settings, surface="d3s2")
    r = pipe.resolution_512
    coords, _ = unsigned_band(duck, r, 1.5 / r)
    shell = latent_shell_coords(coords, 8)
    assert 10 < len(shell) < 8**3
    rgba = _render(duck)
    assert rgba[..., 3].max() == 255 and rgba[..., 3].min() == 0
    mesh = pipe(rgba, generator=torch.Generator().manual_seed(0), progress=False, structure_coords=shell,
                faces=2000)[0]
    assert "structure" not in [s["stage"] for s in pipe.last_stats]
    assert 0 < len(mesh.faces) <= 2100
    v = np.asarray(mesh.vertices)
    assert np.all(np.abs(v) <= 1.0)
    # every vertex lies inside the latent cells of the injected shell (MC ran on the decoded children only)
    cell = np.floor((v + 1.0) / 2.0 * r / 8.0 - 1e-9).astype(np.int64).clip(0, r // 8 - 1)
    allowed = {tuple(c) for c in shell[:, 1:].tolist()}
    # vertices on cell faces may round into the neighbour: accept either side
    near = [tuple(c) in allowed or any(tuple(c + d) in allowed for d in np.eye(3, dtype=np.int64) * -1)
            for c in cell]
    assert np.mean(near) > 0.99
    path = save_mesh(mesh, tmp_path / "duck.glb")
    back = trimesh.load(path, force="mesh")
    assert len(back.faces) == len(mesh.faces) and len(back.faces) > 0


def test_chunked_decoding_matches_one_shot():
    from d3s2.config import build_model
    from d3s2.sparse import SparseTensor

    torch.manual_seed(0)
    vae = build_model("ss_vae_tiny").eval()
    g = torch.Generator().manual_seed(0)
    lat = torch.unique(torch.randint(0, 12, (60, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(lat), 1, dtype=torch.long), lat], 1)
    coords = torch.cat([coords, torch.tensor([[1, 3, 3, 3], [1, 3, 3, 4]])])  # a second sample
    z = SparseTensor(torch.randn(len(coords), 8, generator=g), coords, batch_size=2)
    with torch.no_grad():
        full = vae.decode(z)
        chunked = vae.decode(z, chunk=4)
    assert chunked.num_voxels == full.num_voxels

    def by_key(x):
        c = x.coords.long()
        key = ((c[:, 0] * 200 + c[:, 1]) * 200 + c[:, 2]) * 200 + c[:, 3]
        order = torch.argsort(key)
        return key[order], x.feats[order]

    kf, ff = by_key(full)
    kc, fc = by_key(chunked)
    assert torch.equal(kf, kc)
    torch.testing.assert_close(fc, ff, rtol=1e-5, atol=1e-5)
    # without the halo the chunk borders differ: the halo is what makes it exact
    with torch.no_grad():
        no_halo = vae.decode(z, chunk=4, halo=0)
    assert not torch.allclose(by_key(no_halo)[1], ff, atol=1e-5)
    # the decoder's last features (the 512 refiner's input), row for row with the decoded voxels, chunked or not
    with torch.no_grad():
        full2, feat_full = vae.decode(z, return_features=True)
        chunk2, feat_chunk = vae.decode(z, chunk=4, return_features=True)
    assert torch.equal(full2.feats, full.feats)
    assert feat_full.shape == (full.num_voxels, vae.config.decoder_channels[-1])
    assert feat_chunk.shape == feat_full.shape and feat_full.abs().max() > 0
    torch.testing.assert_close(by_key(chunk2.replace(feat_chunk))[1], by_key(full2.replace(feat_full))[1],
                               rtol=1e-5, atol=1e-5)
    # the out layer of those features is the decoded SDF
    torch.testing.assert_close(torch.tanh(vae.decoder.out_layer(full2.replace(feat_full)).feats), full.feats)


def test_1024_stage_from_the_512_mesh():
    pipe = _centre_decoder_output(ImageTo3DPipeline.from_config("pipeline_tiny", seed=0))
    pipe.settings = dataclasses.replace(pipe.settings, surface="d3s2")  # the bound below is that of the open surface
    block = torch.tensor([[0, 3 + i, 3 + j, 3 + k] for i in range(2) for j in range(2) for k in range(2)])
    meshes = pipe(_square_image(), generator=torch.Generator().manual_seed(0), resolution=1024, progress=False,
                  structure_coords=block)
    stages = [s["stage"] for s in pipe.last_stats]
    assert stages == ["preprocess", "condition", "sparse_512", "sparse_1024", "cleanup", "total"]
    v = np.asarray(meshes[0].vertices)
    assert len(meshes[0].faces) > 0
    # the 512 mesh lives in latent cells 3..4 of 8 ([-0.25, 0.25]); the 1024 stage decodes the latent cells (1/8 wide)
    # of its band (4 voxels at 128^3 = 1/32), so the surface stays within 1/32 + 1/8 of that box
    bound = 0.25 + 1 / 32 + 1 / 8 + 1e-6
    assert v.min() >= -bound and v.max() <= bound
    assert meshes[0].metadata["d3s2_stats"][-1]["stage"] == "total"


def test_no_shape_found_and_bad_arguments():
    pipe = ImageTo3DPipeline.from_config("pipeline_tiny", seed=0)
    with torch.no_grad():
        pipe.models["dense_vae"].decoder.out_layer[2].bias.fill_(-100.0)  # sigmoid ~ 0 everywhere
    with pytest.raises(D3S2Error, match="no shape found.*another seed"):
        pipe(_square_image(), generator=torch.Generator().manual_seed(0), progress=False)
    with pytest.raises(D3S2Error, match="512 or 1024"):
        pipe(_square_image(), resolution=256, progress=False)
    with pytest.raises(D3S2Error, match="structure_coords"):
        pipe(_square_image(), structure_coords=torch.tensor([[0, 9, 0, 0]]), progress=False)


def test_bad_pipeline_folders(tmp_path):
    with pytest.raises(D3S2Error, match="not found"):
        ImageTo3DPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D3S2Error, match="no pipeline.yaml"):
        ImageTo3DPipeline.from_pretrained(tmp_path / "empty")
    with pytest.raises(D3S2Error, match="cond_channels"):
        ImageTo3DPipeline.from_config({"image_encoder": {"preset": "tiny"}, "components": {
            "dense_vae": {"config": "dense_vae_tiny"}, "dense_dit": "dense_dit_tiny",
            "ss_vae_512": "ss_vae_tiny", "ss_dit_512": "ss_dit_tiny"}})


def test_sparse_conditioning_dit_gets_the_foreground_tokens():
    """v1.0-style SS-DiT (sparse_conditioning): the condition is the masked token set with its coordinates."""
    from d3s2.config import load_yaml, resolve_config_path

    data = load_yaml(resolve_config_path("pipeline_tiny"))
    for name in ("ss_dit_512", "ss_dit_1024"):
        data["components"][name]["params"]["sparse_conditioning"] = True
    pipe = _centre_decoder_output(ImageTo3DPipeline.from_config(data, seed=0))
    seen = []
    dit = pipe.models["ss_dit_512"]
    orig = dit.forward

    def spy(x, t, cond, cond_mask=None, cond_coords=None, **kw):
        seen.append((cond.shape, None if cond_mask is None else int(cond_mask.sum()), cond_coords is not None))
        return orig(x, t, cond, cond_mask=cond_mask, cond_coords=cond_coords, **kw)

    dit.forward = spy
    block = torch.tensor([[0, 3, 3, 3], [0, 3, 3, 4], [0, 3, 4, 3], [0, 4, 3, 3]])
    bar = np.zeros((64, 64, 4), np.uint8)
    bar[8:56, 30:34] = (250, 250, 20, 255)  # a thin vertical bar: after cropping it covers the 2 middle columns
    mesh = pipe(bar, generator=torch.Generator().manual_seed(0), progress=False, structure_coords=block)[0]
    assert len(mesh.faces) > 0
    # 1 CLS + 4 registers + the 2 x 4 foreground patches of the 4 x 4 patch grid
    assert seen[0][1] == 5 + 8 and all(s[2] for s in seen)
    assert len(seen) == 2 * pipe.samplers["ss_dit_512"].steps  # conditional + unconditional call per step


def test_sampler_config_defaults_and_overrides():
    pipe = ImageTo3DPipeline.from_config("demo_pipeline", seed=0)
    base = pipe.sampler_config("ss_dit_512")
    assert (base.steps, base.cfg_scale, base.shift) == (25, 3.0, 3.0)  # demo_pipeline.yaml's sampler section
    over = pipe.sampler_config("ss_dit_512", steps=4, guidance_scale=1.5)
    assert (over.steps, over.cfg_scale, over.shift) == (4, 1.5, 3.0)
    assert pipe.sampler_config("ss_dit_1024").steps == 15  # no 1024 stage: the release's default


@pytest.mark.slow
def test_public_api_and_typed_output():
    """``from d3s2 import ImageTo3DPipeline`` (lazy: ``import d3s2`` alone imports no torch); a call returns an
    ImageTo3DOutput that indexes / iterates like the old list, with the stats and the user-facing notes."""
    import subprocess
    import sys
    import warnings

    import d3s2
    from d3s2 import ImageTo3DOutput
    from d3s2 import ImageTo3DPipeline as Public

    assert Public is ImageTo3DPipeline and d3s2.load_release.__module__ == "d3s2.pipelines.official"
    code = "import sys, d3s2; assert 'torch' not in sys.modules, 'import d3s2 imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
    def remover(img):  # a background remover that warns the user, as the border-colour fallback does
        warnings.warn("the mask is a guess")
        return (np.asarray(img).max(-1) > 0).astype(np.uint8) * 255

    pipe = _centre_decoder_output(ImageTo3DPipeline.from_config("pipeline_tiny", seed=1, background_remover=remover))
    with pytest.warns(UserWarning, match="the mask is a guess"):  # still emitted as a warning
        out = pipe(_square_image()[..., :3], generator=torch.Generator().manual_seed(3), progress=False)
    assert isinstance(out, ImageTo3DOutput) and len(out) == 1 and out[0] is out.meshes[0]
    assert list(out) == out.meshes and out.stats is pipe.last_stats and out.stats[-1]["stage"] == "total"
    assert out.notes == ["the mask is a guess"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = pipe(_square_image(), generator=torch.Generator().manual_seed(3), progress=False)
    assert quiet.notes == []
