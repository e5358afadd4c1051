"""The trainer of every stage (issue 5): AdamW, warm-up + schedule, bf16 autocast, clipping, EMA, checkpoints, resume.

One process or ``torchrun`` (DDP / FSDP2); data order from :class:`~d3s2.train.sampling.BatchPlan`; progressive phases
(Table 1) and multi-resolution batches (Sec. 3.3). Resuming restores weights, EMA, optimizer, step, data position and
the RNG states of every rank, so an interrupted run continues with the same losses as an uninterrupted one (on the same
hardware and world size).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d3s2.errors import D3S2Error
from d3s2.train import checkpoint as ck
from d3s2.train.config import TrainConfig
from d3s2.train.distributed import DistInfo, all_reduce_mean, init_distributed, shutdown_distributed, unwrap, wrap_model
from d3s2.train.ema import EMA
from d3s2.train.metrics_log import MetricsLogger
from d3s2.train.sampling import BatchPlan
from d3s2.train.schedule import lr_at
from d3s2.train.task_base import Task, build_task

__all__ = ["Trainer", "set_gradient_checkpointing", "state_digest"]


def set_gradient_checkpointing(module: torch.nn.Module, enabled: bool) -> None:
    """Models with ``set_gradient_checkpointing`` use it; otherwise every submodule's ``use_checkpoint`` flag is set."""
    for m in module.modules():
        if hasattr(m, "set_gradient_checkpointing") and m is not module:
            m.set_gradient_checkpointing(enabled)
        elif hasattr(m, "use_checkpoint") and isinstance(m.use_checkpoint, bool):
            m.use_checkpoint = enabled


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class _KeyStream:
    """Batch sampler for the DataLoader: the keys of steps ``[start, end)`` from a copy of the plan."""

    def __init__(self, plan_state: dict, plan_kwargs: dict, cfg: TrainConfig, start: int, end: int) -> None:
        self.plan_state, self.plan_kwargs, self.cfg, self.start, self.end = plan_state, plan_kwargs, cfg, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        plan = BatchPlan(**self.plan_kwargs)
        plan.load_state_dict(self.plan_state)
        for step in range(self.start, self.end):
            bs, res = _phase_batch(self.cfg, step)
            k = plan.next(bs, res)
            yield [(i, k.resolution, k.epoch) for i in k.indices]


def _phase_batch(cfg: TrainConfig, step: int) -> tuple[int, int | None]:
    _, phase = cfg.phase_at(step)
    return (phase.batch_size or cfg.data.batch_size), phase.resolution


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool | None = None, stop_at: int | None = None,
                 config_dict: dict | None = None) -> None:
        self.cfg = cfg
        self.resume = (cfg.resume == "auto") if resume is None else resume
        self.stop_at = stop_at
        self.config_dict = config_dict or {}
        self._stop_signal = False

    # ----------------------------------------------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _autocast(self):
        p = self.cfg.precision
        if p == "auto":
            p = "bf16" if self.info.device.type == "cuda" else "fp32"
        if p == "bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loader(self, dataset, start: int, end: int):
        kw = dict(
            plan_state=self.plan.state_dict(), plan_kwargs=self.plan_kwargs, cfg=self.cfg, start=start, end=end
        )
        workers = self.cfg.data.workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=_KeyStream(**kw),
            collate_fn=self.task.collate,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=self.info.device.type == "cuda",
            # a private generator: creating a loader must not draw from the global RNG (bit-exact resume)
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _full_state(self, every_rank: bool = False) -> tuple[dict, dict | None]:
        """Full (unsharded) model and optimizer state dicts; a collective under FSDP (rank 0 gets them on the CPU, or
        every rank with ``every_rank``, then without the optimizer)."""
        if self.fsdp and every_rank:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True)), None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.module, options=opts),
                    get_optimizer_state_dict(self.module, self.optimizer, options=opts))
        return self.raw.state_dict(), self.optimizer.state_dict()

    def _ema_full(self) -> dict:
        out = {}
        for k, v in self.ema.state_dict().items():
            out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
        return out

    def save(self, step: int) -> None:
        import torch.distributed as dist

        model_sd, opt_sd = self._full_state()
        ema_sd = self._ema_full() if self.ema is not None else None
        rng = ck.rng_state()
        rngs = [rng]
        if self.info.enabled:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng)
        if self.info.is_main:
            files: dict[str, Any] = {"model.safetensors": ("safetensors", model_sd)}
            if ema_sd is not None:
                files["ema.safetensors"] = ("safetensors", ema_sd)
            files["state.pt"] = ("torch", {
                "step": step,
                "optimizer": opt_sd,
                "data": self.plan.state_dict(),
                "world_size": self.info.world_size,
                "config": json.loads(json.dumps(self.config_dict, default=str)),
                "torch_version": str(torch.__version__),
            })
            for r, s in enumerate(rngs):
                files[f"rng_rank{r}.pt"] = ("torch", s)
            ck.write_checkpoint_dir(self.cfg.checkpoint.dir, step, files)
            ck.prune_checkpoints(self.cfg.checkpoint.dir, self.cfg.checkpoint.keep)
            self.logger.log_event(step, event="checkpoint", dir=ck.step_dir_name(step))
        if self.info.enabled:
            dist.barrier()

    def _load(self, path: Path) -> int:
        from safetensors.torch import load_file

        state = ck.load_state(path / "state.pt")
        model_sd = load_file(str(path / "model.safetensors"))
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.module, model_sd, options=opts)
            set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"], options=opts)
        else:
            try:
                self.raw.load_state_dict(model_sd)
            except RuntimeError as exc:
                raise D3S2Error(f"{path}: weights do not match the configured model ({str(exc).splitlines()[0]})")
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            ema_path = path / "ema.safetensors"
            if ema_path.is_file():
                self.ema.load_state_dict(load_file(str(ema_path)))
        self.plan.load_state_dict(state["data"])
        rng_path = path / f"rng_rank{self.info.rank}.pt"
        if rng_path.is_file() and state.get("world_size") == self.info.world_size:
            ck.set_rng_state(ck.load_state(rng_path))
        else:  # another world size: fresh per-rank streams (no bit-exact continuation promised)
            self._seed(self.cfg.seed * 1000 + self.info.rank + 7919 * int(state["step"]))
        return int(state["step"])

    # ----------------------------------------------------------------------------------------------------------------
    def _install_signal(self):
        def handler(signum, frame):  # finish the current step, save, exit
            self._stop_signal = True

        try:
            return signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            return None

    def _should_stop(self) -> bool:
        flag = self._stop_signal
        if self.info.enabled:
            import torch.distributed as dist

            t = torch.tensor([1.0 if flag else 0.0], device=self.info.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        self._stop_signal = flag
        return flag

    @torch.no_grad()
    def run_validation(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        if self.fsdp and not self.task.validate_under_fsdp:
            if self.info.is_main and not getattr(self, "_warned_val", False):
                self.logger.log_event(step, event="validation skipped: task validates outside forward (use ddp)")
                self._warned_val = True
            return {}
        if self.val_dataset is None:
            self.val_dataset = self.task.build_dataset("val")
        n = min(cfg.validate.items, len(self.val_dataset))
        res = (cfg.phase_at(max(0, step - 1))[1].resolution
               or (max(cfg.data.resolutions) if cfg.data.resolutions else None))
        keys = [(i, res, 0) for i in range(n)]
        batch = self.task.collate([self.val_dataset[k] for k in keys])
        model = self.raw
        was = model.training
        model.eval()
        with torch.random.fork_rng(devices=[self.info.device] if self.info.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            batch = self.task.prepare_batch(self.task.to_device(batch))
            with self._autocast():
                metrics = self.task.validate(model, batch)
        model.train(was)
        if self.info.is_main:
            self.logger.log(step, metrics, kind="val")
        return metrics

    # ----------------------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.info: DistInfo = init_distributed(cfg.device, cfg.distributed.backend)
        try:
            out = self._run()
            if self.info.enabled:
                import torch.distributed as dist

                # every rank finishes its last collective before any tears the group down: a rank that exits while
                # a peer's gloo work is in flight can abort the peer ("terminate called without an active exception")
                dist.barrier()
            return out
        finally:
            shutdown_distributed()

    def _run(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        self.fsdp = cfg.distributed.strategy == "fsdp" and info.enabled
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        self._seed(cfg.seed)  # identical initial weights on every rank
        self.task: Task = build_task(cfg, info.device)
        raw = self.task.build_module().to(info.device)
        if cfg.gradient_checkpointing:
            set_gradient_checkpointing(raw, True)
        self.module = wrap_model(raw, info, cfg.distributed.strategy, cfg.distributed.find_unused_parameters)
        self.raw = unwrap(self.module)
        params = [p for p in self.module.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        self.ema = EMA(self.raw, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay > 0 else None

        self.dataset = self.task.build_dataset("train")
        self.val_dataset = None
        self.plan_kwargs = dict(num_items=len(self.dataset), rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                                resolutions=cfg.data.resolutions, weights=cfg.data.resolution_weights)
        self.plan = BatchPlan(**self.plan_kwargs)

        log_dir = Path(cfg.log.dir)
        self.logger = MetricsLogger(log_dir, tensorboard=cfg.log.tensorboard) if info.is_main else None
        rank_logger = (MetricsLogger(log_dir, f"metrics_rank{info.rank}.jsonl", tensorboard=False)
                       if cfg.log.all_ranks else None)
        if info.is_main:
            (log_dir / "config.json").write_text(json.dumps(self.config_dict, indent=1, default=str))

        step = 0
        ckpt_dir = Path(cfg.checkpoint.dir)
        if info.is_main:
            ck.clean_partial(ckpt_dir)
        if self.resume:
            def skipped(msg: str) -> None:
                if info.is_main:
                    print(f"d3s2 train: warning: {msg}", file=sys.stderr)
                    self.logger.log_event(step, event="resume skipped", reason=msg)

            latest = ck.latest_intact_checkpoint(ckpt_dir, report=skipped)
            if latest is not None:
                step = self._load(latest)
                if info.is_main:
                    self.logger.log_event(step, event="resume", dir=latest.name)
        else:
            # fresh per-rank streams for noise / timesteps (weights were initialised identically above)
            self._seed(cfg.seed * 1000 + info.rank)

        total = cfg.total_steps
        end = total if self.stop_at is None else min(total, self.stop_at)
        old_handler = self._install_signal()
        bar = None
        if info.is_main and cfg.log.progress and step < end:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=step, desc=f"train {cfg.task}", dynamic_ncols=True)
        last_saved = step if self.resume and step > 0 else -1
        history: list[float] = []
        t_last, samples_acc, tokens_acc = time.perf_counter(), 0.0, 0.0
        self.module.train()
        try:
            while step < end:
                phase_idx, _ = cfg.phase_at(step)
                last_phase = phase_idx == len(cfg.phases) - 1
                phase_end = end if last_phase else min(end, sum(p.steps for p in cfg.phases[: phase_idx + 1]))
                loader = self._loader(self.dataset, step, phase_end)
                for batch in loader:
                    bs, fixed_res = _phase_batch(cfg, step)
                    res = self.plan.next(bs, fixed_res).resolution  # the consumed position (the loader has a copy)
                    batch = self.task.prepare_batch(self.task.to_device(batch))
                    lr = lr_at(cfg, step)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    with self._autocast():
                        out = self.module(batch)
                    loss = out["loss"]
                    if not torch.isfinite(loss.detach()):
                        raise D3S2Error(f"step {step}: the loss is {float(loss)}; lower optim.lr or check the data")
                    loss.backward()
                    clip = o.grad_clip if o.grad_clip > 0 else math.inf
                    gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
                    if hasattr(gnorm, "full_tensor"):
                        gnorm = gnorm.full_tensor()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if self.ema is not None and step % cfg.ema.every == 0:
                        self.ema.update(self.raw, step)
                    stats = self.task.batch_stats(batch)
                    samples_acc += stats.get("samples", 0.0)  # this rank's; summed over ranks when logged
                    tokens_acc += stats.get("tokens", 0.0)
                    if step % cfg.log.every == 0 or step == end:
                        terms = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}
                        terms = all_reduce_mean(terms, info)
                        dt = max(1e-9, time.perf_counter() - t_last)
                        # throughput of the whole job: the ranks' own counts summed (ragged token counts per rank)
                        total = {k: v * info.world_size for k, v in
                                 all_reduce_mean({"samples": samples_acc, "tokens": tokens_acc}, info).items()}
                        scalars = dict(terms, lr=lr, grad_norm=float(gnorm), samples_per_s=total["samples"] / dt,
                                       phase=phase_idx, resolution=float(res or 0))
                        if total["tokens"]:
                            scalars["tokens_per_s"] = total["tokens"] / dt
                        if info.device.type == "cuda":
                            scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated(info.device) / 2**30
                        samples_own, tokens_own = samples_acc, tokens_acc
                        t_last, samples_acc, tokens_acc = time.perf_counter(), 0.0, 0.0
                        history.append(terms["loss"])
                        if self.logger is not None:
                            self.logger.log(step, scalars)
                        if rank_logger is not None:  # + this rank's own counts over its own interval
                            rank_logger.log(step, dict(scalars, rank_samples=samples_own, rank_tokens=tokens_own,
                                                       interval_s=dt))
                        if bar is not None:
                            bar.set_postfix(loss=f"{terms['loss']:.4g}", lr=f"{lr:.2e}")
                    if bar is not None:
                        bar.update(1)
                    if cfg.validate.every and step % cfg.validate.every == 0:
                        self.run_validation(step)
                    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                        self.save(step)
                        last_saved = step
                    if self._should_stop():
                        break
                if self._stop_signal or step >= end:
                    break
            if cfg.validate.at_end and step != 0 and not (cfg.validate.every and step % cfg.validate.every == 0):
                self.run_validation(step)
            if cfg.checkpoint.at_exit and step != last_saved and step > 0:
                self.save(step)
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
            if bar is not None:
                bar.close()
        # a collective under FSDP: every rank takes part or none
        need = cfg.log.all_ranks or (info.is_main and not self.fsdp)
        digest = state_digest(self._full_state(every_rank=True)[0]) if need else ""
        if rank_logger is not None:
            rank_logger.log_event(step, event="end", weights=digest)
            rank_logger.close()
        if self.logger is not None:
            self.logger.log_event(step, event="end", weights=digest, stopped_by_signal=self._stop_signal)
            self.logger.close()
        return {"step": step, "losses": history, "weights": digest, "stopped": self._stop_signal}
