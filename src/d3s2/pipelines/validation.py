"""Checks of the per-run generation settings before any model work (issue 22, case 4).

:func:`check_overrides` validates the ``num_inference_steps`` / ``guidance_scale`` / ``shift`` arguments of
:meth:`ImageTo3DPipeline.__call__ <d3s2.pipelines.image_to_3d.ImageTo3DPipeline.__call__>` (one value, or a dict with
keys ``dense``, ``512``, ``1024``) with the bounds of :mod:`d3s2.flow.checks`, so that a bad 512-stage value is not
found only after the structure stage ran. :func:`check_generate_args` does the same for ``d3s2 generate``'s flags,
naming the flag in the message. :func:`stage_override` reads one stage's value of such an argument.
:func:`require_finite` stops a run whose stage output is NaN / inf with that cause
instead of an empty shape.
"""

from __future__ import annotations

from typing import Any

from d3s2.errors import D3S2Error
from d3s2.flow.checks import check_cfg, check_shift, check_steps

__all__ = ["STAGE_KEYS", "check_overrides", "stage_override", "check_seed", "check_generate_args", "require_finite"]

STAGE_KEYS = ("dense", "512", "1024")
_CHECKS = {"num_inference_steps": check_steps, "guidance_scale": check_cfg, "shift": check_shift}


def check_overrides(num_inference_steps: Any = None, guidance_scale: Any = None, shift: Any = None) -> None:
    """Raise :class:`D3S2Error` for an out-of-range, non-finite or misspelt per-stage sampler override."""
    for arg, value in (("num_inference_steps", num_inference_steps), ("guidance_scale", guidance_scale),
                       ("shift", shift)):
        if value is None:
            continue
        check = _CHECKS[arg]
        if isinstance(value, dict):
            unknown = [k for k in value if k not in STAGE_KEYS]
            if unknown:
                raise D3S2Error(f"{arg}: unknown stage {unknown[0]!r} (valid: {', '.join(STAGE_KEYS)})")
            for key, v in value.items():
                if v is not None:
                    check(v, f"{arg}[{key!r}]")
        else:
            check(value, arg)


def stage_override(value: Any, key: str) -> Any:
    """Stage ``key``'s value of a per-stage override: the ``key`` entry of a dict (None when absent), else ``value``
    itself (one value for every stage)."""
    return value.get(key) if isinstance(value, dict) else value


def check_seed(seed: Any, name: str = "seed") -> int:
    # the range torch.Generator.manual_seed accepts
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise D3S2Error(f"{name} must be an integer in [-2^63, 2^64), got {seed!r}")
    return seed


def check_generate_args(args) -> None:
    """``d3s2 generate``'s sampler flags, seed and face count (argparse namespace)."""
    for flag, value in (("--steps-dense", args.steps_dense), ("--steps-512", args.steps_512),
                        ("--steps-1024", args.steps_1024)):
        if value is not None:
            check_steps(value, flag)
    if args.guidance_scale is not None:
        check_cfg(args.guidance_scale, getattr(args, "guidance_flag", None) or "--guidance-scale")
    check_seed(args.seed, "--seed")
    if args.faces is not None and args.faces < 4:
        raise D3S2Error(f"--faces {args.faces} is too small; ask for at least 4 faces")


def require_finite(values, stage: str) -> None:
    """A stage's output must be finite: NaN or inf (damaged weights, an overflow in the model dtype) would otherwise
    surface as "no shape found ... try another seed", which sends the user after the wrong cause."""
    import torch

    if not bool(torch.isfinite(values).all()):
        raise D3S2Error(f"the {stage} stage produced NaN or infinite values: the weights may be damaged or the model "
                        "overflows in its dtype (try --device cpu or another --weights); another seed will not help")
