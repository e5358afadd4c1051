import math

import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.flow import (
    EulerSampler,
    FlowConfig,
    add_noise,
    cfg_combine,
    drop_condition,
    euler_timesteps,
    flow_matching_loss,
    sample_euler,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)


class RaggedLatent:
    """Stand-in for a sparse latent: features [N, C] sorted by sample, offsets [B+1], replace()."""

    def __init__(self, feats, batch_offsets):
        self.feats, self.batch_offsets, self.batch_size = feats, batch_offsets, batch_offsets.numel() - 1

    def replace(self, feats):
        return RaggedLatent(feats, self.batch_offsets)


def _oracle(x0_feats, t_scale=1000.0):
    """Perfect velocity for a fixed x0: v(x_t, t) = (x_t - x0) / t (= eps - x0 on the straight path)."""
    calls = []

    def model(x, t, cond):
        calls.append(t.clone())
        f = x.feats if hasattr(x, "feats") else x
        b = t.shape[0]
        tt = (t / t_scale).to(f.dtype)
        if hasattr(x, "feats"):
            counts = x.batch_offsets[1:] - x.batch_offsets[:-1]
            tt = torch.repeat_interleave(tt, counts)[:, None]
        else:
            tt = tt.view(b, *([1] * (f.ndim - 1)))
        v = (f - x0_feats) / tt
        return x.replace(v) if hasattr(x, "feats") else v

    return model, calls


def test_forward_process_and_target():
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt = add_noise(x0, eps, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.7 * x0[1] + 0.3 * eps[1])
    assert torch.allclose(velocity_target(x0, eps), eps - x0)


@pytest.mark.parametrize("shift,steps", [(1.0, 10), (6.0, 50), (8.0, 15)])
def test_sampler_recovers_x0_with_oracle(shift, steps):
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 8, 4, 4, 4)
    model, calls = _oracle(x0)
    out = sample_euler(model, noise, torch.zeros(2, 3, 5), steps=steps, shift=shift)
    assert len(calls) == steps
    assert calls[0].tolist() == [1000.0, 1000.0]  # starts at t = 1 fed as 1000
    assert torch.allclose(out, x0, atol=1e-5)


def test_sampler_on_sparse_latent():
    torch.manual_seed(0)
    offsets = torch.tensor([0, 5, 12])
    x0 = torch.randn(12, 16)
    model, _ = _oracle(x0)
    out = sample_euler(model, RaggedLatent(torch.randn(12, 16), offsets), torch.zeros(2, 3, 5), steps=12, shift=6.0,
                       guidance_scale=3.0)
    assert isinstance(out, RaggedLatent) and torch.equal(out.batch_offsets, offsets)
    assert torch.allclose(out.feats, x0, atol=1e-5)


def test_cfg_combination_and_batched_equals_separate():
    def model(x, t, cond):  # velocity depends on the condition; zeros cond = unconditional
        return x * 0.1 + cond.mean(dim=(1, 2)).view(-1, 1, 1) + t.view(-1, 1, 1) * 1e-3

    assert torch.allclose(cfg_combine(torch.tensor(2.0), torch.tensor(0.5), 7.0), torch.tensor(0.5 + 7.0 * 1.5))
    x, cond = torch.randn(2, 3, 4), torch.randn(2, 5, 6) + 1.0
    a = sample_euler(model, x, cond, steps=3, guidance_scale=4.0, shift=2.0, batch_cfg=True)
    b = sample_euler(model, x, cond, steps=3, guidance_scale=4.0, shift=2.0, batch_cfg=False)
    assert torch.allclose(a, b, atol=1e-6)
    # Manual integration with the CFG rule and zeros as the unconditional input.
    grid = euler_timesteps(3, 2.0)
    ref = x.clone()
    for i in range(3):
        tt = torch.full((2,), float(grid[i]) * 1000)
        v = cfg_combine(model(ref, tt, cond), model(ref, tt, torch.zeros_like(cond)), 4.0)
        ref = ref + float(grid[i + 1] - grid[i]) * v
    assert torch.allclose(a, ref, atol=1e-5)
    no_cfg = sample_euler(model, x, cond, steps=3, guidance_scale=1.0, shift=2.0)
    assert not torch.allclose(no_cfg, a, atol=1e-3)
    sampler = EulerSampler(steps=3, cfg_scale=4.0, shift=2.0)
    assert torch.allclose(sampler(model, x, cond), a)


def test_shift_is_monotonic_with_fixed_ends():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0, 6.0, 8.0):
        ts = shift_timesteps(t, s)
        assert ts[0] == 0 and ts[-1] == 1
        assert torch.all(ts[1:] > ts[:-1])
        if s > 1:
            assert torch.all(ts[1:-1] > t[1:-1])  # more time spent near the noise end
    assert shift_timesteps(torch.tensor(0.5), 6.0).item() == pytest.approx(6 * 0.5 / (1 + 5 * 0.5))
    g = euler_timesteps(50, 6.0)
    assert g.numel() == 51 and g[0] == 1 and g[-1] == 0 and torch.all(g[1:] < g[:-1])


def test_logit_normal_statistics():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(200_000, "logit_normal", mean=0.5, std=0.8, generator=g).double()
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    t0 = sample_timesteps(200_000, "logit_normal", generator=g)
    assert t0.median().item() == pytest.approx(0.5, abs=0.01)
    u = sample_timesteps(200_000, "uniform", generator=g)
    assert u.mean().item() == pytest.approx(0.5, abs=0.01) and u.var().item() == pytest.approx(1 / 12, abs=0.002)
    shifted = sample_timesteps(200_000, "uniform", shift=3.0, generator=torch.Generator().manual_seed(0))
    assert shifted.median().item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=0.01)
    with pytest.raises(D3S2Error):
        sample_timesteps(3, "cosine")


def test_condition_dropout():
    cond = torch.randn(4000, 2, 3)
    out, kept = drop_condition(cond, 0.25, torch.Generator().manual_seed(0))
    assert torch.all(out[~kept] == 0) and torch.equal(out[kept], cond[kept])
    assert (~kept).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.all(drop_condition(cond, 1.0)[0] == 0)
    assert torch.equal(drop_condition(cond, 0.0)[0], cond)


def test_flow_loss_zero_for_oracle_and_positive_otherwise():
    x0 = torch.randn(3, 2, 4, 4, 4)
    model, calls = _oracle(x0)
    out = flow_matching_loss(model, x0, torch.randn(3, 5, 4), FlowConfig(), generator=torch.Generator().manual_seed(1))
    assert out["loss"].item() < 1e-8 and calls[0].max() <= 1000 and calls[0].min() >= 0
    zero = flow_matching_loss(lambda x, t, c: torch.zeros_like(x), x0, torch.randn(3, 5, 4),
                              t=torch.full((3,), 0.5), eps=torch.zeros_like(x0))
    assert zero["loss"].item() == pytest.approx(x0.pow(2).mean().item(), rel=1e-5)
    sparse = RaggedLatent(torch.randn(9, 4), torch.tensor([0, 4, 9]))
    smodel, _ = _oracle(sparse.feats)
    assert flow_matching_loss(smodel, sparse, torch.randn(2, 5, 4))["loss"].item() < 1e-8


def test_flow_config_validation():
    with pytest.raises(D3S2Error, match="timestep_sampling"):
        FlowConfig(timestep_sampling="beta")
    with pytest.raises(D3S2Error):
        FlowConfig(cond_drop_prob=1.5)
    assert math.isclose(FlowConfig().t_scale, 1000.0)


def test_progress_bar_option(capsys):
    x0 = torch.randn(1, 2, 3)
    model, calls = _oracle(x0)
    out = sample_euler(model, torch.randn(1, 2, 3), torch.zeros(1, 1, 1), steps=4, progress=True)
    assert len(calls) == 4 and torch.allclose(out, x0, atol=1e-5)
