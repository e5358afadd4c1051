"""``d3s2 train CONFIG.yaml``: one command for every stage, on one process or under ``torchrun`` (DDP / FSDP2)."""

from __future__ import annotations

import json
import sys

from d3s2.config import load_yaml, resolve_config_path

__all__ = ["add_parser", "load_train_config"]


def load_train_config(path: str, overrides: list[str] | None = None):
    from d3s2.train.config import apply_overrides, parse_train_config

    p = resolve_config_path(path)
    data = apply_overrides(load_yaml(p), overrides or [])
    return parse_train_config(data, p.name), data


def _cmd_train(args) -> int:
    from d3s2.train.trainer import Trainer

    cfg, data = load_train_config(args.config, args.set)
    if args.check:
        from d3s2.train.task_base import check_task_name, model_config_from

        # what the trainer would only find after building the process group: the task and the model config
        check_task_name(cfg.task)
        model_config_from(cfg.model)
        from d3s2.fileio import check_writable_dir

        check_writable_dir(cfg.checkpoint.dir, "checkpoint.dir")
        check_writable_dir(cfg.log.dir, "log.dir")

        print(json.dumps({"task": cfg.task, "steps": cfg.total_steps, "phases": len(cfg.phases)}))
        return 0
    result = Trainer(cfg, resume=True if args.resume else None, stop_at=args.stop_at, config_dict=data).run()
    if result["losses"]:
        print(f"d3s2 train: step {result['step']}, last loss {result['losses'][-1]:.6g}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a stage (dense_vae, dense_dit, ...) from a training YAML; works under torchrun",
        description="Train one stage from a training YAML (see d3s2/configs/train_*.yaml). Run on one process, or "
        "`torchrun --nproc_per_node N -m d3s2.cli train CONFIG.yaml` for DDP / FSDP2.",
    )
    p.add_argument("config", help="training YAML (path or a shipped name such as train_dense_vae_tiny)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in checkpoint.dir if any")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after this global step (checkpoint written); the schedule still spans max_steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 --set checkpoint.dir=/tmp/ck (repeatable)")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(func=_cmd_train)
