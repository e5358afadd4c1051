"""bench/refiners.py --tiny and bench/parity/refiner_run_rows.py --smoke on the CPU: both write their JSON and find the
lean refiner runs equal to the dense reference (field and mesh)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, *parts):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, *parts))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_refiners_tiny_writes_checks(tmp_path):
    bench = _load("bench_refiners", "bench", "refiners.py")
    out = tmp_path / "r.json"
    assert bench.main(["--device", "cpu", "--tiny", "--stages", "1024", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (r,) = doc["rows"]
    assert doc["tiny"] and doc["commit"] and r["stage"] == "refiner_1024"
    assert r["max_abs_diff_explicit"] == 0.0 and r["sign_mismatch_off_band"] == 0 and r["mesh"]["same"]
    assert r["mesh"]["faces_lean"] > 0


def test_parity_refiner_run_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench", "parity"))
    try:
        rows = _load("refiner_run_rows", "bench", "parity", "refiner_run_rows.py")
        assert rows.main(["--smoke", "--device", "cpu", "--rows", "refiner_1024_run", "--out", str(tmp_path)]) == 0
    finally:
        sys.path.remove(os.path.join(ROOT, "bench", "parity"))
    (r,) = json.loads((tmp_path / "parity-refiner-run-cpu-smoke.json").read_text())["rows"]
    assert r["ok"] and r["mesh_ok"] and r["faces_ours"] == r["faces_theirs"] > 0
