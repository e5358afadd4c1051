"""``d3s2 serve`` without a browser (d3s2.serve.backend, d3s2.serve.app): upload checks, the crop / mask preview,
per-session folders and their clean-up, one generation on a tiny random-weight pipeline, page-safe error messages,
the command's defaults and the Gradio page's queue and upload settings. The browser test is test_serve_e2e.py."""

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from d3s2.errors import D3S2Error
from d3s2.serve import backend
from d3s2.serve.backend import (GenerateOptions, Generator, SessionStore, list_examples, preview_image, public_message,
                                read_upload, run_logged, safe_stem)
from pipeline_helpers import make_tiny_weights, square_image


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("serve_weights"))


@pytest.fixture(scope="module")
def generator(tiny_weights):
    return Generator.load(os.fspath(tiny_weights), device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU runs: 1 thread is faster on a busy machine


# ------------------------------------------------------------------------------------------------- uploads
def test_read_upload_accepts_images_and_refuses_everything_else(tmp_path):
    png = square_image(tmp_path / "ok.png")
    img = read_upload(png, max_bytes=2**20)
    assert img.mode == "RGBA" and img.size == (64, 64)
    Image.fromarray(square_image()[..., :3]).save(tmp_path / "ok.jpg", quality=95)
    assert read_upload(tmp_path / "ok.jpg").mode == "RGB"

    def refused(path, *words, **kw):
        with pytest.raises(D3S2Error) as ei:
            read_upload(path, **kw)
        msg = str(ei.value)
        assert os.fspath(tmp_path) not in msg and "/" not in msg, msg  # the page never sees a server path
        assert msg.startswith(kw.get("name") or os.path.basename(path)), msg
        for w in words:
            assert w in msg, msg
        return msg

    (tmp_path / "notes.png").write_text("these are notes, not pixels")
    refused(tmp_path / "notes.png", "not an image")
    (tmp_path / "notes.txt").write_text("x")
    refused(tmp_path / "notes.txt", "not an accepted image type")
    (tmp_path / "empty.png").write_bytes(b"")
    refused(tmp_path / "empty.png", "empty")
    refused(png, "limit", max_bytes=100)
    Image.fromarray(square_image()[..., :3]).save(tmp_path / "anim.gif")
    os.replace(tmp_path / "anim.gif", tmp_path / "anim.png")  # a GIF in disguise: the decoder tells
    refused(tmp_path / "anim.png", "GIF", "not accepted")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.png", "truncated or corrupt")
    # the name shown is the user's file name, not the stored one
    refused(tmp_path / "notes.png", "not an image", name="holiday.png")


def test_public_message_and_safe_stem():
    assert public_message("/srv/cache/abc/photo.png: cannot decode") == "photo.png: cannot decode"
    assert public_message("bad file '/root/x/y.png'\n in  stage", "up.png") == "bad file 'up.png' in stage"
    assert public_message("2/3 done, PNG/JPEG") == "2/3 done, PNG/JPEG"
    assert safe_stem("my photo (1).png") == "my_photo_1"
    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("...") == "mesh" and safe_stem(None) == "mesh"


def test_preview_is_the_crop_and_its_mask():
    pic = preview_image(Image.fromarray(square_image(size=128)), size=128)
    assert pic.shape == (128, 256, 3) and pic.dtype == np.uint8
    rgb, mask = pic[:, :128].astype(int), pic[:, 128:, 0].astype(int)
    # the object is cropped and centred: the middle is the object's colour, the mask is on there
    assert np.abs(rgb[64, 64] - (200, 100, 50)).max() <= 3 and mask[64, 64] == 255
    # the 24 x 32 object fills the height (minus the pad); left and right of it are white background, mask off
    assert mask[64, 2] == 0 and mask[64, 125] == 0 and (rgb[64, 2] == 255).all()
    assert mask[10, 64] == 255 and mask[117, 64] == 255
    with pytest.raises(D3S2Error, match="mask is empty"):
        preview_image(Image.fromarray(square_image(alpha=False)))


def test_list_examples(tmp_path):
    assert list_examples(tmp_path / "none") == []
    assert list_examples(tmp_path) == []
    for name in ("b.png", "a.PNG", "notes.txt", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_examples(tmp_path)] == ["a.PNG", "b.png"]
    bundled = list_examples()  # whatever the package ships (maybe none): PNG files that exist
    assert all(p.is_file() and p.suffix.lower() == ".png" for p in bundled)


def test_resolve_weights(tmp_path, monkeypatch):
    from d3s2.pipelines import bundled

    assert backend.resolve_weights(tmp_path) == os.fspath(tmp_path)
    monkeypatch.setattr(bundled, "bundled_model_path", lambda: None)
    assert backend.bundled_weights() is None
    with pytest.raises(D3S2Error, match="--weights"):
        backend.resolve_weights(None)
    monkeypatch.setattr(bundled, "bundled_model_path", lambda: tmp_path)
    assert backend.resolve_weights(None) == os.fspath(tmp_path)


# ------------------------------------------------------------------------------------------------- sessions
def test_session_store_folders_runs_and_cleanup(tmp_path):
    store = SessionStore(tmp_path / "out", max_age_s=60)
    a, b = store.folder("abc123"), store.folder("../evil/..")
    assert a.parent == store.root and b.parent == store.root and b.name == "evil"
    assert store.folder(None).name == "anonymous"
    r1 = store.new_run("abc123")
    (r1 / "m.glb").write_bytes(b"1")
    r2 = store.new_run("abc123")
    assert r2 != r1 and r2.is_dir() and not r1.exists()  # one result kept per session
    old = time.time() - 3600
    os.utime(b, (old, old))
    assert store.cleanup() == ["evil"]
    assert sorted(p.name for p in store.root.iterdir()) == ["abc123", "anonymous"]
    assert store.cleanup(now=time.time() + 120) and not any(store.root.iterdir())
    store.folder("x")
    store.drop("x")
    assert not (store.root / "x").exists()


# ------------------------------------------------------------------------------------------------- generation
def test_generate_writes_viewer_and_download_files(tmp_path, generator):
    import trimesh

    assert generator.grids() == {512: 64, 1024: 128}
    d = generator.stage_defaults()
    assert d["dense"] == (4, 3.0) and d["512"] == (3, 3.0) and d["1024"] == (2, 3.0)
    img = read_upload(square_image(tmp_path / "in.png"))
    opts = GenerateOptions(seed=0, resolution=512, steps={"dense": 4, "512": 2}, guidance={"dense": 3.0, "512": 2.0},
                           faces=1500, format="obj")
    res = generator.generate(img, opts, tmp_path / "run", stem="in", progress=False)
    assert res.viewer_path == tmp_path / "run" / "in.glb" and res.download_path == tmp_path / "run" / "in.obj"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["in.glb", "in.obj"]
    for path in (res.viewer_path, res.download_path):
        m = trimesh.load(path, force="mesh")
        assert 0 < len(m.faces) <= 1600 and len(m.faces) == res.faces
    assert [s["stage"] for s in res.stats][-1] == "total" and "sparse_512" in [s["stage"] for s in res.stats]
    assert res.warnings == []  # RGBA input: no background warning
    # an opaque photo gets the border-colour warning, shown in the page; a GLB download is the viewer's file
    opaque = Image.fromarray(np.where(square_image()[..., 3:] > 0, square_image(), 255).astype(np.uint8)[..., :3])
    res2 = generator.generate(opaque, GenerateOptions(seed=0, steps={"512": 1}, faces=500), tmp_path / "run2",
                              progress=False)
    assert len(res2.warnings) == 1 and "no alpha channel" in res2.warnings[0]
    assert res2.download_path == res2.viewer_path == tmp_path / "run2" / "mesh.glb" and 0 < res2.faces <= 550


@pytest.mark.parametrize("opts, words", [
    (GenerateOptions(resolution=768), "resolution 768"),
    (GenerateOptions(format="fbx"), "unknown format"),
    (GenerateOptions(faces=2), "face count"),
    (GenerateOptions(steps={"dense": 0}), "steps of stage dense"),
    (GenerateOptions(guidance={"512": 99.0}), "guidance of stage 512"),
    (GenerateOptions(seed=-1), "seed"),
])
def test_generate_refuses_bad_options(generator, tmp_path, opts, words):
    with pytest.raises(D3S2Error, match=words):
        generator.generate(square_image(), opts, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_no_shape_and_internal_errors_become_page_messages(tiny_weights, tmp_path, caplog):
    gen = Generator.load(os.fspath(tiny_weights), device="cpu")
    with torch.no_grad():  # occupancy logits far below the threshold: the structure stage finds nothing
        _sink_dense_vae(gen.pipe.models["dense_vae"])
    out, err = run_logged(lambda: gen.generate(square_image(), GenerateOptions(), tmp_path, progress=False),
                          "generation")
    assert out is None and "no shape found" in err and "another seed" in err
    assert not any(tmp_path.iterdir())

    def boom():
        raise RuntimeError(f"secret detail in {tmp_path}/x/y")

    with caplog.at_level("ERROR", logger="d3s2.serve"):
        out, err = run_logged(boom, "generation")
    assert out is None and err == "generation failed with an internal error (details are in the server log)"
    assert "secret detail" in caplog.text  # the traceback goes to the server log only


def _sink_dense_vae(vae):
    """Shift the dense VAE's last layer far negative (whatever it is called) so that no voxel is occupied."""
    last = [m for m in vae.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear)) and m.bias is not None][-1]
    last.bias.fill_(-1e4)


# ------------------------------------------------------------------------------------------------- command and page
def test_serve_command_defaults_and_errors(tmp_path, capsys):
    from d3s2.cli import build_parser, main
    from d3s2.serve.app import run_serve

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.weights, args.func) == ("127.0.0.1", 7860, None, run_serve)
    assert args.max_file_size == 10.0 and args.queue_size == 16 and args.max_age == 3600.0
    assert main(["serve", "--port", "0"]) == 2
    assert "--port 0" in capsys.readouterr().err
    assert main(["serve", "--max-file-size", "-1"]) == 2
    assert "--max-file-size" in capsys.readouterr().err
    assert main(["serve", "--weights", os.fspath(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("weights folder not found" in err[0] or "Gradio" in err[0])


def test_page_queue_upload_types_and_launch_settings(generator, tmp_path):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'd3s2[serve]')")
    import argparse

    from d3s2.serve.app import build_app, launch_kwargs

    store = SessionStore(tmp_path / "out")
    ex = tmp_path / "ex"
    ex.mkdir()
    square_image(ex / "box.png")
    demo = build_app(generator, store, list_examples(ex), max_file_bytes=2**20)
    cfg = demo.get_config_file()
    comps = {c.get("props", {}).get("elem_id"): c for c in cfg["components"]}
    for eid in ("d3s2-upload", "d3s2-preview", "d3s2-generate", "d3s2-status", "d3s2-viewer", "d3s2-download",
                "d3s2-seed", "d3s2-randomise", "d3s2-faces", "d3s2-format", "d3s2-resolution", "d3s2-steps-dense",
                "d3s2-cfg-512", "d3s2-steps-1024"):
        assert eid in comps, eid
    assert comps["d3s2-upload"]["props"]["file_types"] == [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
    assert [c[1] for c in comps["d3s2-resolution"]["props"]["choices"]] == [512, 1024]
    limits = {f.name: f.concurrency_limit for f in demo.fns.values()}
    assert limits["on_generate"] == 1  # one generation at a time on the shared models; the rest wait in the queue
    run_id = comps["d3s2-generate"]["id"]
    assert any(t[0] == run_id and t[1] == "click" for d in cfg["dependencies"] for t in d["targets"]
               if d["backend_fn"] and d["queue"] is not False)
    kw = launch_kwargs(argparse.Namespace(host="127.0.0.1", port=7860, max_file_size=2.0), store, list_examples(ex))
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False and kw["show_error"] is False
    assert kw["max_file_size"] == 2 * 2**20 and kw["ssr_mode"] is False
    assert kw["allowed_paths"] == [os.fspath(ex)]  # results come from the cache, bound to a session
