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

from test_train import prepared, vae_cfg  # noqa: E402,F401 - the tiny prepared corpus and VAE config


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


def test_resume_uses_the_newest_intact_checkpoint(prepared, tmp_path, capsys):  # noqa: F811
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
