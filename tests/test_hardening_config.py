"""Issue 22 (hardening), case 5: a binary or unreadable config file is a one-line error everywhere configs are read
(the shared ``config.load_yaml``: pipeline.yaml, training and model configs), and its siblings: hub pipeline.yaml,
the release config.yaml, garbled manifest lines."""

from __future__ import annotations

import pytest

from d3s2.cli import main
from d3s2.config import load_yaml
from d3s2.errors import D3S2Error

BINARY = bytes(range(256)) * 4


def test_load_yaml_binary_and_odd_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(BINARY)
    with pytest.raises(D3S2Error, match="not a text file"):
        load_yaml(p)
    p.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(D3S2Error, match=r"c.yaml: not (valid YAML|a usable YAML config)"):
        load_yaml(p)


def test_binary_training_config_is_one_line(tmp_path, capsys):
    p = tmp_path / "train.yaml"
    p.write_bytes(BINARY)
    assert main(["train", str(p), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a text file" in err[0]


def test_binary_pipeline_yaml_is_one_line(tmp_path, capsys):
    from pipeline_helpers import square_image

    w = tmp_path / "weights"
    w.mkdir()
    (w / "pipeline.yaml").write_bytes(BINARY)
    img = square_image(tmp_path / "a.png")
    assert main(["generate", str(img), "-o", str(tmp_path / "o"), "--weights", str(w)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pipeline.yaml: not a text file" in err[0]


def test_release_and_hub_yaml_readers(tmp_path):
    from d3s2.pipelines.hub import _d3s2_weight_files
    from d3s2.pipelines.release_config import load_release_yaml

    p = tmp_path / "config.yaml"
    p.write_bytes(BINARY)
    with pytest.raises(D3S2Error, match="not a readable YAML file"):
        load_release_yaml(p)
    with pytest.raises(D3S2Error, match="not valid YAML"):
        _d3s2_weight_files(p, None, "repo")


def test_garbled_manifest_line_is_skipped(tmp_path):
    from d3s2.data import manifest as mf

    p = tmp_path / "manifest.jsonl"
    p.write_bytes(b'{"item_id": "a"}\n\xff\xfe\x00garbage\n{"item_id": "b"}\n')
    assert [r["item_id"] for r in mf.read_jsonl(p)] == ["a", "b"]
