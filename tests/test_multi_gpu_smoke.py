"""bench/multi_gpu.py (issue 10): the log parsing, scaling and resume comparison that turn the trainer's per-rank
metrics files into the multi-GPU report (no training here: tests/test_train*.py run torchrun itself)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("multi_gpu", Path(__file__).resolve().parents[1] / "bench" /
                                               "multi_gpu.py")
mg = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mg)


def _write_rank_logs(d: Path, dts: list[float], tokens: list[list[int]], batch: int, mem: list[float]) -> None:
    """What the trainer writes with log.every 1 and log.all_ranks: per rank its own ``rank_tokens`` and ``interval_s``;
    ``samples_per_s`` / ``tokens_per_s`` are the job's (summed over ranks)."""
    world = len(tokens)
    for r in range(world):
        lines = []
        t = 1000.0
        for i, dt in enumerate(dts):
            t += dt
            lines.append({"kind": "train", "step": i + 1, "time": t, "loss": 2.0 - 0.1 * i,
                          "samples_per_s": batch * world / dt,
                          "tokens_per_s": sum(tk[i] for tk in tokens) / dt,
                          "rank_samples": batch, "rank_tokens": tokens[r][i], "interval_s": dt,
                          "gpu_mem_gb": mem[r] * (i + 1) / len(dts)})
        lines.append({"kind": "event", "step": len(dts), "event": "end", "weights": f"w{r}"})
        (d / f"metrics_rank{r}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "tr')
    main = [{"kind": "event", "step": 2, "event": "checkpoint", "dir": "step_00000002"},
            {"kind": "event", "step": 2, "event": "resume", "dir": "step_00000002"},
            {"kind": "event", "step": len(dts), "event": "end", "weights": "w0"}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in main))


def test_run_metrics_recovers_step_times_tokens_and_memory(tmp_path):
    dts = [9.0, 2.0, 1.0, 3.0, 2.0]
    tokens = [[100, 110, 120, 130, 140], [300, 90, 80, 70, 60]]
    _write_rank_logs(tmp_path, dts, tokens, batch=4, mem=[10.0, 12.5])
    m = mg.run_metrics(tmp_path, world=2, batch_size=4, warmup=2)
    assert m["steps_logged"] == 5 and m["window_steps"] == 3  # the truncated last line is ignored
    assert [p["seconds"] for p in m["per_step"]] == pytest.approx(dts)
    assert [p["tokens_per_rank"] for p in m["per_step"]] == [list(x) for x in zip(*tokens)]
    win_tokens = sum(tokens[0][2:]) + sum(tokens[1][2:])
    assert m["tokens_per_s"] == pytest.approx(win_tokens / 6.0)
    assert m["tokens_per_s_per_gpu"] == pytest.approx(win_tokens / 12.0)
    assert m["seconds_per_step_median"] == pytest.approx(2.0) and m["seconds_per_step_mean"] == pytest.approx(2.0)
    assert m["samples_per_s"] == pytest.approx(4 * 2 * 3 / 6.0)
    assert m["tokens_per_sample_mean"] == pytest.approx(win_tokens / 24)
    imb = [max(a, b) / ((a + b) / 2) for a, b in zip(tokens[0][2:], tokens[1][2:])]
    assert m["token_imbalance"] == pytest.approx(sum(imb) / 3)
    assert m["peak_alloc_gib_per_rank"] == pytest.approx([10.0, 12.5])
    assert [e["event"] for e in m["events"]] == ["checkpoint", "resume", "end"]
    assert m["end_weights_digest"] == "w0" and m["losses"][0] == [1, 2.0]


def test_run_metrics_empty_or_missing_logs(tmp_path):
    m = mg.run_metrics(tmp_path / "nothing", world=2, batch_size=1, warmup=1)
    assert m["steps_logged"] == 0 and "tokens_per_s" not in m


def test_scaling_is_weak_scaling_of_tokens_per_second(tmp_path):
    base = {"world": 1, "tokens_per_s": 1000.0, "seconds_per_step_mean": 2.0}
    two = {"world": 2, "tokens_per_s": 1800.0, "seconds_per_step_mean": 2.2}
    s = mg.scaling(base, two)
    assert s["efficiency"] == pytest.approx(0.9) and s["speedup_tokens_per_s"] == pytest.approx(1.8)
    assert s["step_time_ratio"] == pytest.approx(1.1)
    assert mg.scaling({"world": 1}, two) == {}


def test_compare_losses_verdicts():
    ref = [[1, 2.0], [2, 1.9], [3, 1.8], [4, 1.7]]
    same = mg.compare_losses(ref, [list(x) for x in ref], 2)
    assert same["verdict"] == "bit-exact" and same["ok"] and same["after_resume"]["bit_exact"] == 2
    noisy = mg.compare_losses(ref, [[1, 2.0], [2, 1.9 + 1e-6], [3, 1.8 + 2e-5], [4, 1.7]], 2)
    assert noisy["ok"] and noisy["verdict"].startswith("same losses")
    assert noisy["before_stop"]["max_abs_diff"] == pytest.approx(1e-6)
    assert noisy["after_resume"]["max_abs_diff"] == pytest.approx(2e-5)
    det = mg.compare_losses(ref, [[1, 2.0], [2, 1.9], [3, 1.8 + 2e-5], [4, 1.7]], 2)  # deterministic, resume is not
    assert det["ok"] and "not bit-exact after the resume" in det["verdict"]
    wrong = mg.compare_losses(ref, [[1, 2.0], [2, 1.9], [3, 1.5], [4, 1.7]], 2)  # e.g. RNG / data not restored
    assert not wrong["ok"] and wrong["verdict"].startswith("DIFFERENT")
    cut = mg.compare_losses(ref, [[1, 2.0], [2, 1.9]], 2)  # the resumed launch logged nothing
    assert not cut["ok"] and cut["missing_steps"] == [3, 4]


def test_summary_markdown_handles_partial_results():
    doc = {"card": "h100", "nproc": 2, "mode": "gpu", "env": dict(mg.NVLS_OFF), "steps": {}, "notes": ["x"],
           "runs": {"dit_1gpu": {"status": "ok", "gpus": 1, "tokens_per_s": 5.0, "peak_alloc_gib_per_rank": [3.0]},
                    "vae_1gpu": {"status": "skipped", "reason": "time budget"}},
           "scaling": {}, "resume": {"resume_ddp_2gpu": {"status": "skipped", "reason": "reference run failed"}}}
    md = mg.summary_markdown(doc)
    assert "| dit_1gpu | 1 |" in md and "skipped: time budget" in md and "reference run failed" in md


def test_timeout_kills_the_whole_process_group(tmp_path):
    """A run past its time limit is stopped with its children (torchrun's ranks), and recorded as a timeout."""
    import os
    import time

    b = mg.Bench.__new__(mg.Bench)
    pidfile = tmp_path / "child.pid"
    t = time.time()
    rc = b._spawn(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], tmp_path / "x.log", 1.0, dict(os.environ))
    assert rc == -999 and time.time() - t < 15
    child = int(pidfile.read_text())
    time.sleep(0.3)
    stat = Path(f"/proc/{child}/stat")
    if stat.is_file():  # gone, or a zombie waiting for a parent that does not reap (PID 1 of a container)
        assert stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"), stat.read_text()
    assert mg.first_error("ok\n[rank0]: torch.OutOfMemoryError: CUDA out of memory.\nx") .startswith("[rank0]: torch.")
