"""SSA Triton kernels vs the masked PyTorch reference, forward and every gradient (paper Sec. 4.1, Eq. 6-8, Alg. 1).

On a CPU machine the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so sizes are
tiny: a coarse shell of a real mesh, a one-token sample and a random blob in one ragged batch (block sizes that divide
none of the sample sizes). fp32 runs with exact products; fp16 checks the half path (bf16 dots are wrong in the
interpreter, bf16 is checked on the GPU by bench/ssa_check.py).
"""

import pytest
import torch

from d3s2.errors import D3S2Error
from d3s2.ops.ssa import build_ssa_layout, mean_pool_blocks, spatial_sparse_attention
from d3s2.ops.ssa import reference as ref

from test_ssa_layout import blob_coords, mesh_shell_coords

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 1e-2}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "NaN/inf in kernel output"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_layout(m_cmp=2, m_slc=4, m_win=4, seed=0, shell_res=6):
    c = torch.cat([mesh_shell_coords(shell_res, 0), blob_coords(1, 5, 1, seed), blob_coords(37, 11, 2, seed + 1)])
    c = c[torch.randperm(c.shape[0], generator=torch.Generator().manual_seed(seed))]
    return build_ssa_layout(c.to(DEV), m_cmp=m_cmp, m_slc=m_slc, m_win=m_win)


def tensors(lay, h, hkv, d, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, device=DEV).to(dtype).requires_grad_()

    return r(lay.num_tokens, h, d), r(lay.num_tokens, hkv, d), r(lay.num_tokens, hkv, d), \
        r(lay.num_cmp, hkv, d), r(lay.num_cmp, hkv, d), r(lay.num_tokens, h, d).detach()


def ref_fn_grads(fn, ins, do):
    """Reference in fp32 from the same (rounded) inputs: output and grads."""
    ins32 = [t.detach().float().requires_grad_() for t in ins]
    o = fn(*ins32)
    return o, torch.autograd.grad(o, ins32, do.float())


@pytest.mark.parametrize("dtype,h,hkv,d,fused,kv_block_n", [
    (torch.float32, 4, 2, 16, False, 64), (torch.float16, 16, 1, 64, False, 64), (torch.float32, 4, 2, 16, True, 64),
    (torch.float32, 4, 2, 16, False, 16)])
def test_compression_attention(dtype, h, hkv, d, fused, kv_block_n, monkeypatch):
    """fused=True: the one-pass backward with atomic dQ (varlen TUNING["dq_atomic"]). 16-key dK/dV tiles: most lie
    inside one sample (the path that skips the per-query range masks), the rest straddle two."""
    from d3s2.ops.ssa.kernels import varlen_attention
    from d3s2.ops.ssa.kernels.compression import compression_attention_triton

    monkeypatch.setitem(varlen_attention.TUNING, "dq_atomic", fused)
    monkeypatch.setitem(varlen_attention.TUNING, "kv_block_n", kv_block_n)
    lay = make_layout()
    q, _, _, kc, vc, do = tensors(lay, h, hkv, d, dtype)
    scale = d ** -0.5
    o, lse = compression_attention_triton(q, kc, vc, lay, scale)
    ro, rlse = ref.compression_attention(q.float(), kc.float(), vc.float(), lay, scale)
    assert rel(o, ro) < TOL[dtype] and rel(lse, rlse) < TOL[dtype]
    g = torch.autograd.grad(o, (q, kc, vc), do)
    _, rg = ref_fn_grads(lambda a, b, c: ref.compression_attention(a, b, c, lay, scale)[0], (q, kc, vc), do)
    for a, b in zip(g, rg):
        assert rel(a, b) < TOL[dtype]


@pytest.mark.parametrize("m_cmp,top_k,block_s,head_dot", [(2, 3, 64, False), (4, 40, 64, False), (2, 3, 4, False),
                                                          (2, 5, 8, False), (2, 5, 8, True), (4, 40, 64, True)])
def test_score_topk_picks_the_best_blocks(m_cmp, top_k, block_s, head_dot, monkeypatch):
    """Fused Eq. 8 + top-k: the chosen blocks carry the reference's best score mass; counts, uniqueness, padding.
    A small ``block_s`` makes the kernel merge many chunks into its running top-k (the data-dependent merge rounds);
    m_cmp 2 < m_slc 4 runs the slot loop (blocks in the layout's scan order), m_cmp 4 = m_slc the one-to-one path;
    ``head_dot`` sums the group's heads with a dot (16-token tiles)."""
    from d3s2.ops.ssa.kernels import scoring
    from d3s2.ops.ssa.kernels.compression import compression_attention_triton
    from d3s2.ops.ssa.kernels.scoring import score_topk_triton

    for key, val in {"block_s": block_s, "block_s_1": block_s, "head_dot": head_dot, "head_dot_1": head_dot}.items():
        monkeypatch.setitem(scoring.TUNING, key, val)

    lay = make_layout(m_cmp=m_cmp, m_slc=4)
    q, k, _, kc, vc, _ = tensors(lay, 4, 2, 16, torch.float32, seed=3)
    _, lse = compression_attention_triton(q.detach(), kc.detach(), vc.detach(), lay, 0.25)
    idx, sc = score_topk_triton(q.detach(), kc.detach(), lse, lay, top_k, 0.25)
    rs = ref.block_scores(q.detach(), kc.detach(), lse, lay, 0.25)
    blocks = (lay.token_slc_hi - lay.token_slc_lo).long()
    n_valid = (idx >= 0).sum(-1)
    assert torch.equal(n_valid, torch.minimum(blocks, torch.tensor(top_k, device=DEV))[:, None].expand_as(n_valid))
    for row in idx.reshape(-1, top_k).tolist():
        kept = [b for b in row if b >= 0]
        assert len(set(kept)) == len(kept) and row[:len(kept)] == kept  # unique, valid entries first
    # every chosen block belongs to the query's sample
    lo, hi = lay.token_slc_lo.long()[:, None, None], lay.token_slc_hi.long()[:, None, None]
    assert bool(((idx < 0) | ((idx >= lo) & (idx < hi))).all())
    kk = min(top_k, rs.shape[-1])
    best = torch.topk(rs, kk, -1).values
    best = torch.where(torch.isinf(best), torch.zeros_like(best), best).sum(-1)
    chosen = torch.gather(rs, 2, idx.long().clamp_min(0))
    chosen = torch.where(idx < 0, torch.zeros_like(chosen), chosen)
    torch.testing.assert_close(chosen.sum(-1), best, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.where(idx < 0, torch.zeros_like(sc), sc), chosen, rtol=1e-5, atol=1e-6)
    # scores come out best first
    assert bool((sc[..., :-1] >= sc[..., 1:]).all())


@pytest.mark.parametrize("dtype,fwd_tokens", [(torch.float32, 1), (torch.float16, 1), (torch.float32, 8),
                                              (torch.float16, 8), (torch.float32, 3)])
@pytest.mark.slow
def test_selection_attention_and_empty_rows(dtype, fwd_tokens, monkeypatch):
    """fwd_tokens > 1: the grouped forward (union of neighbouring tokens' blocks; 3 is rounded up to 4)."""
    from d3s2.ops.ssa.kernels import selection
    from d3s2.ops.ssa.kernels.selection import selection_attention_triton

    monkeypatch.setitem(selection.TUNING, "fwd_tokens", fwd_tokens)

    lay = make_layout()
    q, k, v, kc, _, do = tensors(lay, 4, 2, 16, dtype, seed=1)
    rs = ref.block_scores(q.detach().float(), kc.detach().float(),
                          ref.compression_attention(q.detach().float(), kc.float(), kc.float(), lay)[1], lay)
    idx = ref.select_topk(rs, 3)
    idx[::7] = -1  # queries that selected nothing: output 0, no gradient
    idx[1::5, :, 0] = -1  # holes inside the list
    o = selection_attention_triton(q, k, v, idx, lay, 0.25)
    ro, rg = ref_fn_grads(lambda a, b, c: ref.selection_attention(a, b, c, idx, lay, 0.25)[0], (q, k, v), do)
    assert rel(o, ro) < TOL[dtype]
    assert float(o.detach()[::7].abs().max()) == 0.0
    g = torch.autograd.grad(o, (q, k, v), do)
    for a, b in zip(g, rg):
        assert rel(a, b) < TOL[dtype]
    g2 = torch.autograd.grad(selection_attention_triton(q, k, v, idx, lay, 0.25), (q, k, v), do)
    assert all(torch.equal(a, b) for a, b in zip(g, g2)), "selection backward must be deterministic"


@pytest.mark.parametrize("dtype,shift,kv_block_n", [(torch.float32, 0, 64), (torch.float32, 2, 64),
                                                    (torch.float16, 2, 64), (torch.float32, 0, 16)])
def test_window_attention(dtype, shift, kv_block_n, monkeypatch):
    """16-key dK/dV tiles with ``skip_ranges`` on: some lie inside one window (range masks skipped), others straddle."""
    from d3s2.ops.ssa.kernels import window
    from d3s2.ops.ssa.kernels.window import window_attention_triton

    monkeypatch.setitem(window.TUNING, "kv_block_n", kv_block_n)
    monkeypatch.setitem(window.TUNING, "skip_ranges", kv_block_n == 16)

    lay = make_layout()
    q, k, v, _, _, do = tensors(lay, 4, 2, 16, dtype, seed=2)
    w = lay.window(shift)

    def run(a, b, c):
        if w.perm is None:
            return window_attention_triton(a, b, c, w, 0.25)
        p = w.perm
        return window_attention_triton(a[p], b[p], c[p], w, 0.25)[w.inverse]

    o = run(q, k, v)
    ro, rg = ref_fn_grads(lambda a, b, c: ref.window_attention(a, b, c, lay, shift, 0.25)[0], (q, k, v), do)
    assert rel(o, ro) < TOL[dtype]
    for a, b in zip(torch.autograd.grad(o, (q, k, v), do), rg):
        assert rel(a, b) < TOL[dtype]


@pytest.mark.parametrize("n,dtype", [(101, torch.float32), (300, torch.float16), (1, torch.float32), (0, torch.float32)])
def test_bwd_delta_matches_rowsum(n, dtype):
    """The backward's delta = rowsum(dO * O): row counts that are not a multiple of the kernel's block, one row, none."""
    from d3s2.ops.ssa.kernels.varlen_attention import bwd_delta

    g = torch.Generator(device=DEV).manual_seed(n)
    o = torch.randn(n, 3, 16, generator=g, device=DEV).to(dtype)
    do = torch.randn(n, 3, 16, generator=g, device=DEV).to(dtype)
    got = bwd_delta(o, do)
    assert got.shape == (n, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, (o.double() * do.double()).sum(-1).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nb", [1, 2, 3])
def test_gated_combine(nb):
    from d3s2.ops.ssa.kernels.gates import gated_combine_triton

    g = torch.Generator(device=DEV).manual_seed(nb)
    br = [torch.randn(37, 3, 16, generator=g, device=DEV).requires_grad_() for _ in range(nb)]
    gl = torch.randn(37, nb, generator=g, device=DEV).requires_grad_()
    do = torch.randn(37, 3, 16, generator=g, device=DEV)
    o = gated_combine_triton(br, gl)
    ro = ref.gated_combine(br, gl)
    assert rel(o, ro) < 1e-6
    for a, b in zip(torch.autograd.grad(o, (*br, gl), do), torch.autograd.grad(ro, (*br, gl), do)):
        assert rel(a, b) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("branches", [("cmp", "slc", "win"), ("slc", "win"), ("cmp",)])
def test_whole_op_triton_matches_reference(branches):
    lay = make_layout(m_cmp=2, m_slc=4, m_win=4, seed=4)
    q, k, v, _, _, do = tensors(lay, 4, 2, 16, torch.float32, seed=5)
    gl = torch.randn(lay.num_tokens, len(branches), device=DEV).requires_grad_()
    ins = (q, k, v, gl)
    outs = {}
    for be in ("triton", "reference"):
        o = spatial_sparse_attention(q, k, v, lay, gate_logits=gl, top_k=5, branches=branches, window_shift=2,
                                     backend=be)
        outs[be] = (o, torch.autograd.grad(o, ins, do))
    assert rel(outs["triton"][0], outs["reference"][0]) < 2e-5
    for a, b in zip(outs["triton"][1], outs["reference"][1]):
        if b.abs().max() == 0:
            assert float(a.abs().max()) == 0.0
        else:
            assert rel(a, b) < 2e-5


def test_dispatcher_choices_and_errors():
    lay = make_layout()
    q, k, v, _, _, _ = tensors(lay, 4, 2, 16, torch.float32)
    with torch.no_grad():
        o = spatial_sparse_attention(q, k, v, lay, top_k=2, branches=("cmp", "win"), backend="auto")
        # auto = the blocked PyTorch backend on CPU (tests/test_ssa_blocked.py checks it against the reference)
        exp = spatial_sparse_attention(q, k, v, lay, top_k=2, branches=("cmp", "win"),
                                       backend="blocked" if DEV == "cpu" else "reference")
    assert torch.equal(o, exp) if DEV == "cpu" else rel(o, exp) < 1e-4
    ks = lay.to_sorted(k.detach())
    kc = mean_pool_blocks(ks, lay)
    assert kc.shape == (lay.num_cmp, 2, 16)
    last = lay.num_cmp - 1
    torch.testing.assert_close(kc[last], ks[int(lay.cmp_offsets[last]):].mean(0))
    with pytest.raises(D3S2Error):
        spatial_sparse_attention(q, k, v, lay, backend="cuda")
    with pytest.raises(D3S2Error):
        spatial_sparse_attention(q[:-1], k[:-1], v[:-1], lay)
    with pytest.raises(D3S2Error):
        spatial_sparse_attention(q, k, v, lay, branches=("cmp", "dense"))
    with pytest.raises(D3S2Error):
        spatial_sparse_attention(q[..., :12], k[..., :12], v[..., :12], lay)
