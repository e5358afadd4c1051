"""Trainer (d3s2.train): tiny CPU runs, bit-exact resume, SIGKILL resume, atomic checkpoints, config errors, pieces."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from d3s2.errors import D3S2Error

pytest.importorskip("trimesh")
pytest.importorskip("igl")

from d3s2.cli import main as cli_main  # noqa: E402
from d3s2.train import checkpoint as ck  # noqa: E402
from d3s2.train.command import load_train_config  # noqa: E402
from d3s2.train.config import parse_train_config  # noqa: E402
from d3s2.train.sampling import BatchPlan  # noqa: E402
from d3s2.train.schedule import lr_at  # noqa: E402
from d3s2.train.trainer import Trainer  # noqa: E402

VAE8 = {
    "model": "dense_vae",
    "params": {"resolution": 8, "latent_channels": 4, "encoder_channels": [4, 8], "decoder_channels": [8, 4],
               "encoder_res_blocks": 1, "encoder_middle_blocks": 1,
               "decoder_res_blocks": 1, "decoder_middle_blocks": 1},
}
ENC28 = {"image_size": 28, "depth": 1, "pos_grid": 2}  # tiny DINOv2-shaped encoder, 2 x 2 patches
DIT4 = {
    "model": "dense_dit",
    "params": {"resolution": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32, "cond_channels": 32,
               "num_blocks": 1, "num_heads": 2, "head_dim": 16},
    "flow": {"cond_drop_prob": 0.2},
}


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Three primitive meshes prepared at 32^3 with two 16-pixel renders each (a few seconds)."""
    import trimesh

    from d3s2.data.prepare import PrepareConfig, run_prepare

    root = tmp_path_factory.mktemp("train_data")
    m = root / "meshes"
    m.mkdir()
    trimesh.creation.icosphere(subdivisions=2, radius=0.8).export(m / "sphere.obj")
    trimesh.creation.box(extents=(1.2, 0.8, 0.6)).export(m / "box.obj")
    trimesh.creation.cylinder(radius=0.5, height=1.4, sections=16).export(m / "cyl.obj")
    s = run_prepare(m, root / "prep", PrepareConfig(resolutions=(32,), views=2, image_size=16, supersample=1,
                                                     tau=1 / 16), progress=False)
    assert s.done == 3
    return root / "prep"


def vae_cfg(prepared: Path, out: Path, **over) -> dict:
    cfg = {
        "task": "dense_vae",
        "model": VAE8,
        "data": {"root": str(prepared), "resolutions": [16, 32], "batch_size": 2},
        "optim": {"lr": 1e-2},
        "schedule": {"warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.1},
        "ema": {"decay": 0.9},
        "checkpoint": {"dir": str(out / "ck"), "every": 100, "keep": 2},
        "log": {"dir": str(out), "every": 1, "progress": False},
        "max_steps": 6,
        "cpu_threads": 1,  # small convs on a busy 2-core machine: one thread is ~50x faster than two
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def vae_weights(prepared, tmp_path_factory) -> Path:
    """A frozen VAE for the DiT task: the tiny VAE after 2 training steps (a real checkpoint folder)."""
    out = tmp_path_factory.mktemp("vae_run")
    Trainer(parse_train_config(vae_cfg(prepared, out, max_steps=2))).run()
    return out / "ck"


def dit_cfg(prepared: Path, vae_ckpt: Path, out: Path, **over) -> dict:
    cfg = {
        "task": "dense_dit",
        "model": DIT4,
        "task_args": {"vae": VAE8, "vae_checkpoint": str(vae_ckpt), "image_encoder_params": ENC28},
        "data": {"root": str(prepared), "resolutions": [32], "batch_size": 2},
        "optim": {"lr": 2e-3},
        "phases": [{"steps": 3, "resolution": 32, "lr": 2e-3, "batch_size": 2},
                   {"steps": 3, "resolution": 32, "lr": 1e-3, "batch_size": 1}],
        "ema": {"decay": 0.9},
        "checkpoint": {"dir": str(out / "ck"), "every": 100, "keep": 2},
        "log": {"dir": str(out), "every": 1, "progress": False},
        "cpu_threads": 1,
    }
    cfg.update(over)
    return cfg


def records(path: Path, kind: str | None = None) -> list[dict]:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if kind is None or r["kind"] == kind]


# ------------------------------------------------------------------------------------------------------------------
# Pieces


def test_batch_plan_shards_and_resumes():
    plans = [BatchPlan(7, rank=r, world_size=2, seed=3) for r in range(2)]
    # one epoch: per rank ceil(7/2) = 4 items; ranks together cover all 7 items (one wrapped duplicate)
    a = plans[0].next(4).indices
    b = plans[1].next(4).indices
    assert sorted(set(a) | set(b)) == list(range(7)) and len(a) == len(b) == 4
    # a restored plan continues with the very same batches; resolutions agree across ranks
    p = BatchPlan(7, seed=3, resolutions=[16, 32, 64])
    for _ in range(3):
        p.next(2)
    q = BatchPlan(7, seed=3, resolutions=[16, 32, 64])
    q.load_state_dict(p.state_dict())
    for _ in range(10):
        kp, kq = p.next(2), q.next(2)
        assert kp == kq and kp.resolution in (16, 32, 64)
    r0, r1 = (BatchPlan(7, rank=r, world_size=2, seed=1, resolutions=[16, 32, 64]) for r in range(2))
    assert [r0.next(1).resolution for _ in range(8)] == [r1.next(1).resolution for _ in range(8)]


def test_lr_schedule_warmup_cosine_phases():
    cfg = parse_train_config({
        "task": "dense_vae", "model": "dense_vae_tiny", "optim": {"lr": 1.0},
        "schedule": {"warmup_steps": 4, "decay": "cosine", "min_lr_ratio": 0.1},
        "phases": [{"steps": 10, "lr": 1.0}, {"steps": 10, "lr": 0.5, "resolution": 64, "batch_size": 1}],
    })
    assert cfg.total_steps == 20
    assert lr_at(cfg, 0) == pytest.approx(0.25) and lr_at(cfg, 3) == pytest.approx(1.0)
    assert lr_at(cfg, 4) == pytest.approx(1.0)
    assert lr_at(cfg, 9) > lr_at(cfg, 10) / 0.5 * 0.5  # phase 2 halves the base LR
    import math

    assert lr_at(cfg, 10) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 16))))
    assert lr_at(cfg, 19) < lr_at(cfg, 12)
    assert cfg.phase_at(15)[1].resolution == 64


def test_chamfer_fscore():
    from d3s2.geometry.metrics import chamfer_distance, f_score

    p = torch.tensor([[0.0, 0, 0], [1, 0, 0]])
    q = torch.tensor([[0.0, 0, 0], [1, 0.5, 0]])
    assert float(chamfer_distance(p, q)) == pytest.approx(0.25)
    assert float(chamfer_distance(p, p)) == 0.0
    assert float(f_score(p, q, 0.1)) == pytest.approx(0.5)
    assert float(f_score(p, q, 0.6)) == pytest.approx(1.0)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch as st

    d = tmp_path / "ck"
    ck.write_checkpoint_dir(d, 1, {"model.safetensors": ("safetensors", {"w": torch.ones(3)}),
                                   "state.pt": ("torch", {"step": 1})})
    real = st.save_file

    def half_then_die(tensors, path, *a, **k):
        Path(path).write_bytes(b"\x00partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(st, "save_file", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        ck.write_checkpoint_dir(d, 2, {"model.safetensors": ("safetensors", {"w": torch.zeros(3)}),
                                       "state.pt": ("torch", {"step": 2})})
    monkeypatch.setattr(st, "save_file", real)
    assert [s for s, _ in ck.list_checkpoints(d)] == [1]  # the half-written step 2 is not visible
    assert (d / "latest").read_text().strip() == "step_00000001"
    assert any(p.name.startswith(".tmp_") for p in d.iterdir())
    ck.clean_partial(d)
    assert not any(p.name.startswith(".tmp_") for p in d.iterdir())
    assert torch.equal(ck.load_weights(d)["w"], torch.ones(3))
    for s in (2, 3, 4):
        ck.write_checkpoint_dir(d, s, {"model.safetensors": ("safetensors", {"w": torch.full((3,), float(s))}),
                                       "state.pt": ("torch", {"step": s})})
    ck.prune_checkpoints(d, 2)
    assert [s for s, _ in ck.list_checkpoints(d)] == [3, 4]


def test_bad_config_key_clear_error(tmp_path, prepared, capsys):
    bad = vae_cfg(prepared, tmp_path)
    bad["optim"]["lrr"] = 1e-3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lrr'" in err and "OptimConfig" in err
    bad = vae_cfg(prepared, tmp_path, task="nope")
    path.write_text(yaml.safe_dump(bad))
    assert cli_main(["train", str(path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    bad = vae_cfg(prepared, tmp_path, task_args={"colour": 1})
    path.write_text(yaml.safe_dump(bad))
    assert cli_main(["train", str(path)]) == 2
    assert "task_args: unknown key 'colour'" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_shipped_tiny_configs_parse():
    for name, task in (("train_dense_vae_tiny", "dense_vae"), ("train_dense_dit_tiny", "dense_dit")):
        cfg, _ = load_train_config(name)
        assert cfg.task == task and cfg.total_steps > 0
    cfg, _ = load_train_config("train_dense_dit_tiny", ["optim.lr=5e-4", "max_steps=7"])
    assert cfg.optim.lr == 5e-4 and cfg.total_steps == 7


# ------------------------------------------------------------------------------------------------------------------
# Training runs


def test_tiny_vae_loss_goes_down(prepared, tmp_path):
    cfg = vae_cfg(prepared, tmp_path, max_steps=30, validate={"every": 10, "items": 3})
    result = Trainer(parse_train_config(cfg)).run()
    losses = result["losses"]
    assert len(losses) == 30 and all(map(lambda v: v == v, losses))
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    val = records(tmp_path / "metrics.jsonl", "val")
    assert [v["step"] for v in val] == [10, 20, 30]
    assert val[-1]["val_bce"] < val[0]["val_bce"]
    assert val[-1]["val_fscore"] > val[0]["val_fscore"] and 0 < val[-1]["val_chamfer"] < 0.5
    train = records(tmp_path / "metrics.jsonl", "train")
    assert {"loss", "bce", "kl", "lr", "grad_norm", "samples_per_s"} <= set(train[0])
    assert {r["resolution"] for r in train} <= {16.0, 32.0} and len({r["resolution"] for r in train}) == 2
    last = ck.latest_checkpoint(tmp_path / "ck")
    assert last.name == "step_00000030" and (last / "ema.safetensors").is_file()
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["step"] == 30 and set(state["data"]) == {"epoch", "cursor"}
    torch.load(last / "rng_rank0.pt", weights_only=True)


def ss_vae_cfg(prepared: Path, out: Path, **over) -> dict:
    return vae_cfg(prepared, out, task="ss_vae", model="ss_vae_tiny",
                   data={"root": str(prepared), "resolutions": [16, 32], "batch_size": 1}, **over)


@pytest.mark.parametrize("task", ["dense_vae", "dense_dit", "ss_vae"])
def test_resume_is_bit_exact(prepared, vae_weights, tmp_path, task):
    def make(out):
        if task == "dense_vae":
            return parse_train_config(vae_cfg(prepared, out, max_steps=6))
        if task == "ss_vae":
            return parse_train_config(ss_vae_cfg(prepared, out, max_steps=6))
        return parse_train_config(dit_cfg(prepared, vae_weights, out))

    straight = Trainer(make(tmp_path / "a")).run()
    first = Trainer(make(tmp_path / "b"), stop_at=3).run()
    assert first["step"] == 3 and ck.latest_checkpoint(tmp_path / "b" / "ck").name == "step_00000003"
    second = Trainer(make(tmp_path / "b"), resume=True).run()
    assert len(straight["losses"]) == 6
    assert first["losses"] + second["losses"] == straight["losses"]  # exact float equality, step by step
    assert second["weights"] == straight["weights"]
    ema_a = ck.load_weights(tmp_path / "a" / "ck")
    ema_b = ck.load_weights(tmp_path / "b" / "ck")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_ss_vae_task_logs_terms_and_validates(prepared, tmp_path):
    cfg = ss_vae_cfg(prepared, tmp_path, max_steps=3, validate={"every": 3, "items": 1})
    Trainer(parse_train_config(cfg)).run()
    train = records(tmp_path / "metrics.jsonl", "train")
    assert {"loss", "in", "ext", "sharp", "kl", "tokens_per_s"} <= set(train[0])
    val = records(tmp_path / "metrics.jsonl", "val")
    assert len(val) == 1 and 0 <= val[0]["val_fscore"] <= 1 and val[0]["val_sdf_l1"] > 0


def test_ss_vae_max_voxels_crops_training_items_only(prepared, tmp_path):
    """data.max_voxels: training items are spatial crops of at most that many voxels; validation sees whole shapes."""
    from d3s2.train.tasks_ss_vae import SSVAETask

    whole = SSVAETask(parse_train_config(ss_vae_cfg(prepared, tmp_path)), torch.device("cpu")).build_dataset("train")
    n = len(whole[(0, 32, 0)]["coords"])
    raw = ss_vae_cfg(prepared, tmp_path, max_steps=2)
    raw["data"].update(resolutions=[32], max_voxels=n // 2)
    cfg = parse_train_config(raw)
    task = SSVAETask(cfg, torch.device("cpu"))
    train, val = task.build_dataset("train"), task.build_dataset("val")
    assert 0 < len(train[(0, 32, 0)]["coords"]) <= n // 2
    assert not torch.equal(train[(0, 32, 0)]["coords"], train[(0, 32, 1)]["coords"])  # new crop next epoch
    assert len(val[(0, 32, 0)]["coords"]) == n
    out = Trainer(cfg).run()
    assert len(out["losses"]) == 2 and all(v == v for v in out["losses"])


@pytest.mark.parametrize("task", ["dense_vae", "dense_dit"])
def test_gradient_checkpointing_same_losses(prepared, vae_weights, tmp_path, task):
    from d3s2.train.task_base import build_task
    from d3s2.train.trainer import set_gradient_checkpointing

    def make(out, gc):
        c = vae_cfg(prepared, out, max_steps=2) if task == "dense_vae" else dit_cfg(
            prepared, vae_weights, out, phases=[{"steps": 2, "resolution": 32}])
        c["gradient_checkpointing"] = gc
        return parse_train_config(c)

    module = build_task(make(tmp_path / "x", True), torch.device("cpu")).build_module()
    set_gradient_checkpointing(module, True)
    flags = [m.use_checkpoint for m in module.modules() if isinstance(getattr(m, "use_checkpoint", None), bool)]
    assert flags and all(flags)
    plain = Trainer(make(tmp_path / "a", False)).run()["losses"]
    ckpt = Trainer(make(tmp_path / "b", True)).run()["losses"]
    assert ckpt == pytest.approx(plain, rel=1e-6, abs=1e-7)


def test_tensorboard_scalars(prepared, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(parse_train_config(vae_cfg(prepared, tmp_path, max_steps=3, validate={"every": 3, "items": 1}))).run()
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/bce", "train/kl", "train/lr", "train/grad_norm", "val/val_fscore"} <= tags
    jsonl = [r["loss"] for r in records(tmp_path / "metrics.jsonl", "train")]
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx(jsonl, rel=1e-6)


def test_loader_workers_give_the_same_batches(prepared, tmp_path):
    runs = [Trainer(parse_train_config(vae_cfg(prepared, tmp_path / str(w), max_steps=4,
                                               data={"root": str(prepared), "resolutions": [16, 32], "batch_size": 2,
                                                     "workers": w}))).run()["losses"] for w in (0, 2)]
    assert len(runs[0]) == 4 and runs[0] == runs[1]


def test_dense_dit_loss_goes_down(prepared, vae_weights, tmp_path):
    cfg = dit_cfg(prepared, vae_weights, tmp_path,
                  phases=[{"steps": 40, "resolution": 32, "lr": 3e-3, "batch_size": 3}],
                  validate={"every": 10, "items": 3}, schedule={"warmup_steps": 3})
    Trainer(parse_train_config(cfg)).run()
    val = records(tmp_path / "metrics.jsonl", "val")
    assert len(val) == 4 and val[-1]["val_loss"] < 0.9 * val[0]["val_loss"]
    assert "tokens_per_s" in records(tmp_path / "metrics.jsonl", "train")[0]


def test_dense_dit_frozen_encoder_from_another_run(prepared, vae_weights, tmp_path):
    """``image_encoder: checkpoint``: the encoder trained by one run is reused, frozen, by the next (one encoder for
    both DiT stages of a pipeline): not a parameter of the train module, its weights unchanged by training."""
    from d3s2.train.checkpoint import load_weights
    from d3s2.train.task_base import build_task

    Trainer(parse_train_config(dit_cfg(prepared, vae_weights, tmp_path / "a",
                                       phases=[{"steps": 2, "resolution": 32}]))).run()
    trained = load_weights(tmp_path / "a" / "ck", prefix="encoder.")
    args = {"vae": VAE8, "vae_checkpoint": str(vae_weights), "image_encoder": "checkpoint",
            "image_encoder_checkpoint": str(tmp_path / "a" / "ck"), "image_encoder_params": ENC28}
    cfg = parse_train_config(dit_cfg(prepared, vae_weights, tmp_path / "b", task_args=args,
                                     phases=[{"steps": 3, "resolution": 32}]))
    task = build_task(cfg, torch.device("cpu"))
    assert task.build_module().encoder is None
    losses = Trainer(cfg).run()["losses"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert not any(k.startswith("encoder.") for k in load_weights(tmp_path / "b" / "ck"))
    for k, v in task.frozen_encoder.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(D3S2Error, match="image_encoder_params"):
        build_task(parse_train_config(dit_cfg(prepared, vae_weights, tmp_path / "c", task_args={
            **args, "image_encoder_params": {**ENC28, "depth": 2}})), torch.device("cpu"))
    with pytest.raises(D3S2Error, match="image_encoder_checkpoint"):
        build_task(parse_train_config(dit_cfg(prepared, vae_weights, tmp_path / "d", task_args={
            **args, "image_encoder_checkpoint": None})), torch.device("cpu"))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_sigkill_then_resume_finishes(prepared, tmp_path):
    cfg = vae_cfg(prepared, tmp_path, max_steps=25, checkpoint={"every": 1, "keep": 3})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "d3s2.cli", "train", str(path)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(s >= 3 for s, _ in ck.list_checkpoints(tmp_path / "ck")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = ck.list_checkpoints(tmp_path / "ck")
    assert done and done[-1][0] < 25
    for _, d in done:  # every visible checkpoint is complete and loadable
        ck.load_weights(d, prefer_ema=False)
        ck.load_weights(d, prefer_ema=True)
        assert torch.load(d / "state.pt", weights_only=True)["step"] == int(d.name.split("_")[1])
    r = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    events = records(tmp_path / "metrics.jsonl", "event")
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed and resumed[-1]["step"] >= done[-1][0]
    assert events[-1]["event"] == "end" and events[-1]["step"] == 25
    assert ck.latest_checkpoint(tmp_path / "ck").name == "step_00000025"
    assert not any(p.name.startswith(".tmp_") for p in (tmp_path / "ck").iterdir())
    steps = [t["step"] for t in records(tmp_path / "metrics.jsonl", "train")]
    assert steps[-1] == 25 and set(range(1, 26)) <= set(steps)


def test_sigterm_saves_and_exits(prepared, tmp_path):
    cfg = vae_cfg(prepared, tmp_path, max_steps=500, checkpoint={"every": 1000})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "d3s2.cli", "train", str(path)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = tmp_path / "metrics.jsonl"
            if m.is_file() and len(records(m, "train")) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    end = records(tmp_path / "metrics.jsonl", "event")[-1]
    assert end["event"] == "end" and end["stopped_by_signal"] and 2 <= end["step"] < 500
    assert ck.latest_checkpoint(tmp_path / "ck").name == ck.step_dir_name(end["step"])


# ------------------------------------------------------------------------------------------------------------------
# Multi-process (torchrun, gloo on CPU)


def _torchrun(cfg: dict, tmp_path: Path, *extra: str, name: str = "run.yaml") -> subprocess.CompletedProcess:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "d3s2.cli", "train", str(path), *extra]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def _rank_logs(out: Path) -> list[list[dict]]:
    return [records(out / f"metrics_rank{r}.jsonl") for r in range(2)]


@pytest.mark.slow
def test_torchrun_ddp_two_ranks_agree(prepared, tmp_path):
    cfg = vae_cfg(prepared, tmp_path, max_steps=2, log={"all_ranks": True})
    _torchrun(cfg, tmp_path)
    r0, r1 = _rank_logs(tmp_path)
    l0 = [r["loss"] for r in r0 if r["kind"] == "train"]
    l1 = [r["loss"] for r in r1 if r["kind"] == "train"]
    assert len(l0) == 2 and l0 == l1  # the all-reduced loss
    # throughput is the job's (the ranks' own counts summed, over each rank's interval); each rank logs its own count
    for a, b in zip([r for r in r0 if r["kind"] == "train"], [r for r in r1 if r["kind"] == "train"]):
        assert a["rank_tokens"] > 0 and b["rank_tokens"] > 0
        for r in (a, b):
            assert r["tokens_per_s"] * r["interval_s"] == pytest.approx(a["rank_tokens"] + b["rank_tokens"], rel=1e-6)
    assert r0[-1]["event"] == "end" and r0[-1]["weights"] == r1[-1]["weights"]  # DDP kept the replicas identical
    from d3s2.train.trainer import state_digest

    final = ck.load_weights(tmp_path / "ck", prefer_ema=False)
    assert state_digest(final) == r0[-1]["weights"]
    assert (ck.latest_checkpoint(tmp_path / "ck") / "rng_rank1.pt").is_file()


@pytest.mark.slow
def test_torchrun_fsdp2_resume_matches(prepared, vae_weights, tmp_path):
    def cfg(out):
        return dit_cfg(prepared, vae_weights, out, distributed={"strategy": "fsdp"},
                       log={"dir": str(out), "every": 1, "progress": False, "all_ranks": True},
                       phases=[{"steps": 4, "resolution": 32, "lr": 2e-3, "batch_size": 1}])

    _torchrun(cfg(tmp_path / "a"), tmp_path, name="a.yaml")
    _torchrun(cfg(tmp_path / "b"), tmp_path, "--stop-at", "2", name="b.yaml")
    _torchrun(cfg(tmp_path / "b"), tmp_path, "--resume", name="b.yaml")
    a0, a1 = _rank_logs(tmp_path / "a")
    b0, _ = _rank_logs(tmp_path / "b")
    la = [r["loss"] for r in a0 if r["kind"] == "train"]
    assert la == [r["loss"] for r in a1 if r["kind"] == "train"] and len(la) == 4
    assert [r["loss"] for r in b0 if r["kind"] == "train"] == la
    assert a0[-1]["weights"] == a1[-1]["weights"] == b0[-1]["weights"]


def test_ema_warmup_forgets_the_initial_weights():
    """With warm-up, an EMA of decay 0.999 over 700 steps of fixed new weights keeps (almost) nothing of the start;
    without it, 0.999^700 ~ 50 % of the random initial weights would remain (the demo's first SS-VAE bundle)."""
    from d3s2.train.ema import EMA, warmup_decay

    assert warmup_decay(0.999, 0) == pytest.approx(0.1) and warmup_decay(0.999, 10**6) == 0.999
    m = torch.nn.Linear(3, 2)
    for warm, bound in ((True, 0.05), (False, None)):
        with torch.no_grad():
            m.weight.fill_(0.0)
        ema = EMA(m, 0.999, warmup=warm)
        with torch.no_grad():
            m.weight.fill_(1.0)
        for step in range(1, 701):
            ema.update(m, step)
        left = 1.0 - float(ema.shadow["weight"].mean())  # share of the initial weights still in the average
        if warm:
            assert left < bound
        else:
            assert left == pytest.approx(0.999 ** 700, rel=1e-3)
