"""The blocked CPU backend of Spatial Sparse Attention (d3s2.ops.ssa.blocked) vs the masked dense reference
(paper Sec. 4.1, Eq. 6-8, Algorithm 1): outputs, the top-k choice and every gradient on fresh random inputs over real
(mesh shell) and random sparse layouts, ragged batches and edge cases; dispatch ("auto" on CPU reaches it from the
functional op, the module and the SS-DiT); and that no N x N-sized tensor is ever created.
"""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import d3s2.ops.ssa.blocked as blocked
from d3s2.errors import D3S2Error
from d3s2.ops.ssa import build_ssa_layout, resolve_backend, spatial_sparse_attention
from d3s2.ops.ssa import reference as ref

from test_ssa_layout import blob_coords, mesh_shell_coords

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU runs: 1 thread is faster on a busy machine


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "NaN/inf in the blocked output"
    assert torch.isfinite(b).all(), "NaN/inf in the reference"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ragged_coords(seed=0, shell_res=7):
    """A mesh shell, a one-token sample, a 3-token sample (fewer blocks than top_k) and a random blob: very different
    token counts, none a multiple of any block size, rows shuffled."""
    c = torch.cat([mesh_shell_coords(shell_res, 0), blob_coords(1, 5, 1, seed), blob_coords(3, 9, 2, seed + 2),
                   blob_coords(41, 11, 3, seed + 1)])
    return c[torch.randperm(c.shape[0], generator=torch.Generator().manual_seed(seed))]


def make_inputs(lay, h, hkv, d, nb, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    n = lay.num_tokens
    ins = dict(q=r(n, h, d), k=r(n, hkv, d), v=r(n, hkv, d), k_cmp=r(lay.num_cmp, hkv, d),
               v_cmp=r(lay.num_cmp, hkv, d), gate_logits=r(n, nb))
    return ins, torch.randn(n, h, d, generator=g, dtype=torch.float64).to(dtype)


def run_both(lay, ins, do, **kw):
    res = {}
    names = list(ins)
    for be in ("blocked", "reference"):
        o, parts = spatial_sparse_attention(ins["q"], ins["k"], ins["v"], lay, k_cmp=ins["k_cmp"], v_cmp=ins["v_cmp"],
                                            gate_logits=ins["gate_logits"], backend=be, return_parts=True, **kw)
        grads = torch.autograd.grad(o, [ins[n] for n in names], do, allow_unused=True)
        res[be] = (o, parts, dict(zip(names, grads)))
    return res


def assert_match(res, tol, branches):
    (ob, pb, gb), (orf, prf, gr) = res["blocked"], res["reference"]
    assert ob.dtype == orf.dtype and ob.shape == orf.shape
    assert rel(ob, orf) < tol
    for b in branches:
        assert rel(pb[b], prf[b]) < tol, b
    if "slc" in branches:
        assert torch.equal(pb["idx"], prf["idx"]), "the blocked top-k chose other blocks than the reference"
    for name, g in gr.items():
        if g is None or float(g.abs().max()) == 0.0:
            # a gradient that is zero in exact arithmetic (e.g. q of a one-token sample): rounding noise only
            assert gb[name] is None or float(gb[name].abs().max()) < 1e-6, name
        else:
            assert gb[name] is not None, name
            assert rel(gb[name], g) < tol, name


@pytest.mark.parametrize("m_cmp,m_slc,m_win,top_k,shift,h,hkv", [
    (2, 4, 4, 4, 2, 6, 2),  # v1.0-like (m_cmp < m_slc), GQA 3 heads per KV head, shifted windows
    (4, 4, 4, 2, 0, 4, 1),  # v1.1-like (m_cmp == m_slc), MQA, windows = selection blocks
    (2, 4, 2, 40, 1, 2, 2),  # top_k larger than every sample's block count (-1 padding), windows != blocks
])
def test_blocked_matches_reference_on_ragged_real_layouts(m_cmp, m_slc, m_win, top_k, shift, h, hkv):
    lay = build_ssa_layout(ragged_coords(seed=m_cmp + top_k), m_cmp=m_cmp, m_slc=m_slc, m_win=m_win)
    assert lay.batch_size == 4 and lay.num_tokens % m_slc
    ins, do = make_inputs(lay, h, hkv, 16, 3, seed=top_k)
    res = run_both(lay, ins, do, top_k=top_k, window_shift=shift)
    assert_match(res, TOL[torch.float32], ("cmp", "slc", "win"))
    idx = res["blocked"][1]["idx"]
    # samples with fewer blocks than top_k (the 1-token one always) pad their rows with -1
    n_blocks = (lay.token_slc_hi - lay.token_slc_lo).long()
    assert bool((n_blocks < top_k).any())
    assert torch.equal((idx >= 0).sum(-1), n_blocks.clamp(max=top_k)[:, None].expand(-1, hkv))


def test_blocked_is_exact_in_float64_and_through_small_chunks():
    """float64 agrees to 1e-10 (same function, not an approximation); tiny chunks/tiles/query passes exercise every
    chunk boundary of the three branches."""
    lay = build_ssa_layout(ragged_coords(seed=3), m_cmp=2, m_slc=4, m_win=4)
    ins, do = make_inputs(lay, 4, 2, 16, 3, dtype=torch.float64, seed=7)
    assert_match(run_both(lay, ins, do, top_k=3, window_shift=2), TOL[torch.float64], ("cmp", "slc", "win"))
    ins, do = make_inputs(lay, 4, 2, 16, 3, seed=8)
    sorted_ins = {k: (lay.to_sorted(t) if t.shape[0] == lay.num_tokens else t) for k, t in ins.items()}
    outs = []
    for kw in ({}, dict(chunk_elems=300, tile=3, query_chunk=37)):
        o, parts = blocked.ssa_blocked(sorted_ins["q"], sorted_ins["k"], sorted_ins["v"], sorted_ins["k_cmp"],
                                       sorted_ins["v_cmp"], sorted_ins["gate_logits"], lay, top_k=3, window_shift=2,
                                       return_parts=True, **kw)
        outs.append((o, parts["idx"], torch.autograd.grad(o, list(ins.values()), do, retain_graph=True)))
    r, _ = ref.ssa_reference(sorted_ins["q"], sorted_ins["k"], sorted_ins["v"], sorted_ins["k_cmp"],
                             sorted_ins["v_cmp"], sorted_ins["gate_logits"], lay, top_k=3, window_shift=2,
                             return_parts=True)
    assert rel(outs[1][0], r) < 2e-5 and torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(outs[0][2], outs[1][2]):
        assert rel(b, a) < 2e-5


@pytest.mark.parametrize("branches", [("slc", "win"), ("cmp",), ("win",), ("cmp", "slc")])
def test_branch_subsets_and_no_gates(branches):
    lay = build_ssa_layout(ragged_coords(seed=5), m_cmp=2, m_slc=4, m_win=4)
    ins, do = make_inputs(lay, 4, 2, 16, len(branches), seed=11)
    assert_match(run_both(lay, ins, do, top_k=2, branches=branches), TOL[torch.float32], branches)
    ins["gate_logits"] = None  # plain sum
    q, k, v = ins["q"], ins["k"], ins["v"]
    o = spatial_sparse_attention(q, k, v, lay, top_k=2, branches=branches, backend="blocked")  # mean-pooled k/v_cmp
    r = spatial_sparse_attention(q, k, v, lay, top_k=2, branches=branches, backend="reference")
    assert rel(o, r) < TOL[torch.float32]
    for a, b in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(r, (q, k, v), do)):
        assert rel(a, b) < TOL[torch.float32]


@pytest.mark.parametrize("case", ["one_token", "single_block", "one_token_blocks", "nsa"])
def test_edge_layouts(case):
    if case == "one_token":
        lay = build_ssa_layout(torch.tensor([[0, 3, 1, 2]]), m_cmp=2, m_slc=4, m_win=4)
    elif case == "single_block":  # 13 tokens inside one 4^3 block
        lay = build_ssa_layout(blob_coords(13, 4, 0, 1), m_cmp=2, m_slc=4, m_win=4)
    elif case == "one_token_blocks":  # isolated voxels: every block (and window) holds one token
        c = torch.tensor([[0, 8 * i, 8 * (i % 2), 0] for i in range(9)] + [[1, 5, 5, 5], [1, 21, 0, 3]])
        lay = build_ssa_layout(c, m_cmp=2, m_slc=4, m_win=4)
        assert lay.max_slc_tokens == 1
    else:  # the NSA ablation's 1D blocks go through the same code
        lay = build_ssa_layout(ragged_coords(seed=9), m_cmp=2, m_slc=4, m_win=3, mode="nsa")
    ins, do = make_inputs(lay, 4, 2, 16, 3, seed=13)
    assert_match(run_both(lay, ins, do, top_k=3, window_shift=lay.m_win // 2), TOL[torch.float32],
                 ("cmp", "slc", "win"))


def test_selection_with_given_indices_holes_and_empty_rows():
    """Arbitrary block lists (as the kernels' tests give them): holes, queries that selected nothing (output 0, no
    gradient), and no NaN anywhere."""
    lay = build_ssa_layout(ragged_coords(seed=2), m_cmp=2, m_slc=4, m_win=4)
    ins, do = make_inputs(lay, 4, 2, 16, 3, seed=17)
    q, k, v = (lay.to_sorted(ins[n]) for n in ("q", "k", "v"))
    kc = ins["k_cmp"].detach()
    lse = ref.compression_attention(q.detach(), kc, kc, lay)[1]
    idx = ref.select_topk(ref.block_scores(q.detach(), kc, lse, lay), 3)
    idx[::7] = -1
    idx[1::5, :, 0] = -1
    o = blocked.selection_attention(q * 0.25, k, v, idx, lay, tile=5)
    r = ref.selection_attention(q, k, v, idx, lay, 0.25)[0]
    assert rel(o, r) < 2e-5
    assert float(o.detach()[::7].abs().max()) == 0.0
    ga = torch.autograd.grad(o, (ins["q"], ins["k"], ins["v"]), lay.to_sorted(do), retain_graph=True)
    gb = torch.autograd.grad(r, (ins["q"], ins["k"], ins["v"]), lay.to_sorted(do))
    for a, b in zip(ga, gb):
        assert rel(a, b) < 2e-5


def test_auto_reaches_blocked_from_op_module_and_dit(monkeypatch):
    from d3s2.config import load_model_config
    from d3s2.models.ss_dit import SSDiT
    from d3s2.nn.ssa import SSAConfig, SpatialSparseAttention
    from d3s2.sparse import SparseTensor

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "blocked" and resolve_backend("reference", cpu) == "reference"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(D3S2Error):
        resolve_backend("dense", cpu)
    calls = []
    real = blocked.ssa_blocked
    monkeypatch.setattr(blocked, "ssa_blocked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    lay = build_ssa_layout(ragged_coords(seed=1), m_cmp=2, m_slc=4, m_win=4)
    ins, _ = make_inputs(lay, 4, 2, 16, 3)
    with torch.no_grad():
        o = spatial_sparse_attention(ins["q"], ins["k"], ins["v"], lay, top_k=2)
        assert len(calls) == 1
        assert torch.equal(o, spatial_sparse_attention(ins["q"], ins["k"], ins["v"], lay, top_k=2, backend="blocked"))
        r = spatial_sparse_attention(ins["q"], ins["k"], ins["v"], lay, top_k=2, backend="reference")
        assert len(calls) == 2 and rel(o, r) < 2e-5
    # the module (config backend "auto") and its explicit reference agree
    torch.manual_seed(0)
    m = SpatialSparseAttention(SSAConfig.v1_0(dim=32, num_heads=4, num_kv_heads=2, head_dim=16, m_cmp=2, m_slc=4,
                                              m_win=4, top_k=3, norm_groups=4))
    assert m.config.backend == "auto"
    coords = ragged_coords(seed=4)
    mlay = m.make_layout(coords)
    x = torch.randn(coords.shape[0], 32, requires_grad=True)
    n0 = len(calls)
    y = m(x, mlay, window_shift=2)
    assert len(calls) == n0 + 1
    gx = torch.autograd.grad(y.square().sum(), x)[0]
    m.with_backend("reference")
    yr = m(x, mlay, window_shift=2)
    assert len(calls) == n0 + 1 and rel(y, yr) < 2e-5
    assert rel(gx, torch.autograd.grad(yr.square().sum(), x)[0]) < 2e-5
    # the SS-DiT built from a config with ssa_backend "auto": every SSA block runs the blocked backend on CPU
    p = dataclasses.replace(load_model_config("ss_dit_tiny").params)
    assert p.ssa_backend == "auto"
    dit = SSDiT(p).eval()
    c = torch.cat([mesh_shell_coords(6, 0), blob_coords(20, 6, 1, 3)])
    xs = SparseTensor(torch.randn(c.shape[0], p.in_channels), c)
    n0 = len(calls)
    with torch.no_grad():
        dit(xs, torch.tensor([500.0, 20.0]), torch.randn(2, 3, p.cond_channels))
    assert len(calls) - n0 == p.num_blocks


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates (deterministic, no timing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def _layout_with_tokens(n_target: int, batch: int = 0):
    """A 3D shell of ~n_target tokens: the surface cells of a sphere (real-like, not random)."""
    r = (n_target / (4 * 3.14159)) ** 0.5 * 0.98
    ext = int(2 * r) + 4
    g = torch.stack(torch.meshgrid(*[torch.arange(ext)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dist = ((g.float() + 0.5 - ext / 2) ** 2).sum(1).sqrt()
    c = g[(dist - r).abs() < 0.5]
    return torch.cat([torch.full((c.shape[0], 1), batch), c], 1)


def test_no_n_by_n_tensor_at_20k_tokens():
    """A ~20k-token shell runs forward without any tensor of N^2 / 16 elements (the largest is a logits chunk or an
    [N, H, D]-sized buffer); the same probe flags the dense reference on 2k tokens, so the check can fail."""
    coords = _layout_with_tokens(20000)
    lay = build_ssa_layout(coords, m_cmp=4, m_slc=8, m_win=8)
    n = lay.num_tokens
    assert 18000 < n < 26000
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, 2, 16, generator=g)
    k, v = torch.randn(n, 1, 16, generator=g), torch.randn(n, 1, 16, generator=g)
    probe = _LargestTensor()
    with torch.no_grad(), probe:
        o = spatial_sparse_attention(q, k, v, lay, top_k=4, window_shift=4, backend="blocked")
    assert torch.isfinite(o).all() and o.shape == (n, 2, 16)
    assert probe.largest < n * n // 16, (probe.largest, probe.op)
    assert probe.largest <= max(4 * blocked.CHUNK_ELEMS, 8 * n * 2 * 16 * 4), (probe.largest, probe.op)
    # the probe does see an N x N-scale reference
    small = build_ssa_layout(_layout_with_tokens(2000), m_cmp=4, m_slc=8, m_win=8)
    ns = small.num_tokens
    ref_probe = _LargestTensor()
    with torch.no_grad(), ref_probe:
        spatial_sparse_attention(q[:ns], k[:ns], v[:ns], small, top_k=4, branches=("win",), backend="reference")
    assert ref_probe.largest >= ns * ns // 16
