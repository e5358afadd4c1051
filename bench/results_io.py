"""Writing a benchmark's JSON result, shared by the bench scripts (imported as the top-level module ``results_io``,
like ``timing``): all at once through a temporary file and a rename, so an interrupted run never leaves half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_json"]


def write_json(path: str | Path, doc: Any, text: str | None = None) -> Path:
    """Writes ``doc`` as indented JSON (or ``text`` as is) to ``path``, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) if text is None else text)
    os.replace(tmp, path)
    return path
