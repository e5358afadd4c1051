"""``d3s2 generate`` (d3s2.pipelines.cli): meshes written atomically, per-image errors that do not stop the batch,
clear one-line errors and exit codes, no partial files; the bundled demo model when no --weights is given
(d3s2.pipelines.bundled), --examples and --preview."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from d3s2.cli import main
from d3s2.pipelines.image_to_3d import ImageTo3DPipeline
from pipeline_helpers import make_tiny_weights


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU runs: 1 thread is faster on a busy machine


def _image(path, alpha=True):
    a = np.zeros((64, 64, 4), np.uint8)
    a[16:48, 20:44] = (200, 100, 50, 255)
    if not alpha:
        a[..., 3] = 0
    Image.fromarray(a).save(path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random-weight pipeline whose SS-VAE output is shifted (decoder bias) so the SDF has a surface."""
    return make_tiny_weights(tmp_path_factory.mktemp("weights"))


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_generate_writes_meshes_and_reports_bad_inputs(tmp_path, weights, capsys):
    import trimesh

    good = _image(tmp_path / "good.png")
    empty = _image(tmp_path / "empty.png", alpha=False)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    out = tmp_path / "out"
    rc = main(["generate", good, str(tmp_path / "missing.png"), str(text), empty, "-o", str(out), "--weights",
               str(weights), "--format", "obj", "--no-progress", "--seed", "0"])
    cap = capsys.readouterr()
    assert rc == 1
    assert _files(out) == ["good.obj"]  # nothing (not even a temporary file) for the failed images
    mesh = trimesh.load(out / "good.obj", force="mesh")
    assert len(mesh.faces) > 0
    assert "good.png ->" in cap.out and "sparse_512" in cap.out and "total" in cap.out
    errors = [line for line in cap.err.splitlines() if "error:" in line]
    assert len(errors) == 3
    assert "missing.png" in errors[0] and "not found" in errors[0]
    assert "notes.png" in errors[1] and "not an image" in errors[1]
    assert "empty.png" in errors[2] and "mask is empty" in errors[2]
    assert "3 of 4 image(s) failed" in cap.err


def test_generate_all_good_exit_zero_and_glb(tmp_path, weights, capsys):
    import trimesh

    out = tmp_path / "o"
    rc = main(["generate", _image(tmp_path / "a.png"), "-o", str(out), "--weights", str(weights), "--no-progress",
               "--faces", "500", "--steps-dense", "2", "--steps-512", "2", "--cfg", "2.0"])
    assert rc == 0, capsys.readouterr().err
    assert _files(out) == ["a.glb"]
    m = trimesh.load(out / "a.glb", force="mesh")
    assert 0 < len(m.faces) <= 550


@pytest.fixture
def assets(tmp_path, monkeypatch):
    """An empty stand-in for the package's assets folder (add ``demo/`` or ``examples/`` to it)."""
    from d3s2.pipelines import bundled

    root = tmp_path / "assets"
    root.mkdir()
    monkeypatch.setattr(bundled, "_assets_dir", lambda: root)
    return root


def test_generate_weights_errors(tmp_path, assets, capsys):
    img = _image(tmp_path / "a.png")
    out = tmp_path / "o"
    assert main(["generate", img, "-o", str(out)]) == 2  # no --weights and no bundled model
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights" in err[0] and "no bundled demo model" in err[0]
    assert "demo/bundle.py" in err[0]
    (assets / "demo").mkdir()  # a half-there bundle (no pipeline.yaml) counts as absent
    assert main(["generate", img, "-o", str(out)]) == 2
    assert "no bundled demo model" in capsys.readouterr().err
    assert main(["generate", img, "-o", str(out), "--weights", str(tmp_path / "no_such_folder")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights folder not found" in err[0]
    (tmp_path / "junk").mkdir()
    assert main(["generate", img, "-o", str(out), "--weights", str(tmp_path / "junk")]) == 2
    assert "no pipeline.yaml" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_generate_uses_the_bundled_model_without_weights(tmp_path, weights, assets, capsys):
    import trimesh

    from d3s2.pipelines.bundled import bundled_model_path, resolve_weights

    shutil.copytree(weights, assets / "demo")
    assert bundled_model_path() == assets / "demo"
    assert resolve_weights(None) == (str(assets / "demo"), True)
    assert resolve_weights(weights) == (str(weights), False)
    out = tmp_path / "o"
    rc = main(["generate", _image(tmp_path / "a.png"), _image(tmp_path / "b.png"), "-o", str(out), "--no-progress",
               "--steps-dense", "2", "--steps-512", "2", "--faces", "500", "--preview"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    notes = [line for line in cap.err.splitlines() if "bundled demo model" in line]
    assert notes == ["d3s2 generate: no --weights given, using the bundled demo model (small, trained on pybullet "
                     "meshes; see README)"]
    assert _files(out) == ["a.glb", "a.preview.png", "b.glb", "b.preview.png"]
    assert len(trimesh.load(out / "a.glb", force="mesh").faces) > 0
    with Image.open(out / "a.preview.png") as im:
        assert im.mode == "RGB" and im.size[0] == 2 * im.size[1]
    assert "a.preview.png" in cap.out
    # an explicit --weights wins and prints no note
    rc = main(["generate", _image(tmp_path / "c.png"), "-o", str(out), "--weights", str(weights), "--no-progress",
               "--steps-dense", "1", "--steps-512", "1", "--faces", "500"])
    cap = capsys.readouterr()
    assert rc == 0 and "bundled" not in cap.err
    assert "c.glb" in _files(out) and "c.preview.png" not in _files(out)


def test_generate_examples_flag(tmp_path, weights, assets, capsys):
    (assets / "examples").mkdir()
    _image(assets / "examples" / "ex1.png")
    out = tmp_path / "o"
    rc = main(["generate", "--examples", "-o", str(out), "--weights", str(weights), "--no-progress",
               "--steps-dense", "1", "--steps-512", "1", "--faces", "500"])
    assert rc == 0, capsys.readouterr().err
    assert _files(out) == ["ex1.glb"]
    shutil.rmtree(assets / "examples")
    assert main(["generate", "--examples", "-o", str(out), "--weights", str(weights)]) == 2
    assert "no bundled example images" in capsys.readouterr().err
    assert main(["generate", "-o", str(out), "--weights", str(weights)]) == 2
    assert "no input images" in capsys.readouterr().err


@pytest.mark.slow
def test_bundled_demo_model_generates_from_an_example():
    """The package ships the demo model (demo/bundle.py): it loads as the demo pipeline config describes and turns a
    bundled example image (a held-out render) into a non-trivial mesh, also with the few CPU steps of `make demo`."""
    from d3s2.pipelines.bundled import bundled_model_path, example_images

    path = bundled_model_path()
    assert path is not None, "src/d3s2/assets/demo is missing: the demo model must ship with the package"
    pipe = ImageTo3DPipeline.from_pretrained(path, device="cpu")
    want = ImageTo3DPipeline.from_config("demo_pipeline", device="cpu")
    assert pipe.resolution_512 == want.resolution_512 and pipe.resolution_1024 is None
    mesh = pipe(example_images()[0], generator=torch.Generator().manual_seed(0),
                num_inference_steps={"dense": 4, "512": 2}, progress=False)[0]
    assert len(mesh.faces) > 1000 and np.isfinite(mesh.vertices).all()
    extent = mesh.vertices.max(0) - mesh.vertices.min(0)
    assert (extent > 0.2).all() and (np.abs(mesh.vertices) <= 1.0 + 1e-6).all()  # an object, inside the unit cube
