"""Bundle the trained demo model (issue 7) into the package: src/d3s2/assets/demo/ (pipeline.yaml + one
``<component>.safetensors`` each; pyproject's package-data already ships ``assets/**/*``).

Builds ``ImageTo3DPipeline.from_config("demo_pipeline")`` in fp16 (the image encoder stays fp32, as the pipeline keeps
it), loads the newest checkpoint of each training run (EMA weights when present) with strict key matching, and writes
it with ``save_pretrained`` (atomic). Checks the 30 MB budget on the written files.

    python demo/bundle.py [--runs runs/demo] [--out src/d3s2/assets/demo]

Source of each component (train module prefix):  dense_vae <- runs/demo/dense_vae ("vae."),
dense_dit <- runs/demo/dense_dit ("dit."), ss_vae_512 <- runs/demo/ss_vae ("vae."), ss_dit_512 <- runs/demo/ss_dit
("dit."), image_encoder <- runs/demo/dense_dit ("encoder."; trained with the structure DiT, then frozen for the
SS-DiT run: both stages saw the tokens of this one encoder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = {  # component -> (run folder, key prefix in the train module's state dict)
    "dense_vae": ("dense_vae", "vae."),
    "dense_dit": ("dense_dit", "dit."),
    "ss_vae_512": ("ss_vae", "vae."),
    "ss_dit_512": ("ss_dit", "dit."),
    "image_encoder": ("dense_dit", "encoder."),
}
BUDGET_BYTES = 30_000_000


def bundle(runs: Path, out: Path, config: str = "demo_pipeline") -> Path:
    import torch

    from d3s2.errors import D3S2Error
    from d3s2.pipelines.image_to_3d import ImageTo3DPipeline
    from d3s2.train.checkpoint import load_weights

    pipe = ImageTo3DPipeline.from_config(config, seed=0, device="cpu", dtype=torch.float16)
    for name, (run, prefix) in SOURCES.items():
        sd = load_weights(Path(runs) / run / "checkpoints", prefix=prefix)
        if not sd:
            raise D3S2Error(f"{runs}/{run}/checkpoints: no '{prefix}*' weights for {name}; train that stage first")
        missing, unexpected = pipe.models[name].load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise D3S2Error(f"{name}: checkpoint does not match the demo config (missing {list(missing)[:3]}, "
                            f"unexpected {list(unexpected)[:3]})")
    path = pipe.save_pretrained(out)
    total = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    if total > BUDGET_BYTES:
        raise D3S2Error(f"{path}: bundled weights take {total / 1e6:.1f} MB, over the {BUDGET_BYTES / 1e6:.0f} MB budget")
    print(f"bundled {path}: {total / 1e6:.2f} MB")
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(REPO / "runs" / "demo"))
    ap.add_argument("--out", default=str(REPO / "src" / "d3s2" / "assets" / "demo"))
    ap.add_argument("--config", default="demo_pipeline")
    args = ap.parse_args(argv)
    bundle(Path(args.runs), Path(args.out), args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
