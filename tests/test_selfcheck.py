import pytest

from d3s2.cli import main
from d3s2.errors import D3S2Error
from d3s2.selfcheck import run_selfcheck


def test_selfcheck_runs_on_the_duck(capsys):
    assert main(["selfcheck", "--resolution", "32", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "selfcheck passed" in text
    assert "[ok] conv k3 s1 == dense conv3d" in text and "FAIL" not in text
    assert "voxels" in text and "blocks" in text


def test_selfcheck_bf16_and_bad_options(capsys):
    lines = []
    assert run_selfcheck(resolution=16, device="cpu", dtype="bfloat16", out=lines.append)
    assert any("k2 s2" in line for line in lines)
    assert main(["selfcheck", "--resolution", "4"]) == 2
    assert "--resolution" in capsys.readouterr().err
    with pytest.raises(D3S2Error, match="not found in pybullet_data"):
        run_selfcheck(resolution=16, mesh_name="no_such_mesh.obj", device="cpu", out=lambda s: None)
