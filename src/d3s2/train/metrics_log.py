"""Training metrics: metrics.jsonl always; TensorBoard scalars when the ``tensorboard`` package is installed."""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["MetricsLogger", "tensorboard_available"]


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class MetricsLogger:
    def __init__(self, log_dir: str | Path, filename: str = "metrics.jsonl", tensorboard: bool = True) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / filename
        self._fh = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard and tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        rec = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        rec.update({k: float(v) for k, v in scalars.items()})
        self._fh.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))

    def log_event(self, step: int, **fields) -> None:
        self._fh.write(json.dumps({"kind": "event", "step": int(step), **fields}) + "\n")

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
