"""Background removal for images without alpha (d3s2.pipelines.matting; --matting birefnet|border|none).

The real BiRefNet export (0.97 GB) cannot be fetched here, so the local hub server of tests/hub_server.py serves a
stand-in ONNX graph under the real repo id and file name (``onnx-community/BiRefNet-ONNX``, ``onnx/model.onnx``): the
same download, onnxruntime session and pre/post-processing run as for the real model. The stand-in is a 1x1
convolution over the normalised RGB (red minus blue), so its mask is known: the test recomputes it in numpy."""

import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from d3s2.errors import D3S2Error
from d3s2.pipelines import matting
from d3s2.pipelines.image_to_3d import ImageTo3DPipeline
from d3s2.pipelines.preprocess import preprocess_image
from hub_server import FakeHub

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                               or importlib.util.find_spec("onnx") is None,
                               reason="needs onnxruntime and onnx (pip install -e '.[matting,test]')")

A, B = 4.0, -6.0  # stand-in logits: A * (red - blue) + B on ImageNet-normalised channels
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
OBJ = (60, 140, 50, 110)  # rows, cols of the red object


def _standin(sigmoid: bool = False) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [1, 3, 1024, 1024])
    y = helper.make_tensor_value_info("output_image", TensorProto.FLOAT, [1, 1, 1024, 1024])
    w = numpy_helper.from_array(np.array([A, 0.0, -A], np.float32).reshape(1, 3, 1, 1), "w")
    b = numpy_helper.from_array(np.array([B], np.float32), "b")
    nodes = [helper.make_node("Conv", ["input_image", "w", "b"], ["logits" if sigmoid else "output_image"])]
    if sigmoid:  # some exports end with the sigmoid
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["output_image"]))
    model = helper.make_model(helper.make_graph(nodes, "birefnet-standin", [x], [y], [w, b]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _scene() -> Image.Image:
    """A red object on blue, inside a grey frame: the border colour (grey) is not the background (blue)."""
    a = np.empty((200, 160, 3), np.uint8)
    a[:] = (128, 128, 128)
    a[8:-8, 8:-8] = (30, 60, 220)
    r0, r1, c0, c1 = OBJ
    a[r0:r1, c0:c1] = (220, 40, 30)
    return Image.fromarray(a)


def _reference_mask(img: Image.Image) -> np.ndarray:
    """The release's recipe with the stand-in network, in numpy (PIL only for the two resizes)."""
    x = np.asarray(img.convert("RGB").resize((1024, 1024), Image.BILINEAR), np.float64) / 255.0
    xn = (x - MEAN) / STD
    logits = A * xn[..., 0] - A * xn[..., 2] + B
    prob = 1.0 / (1.0 + np.exp(-logits))
    small = Image.fromarray((prob * 255.0).astype(np.uint8)).resize(img.size, Image.BICUBIC)
    return np.asarray(small, np.float32) / 255.0


def _bbox(mask):
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


@pytest.fixture(scope="module")
def server():
    hub = FakeHub().start()
    if importlib.util.find_spec("onnx") is not None:
        hub.add_repo(matting.BIREFNET_REPO, {matting.BIREFNET_FILE: _standin(), "config.json": b"{}"})
        hub.add_repo("tester/birefnet-sigmoid", {matting.BIREFNET_FILE: _standin(sigmoid=True)})
    hub.add_repo("tester/broken", {matting.BIREFNET_FILE: b"not an onnx graph"})
    yield hub
    hub.stop()


@pytest.fixture
def online(server, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    if not hf_constants.ENDPOINT.startswith("http://127.0.0.1") or hf_constants.HF_HUB_OFFLINE:
        pytest.skip("huggingface_hub was imported before tests/conftest.py set its endpoint")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", os.fspath(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    server.reset()
    yield server
    server.reset()


@needs_ort
def test_birefnet_from_the_hub_cuts_out_the_object(online):
    img = _scene()
    remover = matting.background_remover_for("birefnet", device="cpu")
    assert isinstance(remover, matting.BiRefNetMatting) and remover.method == "birefnet"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model, not a fallback
        mask = remover(img)
    ref = _reference_mask(img)
    assert mask.shape == (200, 160) and mask.dtype == np.float32
    assert np.array_equal(mask, ref)
    r0, r1, c0, c1 = OBJ
    assert mask[r0 + 2:r1 - 2, c0 + 2:c1 - 2].min() > 0.95 and mask[:r0 - 2].max() == 0.0
    got = _bbox(mask > 0)
    assert all(abs(int(g) - e) <= 1 for g, e in zip(got, OBJ)), got
    # the border colour (grey frame) takes blue for foreground: the whole interior
    assert _bbox(matting.BorderMatting()(img) > 0) == (8, 192, 8, 152)
    assert [p for _, p in online.content_gets()] == [matting.BIREFNET_FILE]
    online.reset()
    again = matting.background_remover_for("birefnet")(img)  # a new session: the model comes from the cache
    assert np.array_equal(again, mask) and online.content_gets() == []
    # an export that ends with the sigmoid gives the same mask
    sig = matting.BiRefNetMatting(repo_id="tester/birefnet-sigmoid")(img)
    assert np.abs(sig - mask).max() <= 1 / 255 + 1e-6


@needs_ort
def test_pipeline_matting_option(online):
    img, rgba = _scene(), np.zeros((200, 160, 4), np.uint8)
    rgba[40:120, 30:90] = (200, 100, 50, 255)
    pipes = {m: ImageTo3DPipeline.from_config("pipeline_tiny", device="cpu", matting=m)
             for m in ("birefnet", "border", "none")}
    size = pipes["none"].models["image_encoder"].config.image_size
    expected = {"birefnet": _reference_mask(img), "border": matting.BorderMatting()(img),
                "none": np.ones((200, 160), np.float32)}
    out = {}
    for m, pipe in pipes.items():
        assert pipe.background_remover.method == m
        out[m] = pipe.encode_images([img])[0]
        want = preprocess_image(img, size=size, background_remover=lambda _im, e=expected[m]: e)
        assert torch.equal(out[m], want), m
    assert not torch.equal(out["birefnet"], out["border"]) and not torch.equal(out["border"], out["none"])
    # an image with alpha keeps its alpha whatever the method
    a = [p.encode_images([rgba])[0] for p in pipes.values()]
    assert torch.equal(a[0], a[1]) and torch.equal(a[1], a[2])
    with pytest.raises(D3S2Error, match="not both"):
        ImageTo3DPipeline.from_config("pipeline_tiny", matting="none", background_remover=lambda im: None)


@needs_ort
def test_default_is_birefnet_when_installed_else_border_with_a_warning(online, monkeypatch):
    img = _scene()
    pipe = ImageTo3DPipeline.from_config("pipeline_tiny", device="cpu")  # matting=None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(pipe.background_remover(img), _reference_mask(img))
    assert pipe.background_remover.method == "birefnet"
    # offline, model not cached: border colour, with a warning that says why, and no request
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", os.fspath(os.path.dirname(os.environ["HF_HUB_CACHE"])) + "/empty")
    online.reset()
    remover = matting.background_remover_for(None)
    for _ in range(2):
        with pytest.warns(UserWarning, match="no alpha channel.*border colour.*matting model is not available.*"
                                             "not in the Hugging Face cache"):
            mask = remover(img)
        assert np.array_equal(mask, matting.BorderMatting()(img))
    assert remover.method == "border" and online.requests == []
    # an explicit birefnet says so and stops, in one line
    with pytest.raises(D3S2Error, match="BiRefNet matting model: .*not in the Hugging Face cache.*--matting border") \
            as err:
        matting.background_remover_for("birefnet")(img)
    assert "\n" not in str(err.value)


def test_default_without_onnxruntime_warns_and_uses_the_border(monkeypatch):
    monkeypatch.setattr(matting, "matting_available", lambda: False)
    img = _scene()
    remover = matting.background_remover_for(None)
    with pytest.warns(UserWarning, match=r"no alpha channel.*not installed \(pip install 'd3s2\[matting\]'\)"):
        mask = remover(img)
    assert remover.method == "border" and _bbox(mask > 0) == (8, 192, 8, 152)
    with pytest.raises(D3S2Error, match=r"needs onnxruntime: pip install 'd3s2\[matting\]'"):
        ImageTo3DPipeline.from_config("pipeline_tiny", matting="birefnet")  # checked before any work
    with pytest.raises(D3S2Error, match="matting must be one of birefnet, border, none"):
        matting.background_remover_for("u2net")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit border or none: no warning
        matting.background_remover_for("border")(img)
        assert matting.background_remover_for("none")(img).min() == 1.0


@needs_ort
def test_unreadable_model_is_one_line(online, tmp_path):
    with pytest.raises(D3S2Error, match="onnxruntime cannot load the matting model") as err:
        matting.BiRefNetMatting(repo_id="tester/broken")(_scene())
    assert "\n" not in str(err.value)
    with pytest.raises(D3S2Error, match="matting model not found"):
        matting.BiRefNetMatting(model_path=tmp_path / "none.onnx")(_scene())
    path = tmp_path / "standin.onnx"
    path.write_bytes(_standin())  # a local file works the same way
    assert np.array_equal(matting.BiRefNetMatting(model_path=path)(_scene()), _reference_mask(_scene()))


def test_cli_and_serve_take_the_option(tmp_path):
    from d3s2.cli import build_parser, main
    from d3s2.serve.backend import Generator, preview_image

    parser = build_parser()
    assert parser.parse_args(["generate", "x.png", "-o", "o", "--matting", "none"]).matting == "none"
    assert parser.parse_args(["generate", "x.png", "-o", "o"]).matting is None
    with pytest.raises(SystemExit):
        main(["generate", "x.png", "-o", "o", "--matting", "u2net"])
    if importlib.util.find_spec("gradio") is not None:
        assert parser.parse_args(["serve", "--matting", "border"]).matting == "border"
    pipe = ImageTo3DPipeline.from_config("pipeline_tiny", device="cpu", matting="none")
    pipe.save_pretrained(tmp_path / "tiny")
    gen = Generator.load(os.fspath(tmp_path / "tiny"), device="cpu", matting="none")
    assert gen.pipe.background_remover.method == "none"
    pic = preview_image(_scene(), background_remover=gen.pipe.background_remover)  # the page shows the method's crop
    assert pic.shape == (256, 512, 3)
    assert np.array_equal(pic, preview_image(_scene(), background_remover=matting.NoMatting()))
    assert not np.array_equal(pic, preview_image(_scene(), background_remover=matting.BorderMatting()))
