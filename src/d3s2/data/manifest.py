"""Bookkeeping files of a prepared data set: per-item ``done`` markers, JSON-lines manifests and failure logs, merging.

Layout of an output folder written by ``d3s2 prepare`` (see d3s2.data.prepare):

    OUT_DIR/<item_id>/done            JSON record of the finished item (written last: its presence means complete)
    OUT_DIR/manifest[.shard-I-of-N].jsonl   one record per item finished by a run (appended as items finish)
    OUT_DIR/failures[.shard-I-of-N].jsonl   one record per failed item: source, stage, reason

``merge_manifests`` rebuilds the authoritative ``manifest.jsonl`` (one line per finished item, sorted by item id) from
the ``done`` markers of one or more output folders and joins their failure logs (items that later succeeded dropped).
Every file is written to a temporary name and renamed; the append-only logs are written one whole line per ``write``
so a crash leaves at most a truncated last line, which the readers skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from d3s2.fileio import atomic_write_text

DONE_MARKER = "done"
MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"


def shard_suffix(shard: tuple[int, int] | None) -> str:
    return "" if shard is None or shard[1] == 1 else f".shard-{shard[0]}-of-{shard[1]}"


def manifest_path(out_dir: str | Path, shard: tuple[int, int] | None = None) -> Path:
    return Path(out_dir) / f"manifest{shard_suffix(shard)}.jsonl"


def failures_path(out_dir: str | Path, shard: tuple[int, int] | None = None) -> Path:
    return Path(out_dir) / f"failures{shard_suffix(shard)}.jsonl"


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file; a truncated or garbled line (crash while appending) is skipped."""
    out = []
    try:
        # errors="replace": a garbled (non-UTF-8) line fails to parse below and is skipped like a truncated one
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    except FileNotFoundError:
        pass
    return out


def read_done(item_dir: str | Path) -> dict | None:
    """The record in an item's ``done`` marker, or None when the item is not finished (or the marker is unreadable)."""
    try:
        with open(Path(item_dir) / DONE_MARKER, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def collect_done(out_dir: str | Path) -> dict[str, dict]:
    out_dir = Path(out_dir)
    done = {}
    if not out_dir.is_dir():
        return done
    with os.scandir(out_dir) as it:
        for entry in it:
            if entry.is_dir() and not entry.name.startswith("."):
                rec = read_done(entry.path)
                if rec is not None:
                    done[rec.get("item_id", entry.name)] = rec
    return done


def merge_manifests(out_dirs: list[str | Path], output_dir: str | Path | None = None) -> dict:
    """Write ``manifest.jsonl`` and ``failures.jsonl`` into ``output_dir`` (default: the first folder).

    Each manifest record gets ``path``: the item folder relative to ``output_dir``. Returns counts.
    """
    out_dirs = [Path(d) for d in out_dirs]
    output_dir = Path(output_dir) if output_dir is not None else out_dirs[0]
    output_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    duplicates = 0
    for d in out_dirs:
        for item_id, rec in sorted(collect_done(d).items()):
            if item_id in records:
                duplicates += 1
                continue
            rec = dict(rec)
            rec["path"] = os.path.relpath(d / item_id, output_dir)
            records[item_id] = rec
    failures: dict[str, dict] = {}
    for d in out_dirs:
        if not d.is_dir():
            continue
        for f in sorted(d.glob("failures*.jsonl")):
            for rec in read_jsonl(f):
                item_id = rec.get("item_id")
                if item_id is not None and item_id not in records:
                    failures[item_id] = rec  # later lines (later runs) win
    atomic_write_text(
        output_dir / MANIFEST, "".join(json.dumps(records[k], sort_keys=True) + "\n" for k in sorted(records))
    )
    atomic_write_text(
        output_dir / FAILURES, "".join(json.dumps(failures[k], sort_keys=True) + "\n" for k in sorted(failures))
    )
    return {
        "items": len(records),
        "failed": len(failures),
        "duplicates": duplicates,
        "manifest": str(output_dir / MANIFEST),
    }
