"""Training (issue 5; paper Sec. 3.3 multi-resolution, Sec. 5.2 and Table 1): one trainer, one task adapter per stage.

``d3s2 train CONFIG.yaml`` (see :mod:`d3s2.train.command`); the pieces: :mod:`~d3s2.train.config` (YAML schema),
:mod:`~d3s2.train.tasks` (task adapters and their registry), :mod:`~d3s2.train.trainer` (the loop),
:mod:`~d3s2.train.checkpoint` (atomic checkpoints), :mod:`~d3s2.train.sampling` (sharded resumable batch order),
:mod:`~d3s2.train.distributed` (DDP / FSDP2), :mod:`~d3s2.train.schedule`, :mod:`~d3s2.train.ema`,
:mod:`~d3s2.train.metrics_log`.
"""
