"""ss_dit training task (d3s2.train.tasks_ss_dit) and `d3s2 encode-latents`: a tiny SS-VAE checkpoint -> latents ->
SS-DiT flow-matching training, loss decrease on a fixed batch, bit-exact resume, sparse conditioning, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trimesh")
pytest.importorskip("igl")

from d3s2.cli import main as cli_main  # noqa: E402
from d3s2.errors import D3S2Error  # noqa: E402
from d3s2.train.config import parse_train_config  # noqa: E402
from d3s2.train.task_base import build_task  # noqa: E402
from d3s2.train.trainer import Trainer  # noqa: E402

SS_VAE = {
    "model": "ss_vae",
    "params": {"resolution": 32, "latent_channels": 4, "model_channels": 16, "encoder_channels": [4, 8, 8, 16],
               "decoder_channels": [8, 8, 4], "num_encoder_blocks": 1, "num_decoder_blocks": 1, "num_heads": 2,
               "head_dim": 8, "mlp_ratio": 2.0, "window": 4, "num_groups": 4},
}


def ss_dit(sparse: bool = False, drop: float = 0.2) -> dict:
    return {
        "model": "ss_dit",
        "params": {"resolution": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32, "cond_channels": 16,
                   "num_blocks": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16, "mlp_ratio": 2.0,
                   "m_cmp": 2, "m_slc": 2, "m_win": 2, "top_k": 2, "window_shift": 1, "ssa_norm_groups": 4,
                   "sparse_conditioning": sparse},
        "flow": {"cond_drop_prob": drop},
    }


ENC = {"image_size": 28, "depth": 1, "num_heads": 2, "pos_grid": 2}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Two primitive meshes prepared at 32^3 and 64^3 with two 16-pixel renders each."""
    import trimesh

    from d3s2.data.prepare import PrepareConfig, run_prepare

    root = tmp_path_factory.mktemp("ssdit_data")
    m = root / "meshes"
    m.mkdir()
    trimesh.creation.icosphere(subdivisions=2, radius=0.8).export(m / "sphere.obj")
    trimesh.creation.box(extents=(1.2, 0.8, 0.6)).export(m / "box.obj")
    s = run_prepare(m, root / "prep", PrepareConfig(resolutions=(32, 64), views=2, image_size=16, supersample=1,
                                                     tau=1 / 16), progress=False)
    assert s.done == 2
    return root / "prep"


@pytest.fixture(scope="module")
def vae_ckpt(prepared, tmp_path_factory) -> Path:
    """A real ss_vae run checkpoint (1 step of the tiny SS-VAE)."""
    out = tmp_path_factory.mktemp("ssvae_run")
    cfg = {"task": "ss_vae", "model": SS_VAE, "data": {"root": str(prepared), "resolutions": [32], "batch_size": 1},
           "checkpoint": {"dir": str(out / "ck"), "every": 100}, "log": {"dir": str(out), "progress": False},
           "max_steps": 1, "cpu_threads": 1}
    Trainer(parse_train_config(cfg)).run()
    return out / "ck"


@pytest.fixture(scope="module")
def latents(prepared, vae_ckpt, tmp_path_factory) -> Path:
    """`d3s2 encode-latents` over the prepared folder (via the CLI, a YAML model config)."""
    import yaml

    y = prepared.parent / "vae.yaml"
    y.write_text(yaml.safe_dump(SS_VAE))
    assert cli_main(["encode-latents", str(prepared), "--vae", str(y), "--checkpoint", str(vae_ckpt),
                     "--resolutions", "32", "64", "--device", "cpu"]) == 0
    return prepared


def dit_cfg(prepared: Path, out: Path, task_args: dict, model: dict | None = None, **over) -> dict:
    cfg = {
        "task": "ss_dit",
        "model": model or ss_dit(),
        "task_args": {"image_encoder_params": ENC, "latent_scale": 2.0, **task_args},
        "data": {"root": str(prepared), "resolutions": [32], "batch_size": 2},
        "optim": {"lr": 2e-3},
        "phases": [{"steps": 3, "resolution": 32, "lr": 2e-3, "batch_size": 2},   # progressive, as Table 1
                   {"steps": 3, "resolution": 64, "lr": 1e-3, "batch_size": 1}],
        "ema": {"decay": 0.9},
        "checkpoint": {"dir": str(out / "ck"), "every": 100, "keep": 2},
        "log": {"dir": str(out), "every": 1, "progress": False, "tensorboard": False},
        "cpu_threads": 1,
    }
    cfg.update(over)
    return cfg


def train_losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in recs if r.get("kind") == "train" and "loss" in r]


def fixed_batch(task, n: int = 2) -> dict:
    ds = task.build_dataset("train")
    return task.prepare_batch(task.to_device(task.collate([ds[(i, 32, 0)] for i in range(n)])))


# ------------------------------------------------------------------------------------------------------------------


def test_encode_latents_files_match_vae_path(latents, vae_ckpt, tmp_path):
    """latent_32.npz holds the frozen VAE's posterior mean: the files path gives the same x_0 as encoding on the fly."""
    files = list(latents.rglob("latent_32.npz"))
    assert len(files) == 2
    with np.load(files[0]) as z:
        assert z["coords"].dtype == np.int32 and z["coords"].shape[1] == 3 and z["feats"].shape[1] == 4
        assert z["coords"].max() < 4 and len(z["coords"]) > 0 and np.isfinite(z["feats"]).all()
    cpu = torch.device("cpu")
    vae_args = {"latents": "vae", "vae": SS_VAE, "vae_checkpoint": str(vae_ckpt)}
    a = build_task(parse_train_config(dit_cfg(latents, tmp_path, vae_args)), cpu)
    b = build_task(parse_train_config(dit_cfg(latents, tmp_path, {"latents": "files"})), cpu)
    xa, xb = fixed_batch(a)["x0"], fixed_batch(b)["x0"]

    def rows(x):
        order = np.lexsort(x.coords.numpy().T[::-1])
        return x.coords.numpy()[order], x.feats.numpy()[order]

    (ca, fa), (cb, fb) = rows(xa), rows(xb)
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-6)
    assert float(fa.std()) > 0  # latent_scale applied to a real latent, not zeros
    # existing files are kept unless --overwrite; a resolution that was not prepared is skipped, not fatal
    stamp = files[0].stat().st_mtime_ns
    y = str(latents.parent / "vae.yaml")
    assert cli_main(["encode-latents", str(latents), "--vae", y, "--checkpoint", str(vae_ckpt),
                     "--resolutions", "32", "128", "--device", "cpu"]) == 0
    assert files[0].stat().st_mtime_ns == stamp and not list(latents.rglob("latent_128.npz"))
    # weights of another VAE config: a clear error, non-zero exit, no file written
    assert cli_main(["encode-latents", str(latents), "--vae", "ss_vae_tiny", "--checkpoint", str(vae_ckpt),
                     "--resolutions", "32", "--device", "cpu", "--overwrite"]) != 0
    assert files[0].stat().st_mtime_ns == stamp and not list(latents.rglob(".latent_*"))


@pytest.mark.parametrize("sparse", [False, True])
def test_ss_dit_loss_falls_on_fixed_batch(latents, tmp_path, sparse):
    """Flow-matching loss at fixed t / noise (no condition dropout) falls when the task's module trains on one batch."""
    torch.manual_seed(0)
    task = build_task(parse_train_config(dit_cfg(latents, tmp_path, {"latents": "files"},
                                                 model=ss_dit(sparse=sparse, drop=0.0))), torch.device("cpu"))
    module = task.build_module()
    assert module.encoder is not None and any(p.requires_grad for p in module.encoder.parameters())
    batch = fixed_batch(task)
    x0 = batch["x0"]
    t = torch.tensor([0.3, 0.7])
    eps = torch.randn(x0.feats.shape, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = module(batch, t=t, eps=eps)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    if sparse:  # Eq. 9 path: the DiT's cond_proj got gradients
        assert module.dit.cond_proj.weight.grad is not None and module.dit.cond_proj.weight.grad.abs().sum() > 0


def test_ss_dit_resume_is_bit_exact_and_vae_path_trains(latents, vae_ckpt, tmp_path):
    """3 + 3 steps with --stop-at / resume give the very same losses as 6 uninterrupted steps (two phases, EMA,
    condition dropout, on-the-fly VAE encoding, gradient checkpointing on)."""
    args = {"latents": "vae", "vae": SS_VAE, "vae_checkpoint": str(vae_ckpt)}
    full = tmp_path / "full"
    Trainer(parse_train_config(dit_cfg(latents, full, args, gradient_checkpointing=True))).run()
    part = tmp_path / "part"
    Trainer(parse_train_config(dit_cfg(latents, part, args, gradient_checkpointing=True)), stop_at=3).run()
    Trainer(parse_train_config(dit_cfg(latents, part, args, gradient_checkpointing=True)), resume=True).run()
    a, b = train_losses(full), train_losses(part)
    assert len(a) == 6 and len(b) == 6
    assert a == b
    assert len(set(a)) > 1 and all(np.isfinite(a))
    assert (full / "ck" / "latest").is_file()
    # the second phase trained on the 64^3 latents (8^3 grid): more tokens per sample than the 4^3 grid of phase 1
    recs = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tr = [r for r in recs if r.get("kind") == "train"]
    assert (tr[0]["resolution"], tr[-1]["resolution"]) == (32, 64) and (tr[0]["lr"], tr[-1]["lr"]) == (2e-3, 1e-3)
    per_sample = [r["tokens_per_s"] / r["samples_per_s"] for r in (tr[0], tr[-1])]
    assert per_sample[1] > 2 * per_sample[0]


def test_ss_dit_config_errors(latents, vae_ckpt, tmp_path):
    cpu = torch.device("cpu")

    def build(task_args, model=None):
        return build_task(parse_train_config(dit_cfg(latents, tmp_path, task_args, model=model)), cpu)

    with pytest.raises(D3S2Error, match="unknown key 'latent_scael'"):
        build({"latents": "files", "latent_scael": 1.0})
    with pytest.raises(D3S2Error, match="vae_checkpoint"):
        build({"latents": "vae", "vae": SS_VAE})
    with pytest.raises(D3S2Error, match="'vae' or 'files'"):
        build({"latents": "sdf"})
    with pytest.raises(D3S2Error, match="needs an ss_dit model config"):
        build({"latents": "files"}, model="dense_dit_tiny")
    wide = ss_dit()
    wide["params"] = {**wide["params"], "in_channels": 8, "out_channels": 8}
    with pytest.raises(D3S2Error, match="8"):
        build({"latents": "vae", "vae": SS_VAE, "vae_checkpoint": str(vae_ckpt)}, model=wide)
    with pytest.raises(D3S2Error, match="cond_channels"):
        build({"latents": "files", "image_encoder_params": {**ENC, "embed_dim": 8}})
    with pytest.raises(D3S2Error, match="DINOv2"):
        build({"latents": "files", "image_encoder": "dinov2", "dinov2_weights": str(tmp_path / "nope.pth"),
               "image_encoder_params": {"embed_dim": 16}})
    # latents at a resolution that was never encoded: a clear error naming the command
    task = build({"latents": "files"})
    with pytest.raises(D3S2Error, match="encode"):
        task.build_dataset("train")[(0, 128, 0)]
    # the CLI: a bad config exits non-zero with a one-line message
    import yaml

    y = tmp_path / "bad.yaml"
    y.write_text(yaml.safe_dump(dit_cfg(latents, tmp_path, {"latents": "files", "image_encoder": "clip"})))
    assert cli_main(["train", str(y)]) != 0


def test_shipped_ss_dit_train_configs_parse():
    from d3s2.train.command import load_train_config

    tiny, _ = load_train_config("train_ss_dit_tiny")
    assert tiny.task == "ss_dit" and tiny.total_steps > 0
    paper, _ = load_train_config("train_ss_dit_v1_1_1024")
    assert [p.resolution for p in paper.phases] == [256, 384, 512, 1024]
    assert paper.gradient_checkpointing and paper.task_args["image_encoder"] == "dinov2"


def test_shipped_tiny_config_trains_via_cli(prepared, tmp_path):
    """`d3s2 train train_ss_dit_tiny` (shipped model configs ss_dit_tiny + ss_vae_tiny) runs two steps on the tiny data,
    latents encoded on the fly by a real ss_vae_tiny checkpoint."""
    vae_out = tmp_path / "vae"
    Trainer(parse_train_config({
        "task": "ss_vae", "model": "ss_vae_tiny", "data": {"root": str(prepared), "resolutions": [32], "batch_size": 1},
        "checkpoint": {"dir": str(vae_out / "ck"), "every": 100}, "log": {"dir": str(vae_out), "progress": False},
        "max_steps": 1, "cpu_threads": 1})).run()
    out = tmp_path / "dit"
    rc = cli_main(["train", "train_ss_dit_tiny", "--set", f"data.root={prepared}", "--set", "task_args.latents=vae",
                   "--set", f"task_args.vae_checkpoint={vae_out / 'ck'}",
                   "--set", "phases=[{steps: 2, resolution: 32}]",
                   "--set", "max_steps=2", "--set", f"checkpoint.dir={out / 'ck'}", "--set", f"log.dir={out}",
                   "--set", "log.every=1", "--set", "log.progress=false", "--set", "log.tensorboard=false",
                   "--set", "validate.every=0", "--set", "validate.at_end=true", "--set", "resume=never"])
    assert rc == 0
    losses = train_losses(out)
    assert len(losses) == 2 and all(np.isfinite(losses))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in recs if r.get("kind") == "val"]
    assert val and np.isfinite(val[-1]["val_loss"]) and val[-1]["val_loss"] > 0


@pytest.mark.slow
def test_train_step_bench_cpu_smoke(tmp_path):
    """bench/train_step.py --cpu-smoke: the H100 script's code paths (SS-DiT ssa + full, SS-VAE at two resolutions)
    run on tiny configs and write a complete JSON (the numbers themselves are not benchmarks)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(root / "bench" / "train_step.py"), "--cpu-smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads((tmp_path / "train_step-cpu-smoke.json").read_text())
    assert doc["card"] == "cpu-smoke" and doc["torch"] and doc["commit"]
    assert [r["mode"] for r in doc["dit"]] == ["ssa", "full"]
    for r in doc["dit"] + doc["vae"]:
        assert "error" not in r and "oom" not in r, r
        assert r["finite_loss"] and r["seconds_per_step"] > 0
    assert all(r["tokens_per_sample"] == [150, 150] for r in doc["dit"]) and doc["ssa_vs_full_throughput"] > 0
    assert [r["resolution"] for r in doc["vae"]] == [32, 64] and doc["vae"][1]["voxels"] > doc["vae"][0]["voxels"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_ranks_agree(latents, tmp_path, strategy):
    """`torchrun --nproc_per_node 2` (gloo): DDP / FSDP2 over the DiT + trainable image encoder (sparse conditioning,
    condition dropout): every trainable parameter gets a gradient (DDP fails otherwise), both ranks log the same losses
    and end with the same weights."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = dit_cfg(latents, tmp_path, {"latents": "files"}, model=ss_dit(sparse=True),
                  phases=[{"steps": 2, "resolution": 32, "batch_size": 1}], distributed={"strategy": strategy},
                  log={"dir": str(tmp_path), "every": 1, "progress": False, "tensorboard": False, "all_ranks": True})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "d3s2.cli", "train", str(path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    logs = [[json.loads(line) for line in (tmp_path / f"metrics_rank{k}.jsonl").read_text().splitlines() if line]
            for k in range(2)]
    l0, l1 = ([x["loss"] for x in lg if x.get("kind") == "train"] for lg in logs)
    assert len(l0) == 2 and l0 == l1
    assert logs[0][-1]["event"] == "end" and logs[0][-1]["weights"] == logs[1][-1]["weights"]
