"""Deterministic, resumable, sharded batch order (DistributedSampler-style) with one resolution per global batch.

Each epoch is a permutation of the items drawn from ``(seed, epoch)``, padded by wrapping to a multiple of the world
size, and rank r takes every world-size-th item from position r (as ``torch.utils.data.DistributedSampler``). A batch
takes the next ``batch_size`` items of the rank's share; a batch that would run past the end starts the next epoch
(drop-last), so every rank always sees full batches and the same number of them. The resolution of a batch is drawn
from ``(seed, epoch, cursor)``: the same on every rank, one per training iteration (paper Sec. 3.3), or fixed by the
current phase (progressive resolution, Table 1).

The position is two integers, ``epoch`` and ``cursor``: saved in the checkpoint, a resumed run continues with the very
next batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from d3s2.data.datasets import keyed_rng
from d3s2.errors import D3S2Error

__all__ = ["BatchPlan", "BatchKeys"]


@dataclass
class BatchKeys:
    indices: list[int]  # item indices of this rank
    resolution: int | None
    epoch: int


class BatchPlan:
    def __init__(
        self,
        num_items: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        resolutions: Sequence[int] = (),
        weights: Sequence[float] | None = None,
        shuffle: bool = True,
    ) -> None:
        if num_items < 1:
            raise D3S2Error("the training set is empty")
        self.n, self.rank, self.world = int(num_items), int(rank), int(world_size)
        self.seed, self.shuffle = int(seed), shuffle
        self.resolutions = [int(r) for r in resolutions]
        w = np.ones(len(self.resolutions)) if not weights else np.asarray(weights, dtype=np.float64)
        if self.resolutions and len(w) != len(self.resolutions):
            raise D3S2Error("data.resolution_weights must have one weight per resolution")
        self.p = w / w.sum() if self.resolutions else None
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    @property
    def per_rank(self) -> int:
        return -(-self.n // self.world)

    def _rank_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            order = keyed_rng("order", self.seed, self.epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
            total = self.per_rank * self.world
            order = np.resize(order, total)  # wrap-pad like DistributedSampler
            self._order, self._order_epoch = order[self.rank :: self.world], self.epoch
        return self._order

    def next(self, batch_size: int, resolution: int | None = None) -> BatchKeys:
        if batch_size > self.per_rank:
            # fewer items than a batch: repeat them (tiny data sets, overfitting tests)
            order = self._rank_order()
            idx = [int(order[(self.cursor + i) % len(order)]) for i in range(batch_size)]
            keys = BatchKeys(idx, self._resolution(resolution), self.epoch)
            self.epoch, self.cursor = self.epoch + 1, 0
            return keys
        if self.cursor + batch_size > self.per_rank:
            self.epoch, self.cursor = self.epoch + 1, 0
        order = self._rank_order()
        idx = [int(i) for i in order[self.cursor : self.cursor + batch_size]]
        keys = BatchKeys(idx, self._resolution(resolution), self.epoch)
        self.cursor += batch_size
        return keys

    def _resolution(self, fixed: int | None) -> int | None:
        if fixed is not None:
            return int(fixed)
        if not self.resolutions:
            return None
        return int(keyed_rng("res", self.seed, self.epoch, self.cursor).choice(self.resolutions, p=self.p))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
