from dataclasses import dataclass, field

import pytest

from d3s2.config import build_model, from_dict, load_model_config, resolve_config_path
from d3s2.errors import D3S2Error
from d3s2.flow import FlowConfig, SamplerConfig
from d3s2.models.dense_dit import DenseDiT, DenseDiTConfig
from d3s2.models.dense_vae import DenseShapeVAE


@pytest.mark.parametrize("name", ["dense_vae_v1", "dense_vae_tiny", "dense_dit_v1", "dense_dit_tiny"])
def test_shipped_configs_load(name):
    cfg = load_model_config(name)
    assert cfg.path == resolve_config_path(f"{name}.yaml")
    m = build_model(cfg, device="meta")
    assert isinstance(m, DenseDiT if cfg.model == "dense_dit" else DenseShapeVAE)
    if cfg.model == "dense_dit":
        assert isinstance(cfg.flow, FlowConfig) and isinstance(cfg.sampler, SamplerConfig)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_named(tmp_path):
    p = _write(tmp_path, "model: dense_dit\nparams:\n  resolution: 8\n  num_layers: 3\n")
    with pytest.raises(D3S2Error, match="unknown key 'num_layers'"):
        load_model_config(p)
    p = _write(tmp_path, "model: dense_dit\nparams: {}\noptimizer: {lr: 1}\n")
    with pytest.raises(D3S2Error, match="unknown top-level key 'optimizer'"):
        load_model_config(p)
    assert load_model_config(p, extra_sections=("optimizer",)).extra == {"optimizer": {"lr": 1}}


def test_types_are_checked_and_coerced(tmp_path):
    p = _write(tmp_path, "model: dense_dit\nparams:\n  num_blocks: two\n")
    with pytest.raises(D3S2Error, match="num_blocks: expected an integer"):
        load_model_config(p)
    p = _write(tmp_path, "model: dense_dit\nparams:\n  qk_rms_norm: 1\n")
    with pytest.raises(D3S2Error, match="qk_rms_norm: expected true/false"):
        load_model_config(p)
    p = _write(tmp_path, "model: dense_dit\nparams:\n  mlp_ratio: 2\n  pe_factor: 5e-1\n")
    cfg = load_model_config(p).params
    assert cfg.mlp_ratio == 2.0 and isinstance(cfg.mlp_ratio, float) and cfg.pe_factor == 0.5
    assert cfg.num_blocks == DenseDiTConfig().num_blocks  # unspecified fields keep their defaults


def test_nested_and_list_fields():
    @dataclass
    class Inner:
        a: int = 1

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        sizes: list[int] = field(default_factory=list)
        name: str | None = None

    o = from_dict(Outer, {"inner": {"a": 3}, "sizes": [1, 2], "name": None})
    assert o.inner.a == 3 and o.sizes == [1, 2] and o.name is None
    with pytest.raises(D3S2Error, match=r"sizes\[1\]"):
        from_dict(Outer, {"sizes": [1, "x"]})
    with pytest.raises(D3S2Error, match="unknown key 'b'"):
        from_dict(Outer, {"inner": {"b": 3}})


def test_bad_files(tmp_path):
    with pytest.raises(D3S2Error, match="config not found"):
        load_model_config(tmp_path / "nope.yaml")
    with pytest.raises(D3S2Error, match="not valid YAML"):
        load_model_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(D3S2Error, match="unknown model 'resnet'"):
        load_model_config(_write(tmp_path, "model: resnet\n"))
    with pytest.raises(D3S2Error, match="missing 'model:'"):
        load_model_config(_write(tmp_path, "params: {}\n"))
