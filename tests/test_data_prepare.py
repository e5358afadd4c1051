"""`d3s2 prepare` / `prepare-merge`: outputs, bad inputs, resume, shards, manifest merge, exit codes."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pybullet_data = pytest.importorskip("pybullet_data")
pytest.importorskip("trimesh")
pytest.importorskip("igl")
from PIL import Image  # noqa: E402

from d3s2.cli import main  # noqa: E402
from d3s2.data import manifest as mf  # noqa: E402
from d3s2.data.prepare import PrepareConfig, run_prepare  # noqa: E402
from d3s2.data.prepare_discovery import discover_meshes, item_id_for, parse_shard, shard_of  # noqa: E402
from d3s2.data.sparse_sdf import load_sparse_sdf  # noqa: E402
from d3s2.errors import D3S2Error  # noqa: E402

GOOD = {"duck_vhacd.obj", "sub/duck.obj"}
BAD = {"junk.glb": "not a readable mesh", "empty.obj": "empty", "cloud.ply": "point cloud", "nanv.obj": "NaN"}
CFG = PrepareConfig(resolutions=(32,), views=2, image_size=32, supersample=1)


@pytest.fixture
def corpus(tmp_path):
    src = Path(pybullet_data.getDataPath())
    root = tmp_path / "meshes"
    (root / "sub").mkdir(parents=True)
    shutil.copy(src / "duck_vhacd.obj", root / "duck_vhacd.obj")
    for name in ("duck.obj", "duck.mtl", "duckCM.png"):  # textured OBJ with its material and texture
        shutil.copy(src / name, root / "sub" / name)
    (root / "readme.txt").write_text("not a mesh and not picked up")
    (root / "junk.glb").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "empty.obj").write_text("")
    (root / "cloud.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
        "0 0 0\n1 0 0\n0 1 0\n"
    )
    (root / "nanv.obj").write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n")
    (root / ".hidden").mkdir()
    shutil.copy(src / "duck_vhacd.obj", root / ".hidden" / "skip.obj")
    return root


def _manifest(path):
    return {r["source"]: r for r in mf.read_jsonl(path)}


def test_prepare_outputs_failures_and_resume(corpus, tmp_path):
    out = tmp_path / "out"
    s = run_prepare(corpus, out, CFG, progress=False)
    assert (s.selected, s.done, s.skipped, s.failed) == (6, 2, 0, 4)

    man = _manifest(out / "manifest.jsonl")
    assert set(man) == GOOD
    for rel, rec in man.items():
        item = out / rec["path"]
        assert item.name == item_id_for(rel) and (item / "done").is_file()
        sdf = load_sparse_sdf(item / rec["sdf"]["32"]["file"])
        assert sdf.resolution == 32 and sdf.coords.dtype == np.int16 and len(sdf) == rec["sdf"]["32"]["voxels"] > 0
        assert np.abs(sdf.sdf.astype(np.float32)).max() < CFG.tau + 1e-3
        assert sdf.scale == pytest.approx(rec["scale"])
        # the sign method auto settled on and the voxels the winding number decided (issue 25)
        assert rec["sdf"]["32"]["sign_method"] == "parts" and 0 <= rec["sdf"]["32"]["winding_voxels"] <= len(sdf)
        cams = json.loads((item / "cameras.json").read_text())
        assert len(cams["views"]) == 2
        for v in cams["views"]:
            img = np.asarray(Image.open(item / v["file"]))
            assert img.shape == (32, 32, 4)
            assert 0 < (img[..., 3] > 0).mean() < 1  # object visible, background transparent
            assert 10 <= v["elevation_deg"] <= 40 and 0 <= v["azimuth_deg"] <= 180 and 30 <= v["focal_mm"] <= 100
            assert np.array(v["intrinsics"]).shape == (3, 3) and np.array(v["c2w"]).shape == (4, 4)
    # the textured duck is coloured (yellow body), the plain duck hull grey
    duck = out / man["sub/duck.obj"]["path"]
    img = np.asarray(Image.open(duck / "renders/000.png")).astype(int)
    body = img[img[..., 3] == 255]
    assert (body[:, 0] - body[:, 2]).mean() > 50

    fails = {r["source"]: r for r in mf.read_jsonl(out / "failures.jsonl")}
    assert set(fails) == set(BAD)
    for rel, word in BAD.items():
        assert word.lower() in fails[rel]["reason"].lower(), fails[rel]
        assert fails[rel]["stage"] == "load"
    assert not any(p.name.startswith(".tmp") or p.suffix == ".tmp" for p in out.rglob("*"))

    # rerun: finished items are skipped (untouched), bad ones are retried and fail again
    marker = out / man["duck_vhacd.obj"]["path"] / "done"
    before = marker.stat().st_mtime_ns
    s2 = run_prepare(corpus, out, CFG, progress=False)
    assert (s2.done, s2.skipped, s2.failed) == (0, 2, 4)
    assert marker.stat().st_mtime_ns == before
    assert len(mf.read_jsonl(out / "failures.jsonl")) == 4  # deduplicated after the rerun

    # interrupted item: complete files are reused, missing ones are redone
    item = out / man["sub/duck.obj"]["path"]
    (item / "done").unlink()
    (item / "renders/001.png").unlink()
    sdf_mtime = (item / "sdf_32.npz").stat().st_mtime_ns
    s3 = run_prepare(corpus, out, CFG, progress=False)
    assert (s3.done, s3.skipped) == (1, 1)
    assert (item / "renders/001.png").is_file() and (item / "done").is_file()
    assert (item / "sdf_32.npz").stat().st_mtime_ns == sdf_mtime

    # more views asked: the item is not finished for these settings
    s4 = run_prepare(
        corpus, out, PrepareConfig(resolutions=(32,), views=3, image_size=32, supersample=1), progress=False
    )
    assert s4.done == 2 and len(list((item / "renders").glob("*.png"))) == 3


def test_shards_partition_and_merge(corpus, tmp_path):
    cfg = PrepareConfig(resolutions=(32,), views=1, image_size=16, supersample=1)
    outs = [tmp_path / "a", tmp_path / "b"]
    seen = []
    for i, out in enumerate(outs):
        s = run_prepare(corpus, out, cfg, shard=(i, 2), progress=False)
        assert s.selected == sum(shard_of(f, 2) == i for f in discover_meshes(corpus))
        assert not (out / "manifest.jsonl").exists()  # shards write their own files; merge joins them
        seen += [r["source"] for r in mf.read_jsonl(mf.manifest_path(out, (i, 2)))]
        seen += [r["source"] for r in mf.read_jsonl(mf.failures_path(out, (i, 2)))]
    assert sorted(seen) == sorted(GOOD | set(BAD))  # every mesh in exactly one shard

    merged = tmp_path / "merged"
    assert main(["prepare-merge", str(outs[0]), str(outs[1]), "--output", str(merged)]) == 0
    man = mf.read_jsonl(merged / "manifest.jsonl")
    assert sorted(r["source"] for r in man) == sorted(GOOD)
    assert [r["item_id"] for r in man] == sorted(r["item_id"] for r in man)
    for r in man:
        assert (merged / r["path"] / "done").is_file()
    assert sorted(r["source"] for r in mf.read_jsonl(merged / "failures.jsonl")) == sorted(BAD)

    names = [f"obj/{i}/m.obj" for i in range(4000)]
    counts = np.bincount([shard_of(n, 4) for n in names], minlength=4)
    assert counts.sum() == 4000 and counts.min() > 850  # a partition, and balanced
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(D3S2Error):
            parse_shard(bad)


def test_discovery_is_sorted_recursive_and_filtered(corpus):
    (corpus / "UPPER.OBJ").write_text("v 0 0 0\n")
    files = discover_meshes(corpus)
    assert files == sorted(files)
    assert set(files) == GOOD | set(BAD) | {"UPPER.OBJ"}
    assert discover_meshes(corpus, "*.obj") == ["duck_vhacd.obj", "empty.obj", "nanv.obj", "sub/duck.obj"]
    assert discover_meshes(corpus, "sub/*") == ["sub/duck.mtl", "sub/duck.obj", "sub/duckCM.png"]


def test_cli_exit_codes(corpus, tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert main(["prepare", str(empty), str(tmp_path / "o1")]) == 2
    assert "no mesh files" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["prepare", str(corpus), str(blocker / "out"), "--resolutions", "32", "--views", "0"]) == 2
    assert "not writable" in capsys.readouterr().err
    assert main(["prepare", str(corpus), str(tmp_path / "o2"), "--shard", "2/2"]) == 2
    # failed items do not fail the run; the summary line reports them
    rc = main(["prepare", str(corpus), str(tmp_path / "o3"), "--resolutions", "32", "--views", "0", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0
    assert "2 done, 0 skipped, 4 failed" in out.out
    assert "cloud.ply" in out.err


def test_workers_process_pool(corpus, tmp_path):
    out = tmp_path / "out"
    cfg = PrepareConfig(resolutions=(32,), views=1, image_size=16, supersample=1)
    s = run_prepare(corpus, out, cfg, workers=2, progress=False)
    assert (s.done, s.failed) == (2, 4)
    assert set(_manifest(out / "manifest.jsonl")) == GOOD
    # same outputs as the in-process path
    ref = tmp_path / "ref"
    run_prepare(corpus, ref, cfg, workers=1, progress=False)
    for rel in GOOD:
        a = load_sparse_sdf(out / item_id_for(rel) / "sdf_32.npz")
        b = load_sparse_sdf(ref / item_id_for(rel) / "sdf_32.npz")
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.sdf, b.sdf)
        ia = np.asarray(Image.open(out / item_id_for(rel) / "renders/000.png"))
        ib = np.asarray(Image.open(ref / item_id_for(rel) / "renders/000.png"))
        np.testing.assert_array_equal(ia, ib)
    assert os.path.isfile(out / "failures.jsonl")
