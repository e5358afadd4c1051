"""Size of the bundled demo model (issue 7: safetensors <= 30 MB in all), counted on the meta device (no memory).

The pipeline casts every component but the image encoder to its dtype and keeps the encoder in fp32
(d3s2.pipelines.image_to_3d), and save_pretrained writes the state dicts as they are: bundled from an fp16 pipeline,
the encoder takes 4 bytes a value and the rest 2.

    python demo/budget.py [demo_pipeline]
"""

from __future__ import annotations

import sys

BUDGET_BYTES = 30_000_000


def component_sizes(config: str = "demo_pipeline", dtype_bytes: int = 2) -> dict[str, dict]:
    """Per component: parameter count, state-dict values and bytes as bundled (encoder fp32, others ``dtype_bytes``)."""
    import torch

    from d3s2.config import load_yaml, model_class, resolve_config_path
    from d3s2.models.image_encoder import DINOv2Encoder
    from d3s2.pipelines.folder_format import parse_pipeline_config

    path = resolve_config_path(config)
    comps, enc_cfg, _ = parse_pipeline_config(load_yaml(path), path.name)
    out = {}
    with torch.device("meta"):
        models = {"image_encoder": DINOv2Encoder(enc_cfg)}
        for name, comp in comps.items():
            models[name] = model_class(comp.model)(comp.params)
    for name, m in models.items():
        values = sum(v.numel() for v in m.state_dict().values())
        per = 4 if name == "image_encoder" else dtype_bytes
        out[name] = {"params": sum(p.numel() for p in m.parameters()), "values": values, "bytes": values * per}
    return out


def main(argv: list[str]) -> int:
    sizes = component_sizes(argv[0] if argv else "demo_pipeline")
    for name, s in sizes.items():
        print(f"{name:14s} {s['params'] / 1e6:7.3f} M params  {s['bytes'] / 1e6:7.2f} MB")
    total = sum(s["bytes"] for s in sizes.values())
    print(f"total {total / 1e6:.2f} MB of {BUDGET_BYTES / 1e6:.0f} MB (encoder fp32, others fp16)")
    return 0 if total <= BUDGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
