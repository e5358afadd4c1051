"""Bundled example images (src/d3s2/assets/examples, demo/make_examples.py): every one is a render of a HELD-OUT mesh
of demo/split.json, small, RGBA, and really shows the mesh its JSON names."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d3s2.errors import D3S2Error
from d3s2.pipelines.bundled import example_images

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "src" / "d3s2" / "assets" / "examples"
SPLIT = json.loads((REPO / "demo" / "split.json").read_text())


def _make_examples_module():
    spec = importlib.util.spec_from_file_location("make_examples", REPO / "demo" / "make_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def index():
    return json.loads((EXAMPLES / "examples.json").read_text())["examples"]


def test_examples_are_held_out_small_rgba_images(index):
    heldout, train = set(SPLIT["heldout"]), set(SPLIT["train"])
    assert len(index) == 4
    for name, rec in index.items():
        assert rec["source"] in heldout and rec["source"] not in train, name
        path = EXAMPLES / rec["image"]
        assert path.stat().st_size < 150_000
        with Image.open(path) as im:
            assert im.mode == "RGBA" and im.size == (rec["camera"]["resolution"],) * 2
            a = np.asarray(im)[..., 3]
        assert a[0, 0] == 0 and a[-1, -1] == 0 and (a == 255).mean() > 0.05  # object on a transparent background
    # nothing else in the folder, and the package API lists exactly these
    assert sorted(p.name for p in EXAMPLES.glob("*.png")) == sorted(r["image"] for r in index.values())
    assert [p.name for p in example_images()] == sorted(r["image"] for r in index.values())
    # the script's list is the one that was rendered
    assert {v for v in _make_examples_module().EXAMPLES.values()} == {r["source"] for r in index.values()}


def test_example_images_show_the_named_meshes(index):
    """Re-render each named mesh small at the recorded camera: its silhouette must match the bundled image's."""
    pytest.importorskip("pybullet_data")
    mod = _make_examples_module()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        masks = {}
        for name, rec in index.items():
            rgba, cam = mod.render_example(rec["source"], 64)
            assert cam.elevation_deg == rec["camera"]["elevation_deg"]
            assert cam.azimuth_deg == rec["camera"]["azimuth_deg"]
            assert abs(cam.distance - rec["camera"]["distance"]) < 1e-6
            masks[name] = rgba[..., 3] > 127
    finally:
        torch.set_num_threads(n)
    for name, rec in index.items():
        with Image.open(EXAMPLES / rec["image"]) as im:
            small = np.asarray(im.getchannel("A").resize((64, 64), Image.Resampling.BOX)) > 127
        iou = {other: (m & small).sum() / (m | small).sum() for other, m in masks.items()}
        assert iou[name] > 0.9, (name, iou)
        assert max(v for k, v in iou.items() if k != name) < iou[name] - 0.1  # and not another example's mesh


def test_make_examples_refuses_training_meshes(tmp_path):
    mod = _make_examples_module()
    with pytest.raises(D3S2Error, match="held-out"):
        mod.make_examples(tmp_path / "ex", size=16, examples={"duck": "duck.obj"})
    assert not (tmp_path / "ex").exists()
