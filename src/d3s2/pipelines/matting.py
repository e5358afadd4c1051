"""Background removal for images without a usable alpha channel (release recipe step 1; issue 21).

The release cuts such images out with BiRefNet at 1024^2 (``ZhengPeng7/BiRefNet``, loaded through transformers with
``trust_remote_code``). d3s2 runs the same network from its ONNX export (``onnx-community/BiRefNet-ONNX``,
``onnx/model.onnx``, about 0.97 GB, fetched once into the Hugging Face cache by :mod:`d3s2.pipelines.hub`) with
onnxruntime (extra ``matting``): an ONNX graph, no code from the hub. Pre- and post-processing follow the release: RGB
resized to 1024 x 1024 (bilinear), scaled to [0, 1], ImageNet mean / std; the last output's sigmoid, quantised to 8 bit
(the release goes through a PIL image) and resized back to the image size (bicubic).

Methods (``matting=`` of :class:`~d3s2.pipelines.image_to_3d.ImageTo3DPipeline`, ``--matting`` of ``d3s2 generate``
and ``d3s2 serve``); they apply only where the image has no usable alpha (none, or fully opaque):

- ``birefnet``: the model above. onnxruntime's CUDA provider when the pipeline runs on CUDA and ``onnxruntime-gpu``
  is installed, else the CPU. A missing onnxruntime or model is an error.
- ``border``: the median border colour is the background (:func:`~d3s2.pipelines.preprocess.border_color_mask`);
  plain backgrounds only.
- ``none``: the whole image is the object (a mask of ones), as the release does for a 3-channel array.
- ``None`` (default): ``birefnet`` when onnxruntime is installed, else ``border`` with a warning; when the model cannot
  be had (offline and not cached, hub unreachable) ``border`` with a warning that says why.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from pathlib import Path

import numpy as np

from d3s2.errors import D3S2Error

__all__ = ["MATTING_METHODS", "BIREFNET_REPO", "BIREFNET_FILE", "BIREFNET_SIZE", "matting_available",
           "background_remover_for", "BiRefNetMatting", "BorderMatting", "NoMatting"]

MATTING_METHODS = ("birefnet", "border", "none")
BIREFNET_REPO = "onnx-community/BiRefNet-ONNX"
BIREFNET_FILE = "onnx/model.onnx"
BIREFNET_SIZE = 1024
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
_INSTALL = "pip install 'd3s2[matting]'"


def matting_available() -> bool:
    """True when onnxruntime (the ``matting`` extra) is installed."""
    return importlib.util.find_spec("onnxruntime") is not None


def _border_warning(reason: str) -> str:
    return (f"no alpha channel; separating the object from the background by the border colour (plain backgrounds "
            f"only) because {reason}; pass an RGBA image for the best result")


class BorderMatting:
    """``f(PIL RGB) -> [H, W]`` border-colour mask; with ``warning`` set, warns with it on every call."""

    method = "border"

    def __init__(self, warning: str | None = None) -> None:
        self.warning = warning

    def __call__(self, img) -> np.ndarray:
        from d3s2.pipelines.preprocess import border_color_mask

        if self.warning:
            warnings.warn(self.warning, stacklevel=2)
        return border_color_mask(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


class NoMatting:
    """``f(PIL RGB) -> [H, W]`` ones: the whole image is the object."""

    method = "none"

    def __call__(self, img) -> np.ndarray:
        return np.ones((img.height, img.width), np.float32)


class BiRefNetMatting:
    """BiRefNet through onnxruntime (module docstring). The session is created on the first image that needs it.

    ``model_path``: a local ``.onnx`` file (else ``repo_id`` / ``filename`` / ``revision`` on the hub);
    ``device``: the pipeline's device (CUDA provider when it is CUDA and available); ``fallback``: on a missing
    model, warn and use the border colour instead of raising (the default method's behaviour)."""

    def __init__(self, model_path: str | Path | None = None, *, repo_id: str = BIREFNET_REPO,
                 filename: str = BIREFNET_FILE, revision: str | None = None, device=None,
                 local_files_only: bool | None = None, fallback: bool = False) -> None:
        self.model_path = Path(model_path) if model_path is not None else None
        self.repo_id, self.filename, self.revision = repo_id, filename, revision
        self.device = device
        self.local_files_only = local_files_only
        self.fallback = fallback
        self._session = None
        self._unavailable: str | None = None  # fallback mode: why the model could not be had (asked once)
        self._lock = threading.Lock()

    @property
    def method(self) -> str:
        """``"birefnet"``, or ``"border"`` once the fallback found the model unavailable."""
        return "border" if self._unavailable is not None else "birefnet"

    def _providers(self, ort) -> list[str]:
        on_cuda = self.device is not None and str(self.device).startswith("cuda")
        if on_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def session(self):
        """The onnxruntime session (created once; D3S2Error when onnxruntime or the model is missing)."""
        with self._lock:
            if self._session is None:
                try:
                    import onnxruntime as ort
                except ImportError as exc:
                    raise D3S2Error(f"BiRefNet matting needs onnxruntime: {_INSTALL} (or onnxruntime-gpu), or use "
                                    "--matting border") from exc
                path = self.model_path
                if path is None:
                    from d3s2.pipelines.hub import HubError, fetch_file

                    try:
                        path = fetch_file(self.repo_id, self.filename, revision=self.revision,
                                          local_files_only=self.local_files_only, where="BiRefNet matting model")
                    except HubError as exc:
                        raise D3S2Error(f"{exc}; the model ({self.repo_id}, {self.filename}, about 0.97 GB) is "
                                        "downloaded once when online, or use --matting border") from exc
                elif not path.is_file():
                    raise D3S2Error(f"BiRefNet matting model not found: {path}")
                try:
                    self._session = ort.InferenceSession(str(path), providers=self._providers(ort))
                except Exception as exc:  # onnxruntime raises its own types on a corrupt or foreign file
                    raise D3S2Error(f"{path}: onnxruntime cannot load the matting model "
                                    f"({' '.join(str(exc).split())[:200]})") from exc
            return self._session

    def predict(self, img) -> np.ndarray:
        """``[H, W]`` mask in [0, 1] of a PIL image (module docstring)."""
        from PIL import Image

        sess = self.session()
        rgb = img.convert("RGB")
        x = np.asarray(rgb.resize((BIREFNET_SIZE, BIREFNET_SIZE), Image.BILINEAR), dtype=np.float32) / 255.0
        x = ((x - _MEAN) / _STD).transpose(2, 0, 1)[None]
        inp = sess.get_inputs()[0]
        x = x.astype(np.float16 if "float16" in inp.type else np.float32)
        out = np.asarray(sess.run(None, {inp.name: x})[-1], dtype=np.float32)  # the release takes the last output
        if out.ndim < 2 or out.size != out.shape[-1] * out.shape[-2]:
            raise D3S2Error(f"matting model output has shape {out.shape}, expected one [H, W] map")
        out = out.reshape(out.shape[-2:])
        # exports differ: most end with logits (as the PyTorch model), some include the sigmoid
        prob = out if (out.min() >= 0.0 and out.max() <= 1.0) else 1.0 / (1.0 + np.exp(-out))
        mask = Image.fromarray((prob * 255.0).astype(np.uint8)).resize(rgb.size, Image.BICUBIC)
        return np.asarray(mask, dtype=np.float32) / 255.0

    def __call__(self, img) -> np.ndarray:
        if self.fallback and self._unavailable is None and self._session is None:
            try:
                self.session()
            except D3S2Error as exc:
                self._unavailable = str(exc)
        if self.fallback and self._unavailable is not None:
            warnings.warn(_border_warning(f"the matting model is not available ({self._unavailable})"), stacklevel=2)
            return BorderMatting()(img)
        return self.predict(img)


def background_remover_for(matting: str | None = None, *, device=None, local_files_only: bool | None = None):
    """The callable for a ``matting`` method (module docstring); checked here, before any model is loaded."""
    if matting is None:
        if not matting_available():
            return BorderMatting(_border_warning(f"the matting model is not installed ({_INSTALL})"))
        return BiRefNetMatting(device=device, local_files_only=local_files_only, fallback=True)
    if matting not in MATTING_METHODS:
        raise D3S2Error(f"matting must be one of {', '.join(MATTING_METHODS)}, got {matting!r}")
    if matting == "border":
        return BorderMatting()
    if matting == "none":
        return NoMatting()
    if not matting_available():
        raise D3S2Error(f"matting 'birefnet' needs onnxruntime: {_INSTALL} (or onnxruntime-gpu), or use matting "
                        "'border'")
    return BiRefNetMatting(device=device, local_files_only=local_files_only)
