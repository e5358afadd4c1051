"""README.md's "Quick start (Python)" runs as written (issue 23, item 7): the bundled demo model on a bundled example
image, the mesh written to the current folder and its report printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Quick start (Python)"


def quickstart_code(text: str) -> str:
    """The first ```python block of the README's quick-start section (from its heading to the next ``## ``)."""
    start = text.index(f"\n{HEADING}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    match = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
    assert match, f"README.md: no python code block under {HEADING!r}"
    return match.group(1)


def test_quickstart_block_is_found():
    code = quickstart_code(README.read_text(encoding="utf-8"))
    assert "from d3s2 import ImageTo3DPipeline" in code and "save_mesh(" in code


@pytest.mark.slow  # about 25 s on a 2-core CPU (10 + 10 sampler steps of the demo model)
def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    from d3s2.pipelines.bundled import bundled_model_path

    if bundled_model_path() is None:
        pytest.skip("this checkout has no bundled demo model (src/d3s2/assets/demo)")
    pytest.importorskip("trimesh")
    code = quickstart_code(README.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{README}:{HEADING}", "exec"), {"__name__": "__readme__"})
    written = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".glb", ".obj", ".ply", ".stl"))
    assert written == ["blocks.glb"] and (tmp_path / "blocks.glb").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "'closed'" in printed and "'faces'" in printed  # the mesh report
