import dataclasses

import pytest
import torch

from d3s2.config import build_model, load_model_config
from d3s2.errors import D3S2Error
from d3s2.flow import FlowConfig, flow_matching_loss, sample_euler
from d3s2.models.dense_dit import DenseDiT, DenseDiTConfig, load_official_state_dict
from d3s2.nn.embeddings import AbsolutePositionEmbedder, grid_coords


@pytest.fixture
def one_thread():
    """Tiny training loops: one intra-op thread is faster, and far faster on a busy 2-core machine (no oversubscription)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hand_count(c, cond, heads, head_dim, blocks, mlp_ratio, cin, cout, patch=1, qkv_bias=True, qk_norm=True):
    """Parameter count derived from the architecture description (official-release.md), not from the code."""
    inner, hidden = heads * head_dim, int(c * mlp_ratio)
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    t_emb = lin(256, c) + lin(c, c)
    block = (
        lin(c, 6 * c)  # adaLN_modulation.1
        + 2 * c  # norm2 (affine); norm1 / norm3 have no parameters
        + lin(c, 3 * inner, qkv_bias) + lin(inner, c)  # self_attn.to_qkv, to_out
        + (2 * heads * head_dim if qk_norm else 0)  # q_rms_norm.gamma, k_rms_norm.gamma
        + lin(c, inner, qkv_bias) + lin(cond, 2 * inner, qkv_bias) + lin(inner, c)  # cross_attn
        + lin(c, hidden) + lin(hidden, c)  # mlp.mlp.0, mlp.mlp.2
    )
    return t_emb + lin(cin * patch**3, c) + blocks * block + lin(c, cout * patch**3)


def test_paper_config_names_shapes_and_count():
    cfg = load_model_config("dense_dit_v1")
    assert cfg.params == DenseDiTConfig()  # the shipped YAML is the paper model
    assert (cfg.sampler.steps, cfg.sampler.shift, cfg.sampler.cfg_scale) == (50, 6.0, 7.0)
    m = build_model(cfg, device="meta")
    sd = m.state_dict()
    assert tuple(sd["pos_emb"].shape) == (4096, 1024)
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == _hand_count(1024, 1024, 16, 64, 24, 4.0, 8, 8)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["t_embedder.mlp.0.weight"] == (1024, 256) and shapes["t_embedder.mlp.2.weight"] == (1024, 1024)
    assert shapes["input_layer.weight"] == (1024, 8) and shapes["out_layer.weight"] == (8, 1024)
    for i in (0, 23):
        p = f"blocks.{i}."
        assert shapes[p + "adaLN_modulation.1.weight"] == (6144, 1024)
        assert shapes[p + "self_attn.to_qkv.weight"] == (3072, 1024)
        assert shapes[p + "self_attn.q_rms_norm.gamma"] == (16, 64) == shapes[p + "self_attn.k_rms_norm.gamma"]
        assert shapes[p + "cross_attn.to_kv.weight"] == (2048, 1024)
        assert shapes[p + "mlp.mlp.0.weight"] == (4096, 1024) and shapes[p + "mlp.mlp.2.weight"] == (1024, 4096)
        assert shapes[p + "norm2.weight"] == (1024,)
    assert "blocks.24.norm2.weight" not in shapes
    assert not any(".norm1." in k or ".norm3." in k for k in shapes)  # non-affine
    assert not any(k.startswith("out_norm") or "final" in k for k in shapes)  # no final adaLN / affine norm
    assert len(sd) == 1 + 4 + 2 + 2 + 24 * 20


def test_pos_emb_is_ape_of_grid():
    cfg = dataclasses.replace(DenseDiTConfig(), resolution=4, model_channels=48, cond_channels=8, num_blocks=1,
                              num_heads=2, head_dim=24)
    m = DenseDiT(cfg)
    assert torch.allclose(m.pos_emb, AbsolutePositionEmbedder(48)(grid_coords(4)))
    assert m.pos_emb[0, :8].tolist() == [0.0] * 8  # sin(0) block of the x axis at the origin


def test_patchify_roundtrip_and_patch2_forward():
    cfg = DenseDiTConfig(resolution=4, in_channels=3, out_channels=3, model_channels=24, cond_channels=8,
                         num_blocks=1, num_heads=2, head_dim=12, patch_size=2)
    m = DenseDiT(cfg)
    x = torch.randn(2, 3, 4, 4, 4)
    tokens = m.patchify(x)
    assert tokens.shape == (2, 8, 24)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 0:2, 2:4].reshape(-1))  # token 1 = patch (0, 0, 1)
    assert torch.equal(m.unpatchify(tokens), x)
    assert m(x, torch.tensor([3.0, 900.0]), torch.randn(2, 5, 8)).shape == x.shape


def test_input_validation():
    m = build_model("dense_dit_tiny")
    with pytest.raises(D3S2Error, match="expects x"):
        m(torch.randn(1, 4, 6, 6, 6), torch.tensor([1.0]), torch.randn(1, 3, 32))
    with pytest.raises(D3S2Error, match="expects cond"):
        m(torch.randn(1, 4, 8, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 16))


def test_state_dict_roundtrip_and_key_map():
    a, b = build_model("dense_dit_tiny"), build_model("dense_dit_tiny")
    for p in a.parameters():
        torch.nn.init.normal_(p)
    sd = {k.replace("blocks.", "layers."): v for k, v in a.state_dict().items()}
    with pytest.raises(D3S2Error, match="missing keys"):
        load_official_state_dict(b, sd)
    load_official_state_dict(b, sd, key_map={"layers.": "blocks."})
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


@pytest.mark.slow
def test_tiny_dit_overfits_one_latent(one_thread):
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_model_config("dense_dit_tiny").params, resolution=4)
    dit = DenseDiT(cfg)
    x0, cond = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 5, 32)
    flow = FlowConfig(cond_drop_prob=0.0)

    def eval_loss():
        with torch.no_grad():
            return flow_matching_loss(dit, x0.expand(64, -1, -1, -1, -1), cond.expand(64, -1, -1), flow,
                                      generator=torch.Generator().manual_seed(123))["loss"].item()

    before = eval_loss()
    opt = torch.optim.AdamW(dit.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        loss = flow_matching_loss(dit, x0.expand(16, -1, -1, -1, -1), cond.expand(16, -1, -1), flow, generator=g)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
    after = eval_loss()
    assert after < before / 10, (before, after)
    dit.eval()
    sample = sample_euler(dit, torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(5)), cond, steps=20)
    assert (sample - x0).pow(2).mean().item() < 0.1 * x0.var().item()


def test_gradient_checkpointing_matches(one_thread):
    cfg = dataclasses.replace(load_model_config("dense_dit_tiny").params, resolution=4)
    torch.manual_seed(0)
    m = DenseDiT(cfg)
    for p in m.parameters():  # leave the zero init so gradients reach every block
        torch.nn.init.normal_(p, std=0.1)
    x, t, c = torch.randn(2, 4, 4, 4, 4), torch.tensor([10.0, 700.0]), torch.randn(2, 3, 32)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.set_gradient_checkpointing(ckpt)
        m(x, t, c).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert all(b.use_checkpoint for b in m.blocks)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_bf16_weights_and_autocast_close_to_fp32(one_thread):
    m = build_model("dense_dit_tiny")
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, c, t = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 3, 32), torch.tensor([1.0, 999.0])
    ref = m(x, t, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = m(x, t, c)
    b = m.to(torch.bfloat16)(x.bfloat16(), t, c.bfloat16())
    scale = ref.abs().max()
    for out in (a, b):
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < 3e-2 * scale
