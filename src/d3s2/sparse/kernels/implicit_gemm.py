"""Implicit-GEMM sparse convolution kernels (Triton): forward, input gradient, weight gradient (paper Sec. 3.1).

The gather-GEMM-scatter reference (`d3s2.sparse.conv`) launches three kernels per kernel offset and round-trips every
partial product through memory. Here one program owns ``BLOCK_M`` output rows x ``BLOCK_N`` output channels and loops
over all ``K^3`` offsets x ``Cin / BLOCK_K`` channel tiles, gathering its input rows through a neighbour table
``table[k, j]`` (int32 row of the input voxel at offset ``k`` of output ``j``, -1 when inactive; masked loads) and
accumulating ``tl.dot`` products in fp32 registers: one store per output tile, no atomics, deterministic.

* input gradient: the same kernel on ``grad_out`` with transposed weights and the transposed table
  (input row -> output row per offset). For odd submanifold kernels the map is symmetric (offset ``k`` of output
  ``o`` reaching input ``i`` <=> offset ``K^3 - 1 - k`` of ``i`` reaching ``o``), so the forward table serves with
  the weights flipped along the offset axis; otherwise the transposed table is built once from the pairs.
* weight gradient: ``dW[k] = sum_pairs X[in]^T dY[out]`` over the compact (in, out) pair list of offset ``k``. Each
  program tiles ``Cin x Cout`` of one offset and reduces one slice of its pairs into an fp32 partial; partials are
  summed in a fixed order afterwards (deterministic, no atomics).

Rows are processed in Morton (Z-curve) order of the output coordinates (``ConvPlan.order``), so that a tile of
``BLOCK_M`` rows is a compact 3D patch and its 27 gathers hit the same cache lines; results are stored back to the
caller's row order. Row offsets are computed in int64 (23M voxels x 128 channels exceeds 2^31 elements).

Kernels use plain pointer arithmetic (Triton 3.6 .. 3.9) and run in Triton's CPU interpreter for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

__all__ = ["ConvPlan", "KernelConfig", "morton_order", "igemm_forward", "igemm_wgrad", "default_config"]


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def igemm_fwd_kernel(
    X, W, B, TABLE, ORDER, OUT,
    n_out, COUT,
    CIN: tl.constexpr, KV: tl.constexpr, HAS_BIAS: tl.constexpr, SKIP_EMPTY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """OUT[ORDER[j], :] = B + sum_k X[TABLE[k, j], :] @ W[k] for the BLOCK_M positions j of this program."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    jm = j < n_out
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = cn < COUT
    ck0 = tl.arange(0, BLOCK_K)
    K_TILES: tl.constexpr = (CIN + BLOCK_K - 1) // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one flat loop over (offset, channel tile) so that the compiler can pipeline the gathers
    for t in range(KV * K_TILES):
        k = t // K_TILES
        c0 = (t % K_TILES) * BLOCK_K
        idx = tl.load(TABLE + k.to(tl.int64) * n_out + j, mask=jm, other=-1)
        ok = idx >= 0
        ck = c0 + ck0
        km = ck < CIN
        if SKIP_EMPTY:
            if tl.max(idx, axis=0) >= 0:
                a = tl.load(X + idx.to(tl.int64)[:, None] * CIN + ck[None, :], mask=ok[:, None] & km[None, :],
                            other=0.0)
                w = tl.load(W + (k * CIN + ck).to(tl.int64)[:, None] * COUT + cn[None, :],
                            mask=km[:, None] & nm[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PREC)
        else:
            a = tl.load(X + idx.to(tl.int64)[:, None] * CIN + ck[None, :], mask=ok[:, None] & km[None, :], other=0.0)
            w = tl.load(W + (k * CIN + ck).to(tl.int64)[:, None] * COUT + cn[None, :],
                        mask=km[:, None] & nm[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(B + cn, mask=nm, other=0.0).to(tl.float32)[None, :]
    row = tl.load(ORDER + j, mask=jm, other=0).to(tl.int64)
    tl.store(OUT + row[:, None] * COUT + cn[None, :], acc.to(OUT.dtype.element_ty), mask=jm[:, None] & nm[None, :])


@triton.jit
def igemm_wgrad_kernel(
    X, DY, PIN, POUT, PTR, PART,
    COUT, SPLITS,
    CIN: tl.constexpr, KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, PREC: tl.constexpr,
    TRANS_LOAD: tl.constexpr,
):
    """PART[s, k] = sum over slice s of offset k's pairs p of X[PIN[p]]^T @ DY[POUT[p]] (fp32)."""
    k = tl.program_id(0)
    s = tl.program_id(1)
    pid_c = tl.program_id(2)
    n_co = tl.cdiv(COUT, BLOCK_CO)
    ci = (pid_c // n_co) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co = (pid_c % n_co) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    cim = ci < CIN
    com = co < COUT
    start = tl.load(PTR + k)
    end = tl.load(PTR + k + 1)
    per = tl.cdiv(tl.cdiv(end - start, SPLITS), BLOCK_M) * BLOCK_M
    lo = start + s * per
    hi = tl.minimum(lo + per, end)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_M):
        p = p0 + tl.arange(0, BLOCK_M)
        pm = p < hi
        i = tl.load(PIN + p, mask=pm, other=0).to(tl.int64)
        o = tl.load(POUT + p, mask=pm, other=0).to(tl.int64)
        g = tl.load(DY + o[:, None] * COUT + co[None, :], mask=pm[:, None] & com[None, :], other=0.0)  # [M, CO]
        if TRANS_LOAD:  # gather rows as stored ([M, CI], contiguous channels), transpose the register tile
            a = tl.load(X + i[:, None] * CIN + ci[None, :], mask=pm[:, None] & cim[None, :], other=0.0)
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PREC)
        else:  # gather straight into the [CI, M] operand layout
            a = tl.load(X + i[None, :] * CIN + ci[:, None], mask=pm[None, :] & cim[:, None], other=0.0)
            acc = tl.dot(a, g, acc, input_precision=PREC)
    base = (s * KV + k).to(tl.int64) * CIN
    tl.store(PART + (base + ci[:, None]) * COUT + co[None, :], acc, mask=cim[:, None] & com[None, :])


# ------------------------------------------------------------------------------------------------------ host side
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one conv: forward / input-gradient kernel (``block_*``, ``num_*``, ``skip_empty``: skip an
    offset whose whole tile is inactive; measured slower on a shell) and weight-gradient kernel (``wg_*``)."""

    block_m: int = 128
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    skip_empty: bool = False
    # weight gradient
    wg_block_m: int = 64
    wg_block_ci: int = 64
    wg_block_co: int = 64
    wg_warps: int = 4
    wg_stages: int = 3
    wg_programs_per_sm: int = 8
    wg_trans_load: bool = True


# ``TUNING["gpu"]``: optional callable ``(cin, cout) -> KernelConfig | None`` consulted first on CUDA (the
# benchmark's ``--sweep`` installs the configs it measured best; None falls back to the defaults below). The
# interpreter gets small fixed tiles so that tests stay fast; tile sizes never change results.
TUNING: dict[str, object] = {"gpu": None}


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def default_config(cin: int, cout: int, device: torch.device) -> KernelConfig:
    if device.type != "cuda":  # interpreter: one fixed, small config
        return KernelConfig(block_m=32, block_n=_pow2(cout, 16, 32), block_k=_pow2(cin, 16, 32), num_warps=1,
                            num_stages=1, wg_block_m=16, wg_block_ci=_pow2(cin, 16, 32),
                            wg_block_co=_pow2(cout, 16, 32), wg_warps=1, wg_stages=1, wg_programs_per_sm=1)
    override = TUNING.get("gpu")
    if callable(override):
        cfg = override(cin, cout)
        if cfg is not None:
            return cfg
    # H100 sweep (bench/results/sparse_conv-triton-h100.json, "sweep"/"applied_configs"): 128-row tiles, full
    # Cout per tile up to 128, 64-wide channel steps; the weight gradient wants many programs (32 per SM: its loop
    # is latency-bound gathers) and, up to 64 channels, the [CI, M] gather layout.
    bn = _pow2(cout, 16, 128)
    bk = _pow2(cin, 16, 64)
    big = max(cin, cout) > 64
    small = max(cin, cout) <= 32
    return KernelConfig(
        block_m=128, block_n=bn, block_k=bk, num_warps=4 if bn * bk <= 4096 else 8, num_stages=2 if cin >= 64 else 3,
        wg_block_m=64 if big else (256 if small else 128), wg_block_ci=_pow2(cin, 16, 128 if big else 64),
        wg_block_co=_pow2(cout, 16, 128 if big else 64), wg_warps=8 if big else 4, wg_stages=3,
        wg_programs_per_sm=32, wg_trans_load=big,
    )


def _prec(dtype: torch.dtype) -> str:
    """fp32 keeps exact (IEEE) products, matching the reference's fp32 matmuls; half types use the tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # interpreter: still exercise the split-over-pairs path
    return torch.cuda.get_device_properties(device).multi_processor_count


def _spread_bits(v: torch.Tensor) -> torch.Tensor:
    """Insert two zero bits between the low 21 bits of ``v`` (int64): the per-axis step of a 3D Morton code."""
    v = v & 0x1FFFFF
    v = (v | (v << 32)) & 0x1F00000000FFFF
    v = (v | (v << 16)) & 0x1F0000FF0000FF
    v = (v | (v << 8)) & 0x100F00F00F00F00F
    v = (v | (v << 4)) & 0x10C30C30C30C30C3
    v = (v | (v << 2)) & 0x1249249249249249
    return v


def morton_order(coords: torch.Tensor, extent: int) -> torch.Tensor:
    """Row permutation (int64) sorting ``coords [N, 4]`` by (batch, Morton code of x, y, z): consecutive rows form
    compact 2^a x 2^b x 2^c boxes at every scale, which is what a tile of the implicit GEMM gathers around."""
    if coords.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=coords.device)
    bits = max(1, int(extent - 1).bit_length())
    c = coords.to(torch.int64)
    code = _spread_bits(c[:, 1]) << 2 | _spread_bits(c[:, 2]) << 1 | _spread_bits(c[:, 3])
    if 3 * bits + max(1, int(c[:, 0].max()).bit_length()) < 63:
        code = code | (c[:, 0] << (3 * bits))
        return torch.argsort(code)
    # batch does not fit beside the code: stable sort by code, then by batch
    order = torch.argsort(code)
    return order[torch.sort(c[order, 0], stable=True).indices]


@dataclass
class ConvPlan:
    """Everything the kernels need about one (coordinate set, kernel, stride): built once, cached on the input
    SparseTensor next to the reference's neighbour map.

    ``table [K^3, N_out]`` int32 in processing order (input row or -1), ``order [N_out]`` int32 (caller's row of each
    processing position). ``symmetric``: the transposed map is the forward table with offsets reversed.
    """

    table: torch.Tensor
    order: torch.Tensor
    num_in: int
    num_out: int
    symmetric: bool
    in_order: torch.Tensor | None = None  # Morton order of the input rows (only needed for the transposed table)
    max_pairs: int | None = None  # largest per-offset pair count, known once pairs() ran
    _pairs: tuple | None = field(default=None, repr=False)
    _table_t: tuple | None = field(default=None, repr=False)

    @property
    def kernel_volume(self) -> int:
        return int(self.table.shape[0])

    @property
    def num_pairs(self) -> int:
        return int(self.pairs()[2][-1]) if self.num_out else 0

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(in rows, out rows, ptr [K^3 + 1] int64) grouped by offset, outputs in processing order within an offset."""
        if self._pairs is None:
            kv = self.kernel_volume
            pin, pout, counts = [], [], []
            for k in range(kv):  # per offset keeps the temporary nonzero() small at 23M voxels
                row = self.table[k]
                jj = (row >= 0).nonzero().squeeze(1)
                pin.append(row[jj])
                pout.append(self.order[jj])
                counts.append(jj.numel())
            ptr = torch.zeros(kv + 1, dtype=torch.int64)
            ptr[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
            self._pairs = (torch.cat(pin), torch.cat(pout), ptr.to(self.table.device))
            self.max_pairs = max(counts) if counts else 0
        return self._pairs

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(table, order, flip): the input-gradient map. ``flip``: use weights reversed along the offset axis."""
        if self.symmetric:
            return self.table, self.order, True
        if self._table_t is None:
            pin, pout, ptr = self.pairs()
            kv = self.kernel_volume
            dev = self.table.device
            in_order = self.in_order
            inv = torch.empty(self.num_in, dtype=torch.int64, device=dev)
            inv[in_order] = torch.arange(self.num_in, device=dev)
            tt = torch.full((kv, self.num_in), -1, dtype=torch.int32, device=dev)
            bounds = ptr.tolist()
            for k in range(kv):
                a, b = bounds[k], bounds[k + 1]
                if b > a:
                    tt[k, inv[pin[a:b].long()]] = pout[a:b]
            self._table_t = (tt, in_order.to(torch.int32))
        return self._table_t[0], self._table_t[1], False


def igemm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor,
                  order: torch.Tensor, num_out: int, config: KernelConfig | None = None) -> torch.Tensor:
    """``out [num_out, Cout]`` (dtype of ``x``) = bias + sum_k x[table[k]] @ weight[k], stored at rows ``order``."""
    kv, cin, cout = weight.shape
    out = torch.empty(num_out, cout, dtype=x.dtype, device=x.device)
    if num_out == 0:
        return out
    if x.shape[0] == 0 or cin == 0:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
        return out
    cfg = config or default_config(cin, cout, x.device)
    x, weight = x.contiguous(), weight.contiguous()
    grid = (triton.cdiv(num_out, cfg.block_m), triton.cdiv(cout, cfg.block_n))
    igemm_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, table, order, out, num_out, cout,
        CIN=cin, KV=kv, HAS_BIAS=bias is not None, SKIP_EMPTY=cfg.skip_empty, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PREC=_prec(x.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def igemm_wgrad(x: torch.Tensor, grad_out: torch.Tensor, pin: torch.Tensor, pout: torch.Tensor, ptr: torch.Tensor,
                kv: int, config: KernelConfig | None = None, max_pairs: int | None = None) -> torch.Tensor:
    """``dW [K^3, Cin, Cout]`` fp32 = per offset ``x[pin]^T @ grad_out[pout]`` over that offset's pairs
    (``max_pairs``: the largest per-offset pair count, if known; saves a device sync)."""
    cin, cout = x.shape[1], grad_out.shape[1]
    if pin.numel() == 0 or cin == 0 or cout == 0:
        return torch.zeros(kv, cin, cout, dtype=torch.float32, device=x.device)
    cfg = config or default_config(cin, cout, x.device)
    tiles = triton.cdiv(cin, cfg.wg_block_ci) * triton.cdiv(cout, cfg.wg_block_co)
    if max_pairs is None:
        max_pairs = int((ptr[1:] - ptr[:-1]).max())
    want = max(1, cfg.wg_programs_per_sm * _num_sms(x.device) // (kv * tiles))
    splits = max(1, min(want, triton.cdiv(max_pairs, 4 * cfg.wg_block_m)))
    part = torch.empty(splits, kv, cin, cout, dtype=torch.float32, device=x.device)
    igemm_wgrad_kernel[(kv, splits, tiles)](
        x.contiguous(), grad_out.contiguous(), pin, pout, ptr, part, cout, splits, CIN=cin, KV=kv,
        BLOCK_M=cfg.wg_block_m, BLOCK_CI=cfg.wg_block_ci, BLOCK_CO=cfg.wg_block_co, PREC=_prec(x.dtype),
        TRANS_LOAD=cfg.wg_trans_load, num_warps=cfg.wg_warps, num_stages=cfg.wg_stages,
    )
    return part.sum(0) if splits > 1 else part[0]
