"""The `d3s2` command line.

Each subcommand lives in the module that owns its job and registers itself through `COMMANDS`: a list of
``(name, "module:function")`` pairs, where the function takes the argparse subparsers object and adds its parser
(with ``set_defaults(func=...)``). Modules are imported lazily so `d3s2 --help` stays fast and a missing optional
dependency of one command never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from d3s2 import __version__
from d3s2.errors import D3S2Error

COMMANDS: list[tuple[str, str]] = [
    ("selfcheck", "d3s2.selfcheck:add_parser"),
    ("prepare", "d3s2.data.prepare_command:add_parser"),
    ("prepare-merge", "d3s2.data.prepare_command:add_merge_parser"),
    ("train", "d3s2.train.command:add_parser"),
    ("generate", "d3s2.pipelines.cli:add_parser"),
    ("encode-latents", "d3s2.train.encode_latents:add_parser"),
    ("serve", "d3s2.serve.app:add_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d3s2",
        description="Direct3D-S2: image to 3D mesh through sparse SDF volumes and Spatial Sparse Attention.",
    )
    parser.add_argument("--version", action="version", version=f"d3s2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in COMMANDS:
        module_name, func_name = target.split(":")
        try:
            register = getattr(importlib.import_module(module_name), func_name)
        except ImportError as exc:  # an optional dependency is missing: keep the command visible, explain on use
            p = sub.add_parser(name, help=f"(unavailable: {exc})")
            p.set_defaults(func=_unavailable(name, exc))
            continue
        register(sub)
    return parser


def _unavailable(name: str, exc: Exception):
    def run(_args):
        raise D3S2Error(f"'d3s2 {name}' needs a package that is not installed ({exc}); install d3s2 with the [data] extra")

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except D3S2Error as exc:
        print(f"d3s2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"d3s2 {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
