"""Atomic training checkpoints: safetensors weights (+ EMA) and a weights_only-loadable state file.

Layout of ``checkpoint.dir``::

    step_00000100/model.safetensors   trainable weights (full, unsharded; keys as in the task's train module)
    step_00000100/ema.safetensors     EMA weights (when EMA is on)
    step_00000100/state.pt            optimizer, step, data position, config (torch.save; loads with weights_only=True)
    step_00000100/rng_rank<r>.pt      RNG states of rank r (torch CPU/CUDA, numpy, python)
    latest                            name of the newest complete step folder

A checkpoint is written into ``.tmp_step_*`` and renamed into place with ``os.replace`` (atomic on POSIX), so a run
killed at any moment (SIGKILL included) leaves only complete ``step_*`` folders; leftover ``.tmp_*`` folders are
removed at the next start. The ``keep`` newest folders are kept.

A folder can still be damaged after the fact (a disk filling up, a copy cut short, a file truncated by hand): resume
verifies a checkpoint before trusting it (:func:`checkpoint_problem`: every safetensors header covers its file, every
torch zip archive passes its CRC check) and falls back to the newest intact one, naming what it skipped
(:func:`latest_intact_checkpoint`; issue 22, case 6).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d3s2.errors import D3S2Error

__all__ = [
    "rng_state",
    "set_rng_state",
    "step_dir_name",
    "list_checkpoints",
    "latest_checkpoint",
    "checkpoint_problem",
    "latest_intact_checkpoint",
    "clean_partial",
    "write_checkpoint_dir",
    "prune_checkpoints",
    "load_state",
    "load_weights",
]

_STEP_RE = re.compile(r"^step_(\d{8,})$")


def rng_state() -> dict[str, Any]:
    """RNG states as tensors / plain Python values (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file() and (p / "model.safetensors").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the ``step_*`` folder ``path`` cannot be resumed from, or None when it looks intact (see module docstring).

    Reads the safetensors headers and checks the torch archives' CRCs; nothing is unpickled."""
    import zipfile

    from safetensors import safe_open

    p = Path(path)
    for name in ("state.pt", "model.safetensors"):
        if not (p / name).is_file():
            return f"{name} is missing"
    for f in sorted(p.iterdir()):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), "pt") as fh:
                    fh.keys()
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                return f"{f.name} is damaged ({' '.join(str(exc).split())[:160]})"
        elif f.suffix == ".pt":
            try:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                return f"{f.name} is damaged ({' '.join(str(exc).split())[:160]})"
            if bad is not None:
                return f"{f.name} is damaged (entry {bad} fails its CRC check)"
    return None


def latest_intact_checkpoint(ckpt_dir: str | Path, report=None) -> Path | None:
    """The newest ``step_*`` folder that passes :func:`checkpoint_problem`; ``report(message)`` is called for every
    newer folder skipped (incomplete or damaged) so that the fallback is never silent."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))),
                   reverse=True)
    for _, p in steps:
        problem = checkpoint_problem(p)
        if problem is None:
            return p
        if report is not None:
            report(f"checkpoint {p} not used: {problem}; trying an older one")
    return None


def clean_partial(ckpt_dir: str | Path) -> None:
    """Remove ``.tmp_*`` leftovers of a run killed while writing."""
    d = Path(ckpt_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".tmp_"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint_dir(ckpt_dir: str | Path, step: int, files: dict[str, Any]) -> Path:
    """Write ``files`` ({name: ("safetensors", {key: tensor}) | ("torch", obj)}) as ``step_<step>`` atomically."""
    from safetensors.torch import save_file

    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / step_dir_name(step)
    tmp = d / f".tmp_{step_dir_name(step)}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, (kind, obj) in files.items():
        path = tmp / name
        if kind == "safetensors":
            save_file({k: v.detach().to("cpu").contiguous() for k, v in obj.items()}, str(path))
        else:
            torch.save(obj, path)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # same step written again (e.g. at exit right after a periodic save)
        old = d / f".tmp_old_{step_dir_name(step)}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    latest_tmp = d / f".tmp_latest_{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, d / "latest")
    _fsync_dir(d)
    return final


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, p in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
        msg = " ".join(str(exc).split())[:300]
        raise D3S2Error(f"{path}: cannot read the checkpoint state ({msg}); delete that folder to use an older one")


def load_weights(path: str | Path, prefix: str = "", prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file, a ``step_*`` folder or a checkpoint dir (its newest step).

    ``prefer_ema``: take ``ema.safetensors`` when the folder has it (weights the EMA does not track, i.e. frozen ones,
    from ``model.safetensors``). ``prefix``: keep only keys starting with it, with
    the prefix removed (e.g. ``"vae."`` for the VAE inside a train module).
    """
    from safetensors.torch import load_file

    import warnings

    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").is_file():
        latest = latest_intact_checkpoint(p, report=lambda msg: warnings.warn(msg, stacklevel=3))
        if latest is None:
            raise D3S2Error(f"{p}: no intact checkpoint (step_*/model.safetensors) found; train that model first")
        p = latest
    frozen: dict[str, torch.Tensor] = {}
    if p.is_dir():
        if prefer_ema and (p / "ema.safetensors").is_file():
            # the EMA tracks trainable weights only; frozen ones (never updated) come from the model file
            frozen = load_file(str(p / "model.safetensors")) if (p / "model.safetensors").is_file() else {}
            p = p / "ema.safetensors"
        else:
            p = p / "model.safetensors"
    if not p.is_file():
        raise D3S2Error(f"{p}: no such weights file")
    try:
        sd = {**frozen, **load_file(str(p))}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on damaged files
        raise D3S2Error(f"{p}: not a readable safetensors file ({' '.join(str(exc).split())[:200]}); "
                        "give an intact checkpoint") from exc
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise D3S2Error(f"{p}: no weights under the prefix '{prefix}'")
    return sd
