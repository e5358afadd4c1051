"""Issue 22 (hardening) for ``d3s2 train``: damaged checkpoints are verified and skipped on resume (falling back to the
newest intact one, saying so), configs are validated fully by ``--check``, binary YAML is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.train import checkpoint as ck

pytest.importorskip("trimesh")
pytest.importorskip("igl")

import test_train  # noqa: E402

prepared = test_train.prepared  # the tiny prepared corpus (module fixture)
vae_cfg = test_train.vae_cfg


def _fake_ckpt(root, step, ema=True):
    files = {"model.safetensors": ("safetensors", {"w": torch.full((64,), float(step))}),
             "state.pt": ("torch", {"step": step}), "rng_rank0.pt": ("torch", ck.rng_state())}
    if ema:
        files["ema.safetensors"] = ("safetensors", {"w": torch.zeros(64)})
    return ck.write_checkpoint_dir(root, step, files)


def _truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


@pytest.mark.parametrize("damage", ["model_truncated", "ema_empty", "state_truncated", "rng_garbage", "no_model"])
def test_latest_intact_checkpoint_skips_a_damaged_newest(tmp_path, damage):
    _fake_ckpt(tmp_path, 1)
    newest = _fake_ckpt(tmp_path, 2)
    assert ck.checkpoint_problem(newest) is None
    if damage == "model_truncated":
        _truncate(newest / "model.safetensors")
    elif damage == "ema_empty":
        _truncate(newest / "ema.safetensors", keep=0)
    elif damage == "state_truncated":
        _truncate(newest / "state.pt")
    elif damage == "rng_garbage":
        (newest / "rng_rank0.pt").write_bytes(b"\0" * 100)
    else:
        (newest / "model.safetensors").unlink()
    said = []
    assert ck.latest_intact_checkpoint(tmp_path, report=said.append) == tmp_path / "step_00000001"
    assert len(said) == 1 and "step_00000002" in said[0] and "trying an older one" in said[0]


def test_load_weights_falls_back_and_reports_damaged_files(tmp_path):
    _fake_ckpt(tmp_path, 1, ema=False)
    newest = _fake_ckpt(tmp_path, 2, ema=False)
    _truncate(newest / "model.safetensors")
    with pytest.warns(UserWarning, match="step_00000002 not used"):
        sd = ck.load_weights(tmp_path)
    assert float(sd["w"][0]) == 1.0
    with pytest.raises(D3S2Error, match="not a readable safetensors file"):
        ck.load_weights(newest / "model.safetensors")


def test_resume_uses_the_newest_intact_checkpoint(prepared, tmp_path, capsys):
    from d3s2.train.config import parse_train_config
    from d3s2.train.trainer import Trainer

    def cfg(max_steps):
        return parse_train_config(vae_cfg(prepared, tmp_path, max_steps=max_steps,
                                          checkpoint={"every": 2, "keep": 3}, ema={"decay": 0.9}))

    Trainer(cfg(4)).run()
    ckdir = tmp_path / "ck"
    assert [p.name for _, p in ck.list_checkpoints(ckdir)] == ["step_00000002", "step_00000004"]
    _truncate(ckdir / "step_00000004" / "model.safetensors")
    (ckdir / "step_00000004" / "ema.safetensors").write_bytes(b"")
    capsys.readouterr()
    result = Trainer(cfg(4), resume=True).run()
    err = capsys.readouterr().err
    assert "step_00000004 not used: " in err and "safetensors is damaged" in err
    assert result["step"] == 4 and len(result["losses"]) == 2  # steps 3 and 4 were trained again
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resume"]
    assert resumed[-1]["dir"] == "step_00000002"
    assert ck.checkpoint_problem(ckdir / "step_00000004") is None  # rewritten intact


BAD_SETTINGS = [
    ("optim.lr=-1", "optim.lr must be a finite number > 0"),
    ("optim.lr=.nan", "optim.lr must be a finite number > 0"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be two numbers in [0, 1)"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("data.batch_size=0", "data.batch_size must be an integer >= 1"),
    ("data.workers=-1", "data.workers"),
    ("data.resolutions=[]", "data.resolutions"),
    ("data.resolution_weights=[1.0]", "data.resolution_weights must be one weight per resolution"),
    ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio"),
    ("schedule.warmup_steps=-5", "schedule.warmup_steps"),
    ("ema.decay=1.5", "ema.decay"),
    ("ema.every=0", "ema.every"),
    ("checkpoint.every=-1", "checkpoint.every"),
    ("log.every=0", "log.every"),
    ("validate.items=0", "validate.items"),
    ("cpu_threads=0", "cpu_threads"),
    ("device=tpu", "device must be auto, cpu or cuda"),
    ("max_steps=-3", "max_steps"),
    ("phases=[{steps: 2, lr: -1}]", "phases[].lr"),
    ("phases=[{steps: 2, batch_size: 0}]", "phases[].batch_size"),
    ("task=no_such_task", "unknown task 'no_such_task'"),
    ("model=no_such_model_config", "config not found: no_such_model_config"),
]


@pytest.mark.parametrize("setting, needle", BAD_SETTINGS)
def test_train_check_catches_bad_settings(setting, needle, capsys):
    from d3s2.cli import main

    assert main(["train", "train_dense_vae_tiny", "--set", setting, "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_train_check_accepts_the_shipped_configs(capsys):
    from d3s2.cli import main

    for name in ("train_dense_vae_tiny", "train_dense_dit_tiny", "train_ss_dit_tiny",
                 "demo_train_dense_vae", "demo_train_dense_dit", "demo_train_ss_vae", "demo_train_ss_dit",
                 "train_ss_dit_v1_1_1024"):
        assert main(["train", name, "--check"]) == 0, capsys.readouterr().err


def test_train_check_catches_unwritable_output_folders(tmp_path, capsys):
    from d3s2.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for key in ("checkpoint.dir", "log.dir"):
        assert main(["train", "train_dense_vae_tiny", "--set", f"{key}={blocker}/sub", "--check"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{key}:" in err[0] and "is a file" in err[0], err
