"""bench/pipeline.py in --smoke mode (tiny pipeline on the CPU with a real mesh injected through the pipeline's
benchmark hooks), plus the pieces of d3s2.pipelines.image_to_3d it relies on: the octree latent band (exact against
the voxel band of d3s2.data.sdf) and batched classifier-free guidance (same result as two calls)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("trimesh")
pytest.importorskip("igl")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_pipeline", os.path.join(ROOT, "bench", "pipeline.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU runs: 1 thread is faster on a busy machine


@pytest.fixture(scope="module")
def duck():
    pytest.importorskip("pybullet_data")
    bench = _bench_module()
    v, f, _ = bench.load_mesh_arrays("duck")
    return bench.normalized(v, f), f


@pytest.mark.slow
def test_smoke_run_writes_per_stage_numbers_of_the_injected_mesh(tmp_path, duck):
    bench = _bench_module()
    torch.set_num_threads(2)
    assert bench.main(["--smoke", "--out", str(tmp_path), "--target-tokens", "60"]) == 0
    assert torch.get_num_threads() == 2  # the smoke's single thread does not leak into the caller
    doc = json.loads((tmp_path / "pipeline-cpu-smoke-refiners.json").read_text())  # refiners on by default
    inj = doc["injected"]
    assert inj["mesh"] == "duck" and 0 < inj["scale"] < 1 and inj["tokens_512"] > 0
    assert [(r["resolution"], r["low_vram"]) for r in doc["runs"]] == [(512, False), (1024, False), (512, True),
                                                                        (1024, True)]
    off = doc["runs"][1]
    assert not {"to_device", "offload"} & set(off["stages"][4]["parts"])  # resident models: no uploads
    assert [s["stage"] for s in doc["runs"][0]["stages"]] == ["preprocess", "condition", "structure", "sparse_512",
                                                              "cleanup", "total"]
    run = doc["runs"][3]
    stages = {s["stage"]: s for s in run["stages"]}
    assert list(stages) == ["preprocess", "condition", "structure", "sparse_512", "sparse_1024", "cleanup", "total"]
    assert abs(sum(s["seconds"] for s in run["stages"][:-1]) - stages["total"]["seconds"]) < 0.5
    for name in ("dit", "decode", "hook", "refiner", "marching_cubes", "band", "to_device", "offload"):
        assert name in stages["sparse_1024"]["parts"], name
    assert "refiner" in stages["sparse_512"]["parts"]
    assert set(doc["params_millions"]) >= {"refiner_512", "refiner_1024"}
    assert set(stages["structure"]["parts"]) >= {"dit", "decode", "hook"}
    seen = run["injected_seen"]
    # the structure stage ran (its own voxels) and was replaced by the mesh's latent shell
    assert seen["structure"]["injected_tokens"] == inj["tokens_512"]
    assert seen["tokens_512"] == inj["tokens_512"]
    # the 1024 tokens come from the pipeline's band of the 512 mesh extracted from the true SDF: close to the band of
    # the true mesh
    assert abs(seen["tokens_1024"] - inj["tokens_1024_of_true_mesh"]) <= 0.35 * inj["tokens_1024_of_true_mesh"]
    # the true SDF was computed once per stage (warm-up) and reused in the timed run
    assert seen["sdf_computations"] == 2
    # the final mesh is the injected (scaled) duck: same extent within a few voxels of the tiny 128^3 grid
    assert np.allclose(run["mesh_extent"], inj["extent"], atol=6 * 2 / 128)
    assert run["mesh_faces"] > 100
    assert [(r["resolution"], r["low_vram"]) for r in doc["summary"]] == [(512, False), (1024, False), (512, True),
                                                                           (1024, True)]
    # same injected surface with and without low_vram
    assert off["mesh_faces"] == run["mesh_faces"]


def test_latent_band_coords_match_the_voxel_band(duck):
    from d3s2.data.sdf import unsigned_band
    from d3s2.pipelines.image_to_3d import latent_band_coords, latent_shell_coords

    v, f = duck
    import trimesh

    mesh = trimesh.Trimesh(v * 0.6, f, process=False)
    for res, tau in ((64, 2.5 / 64), (128, 4 / 128), (96, 1.2 / 96)):
        ref = latent_shell_coords(unsigned_band(mesh, res, tau, backend="cpu")[0], 8, batch=0)
        got = latent_band_coords(v * 0.6, f, res, tau, 8, device="cpu", batch=0)
        key = lambda c: set(map(tuple, c.tolist()))  # noqa: E731
        assert len(got) > 0 and key(got) == key(ref), res
        assert got.dtype == torch.int32 and got.shape[1] == 4
        from d3s2.pipelines.token_band import band_queries

        queries = band_queries(v * 0.6, np.asarray(f, np.int64), torch.device("cpu"))  # built once by the caller
        assert torch.equal(latent_band_coords(v * 0.6, f, res, tau, 8, device="cpu", queries=queries), got)
    assert len(latent_band_coords(v, np.zeros((0, 3), np.int64), 64, 0.1)) == 0


def test_batched_guidance_equals_two_calls():
    """Sparse CFG in one call on the stacked latent (the CUDA default) gives the two-call result."""
    from d3s2.flow.sampler import SamplerConfig
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline
    from d3s2.sparse import SparseTensor

    pipe = ImageTo3DPipeline.from_config("pipeline_tiny", seed=0)
    dit = pipe.models["ss_dit_512"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised output / adaLN layers would make the guidance a no-op
        for prm in dit.parameters():
            if not bool(prm.any()):
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
    calls = []
    orig = dit.forward
    dit.forward = lambda x, *a, **k: (calls.append(x.num_voxels), orig(x, *a, **k))[1]
    coords = torch.tensor([[b, 3 + i, 3 + j, 3 + k] for b in range(2) for i in range(2) for j in range(2)
                           for k in range(2) if b == 0 or i + j + k < 3])  # two samples of 8 and 7 tokens
    noise = torch.randn(len(coords), 8, generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(2, 21, 32, generator=torch.Generator().manual_seed(2))
    cfg = SamplerConfig(steps=2, cfg_scale=3.0, shift=3.0)
    out = {}
    for batched in (False, True):
        pipe.settings.batch_cfg = batched
        calls.clear()
        x = SparseTensor(noise.clone(), coords, batch_size=2)
        with torch.no_grad():
            out[batched] = pipe._sample("ss_dit_512", dit, x, tokens, torch.zeros_like(tokens), cfg, {}, False,
                                        "t").feats
        # batched: one call per step on the latent stacked twice; otherwise two calls on the latent
        assert calls == ([2 * len(coords)] * 2 if batched else [len(coords)] * 4)
    assert torch.isfinite(out[True]).all() and not torch.allclose(out[True], noise, atol=1e-3)  # guidance acted
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-5)


def test_unknown_hook_is_a_clear_error():
    from d3s2.errors import D3S2Error
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

    pipe = ImageTo3DPipeline.from_config("pipeline_tiny", seed=0)
    with pytest.raises(D3S2Error, match="unknown hook"):
        pipe(np.zeros((8, 8, 4), np.uint8), hooks={"decode": lambda *a: None}, progress=False)
