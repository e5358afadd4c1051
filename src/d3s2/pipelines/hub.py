"""Weights from the Hugging Face hub (issue 21): the authors' release, d3s2-format repos, DINOv2, the matting model.

Hub ids (:func:`parse_hub_id`):

- ``wushuang98/Direct3D-S2`` (the release's default subfolder ``direct3d-s2-v-1-1``) or
  ``wushuang98/Direct3D-S2/direct3d-s2-v-1-0``: the authors' release layout (shared/reference/official-release.md),
  read by :mod:`d3s2.pipelines.official`.
- ``owner/name`` or ``owner/name/sub/folder``: a repo (folder) holding ``pipeline.yaml`` and one ``.safetensors`` per
  model (:meth:`~d3s2.pipelines.image_to_3d.ImageTo3DPipeline.save_pretrained`). A repo with no ``pipeline.yaml``
  but ``<subfolder>/config.yaml`` (a mirror of the release) is read as the release.

Only what the requested resolution needs is fetched (:func:`release_files`; for d3s2 repos the ``*_1024`` components
are skipped at 512). Every file goes through ``huggingface_hub.hf_hub_download`` into the standard cache, with its
progress bar. The first file fixes the commit that ``revision`` (default ``main``) names and the others are asked
for by that commit, so a branch that moves during a download cannot mix two versions, and a cached file is never
fetched again: a second run makes one metadata request and no content request. ``hf_hub_download`` writes each
file under a temporary name and renames it when complete, so an interrupted download leaves nothing in the cache.
``HF_ENDPOINT``, ``HF_HUB_CACHE`` / ``HF_HOME`` and ``HF_HUB_OFFLINE`` are read at each call
(:mod:`d3s2.hub_settings`); ``local_files_only=True`` (or ``HF_HUB_OFFLINE=1``) never touches the network. Nothing
from the hub is executed: checkpoints are read with ``torch.load(weights_only=True)`` or safetensors, the matting
model is an ONNX graph.

The release does not ship the DINOv2 ViT-L/14-reg encoder (its code loads ``dinov2_vitl14_reg`` through torch hub);
:func:`fetch_dinov2_weights` downloads timm's copy of the same weights (``timm/vit_large_patch14_reg4_dinov2.lvd142m``,
``model.safetensors``, read by :func:`d3s2.models.image_encoder.load_dinov2_weights`), once, when no cached copy is
found.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from d3s2.errors import D3S2Error
from d3s2.hub_settings import HubSettings, hub_settings

__all__ = ["RELEASE_REPO", "RELEASE_SUBFOLDER", "HubId", "HubError", "HubWeights", "parse_hub_id", "release_files",
           "fetch_weights", "fetch_release", "fetch_d3s2", "fetch_dinov2_weights", "fetch_file"]

RELEASE_REPO = "wushuang98/Direct3D-S2"
RELEASE_SUBFOLDER = "direct3d-s2-v-1-1"  # the release's default version
RELEASE_FILES_512 = ("config.yaml", "model_dense.ckpt", "model_sparse_512.ckpt", "model_refiner.ckpt")
RELEASE_FILES_1024 = ("model_sparse_1024.ckpt", "model_refiner_1024.ckpt")
DINOV2_FILE = "model.safetensors"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


@dataclass(frozen=True)
class HubId:
    repo_id: str
    subfolder: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.subfolder}" if self.subfolder else self.repo_id

    @property
    def is_release(self) -> bool:
        return self.repo_id.lower() == RELEASE_REPO.lower()


@dataclass(frozen=True)
class HubWeights:
    """A downloaded hub id: ``kind`` is ``"d3s2"`` (``pipeline.yaml``) or ``"release"`` (``config.yaml`` + ckpts)."""

    kind: str
    folder: Path
    commit: str


class HubError(D3S2Error):
    """A download that did not happen. ``kind``: offline, unreachable, repo, revision, entry or download;
    ``detail``: the message without the leading ``where:``; ``filename``: the file asked for."""

    def __init__(self, where: str, detail: str, kind: str, filename: str | None = None) -> None:
        super().__init__(f"{where}: {detail}")
        self.detail, self.kind, self.filename = detail, kind, filename


def parse_hub_id(value) -> HubId | None:
    """``owner/name[/sub/folder]`` -> :class:`HubId`; None for anything that can only be a local path (absolute,
    ``./``, ``~``, backslashes, a single name) or an existing folder."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    text = os.fspath(value)
    if not text or text.startswith(("/", ".", "~")) or "\\" in text or ":" in text or os.path.isdir(text):
        return None
    parts = text.rstrip("/").split("/")
    if len(parts) < 2 or not all(_NAME.match(p) and ".." not in p for p in parts):
        return None
    return HubId("/".join(parts[:2]), "/".join(parts[2:]) or None)


def release_files(resolution: int | None = None) -> tuple[str, ...]:
    """Files of a release folder that a run at ``resolution`` needs (None: all of them)."""
    if resolution not in (None, 512, 1024):
        raise D3S2Error(f"resolution must be 512 or 1024, got {resolution!r}")
    return RELEASE_FILES_512 if resolution == 512 else RELEASE_FILES_512 + RELEASE_FILES_1024


# ------------------------------------------------------------------------------------------------- one file
def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while seen.__cause__ is not None or (seen.__context__ is not None and not seen.__suppress_context__):
        seen = seen.__cause__ or seen.__context__
    return seen


def _download(s: HubSettings, repo_id: str, filename: str, revision: str | None, where: str) -> Path:
    """``hf_hub_download`` with the call-time settings; failures become a :class:`HubError` of one line."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hf_errors
    except ImportError as exc:
        raise D3S2Error(f"{where}: downloading from the hub needs huggingface_hub (pip install huggingface_hub)") \
            from exc
    from d3s2 import __version__

    def fail(detail: str, kind: str) -> HubError:
        return HubError(where, detail, kind, filename)

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=s.cache_dir, endpoint=s.endpoint,
                                    local_files_only=s.local_files_only, library_name="d3s2",
                                    library_version=__version__))
    except hf_errors.GatedRepoError as exc:
        raise fail(f"{s.endpoint}/{repo_id} is gated: accept its terms on the hub and log in (hf auth login)",
                   "repo") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise fail(f"not a local folder, and the hub has no model repo {repo_id} ({s.endpoint}; a private repo "
                   "needs hf auth login)", "repo") from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise fail(f"revision {revision!r} not found in {repo_id} (give a branch, tag or commit of "
                   f"{s.endpoint}/{repo_id})", "revision") from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        cause = _root_cause(exc)
        if s.local_files_only or isinstance(cause, hf_errors.OfflineModeIsEnabled):
            raise fail(f"{repo_id}/{filename} is not in the Hugging Face cache ({s.cache_dir}) and downloads are off "
                       "(HF_HUB_OFFLINE=1 or local_files_only)", "offline") from exc
        raise fail(f"cannot reach the hub at {s.endpoint} ({_short(cause)})", "unreachable") from exc
    except hf_errors.EntryNotFoundError as exc:
        raise fail(f"{repo_id} has no file {filename} at revision {revision or 'main'}", "entry") from exc
    except Exception as exc:  # connection dropped mid-file, size mismatch, disk full: nothing was kept
        raise fail(f"downloading {repo_id}/{filename} from {s.endpoint} failed ({_short(exc)}); nothing partial was "
                   "kept in the cache: run the command again", "download") from exc


def _commit_of(path: Path) -> str:
    """The commit a cached file belongs to (``.../snapshots/<commit>/<filename>``)."""
    parts = path.parts
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    return parts[i + 1]


def fetch_file(repo_id: str, filename: str, *, revision: str | None = None, local_files_only: bool | None = None,
               where: str | None = None) -> Path:
    """One file of a hub repo, cached (the matting model and DINOv2 come this way); :class:`HubError` on failure."""
    return _download(hub_settings(local_files_only), repo_id, filename, revision, where or repo_id)


def fetch_dinov2_weights(*, local_files_only: bool | None = None) -> Path:
    """timm's DINOv2 ViT-L/14-reg ``model.safetensors`` (1.2 GB), downloaded once into the Hugging Face cache."""
    from d3s2.models.image_encoder import HF_REPO

    return fetch_file(HF_REPO, DINOV2_FILE, local_files_only=local_files_only, where="DINOv2 ViT-L/14-reg")


# ------------------------------------------------------------------------------------------------- layouts
def _release_message(s: HubSettings, hid: HubId, sub: str, revision: str | None,
                     files: tuple[str, ...], err: HubError) -> str:
    url = s.tree_url(hid.repo_id, revision, sub)
    why = ("the authors' weights are not available offline" if err.kind == "offline" else
           f"the authors' weights are not in the cache and {err.detail}")
    note = "; the *_1024 files are only needed for --resolution 1024" if len(files) > len(RELEASE_FILES_512) else ""
    return (f"{why}; download {', '.join(files)} from {url} into one folder (e.g. ./{sub}/) and pass that folder"
            f"{note}")


def fetch_release(hid: HubId, *, revision: str | None = None, local_files_only: bool | None = None,
                  resolution: int | None = None, where: str | None = None) -> HubWeights:
    """The authors' release folder at ``resolution`` (plus the DINOv2 weights when no copy is cached)."""
    s = hub_settings(local_files_only)
    where = where or str(hid)
    sub = hid.subfolder or RELEASE_SUBFOLDER
    files = release_files(resolution)
    try:
        first = _download(s, hid.repo_id, f"{sub}/{files[0]}", revision, where)
        commit = _commit_of(first)
        for name in files[1:]:
            _download(s, hid.repo_id, f"{sub}/{name}", commit, where)
    except HubError as exc:
        if exc.kind in ("offline", "unreachable"):
            raise HubError(where, _release_message(s, hid, sub, revision, files, exc), exc.kind, exc.filename) \
                from None
        raise
    _ensure_dinov2(s)
    return HubWeights("release", first.parent, commit)


def _ensure_dinov2(s: HubSettings) -> None:
    from d3s2.models.image_encoder import find_dinov2_weights

    if find_dinov2_weights() is not None:
        return
    try:
        fetch_dinov2_weights(local_files_only=s.local_files_only)
    except D3S2Error:
        # not fatal here: encoder_weights= or image_encoder= may replace it; when the encoder needs the weights,
        # load_dinov2_weights says what to download and where
        pass


def _d3s2_weight_files(yaml_path: Path, resolution: int | None, where: str) -> list[str]:
    import yaml

    from d3s2.pipelines.folder_format import COMPONENTS, OPTIONAL_COMPONENTS, STAGE_1024_COMPONENTS

    try:
        data = yaml.safe_load(yaml_path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise D3S2Error(f"{where}: pipeline.yaml is not valid YAML") from exc
    comps = data.get("components") if isinstance(data, dict) else None
    if not isinstance(comps, dict):
        raise D3S2Error(f"{where}: pipeline.yaml has no components: not a d3s2 pipeline")
    names = [n for n in (*COMPONENTS, *OPTIONAL_COMPONENTS) if n == "image_encoder" or n in comps]
    if resolution == 512:
        names = [n for n in names if n not in STAGE_1024_COMPONENTS]
    return [f"{n}.safetensors" for n in names]


def fetch_d3s2(hid: HubId, *, revision: str | None = None, local_files_only: bool | None = None,
               resolution: int | None = None, where: str | None = None) -> HubWeights:
    """A d3s2-format repo folder: ``pipeline.yaml`` and the ``.safetensors`` files ``resolution`` needs."""
    release_files(resolution)  # checks the value before any download
    s = hub_settings(local_files_only)
    where = where or str(hid)
    prefix = f"{hid.subfolder}/" if hid.subfolder else ""
    first = _download(s, hid.repo_id, f"{prefix}pipeline.yaml", revision, where)
    commit = _commit_of(first)
    files = _d3s2_weight_files(first, resolution, where)
    try:
        for name in files:
            _download(s, hid.repo_id, prefix + name, commit, where)
    except HubError as exc:
        if exc.kind in ("offline", "unreachable"):
            url = s.tree_url(hid.repo_id, revision, hid.subfolder)
            raise HubError(where, f"{exc.detail}; download pipeline.yaml and {', '.join(files)} from {url} into one "
                                  "folder and pass that folder", exc.kind, exc.filename) from None
        raise
    return HubWeights("d3s2", first.parent, commit)


def fetch_weights(path_or_id, *, revision: str | None = None, local_files_only: bool | None = None,
                  resolution: int | None = None) -> HubWeights:
    """Download (or find in the cache) what a hub id needs and return its local folder and layout.

    ``revision``: branch, tag or commit (default ``main``); ``local_files_only``: cache only (default: True when
    ``HF_HUB_OFFLINE=1``); ``resolution``: 512 or 1024 (None: every file)."""
    where = os.fspath(path_or_id)
    hid = parse_hub_id(path_or_id)
    if hid is None:
        raise D3S2Error(f"weights folder not found: {where}")
    kw = dict(revision=revision, local_files_only=local_files_only, resolution=resolution, where=where)
    if hid.is_release:
        return fetch_release(hid, **kw)
    try:
        return fetch_d3s2(hid, **kw)
    except HubError as exc:
        if exc.kind not in ("entry", "offline") or not (exc.filename or "").endswith("pipeline.yaml"):
            raise
        d3s2_kind = exc.kind
    try:  # no pipeline.yaml (or none cached): a mirror of the authors' release?
        return fetch_release(hid, **kw)
    except HubError as exc:
        if exc.kind not in ("entry", "offline") or not (exc.filename or "").endswith("config.yaml"):
            raise
        release_kind = exc.kind
    s = hub_settings(local_files_only)
    sub = hid.subfolder or RELEASE_SUBFOLDER
    prefix = f"{hid.subfolder}/" if hid.subfolder else ""
    if "offline" in (d3s2_kind, release_kind):
        raise HubError(where, f"not a local folder, and not available offline: neither {prefix}pipeline.yaml "
                              f"(d3s2) nor {sub}/config.yaml (the authors' layout) of {hid.repo_id} is in the Hugging "
                              f"Face cache ({s.cache_dir}); run once online, or download the files from "
                              f"{s.tree_url(hid.repo_id, revision, hid.subfolder)} into one folder and pass that "
                              "folder", "offline")
    raise HubError(where, f"{hid.repo_id} holds neither {prefix}pipeline.yaml (a d3s2 pipeline) nor {sub}/config.yaml "
                          "(the authors' release layout)", "entry")
