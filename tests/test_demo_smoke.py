"""Demo-model groundwork (issue 7): the fixed held-out split, the demo configs and their size budget, and the
quality report script (bench/eval_quality.py) in its CPU smoke mode on random tiny weights."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def make_split():
    return _load("demo_make_split", REPO / "demo" / "make_split.py")


@pytest.fixture(scope="module")
def split():
    return json.loads((REPO / "demo" / "split.json").read_text())


def test_split_file_is_valid_and_disjoint(split):
    import pybullet_data

    root = Path(pybullet_data.getDataPath())
    train, held = split["train"], split["heldout"]
    assert set(train).isdisjoint(held) and set(split["excluded"]).isdisjoint(set(train) | set(held))
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    assert split["counts"] == {"train": len(train), "heldout": len(held), "excluded": len(split["excluded"])}
    frac = len(held) / (len(train) + len(held))
    assert 0.07 < frac < 0.13 and len(train) + len(held) > 900
    for rel in train + held:
        assert not rel.startswith("/") and ".." not in rel.split("/") and (root / rel).is_file(), rel
    for name in ("duck.obj", "teddy2_VHACD_CHs.obj", "objects/mug.obj", "lego/lego.obj"):
        assert name in train or name in held


def test_split_is_reproducible(make_split, split):
    held = split["heldout"]
    fresh = make_split.build_split()
    assert make_split.dumps(fresh) == (REPO / "demo" / "split.json").read_text()
    # the rule is per path: held-out membership matches the hash rule, independent of the other paths
    assert all(make_split.is_heldout(p) for p in split["heldout"])
    assert not any(make_split.is_heldout(p) for p in split["train"])
    assert make_split.is_heldout("random_urdfs/003/003.obj") != make_split.is_heldout("random_urdfs/000/000.obj")
    other_seed = {p for p in split["train"] + split["heldout"] if make_split.is_heldout(p, seed=1)}
    assert other_seed != set(split["heldout"]) and 0.07 < len(other_seed) / (len(split["train"]) + len(held)) < 0.13
    # a mesh that fails to load is excluded with its reason, not split
    assert "random_urdfs/168/168.obj" in split["excluded"]


DEMO_MODELS = ["demo_dense_vae", "demo_dense_dit", "demo_ss_vae", "demo_ss_dit"]
DEMO_TRAIN = ["demo_train_dense_vae", "demo_train_dense_dit", "demo_train_ss_vae", "demo_train_ss_dit"]


def test_demo_pipeline_fits_the_bundle_budget():
    budget = _load("demo_budget", REPO / "demo" / "budget.py")
    sizes = budget.component_sizes("demo_pipeline")
    assert set(sizes) == {"image_encoder", "dense_vae", "dense_dit", "ss_vae_512", "ss_dit_512"}
    total = sum(s["bytes"] for s in sizes.values())
    assert total <= budget.BUDGET_BYTES
    assert total > 0.5 * budget.BUDGET_BYTES  # not accidentally tiny: the budget is used
    assert sizes["image_encoder"]["bytes"] == 4 * sizes["image_encoder"]["values"]
    assert sizes["ss_dit_512"]["bytes"] == 2 * sizes["ss_dit_512"]["values"]


def test_demo_model_and_training_configs_load():
    from d3s2.config import build_model, load_model_config
    from d3s2.train.command import load_train_config
    from d3s2.train.task_base import task_class

    for name in DEMO_MODELS:
        with torch.device("meta"):
            m = build_model(name)
        assert sum(p.numel() for p in m.parameters()) > 1e5, name
    # the sparse stage runs at 128^3: the SS-VAE latent grid there (1/4) is the 32^3 structure grid, and the SS-DiT
    # runs on it (small enough for a CPU demo: ~2-4k tokens per image)
    with torch.device("meta"):
        vae = build_model("demo_ss_vae")
    structure = load_model_config("demo_dense_vae").params.resolution
    assert structure == 32 and structure * vae.config.downsample_factor == 128
    assert load_model_config("demo_ss_dit").params.resolution == structure
    assert load_model_config("demo_ss_dit").params.ssa_mode == "ssa"
    assert 128 in load_train_config("demo_train_ss_dit")[0].data.resolutions
    for name in DEMO_TRAIN:
        cfg, _ = load_train_config(name)
        assert cfg.total_steps > 0 and cfg.resume == "auto"
        entry = task_class(cfg.task)
        assert set(cfg.task_args) <= set(entry.task_args), (name, set(cfg.task_args) - set(entry.task_args))
    assert load_train_config("demo_train_ss_vae")[0].data.resolutions == [128, 256]
    # one image encoder for both DiT stages: the structure DiT run trains it with the pipeline's architecture, the
    # SS-DiT run loads that run's encoder frozen (the bundle ships it from the dense_dit run)
    from d3s2.config import load_yaml, resolve_config_path
    from d3s2.models.image_encoder import ImageEncoderConfig
    from d3s2.pipelines.folder_format import parse_pipeline_config

    path = resolve_config_path("demo_pipeline")
    _, shipped, _ = parse_pipeline_config(load_yaml(path), path.name)
    dense, ss = load_train_config("demo_train_dense_dit")[0], load_train_config("demo_train_ss_dit")[0]
    for run, model in ((dense, "demo_dense_dit"), (ss, "demo_ss_dit")):
        cfg = ImageEncoderConfig.tiny(embed_dim=load_model_config(model).params.cond_channels,
                                      **run.task_args["image_encoder_params"])
        assert cfg == shipped, model
    assert dense.task_args["image_encoder"] == "tiny" and ss.task_args["image_encoder"] == "checkpoint"
    assert Path(ss.task_args["image_encoder_checkpoint"]) == Path(dense.checkpoint.dir)
    b = _load("demo_bundle", REPO / "demo" / "bundle.py")
    assert b.SOURCES["image_encoder"] == ("dense_dit", "encoder.")


def test_zero_condition_blanks_the_image_tokens():
    ev = _load("bench_eval_quality", REPO / "bench" / "eval_quality.py")
    from d3s2.models.image_encoder import DINOv2Encoder, ImageEncoderConfig

    enc = DINOv2Encoder(ImageEncoderConfig.tiny()).eval()
    x = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        ref = enc(x)
        with ev.ZeroCondition(enc):
            zero = enc(x)
        back = enc(x)
    assert ref.abs().sum() > 0 and zero.abs().sum() == 0 and zero.shape == ref.shape
    assert torch.equal(back, ref)


def test_eval_quality_cpu_smoke(tmp_path, split):
    ev = _load("bench_eval_quality", REPO / "bench" / "eval_quality.py")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "q.json"
        assert ev.main(["--cpu-smoke", "--out", str(out), "--points", "2000"]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads(out.read_text())
    assert res["mode"] == "cpu_smoke" and res["items"] == 1
    assert res["generation"][0]["source"] in split["heldout"] and res["ss_vae"][0]["source"] in split["heldout"]
    for mode in ("conditional", "unconditional"):
        row = res["generation"][0][mode]
        assert "error" not in row and row["faces"] > 0
        assert 0.0 <= row["volume_iou"] <= 1.0 and 0.0 <= row["fscore_0.01"] <= row["fscore_0.02"] <= 1.0
    vae = res["ss_vae"][0]
    assert vae["resolution"] == 64 and vae["input_voxels"] > 0 and math.isfinite(vae["chamfer"])
    s = res["summary"]
    assert s["ss_vae_chamfer"] == pytest.approx(vae["chamfer"])
    assert not (tmp_path / "q.json.tmp").exists()


def test_eval_quality_refuses_training_items(tmp_path, split):
    ev = _load("bench_eval_quality", REPO / "bench" / "eval_quality.py")
    from d3s2.errors import D3S2Error

    rec = {"item_id": "x-1", "source": split["train"][0], "sdf": {}, "views": 0}
    (tmp_path / "x-1").mkdir()
    (tmp_path / "manifest.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(D3S2Error, match="held-out"):
        ev._items(tmp_path, 5)


def test_bundle_loads_checkpoints_and_round_trips(tmp_path):
    """demo/bundle.py on fake checkpoints laid out as the trainer writes them (train-module key prefixes)."""
    from safetensors.torch import save_file

    from d3s2.errors import D3S2Error
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

    b = _load("demo_bundle", REPO / "demo" / "bundle.py")
    src = ImageTo3DPipeline.from_config("demo_pipeline", seed=1, device="cpu")
    files = {}
    for name, (run, prefix) in b.SOURCES.items():
        files.setdefault(run, {}).update({prefix + k: v.contiguous() for k, v in src.models[name].state_dict().items()})
    runs = tmp_path / "runs"
    for run, sd in files.items():
        step = runs / run / "checkpoints" / "step_00000010"
        step.mkdir(parents=True)
        save_file(sd, str(step / "model.safetensors"))
        torch.save({"step": 10}, step / "state.pt")
    out = b.bundle(runs, tmp_path / "bundle")
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0.5 * b.BUDGET_BYTES < total <= b.BUDGET_BYTES
    back = ImageTo3DPipeline.from_pretrained(str(out), device="cpu")
    for name in b.SOURCES:
        ref, got = src.models[name].state_dict(), back.models[name].state_dict()
        assert set(ref) == set(got)
        k = next(k for k, v in ref.items() if v.is_floating_point() and v.abs().sum() > 0)
        tol = 0 if name == "image_encoder" else 1e-3  # fp16 bundle except the encoder
        assert torch.allclose(got[k].float(), ref[k].float(), atol=tol, rtol=tol), name
    # a missing stage is a clear error, not a partial bundle
    import shutil

    shutil.rmtree(runs / "ss_vae")
    with pytest.raises(D3S2Error, match="ss_vae"):
        b.bundle(runs, tmp_path / "bundle2")
    assert not (tmp_path / "bundle2").exists()


@pytest.mark.slow
def test_prepare_script_and_eval_on_prepared_heldout_items(tmp_path, split):
    """demo/prepare.sh stages exactly the held-out meshes (a few of them via --shard, no renders, 32^3) and
    bench/eval_quality.py reads the prepared items with a saved random tiny pipeline (scores may be zero)."""
    import os
    import subprocess

    from d3s2.data.datasets import load_items
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline

    out = tmp_path / "prep"
    env = {**os.environ, "PYTHON": sys.executable, "DEMO_VIEWS": "0"}
    r = subprocess.run(["bash", str(REPO / "demo" / "prepare.sh"), str(out), "heldout", "--shard", "2/40",
                        "--resolutions", "32", "--sdf-backend", "cpu", "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    staged = sorted(p.relative_to(out / ".meshes").as_posix() for p in (out / ".meshes").rglob("*.obj"))
    assert staged == sorted(split["heldout"])
    items = load_items(out)
    assert 1 <= len(items) <= 10 and {it["source"] for it in items} <= set(split["heldout"])
    ImageTo3DPipeline.from_config("pipeline_tiny", seed=0).save_pretrained(tmp_path / "pipe")
    ev = _load("bench_eval_quality", REPO / "bench" / "eval_quality.py")
    res_path = tmp_path / "q.json"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert ev.main(["--pipeline", str(tmp_path / "pipe"), "--data", str(out), "--limit", "1", "--points", "1000",
                        "--device", "cpu", "--image-size", "64", "--out", str(res_path)]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads(res_path.read_text())
    assert res["mode"] == "heldout" and res["items"] == 1
    assert res["ss_vae"][0]["resolution"] == 32 and res["ss_vae"][0]["input_voxels"] > 0
    assert set(res["generation"][0]) == {"source", "conditional", "unconditional"}
