"""Issue 22 (hardening) for ``d3s2 prepare``: global settings checked before the first mesh, a run where every item
failed exits 1, stale temporary files of a killed run are cleaned on resume, failed items leave no empty folders."""

from __future__ import annotations

import pytest

pytest.importorskip("trimesh")
pytest.importorskip("igl")

from d3s2.cli import main  # noqa: E402
from d3s2.data.prepare import PrepareConfig, run_prepare  # noqa: E402
from d3s2.data.prepare_discovery import item_id_for  # noqa: E402

CFG = PrepareConfig(resolutions=(16,), views=1, image_size=16, supersample=1, tau=1 / 16)


@pytest.fixture
def corpus(tmp_path):
    import trimesh

    root = tmp_path / "meshes"
    root.mkdir()
    trimesh.creation.icosphere(subdivisions=1, radius=0.8).export(root / "ball.obj")
    return root


@pytest.mark.parametrize("flags, needle", [
    (["--image-size", "0"], "--image-size must be an integer in [2, 8192], got 0"),
    (["--image-size", "-5"], "--image-size must be"),
    (["--supersample", "0"], "--supersample must be an integer in [1, 16]"),
    (["--tau", "0"], "--tau must be a band half-width in (0, 1]"),
    (["--tau", "-1"], "--tau must be"),
    (["--tau", "nan"], "--tau must be"),
    (["--views", "-1"], "--views must be an integer in [0, 10000], got -1"),
    (["--sharp-angle", "400"], "--sharp-angle must be an angle"),
    (["--resolutions", "0"], "--resolutions must be"),
    (["--workers", "0"], "--workers must be an integer >= 1"),
])
def test_bad_settings_are_refused_before_the_first_mesh(corpus, tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    assert main(["prepare", str(corpus), str(out), "--resolutions", "16", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_a_run_where_every_item_failed_exits_1(tmp_path, capsys):
    root = tmp_path / "meshes"
    root.mkdir()
    (root / "empty.obj").write_text("")
    (root / "junk.glb").write_bytes(b"\x01" * 300)
    rc = main(["prepare", str(root), str(tmp_path / "out"), "--resolutions", "16", "--views", "0", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "0 done, 0 skipped, 2 failed" in cap.out and "every item failed" in cap.err


def test_failed_items_leave_no_empty_folder(corpus, tmp_path, monkeypatch):
    from d3s2.data import sdf

    def broken(*a, **k):
        raise RuntimeError("simulated SDF failure")

    monkeypatch.setattr(sdf, "mesh_to_sparse_sdf", broken)
    out = tmp_path / "out"
    s = run_prepare(corpus, out, CFG, progress=False)
    assert s.failed == 1 and "simulated SDF failure" in s.failed_items[0]["reason"]
    assert not (out / item_id_for("ball.obj")).exists()


def test_a_failed_render_keeps_the_reusable_sdf(corpus, tmp_path, monkeypatch):
    from d3s2.data import prepare_item

    def broken(*a, **k):
        raise RuntimeError("simulated render failure")

    monkeypatch.setattr(prepare_item, "_render_item", broken)
    out = tmp_path / "out"
    assert run_prepare(corpus, out, CFG, progress=False).failed == 1
    item = out / item_id_for("ball.obj")
    assert sorted(p.name for p in item.iterdir()) == ["sdf_16.npz"]  # kept: the rerun reuses it


def test_stale_temp_files_of_a_killed_run_are_removed_on_resume(corpus, tmp_path):
    out = tmp_path / "out"
    assert run_prepare(corpus, out, CFG, progress=False).done == 1
    item = out / item_id_for("ball.obj")
    (item / "done").unlink()  # as if killed during the render write
    stale = [item / "renders" / ".000.png.k2j3h4.tmp", item / ".sdf_16.npz.abc123.tmp"]
    for p in stale:
        p.write_bytes(b"")
    s = run_prepare(corpus, out, CFG, progress=False)
    assert s.done == 1
    assert not any(p.exists() for p in stale)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("sign", ["parts", "pseudonormal"])
def test_every_sign_method_the_cli_offers_is_accepted(sign):
    from dataclasses import replace

    from d3s2.data.prepare_checks import check_prepare_config

    check_prepare_config(replace(CFG, sign=sign))  # refused before: the check knew only auto / winding / shell
    with pytest.raises(Exception, match="--sign must be auto, parts, winding, pseudonormal or shell"):
        check_prepare_config(replace(CFG, sign="nope"))
