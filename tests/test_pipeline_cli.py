"""``d3s2 generate`` (d3s2.pipelines.cli): meshes written atomically, per-image errors that do not stop the batch,
clear one-line errors and exit codes, no partial files."""

import numpy as np
import pytest
import torch
from PIL import Image

from d3s2.cli import main
from d3s2.pipelines.image_to_3d import ImageTo3DPipeline


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    root = tmp_path_factory.mktemp("weights")
    pipe = ImageTo3DPipeline.from_config("pipeline_tiny", seed=0)
    medians = []

    def hook(mod, inp, out):
        medians.append(out.feats.median())
        return out.replace(out.feats - medians[-1])

    vae = pipe.models["ss_vae_512"]
    handle = vae.decoder.out_layer.register_forward_hook(hook)
    pipe(_image(root / "probe.png"), generator=torch.Generator().manual_seed(0), progress=False)
    handle.remove()
    with torch.no_grad():
        vae.decoder.out_layer.bias -= medians[0]
    return pipe.save_pretrained(root / "tiny")


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


def test_generate_weights_errors(tmp_path, capsys):
    img = _image(tmp_path / "a.png")
    out = tmp_path / "o"
    assert main(["generate", img, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights" in err[0]
    assert main(["generate", img, "-o", str(out), "--weights", str(tmp_path / "no_such_folder")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights folder not found" in err[0]
    (tmp_path / "junk").mkdir()
    assert main(["generate", img, "-o", str(out), "--weights", str(tmp_path / "junk")]) == 2
    assert "no pipeline.yaml" in capsys.readouterr().err
    assert not out.exists()
