"""Image preprocessing of the inference recipe (d3s2.pipelines.preprocess): alpha mask, border segmentation with a
warning, user background remover, grayscale / palette inputs, empty masks, huge and unreadable files."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from d3s2.errors import D3S2Error
from d3s2.pipelines.preprocess import load_image, preprocess_image


def _rgba_square(h=60, w=80, box=(10, 40, 20, 50), color=(200, 30, 30)):
    a = np.zeros((h, w, 4), np.uint8)
    y0, y1, x0, x1 = box
    a[y0:y1, x0:x1, :3] = color
    a[y0:y1, x0:x1, 3] = 255
    a[..., :3][a[..., 3] == 0] = (0, 255, 0)  # a garish colour under the transparent part must not leak
    return a


def _bbox(mask):
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def test_alpha_crop_square_pad_and_white_background():
    size = 110  # pad = round(16 * 110 / 518) = 3
    x = preprocess_image(_rgba_square(), size=size)
    assert x.shape == (4, size, size) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # object 30 x 30 -> fills the square, then 16/518 margin on each side
    y0, y1, x0, x1 = _bbox(x[3])
    expect = size * size / (size + 2 * 3)
    assert abs((y1 - y0) - expect) <= 2 and abs((x1 - x0) - expect) <= 2
    assert abs((y0 + y1) / 2 - size / 2) <= 1 and abs((x0 + x1) / 2 - size / 2) <= 1
    bg = x[3] == 0
    assert torch.allclose(x[:3][:, bg], torch.ones(1)), "background must be white"
    inner = x[:3, size // 2, size // 2]
    assert torch.allclose(inner, torch.tensor([200, 30, 30]) / 255.0, atol=1e-3)


def test_no_alpha_uses_border_colour_with_warning():
    a = np.full((50, 70, 3), 255, np.uint8)
    a[10:40, 30:60] = (20, 40, 200)
    with pytest.warns(UserWarning, match="no alpha"):
        x = preprocess_image(a, size=56, pad=0)
    y0, y1, x0, x1 = _bbox(x[3])
    assert (y1 - y0, x1 - x0) == (56, 56)  # the 30 x 30 object fills the square exactly (pad 0)
    assert torch.allclose(x[:3, 28, 28], torch.tensor([20, 40, 200]) / 255.0, atol=1e-3)


def test_opaque_alpha_counts_as_no_alpha_and_remover_is_used():
    a = np.full((40, 40, 4), 255, np.uint8)
    a[..., :3] = 90  # uniform image: border segmentation would find nothing
    calls = []

    def remover(img):
        calls.append(img.mode)
        m = np.zeros((img.height, img.width), np.uint8)
        m[5:15, 5:25] = 255
        return m

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the remover replaces the border heuristic: no warning
        x = preprocess_image(a, size=56, pad=0, background_remover=remover)
    assert calls == ["RGB"]
    y0, y1, x0, x1 = _bbox(x[3])
    assert x1 - x0 == 56 and 26 <= y1 - y0 <= 30  # 10 x 20 box -> 28 x 56 after the square resize


def test_grayscale_and_palette_images():
    g = Image.fromarray(np.where(np.arange(48)[None, :] > 24, 30, 250).astype(np.uint8).repeat(48, 0))
    with pytest.warns(UserWarning):
        x = preprocess_image(g, size=28)
    assert x.shape == (4, 28, 28)
    assert torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2])
    p = Image.fromarray(_rgba_square()).convert("RGBA").quantize(colors=8)
    rgba = Image.fromarray(_rgba_square())
    pal = rgba.convert("P")
    pal.info["transparency"] = 0
    # a palette image with a transparent index is read with its alpha (no warning)
    im = load_image(pal)
    assert im.mode == "RGBA"
    assert load_image(p).mode == "RGB"
    i16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 10).astype(np.int32), mode="I")
    assert load_image(i16).mode == "RGB"


def test_empty_mask_is_a_clear_error():
    a = np.zeros((30, 30, 4), np.uint8)
    a[..., :3] = 128
    a[0, 0, 3] = 0
    with pytest.raises(D3S2Error, match="mask is empty"):
        preprocess_image(a, size=28)


def test_huge_image_is_downscaled_first(tmp_path):
    a = np.zeros((3000, 5000, 4), np.uint8)
    a[1000:2000, 2000:3000] = (10, 200, 10, 255)
    path = tmp_path / "huge.png"
    Image.fromarray(a).save(path)
    im = load_image(path, max_input_size=1024)
    assert max(im.size) == 1024 and im.size == (1024, 614)
    x = preprocess_image(path, size=28)
    assert x.shape == (4, 28, 28) and float(x[3].max()) > 0.99


def test_unreadable_files(tmp_path):
    with pytest.raises(D3S2Error, match="not found"):
        preprocess_image(tmp_path / "missing.png")
    txt = tmp_path / "notes.png"
    txt.write_text("this is not a picture")
    with pytest.raises(D3S2Error, match="not an image"):
        preprocess_image(txt)
    good = tmp_path / "good.png"
    Image.fromarray(_rgba_square()).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(D3S2Error, match="corrupt|cannot decode|not an image"):
        preprocess_image(trunc)


def test_training_framing_equals_pipeline_framing(tmp_path):
    """The DiT tasks frame a prepared render (straight RGB + alpha, black where alpha is 0) exactly as the pipeline
    frames the same RGBA file: a mismatch here silently trains the image encoder on another image distribution."""
    from PIL import Image

    from d3s2.data.datasets import load_rgba
    from d3s2.train.image_encoders import encoder_input

    rng = np.random.default_rng(3)
    a = np.zeros((2, 96, 80, 4), np.uint8)
    a[0, 10:40, 50:75, :3] = rng.integers(0, 256, (30, 25, 3))  # off-centre, not square
    a[0, 10:40, 50:75, 3] = 255
    a[0, 40, 60, 3] = 128  # soft edge
    a[1, 60:62, 5:70, :3] = 40
    a[1, 60:62, 5:70, 3] = 255
    rgbs, masks, want = [], [], []
    for i in range(2):
        path = tmp_path / f"v{i}.png"
        Image.fromarray(a[i]).save(path)
        rgb, mask = load_rgba(path)
        rgbs.append(rgb)
        masks.append(mask)
        want.append(preprocess_image(path, size=28))
    got = encoder_input(torch.stack(rgbs), torch.stack(masks), 28)
    assert got.shape == (2, 4, 28, 28)
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-6)
    # the framing did crop: the object fills the frame (minus the pad), whatever its place in the render
    assert float(got[0, 3, 14, 14]) == 1.0 and float(got[0, 3].mean()) > 0.6
    assert float(got[0, :3, 0, 0].min()) == 1.0  # white background


def test_frame_object_empty_mask_is_white():
    from d3s2.pipelines.preprocess import frame_object

    out = frame_object(torch.zeros(4, 10, 12), 8)
    assert out.shape == (4, 8, 8) and bool((out[:3] == 1).all()) and bool((out[3] == 0).all())
