"""The Hugging Face hub settings of the environment, read when a download is asked for (never at import).

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when it is first
imported; d3s2 reads them at each call and passes them to it explicitly (``endpoint=``, ``cache_dir=``,
``local_files_only=``), so that a setting changed after the import (a test, a notebook) is honoured and every d3s2
download uses the same cache as the lookup that follows it. The defaults are the hub's own (``https://huggingface.co``,
``~/.cache/huggingface/hub``). Kept below :mod:`d3s2.models` so that the DINOv2 loader finds what
:mod:`d3s2.pipelines.hub` downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HubSettings", "hub_settings", "hub_cache_dir", "hub_offline"]

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache`` by default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expanduser(xdg)) / "huggingface" / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to 1 / on / yes / true."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


@dataclass(frozen=True)
class HubSettings:
    endpoint: str
    cache_dir: Path
    local_files_only: bool

    def tree_url(self, repo_id: str, revision: str | None, subfolder: str | None) -> str:
        """The web page listing a repo folder (where a user downloads the files by hand)."""
        url = f"{self.endpoint}/{repo_id}/tree/{revision or 'main'}"
        return f"{url}/{subfolder}" if subfolder else url


def hub_settings(local_files_only: bool | None = None) -> HubSettings:
    """The settings for one download: ``local_files_only=None`` follows ``HF_HUB_OFFLINE``."""
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    offline = hub_offline() if local_files_only is None else bool(local_files_only)
    return HubSettings(endpoint, hub_cache_dir(), offline)
