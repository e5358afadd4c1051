"""Image preprocessing of the inference recipe (shared/reference/official-release.md, step 1; paper Sec. 5.2).

RGBA alpha is the foreground mask. Without a usable alpha channel (none, or fully opaque) the mask comes from a
background-removal callable the user supplies (the release uses BiRefNet; d3s2 bundles none), else from a simple
border-colour segmentation (the median colour of the image border is the background), with a warning because that
only works on plain backgrounds. Then: crop to the mask's bounding box, composite on white, pad to a square, resize to
``size`` (518), pad ``pad`` px (16) on every side, resize to ``size`` again. Output: ``[4, size, size]`` float in
[0, 1], RGB + mask.

Grayscale / palette / 16-bit / CMYK images are converted to RGB(A); images larger than ``max_input_size`` on a side are
downscaled first (memory and time of the segmentation). An empty mask raises :class:`~d3s2.errors.D3S2Error`; an
object that covers almost nothing (under ``MIN_OBJECT_PIXELS`` pixels of mask, e.g. a 1x1 image, or a mask that is
nearly transparent everywhere) gives a warning, because the framing blows it up to the whole frame and the models then
invent a full-size shape from a few pixels (issue 22, case 10).

Two framings (``mode``): ``"d3s2"`` (:func:`frame_object`: float math, antialiased bilinear resizes of RGB and mask
alike) and ``"release"`` (:func:`release_frame`: the authors' ``preprocess_image`` step by step: the RGBA array is
cropped to ``alpha > 0`` (the whole image when that covers under 0.1 % of it), composited on white in float64 and
truncated to uint8, padded to a square, resized with PIL's BILINEAR filter (mask: NEAREST), padded 16 px, resized
again; the release's weights were trained on that distribution).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from d3s2.errors import D3S2Error

__all__ = ["load_image", "preprocess_image", "frame_object", "release_frame", "border_color_mask", "RELEASE_SIZE",
           "RELEASE_PAD", "PREPROCESS_MODES"]

PREPROCESS_MODES = ("d3s2", "release")

RELEASE_SIZE = 518
RELEASE_PAD = 16
MIN_OBJECT_PIXELS = 64  # foreground mass (sum of the mask) in source pixels: an 8x8 object
MIN_OBJECT_ALPHA = 0.1  # mean mask value over the pixels the mask touches
BORDER_THRESHOLD = 0.12  # Euclidean RGB distance in [0, 1] units from the border colour that counts as foreground


def load_image(image: Any, max_input_size: int = 2048):
    """Path / PIL image / uint8 or float array ``[H, W, (1|3|4)]`` -> PIL image in mode RGB or RGBA, downscaled so
    that its longer side is at most ``max_input_size``. Unreadable files raise D3S2Error."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise D3S2Error(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        except Image.DecompressionBombError as exc:  # not an OSError: it would stop a whole batch
            limit = (Image.MAX_IMAGE_PIXELS or 0) * 2 / 1e6
            raise D3S2Error(f"{path}: too large to decode safely ({' '.join(str(exc).split())[:120]}); downscale it "
                            f"below {limit:.0f} megapixels (about {max_input_size} px on the longer side is "
                            "plenty)") from exc
        except UnidentifiedImageError as exc:
            raise D3S2Error(f"{path}: not an image file PIL can read (use PNG, JPEG, WebP, ...)") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise D3S2Error(f"{path}: cannot decode the image ({' '.join(str(exc).split())}); the file may be "
                            "truncated or corrupt") from exc
    elif isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        arr = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise D3S2Error(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        img = Image.fromarray(arr)
    else:
        raise D3S2Error(f"unsupported image type {type(image).__name__}: give a path, a PIL image or an array")
    if img.width < 1 or img.height < 1:
        raise D3S2Error("image has no pixels")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale: scale to 8 bit first
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.max() > 0 else 1.0
        img = Image.fromarray((a / hi * 255.0 + 0.5).astype(np.uint8))
    img = img.convert("RGBA" if has_alpha else "RGB")
    if max(img.size) > max_input_size:
        scale = max_input_size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    return img


def border_color_mask(rgb: np.ndarray, threshold: float = BORDER_THRESHOLD) -> np.ndarray:
    """Foreground mask ``[H, W]`` in {0, 1}: pixels farther than ``threshold`` from the median border colour."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]], axis=0)
    bg = np.median(border, axis=0)
    return (np.linalg.norm(rgb - bg, axis=-1) > threshold).astype(np.float32)


def _mask_from_remover(remover: Callable, img) -> np.ndarray:
    from PIL import Image

    out = remover(img)
    if isinstance(out, Image.Image):
        if out.mode in ("RGBA", "LA"):
            out = out.getchannel("A")
        arr = np.asarray(out.convert("L"), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float32)
        arr = np.squeeze(arr)
        if arr.size and arr.max() > 1.0:
            arr = arr / 255.0
    if arr.shape != (img.height, img.width):
        raise D3S2Error(f"background remover returned a mask of shape {arr.shape}, expected {(img.height, img.width)}")
    return np.clip(arr, 0.0, 1.0)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def preprocess_image(
    image: Any,
    size: int = RELEASE_SIZE,
    pad: int | None = None,
    background_remover: Callable | None = None,
    max_input_size: int = 2048,
    source: str | None = None,
    mode: str = "d3s2",
) -> torch.Tensor:
    """One image -> ``[4, size, size]`` float in [0, 1] (RGB composited on white + mask), see module docstring.

    ``pad``: margin after the first resize (default 16 px at 518, scaled with ``size``). ``background_remover``:
    ``f(PIL RGB image) -> PIL RGBA / L image or [H, W] mask``, used when the image has no usable alpha. ``mode``:
    ``"d3s2"`` or ``"release"`` framing."""
    if mode not in PREPROCESS_MODES:
        raise D3S2Error(f"preprocess mode must be one of {', '.join(PREPROCESS_MODES)}, got {mode!r}")
    name = source or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "image")
    img = load_image(image, max_input_size)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    rgb = arr[..., :3]
    mask = arr[..., 3] if arr.shape[-1] == 4 else None
    if mask is not None and mask.min() >= 1.0:  # fully opaque alpha carries no mask
        mask = None
    if mask is None:
        if background_remover is not None:
            mask = _mask_from_remover(background_remover, img.convert("RGB"))
        else:
            warnings.warn(f"{name}: no alpha channel; separating the object from the background by the border colour "
                          "(works on plain backgrounds only): pass an RGBA image or a background_remover",
                          stacklevel=2)
            mask = border_color_mask(rgb)
    if not (mask > 0).any():
        raise D3S2Error(f"{name}: the foreground mask is empty (alpha is 0 everywhere or no object found); "
                        "give an image with the object visible and a transparent or plain background")
    _warn_if_tiny(mask, name)
    if mode == "release":
        alpha = np.asarray(img.getchannel("A"), dtype=np.uint8) if img.mode == "RGBA" and arr[..., 3].min() < 1.0 \
            else (np.clip(mask, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        rgba = np.concatenate([np.asarray(img.convert("RGB"), dtype=np.uint8), alpha[..., None]], axis=-1)
        return release_frame(rgba, size, RELEASE_PAD if pad is None else pad)
    x = torch.from_numpy(np.concatenate([rgb, mask[..., None]], axis=-1)).permute(2, 0, 1).contiguous()
    return frame_object(x, size, pad)


def _warn_if_tiny(mask: np.ndarray, name: str) -> None:
    touched = mask > 0
    mass = float(mask.sum())
    mean = mass / max(int(touched.sum()), 1)
    if mass < MIN_OBJECT_PIXELS:
        rows, cols = np.nonzero(touched)
        box = f"{cols.max() - cols.min() + 1}x{rows.max() - rows.min() + 1}"
        warnings.warn(f"{name}: the object covers almost nothing ({mass:.1f} pixels of mask in a {box} box); the "
                      "mesh is a guess from a few pixels: give a larger image of the object", stacklevel=3)
    elif mean < MIN_OBJECT_ALPHA:
        warnings.warn(f"{name}: the object is almost transparent (mean alpha {mean:.3f} where the mask is not 0); "
                      "the mesh is a guess: give an image with an opaque object", stacklevel=3)


def release_frame(rgba: np.ndarray, size: int = RELEASE_SIZE, pad: int = RELEASE_PAD) -> torch.Tensor:
    """The release's framing of a uint8 RGBA array ``[H, W, 4]`` -> ``[4, size, size]`` (module docstring)."""
    from PIL import Image

    a = np.asarray(rgba)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 4:
        raise D3S2Error(f"release framing needs a uint8 RGBA array [H, W, 4], got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    fg = a[..., 3] > 0
    if fg.sum() >= h * w * 0.001:
        rows, cols = np.nonzero(fg)
        a = a[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    f = a / 255.0
    alpha = f[..., 3:]
    rgb = Image.fromarray(((f[..., :3] * alpha + (1 - alpha)) * 255).astype(np.uint8))
    mask = Image.fromarray((f[..., 3] * 255).astype(np.uint8))
    h, w = a.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2

    def padded(im, amount_lt, side_w, side_h, fill):
        out = Image.new(im.mode, (side_w, side_h), fill)
        out.paste(im, amount_lt)
        return out

    rgb, mask = padded(rgb, (left, top), side, side, (255, 255, 255)), padded(mask, (left, top), side, side, 0)
    rgb, mask = rgb.resize((size, size), Image.BILINEAR), mask.resize((size, size), Image.NEAREST)
    if pad > 0:
        big = size + 2 * pad
        rgb, mask = padded(rgb, (pad, pad), big, big, (255, 255, 255)), padded(mask, (pad, pad), big, big, 0)
        rgb, mask = rgb.resize((size, size), Image.BILINEAR), mask.resize((size, size), Image.NEAREST)
    out = np.concatenate([np.asarray(rgb, dtype=np.float32), np.asarray(mask, dtype=np.float32)[..., None]], -1)
    return torch.from_numpy(out / 255.0).permute(2, 0, 1).contiguous()


def frame_object(x: torch.Tensor, size: int, pad: int | None = None) -> torch.Tensor:
    """Straight RGB + mask ``[4, H, W]`` in [0, 1] -> the encoder's ``[4, size, size]``: crop to the mask's bounding
    box, composite on white, pad to a square, resize, pad ``pad`` px, resize again (module docstring).

    The one framing of every conditioning image: :func:`preprocess_image` (inference) and the DiT training tasks
    (:func:`d3s2.train.image_encoders.encoder_input`) both call it, so the encoder sees the same distribution in
    training and at inference. A mask with no foreground gives an all-white image with an empty mask."""
    if pad is None:
        pad = round(RELEASE_PAD * size / RELEASE_SIZE)
    x = x.float()
    rgb, mask = x[:3], x[3:4]
    rows, cols = torch.nonzero(mask[0].amax(1) > 0).flatten(), torch.nonzero(mask[0].amax(0) > 0).flatten()
    if len(rows) == 0:
        out = torch.zeros(4, size, size, device=x.device)
        out[:3] = 1.0
        return out
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    rgb, mask = rgb[:, y0:y1, x0:x1], mask[:, y0:y1, x0:x1]
    x = torch.cat([rgb * mask + (1.0 - mask), mask])  # composite on white
    h, w = x.shape[1:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    sq = torch.zeros(4, side, side, device=x.device)
    sq[:3] = 1.0
    sq[:, top:top + h, left:left + w] = x
    x = _resize(sq, size)
    if pad > 0:
        padded = torch.zeros(4, size + 2 * pad, size + 2 * pad, device=x.device)
        padded[:3] = 1.0
        padded[:, pad:pad + size, pad:pad + size] = x
        x = _resize(padded, size)
    return x.clamp_(0.0, 1.0)
