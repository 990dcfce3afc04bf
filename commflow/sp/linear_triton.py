"""commflow's own Triton chunk kernels: output, dv and dq/dk/dg, with an optional state *fold*.

Why they exist:

1. fla-core 0.6.0 refuses its gated ``chunk_bwd_dqkwg`` on Hopper with Triton 3.4-3.7.0
   because Triton miscompiled it there (fla #640; the GPU machine has Triton 3.6). The
   bisection in fla PR #826 traced the wrong results to ``tl.dot(tl.trans(b_ds), b_q)``:
   a transpose of a tensor in the wgmma *output* register layout. These kernels never
   transpose a computed tensor: every ``tl.dot`` operand is a tile loaded from memory
   (transposed tiles are loaded with swapped strides) or a cast of an accumulator used
   untransposed. ``dq/dk`` need ``ds = do v^T`` and its transpose, so both are formed as
   products of loaded tiles (one extra ``[BT, BT]`` product per ``V`` block).
2. LASP-2 without extra memory passes. The fold adds a rank-level state to every chunk's
   state tile as it is loaded: the output kernel uses ``h_c + 2^{w_c} S_in`` (the state
   arriving from earlier ranks, decayed to chunk ``c``), the backward kernels use
   ``dh_c + 2^{w_c} dS_out`` (the gradient arriving from later ranks). The fold state is
   ``[B, H, K, V]`` fp32 and stays in L2; no full pass over ``q``/``o`` or ``dh`` is added.

Layout as fla: ``q, k`` ``[B, T, H, K]``, ``v, do`` ``[B, T, H, V]``, states
``[B, NT, H, K, V]`` (``h[:, c]`` enters chunk ``c``, ``dh[:, c]`` is the gradient of the
state leaving it), ``g2`` ``[B, T, H]`` fp32 chunk-local cumulative log2 decay,
``gamma2`` ``[H]`` (constant log2 decay), fold weights ``w`` ``[B, NT, H]`` (log2).

Correctness guard: :func:`checked` runs each kernel variant once per (device, dtype, head
dims, chunk size, decay mode, fold) on a small random problem against the torch
formulation and, on a mismatch, warns and returns None so the caller uses torch instead:
a miscompiling Triton never gives wrong results silently. ``COMMFLOW_LINEAR_TRITON=0``
disables these kernels. In a process group, :func:`prime` runs every self-check up front
and makes the ranks agree on the verdicts (one all-reduce), so no rank takes the torch
path while its peers take Triton.

Autotuning cost: :func:`autotune_mode` limits what every Triton autotuner in the process
(fla's and these) does on a new key: ``"off"`` runs one configuration without timing and
caches nothing (correctness checks: fla tunes some kernels over 48 configurations, each a
compile); ``"limited"`` times at most ``AUTOTUNE_LIMIT`` of them; ``"full"`` is Triton's own.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import torch

__all__ = ["autotune_mode", "checked", "chunk_bwd_dqkg", "chunk_bwd_dv", "chunk_fwd_o", "force_occupancy", "prime",
           "self_check"]

try:  # optional: only the GPU path needs Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

LN2 = math.log(2.0)
# The largest relative error (max |kernel - torch| / max |torch|) the self-check accepts:
# bf16 tiles in the products give ~1e-2; the miscompile of fla #640 gave errors of order 1.
SELF_CHECK_RTOL = 5e-2
# H is a runtime argument (index arithmetic only): one compile serves every head count.
# ``occupancy`` (a bucket of the program count, unused in the body) keeps the tuning done on
# a small first call (e.g. the self-check) from deciding the tiles of long sequences.
_KEY = ["K", "V", "BT", "USE_G", "USE_GAMMA", "HAS_FOLD", "occupancy"]
_OUT_CONFIGS = [(128, 8, 3), (128, 8, 2), (64, 4, 3), (64, 4, 2)]  # (BV, warps, stages)

if triton is not None:

    def _value_block_configs() -> list:
        """The output and dv kernels' tunings over ``_OUT_CONFIGS`` (a fresh list per kernel)."""
        return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv, w, s in _OUT_CONFIGS]

    @triton.jit
    def _gates(g, gamma, rows, m_t, i_t, i_h, last, bos, H, BT: tl.constexpr,
               USE_G: tl.constexpr, USE_GAMMA: tl.constexpr):
        """Chunk-local cumulative log2 decay of the chunk's tokens and of its last token."""
        if USE_G:
            b_g = tl.load(g + rows, mask=m_t, other=0.0)
            b_g_last = tl.load(g + (bos + last) * H + i_h)
        else:
            b_gamma = tl.load(gamma + i_h)
            b_g = b_gamma * (tl.arange(0, BT) + 1).to(tl.float32)
            b_g_last = b_gamma * (last - i_t * BT + 1).to(tl.float32)
        return b_g, b_g_last

    @triton.autotune(configs=_value_block_configs(), key=_KEY)
    @triton.jit(do_not_specialize=["T", "H", "occupancy"])
    def _chunk_fwd_o_kernel(
        q, k, v, h, g, gamma, fold, fold_w, o, scale, T, occupancy,
        H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_G: tl.constexpr, USE_GAMMA: tl.constexpr, HAS_FOLD: tl.constexpr,
    ):
        i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_b = (i_bh // H).to(tl.int64)
        i_h = i_bh % H
        n_chunks = tl.cdiv(T, BT)
        bos = i_b * T
        chunk = (i_b * n_chunks + i_t) * H + i_h
        state = chunk.to(tl.int64) * K * V
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        rows = (bos + o_t) * H + i_h
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        if HAS_FOLD:
            w = tl.exp2(tl.load(fold_w + chunk))
            fbase = (i_b * H + i_h) * K * V
        b_o = tl.zeros([BT, BV], dtype=tl.float32)
        b_a = tl.zeros([BT, BT], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_kt = tl.load(k + rows[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
            m_kv = m_k[:, None] & m_v[None, :]
            b_h = tl.load(h + state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
            if HAS_FOLD:
                b_h += w * tl.load(fold + fbase + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            b_o = tl.dot(b_q, b_h.to(b_q.dtype), b_o)
            b_a = tl.dot(b_q, b_kt, b_a)
        keep = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
        if USE_G or USE_GAMMA:
            last = tl.minimum(i_t * BT + BT, T) - 1
            b_g, b_g_last = _gates(g, gamma, rows, m_t, i_t, i_h, last, bos, H, BT, USE_G, USE_GAMMA)
            b_o = b_o * tl.exp2(b_g)[:, None]
            b_a = tl.where(keep, b_a * tl.exp2(tl.minimum(b_g[:, None] - b_g[None, :], 0.0)), 0.0)
        else:
            b_a = tl.where(keep, b_a, 0.0)
        m_tv = m_t[:, None] & m_v[None, :]
        b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_o = (b_o + tl.dot(b_a.to(b_v.dtype), b_v)) * scale
        tl.store(o + rows[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)

    @triton.autotune(configs=_value_block_configs(), key=_KEY)
    @triton.jit(do_not_specialize=["T", "H", "occupancy"])
    def _chunk_bwd_dv_kernel(
        q, k, do, dh, g, gamma, fold, fold_w, dv, scale, T, occupancy,
        H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_G: tl.constexpr, USE_GAMMA: tl.constexpr, HAS_FOLD: tl.constexpr,
    ):
        i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_b = (i_bh // H).to(tl.int64)
        i_h = i_bh % H
        n_chunks = tl.cdiv(T, BT)
        bos = i_b * T
        chunk = (i_b * n_chunks + i_t) * H + i_h
        state = chunk.to(tl.int64) * K * V
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        rows = (bos + o_t) * H + i_h
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        if HAS_FOLD:
            w = tl.exp2(tl.load(fold_w + chunk))
            fbase = (i_b * H + i_h) * K * V
        b_dv = tl.zeros([BT, BV], dtype=tl.float32)
        b_a = tl.zeros([BT, BT], dtype=tl.float32)  # [s, t] = k_s . q_t
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            b_k = tl.load(k + rows[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_qt = tl.load(q + rows[None, :] * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
            m_kv = m_k[:, None] & m_v[None, :]
            b_dh = tl.load(dh + state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
            if HAS_FOLD:
                b_dh += w * tl.load(fold + fbase + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            b_a = tl.dot(b_k, b_qt, b_a)
            b_dv = tl.dot(b_k, b_dh.to(b_k.dtype), b_dv)
        keep = (o_t[None, :] >= o_t[:, None]) & m_t[:, None] & m_t[None, :]  # t >= s
        if USE_G or USE_GAMMA:
            last = tl.minimum(i_t * BT + BT, T) - 1
            b_g, b_g_last = _gates(g, gamma, rows, m_t, i_t, i_h, last, bos, H, BT, USE_G, USE_GAMMA)
            b_dv = b_dv * tl.where(m_t, tl.exp2(b_g_last - b_g), 0.0)[:, None]
            b_a = tl.where(keep, b_a * tl.exp2(tl.minimum(b_g[None, :] - b_g[:, None], 0.0)), 0.0) * scale
        else:
            b_a = tl.where(keep, b_a, 0.0) * scale
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_dv = tl.dot(b_a.to(b_do.dtype), b_do, b_dv)
        tl.store(dv + rows[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)

    @triton.autotune(
        configs=[triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (8, 2), (8, 3))],
        key=_KEY,
    )
    @triton.jit(do_not_specialize=["T", "H", "occupancy"])
    def _chunk_bwd_dqkg_kernel(
        q, k, v, h, dh, do, g, gamma, fold, fold_w, dq, dk, db, scale, T, n_rows, occupancy,
        H, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        USE_G: tl.constexpr, USE_GAMMA: tl.constexpr, HAS_FOLD: tl.constexpr,
    ):
        i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_b = (i_bh // H).to(tl.int64)
        i_h = i_bh % H
        n_chunks = tl.cdiv(T, BT)
        bos = i_b * T
        chunk = (i_b * n_chunks + i_t) * H + i_h
        state = chunk.to(tl.int64) * K * V
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        rows = (bos + o_t) * H + i_h
        if HAS_FOLD:
            w = tl.exp2(tl.load(fold_w + chunk))
            fbase = (i_b * H + i_h) * K * V

        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # [t, s] = do_t . v_s
        b_dst = tl.zeros([BT, BT], dtype=tl.float32)  # [s, t] = v_s . do_t
        b_hdh = tl.zeros([BK], dtype=tl.float32)
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            m_v = o_v < V
            m_tv = m_t[:, None] & m_v[None, :]
            m_vt = m_v[:, None] & m_t[None, :]
            b_v = tl.load(v + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
            b_vt = tl.load(v + rows[None, :] * V + o_v[:, None], mask=m_vt, other=0.0)
            b_do = tl.load(do + rows[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
            b_dot = tl.load(do + rows[None, :] * V + o_v[:, None], mask=m_vt, other=0.0)
            m_vk = m_v[:, None] & m_k[None, :]
            offs = o_k[None, :] * V + o_v[:, None]  # state^T tiles [BV, BK]
            b_h = tl.load(h + state + offs, mask=m_vk, other=0.0).to(tl.float32)
            b_dh = tl.load(dh + state + offs, mask=m_vk, other=0.0).to(tl.float32)
            if HAS_FOLD:
                b_dh += w * tl.load(fold + fbase + offs, mask=m_vk, other=0.0)
            if USE_G:
                b_hdh += tl.sum(b_h * b_dh, axis=0)
            b_ds = tl.dot(b_do, b_vt, b_ds)
            b_dst = tl.dot(b_v, b_dot, b_dst)
            b_dq = tl.dot(b_do, b_h.to(b_do.dtype), b_dq)
            b_dk = tl.dot(b_v, b_dh.to(b_v.dtype), b_dk)

        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        keep = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]  # [t, s]: s <= t
        keep_t = (o_t[None, :] >= o_t[:, None]) & m_t[:, None] & m_t[None, :]  # [s, t]: t >= s
        last = tl.minimum(i_t * BT + BT, T) - 1
        if USE_G or USE_GAMMA:
            b_g, b_g_last = _gates(g, gamma, rows, m_t, i_t, i_h, last, bos, H, BT, USE_G, USE_GAMMA)
            b_dq = b_dq * (tl.exp2(b_g) * scale)[:, None]
            b_dk = b_dk * tl.where(m_t, tl.exp2(b_g_last - b_g), 0.0)[:, None]
            b_ds = tl.where(keep, b_ds * tl.exp2(tl.minimum(b_g[:, None] - b_g[None, :], 0.0)), 0.0) * scale
            b_dst = tl.where(keep_t, b_dst * tl.exp2(tl.minimum(b_g[None, :] - b_g[:, None], 0.0)), 0.0) * scale
        else:
            b_dq = b_dq * scale
            b_ds = tl.where(keep, b_ds, 0.0) * scale
            b_dst = tl.where(keep_t, b_dst, 0.0) * scale
        if USE_G:  # the state's share of d b_last, before the intra-chunk terms join dk
            b_db_last = tl.sum(b_hdh) * tl.exp2(b_g_last) + tl.sum(b_dk * b_k.to(tl.float32))
        b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq)
        b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk)
        tl.store(dq + rows[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(dk + rows[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
        if USE_G:
            b_db = tl.sum(b_dq * b_q.to(tl.float32), axis=1) - tl.sum(b_dk * b_k.to(tl.float32), axis=1)
            b_db = tl.where(o_t == last, b_db + b_db_last, b_db)
            tl.store(db + i_k.to(tl.int64) * n_rows + rows, b_db, mask=m_t)


def _flags(g2, gamma2, fold):
    return {"USE_G": g2 is not None, "USE_GAMMA": gamma2 is not None, "HAS_FOLD": fold is not None}


def _dummy(x):
    return x.new_empty(1, dtype=torch.float32)


def _optional_args(q, g2, gamma2, fold, fold_w) -> tuple:
    """``(g2, gamma2, fold, fold_w)`` with a one-element fp32 placeholder for each absent one
    (the kernels take a pointer either way; the flags keep them from reading it)."""
    d = _dummy(q)
    return tuple(d if t is None else t for t in (g2, gamma2, fold, fold_w))


def _block_k(K: int) -> int:
    """Tile width over the key dim: the next power of two of ``K``, within 16..128."""
    return min(128, max(16, triton.next_power_of_2(K)))


_OCCUPANCY_OVERRIDE: int | None = None


def _occupancy(B, T, H, BT) -> int:
    if _OCCUPANCY_OVERRIDE is not None:
        return _OCCUPANCY_OVERRIDE
    return min(4, triton.cdiv(T, BT) * B * H // 512)


@contextlib.contextmanager
def force_occupancy(bucket: int):
    """Run these kernels under the autotune entry of occupancy ``bucket`` (0..4) whatever the
    problem size: a small re-check then exercises the configuration tuned on long sequences."""
    global _OCCUPANCY_OVERRIDE
    if not 0 <= bucket <= 4:
        raise ValueError(f"bucket must be in 0..4, got {bucket}")
    saved, _OCCUPANCY_OVERRIDE = _OCCUPANCY_OVERRIDE, bucket
    try:
        yield
    finally:
        _OCCUPANCY_OVERRIDE = saved


def _launch_over_value_blocks(kernel, q, k, x, state, g2, gamma2, scale, chunk_size, fold, fold_w):
    """Run the output or the dv kernel: both read ``q, k``, a value-shaped ``x [B, T, H, V]``
    (``v`` or ``do``) and per-chunk states, and write a tensor like ``x``, one program per
    (value block, chunk, batch x head)."""
    B, T, H, K = q.shape
    V = x.shape[-1]
    BT, BK = chunk_size, _block_k(K)
    out = torch.empty_like(x)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), triton.cdiv(T, BT), B * H)  # noqa: E731
    kernel[grid](q, k, x, state, *_optional_args(q, g2, gamma2, fold, fold_w), out, scale, T,
                 _occupancy(B, T, H, BT), H=H, K=K, V=V, BT=BT, BK=BK, **_flags(g2, gamma2, fold))
    return out


def chunk_fwd_o(q, k, v, h, g2, gamma2, scale: float, chunk_size: int = 64, fold=None, fold_w=None):
    """``o [B, T, H, V]`` from the entering states ``h`` (+ ``2^{fold_w} fold`` per chunk)."""
    return _launch_over_value_blocks(_chunk_fwd_o_kernel, q, k, v, h, g2, gamma2, scale, chunk_size, fold, fold_w)


def chunk_bwd_dv(q, k, do, dh, g2, gamma2, scale: float, chunk_size: int = 64, fold=None, fold_w=None):
    """``dv [B, T, H, V]`` from the leaving-state gradients ``dh`` (+ ``2^{fold_w} fold``)."""
    return _launch_over_value_blocks(_chunk_bwd_dv_kernel, q, k, do, dh, g2, gamma2, scale, chunk_size, fold,
                                     fold_w)


def chunk_bwd_dqkg(q, k, v, do, h, dh, g2, gamma2, scale: float, chunk_size: int = 64, fold=None, fold_w=None):
    """``(dq, dk, db)``; ``db`` fp32 ``[B, T, H]`` (gated only, else None), before the chunk-local
    reverse cumsum that turns it into ``dg``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = chunk_size
    BK = _block_k(K)
    BV = min(64, max(16, triton.next_power_of_2(V)))
    NK = triton.cdiv(K, BK)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    db = torch.empty(NK, B, T, H, dtype=torch.float32, device=q.device) if g2 is not None else _dummy(q)
    grid = (NK, triton.cdiv(T, BT), B * H)
    _chunk_bwd_dqkg_kernel[grid](q, k, v, h, dh, do, *_optional_args(q, g2, gamma2, fold, fold_w), dq, dk, db, scale,
                                 T, B * T * H, _occupancy(B, T, H, BT), H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                 **_flags(g2, gamma2, fold))
    if g2 is None:
        return dq, dk, None
    return dq, dk, db.sum(0) if NK > 1 else db[0]


# ----------------------------------------------------------------------------- self-check


def self_check(device, dtype, K: int, V: int, chunk_size: int, mode: str, fold: bool, *, seed: int = 0
               ) -> tuple[bool, float]:
    """All three kernels for one variant on a small random problem (two full chunks and a
    partial one) against the torch backend. Returns ``(ok, worst relative error)``."""
    from .linear_kernels import TorchChunkKernels, fold_log_weights

    gen = torch.Generator(device="cpu").manual_seed(seed)
    C, B, H = chunk_size, 2, 2
    T = 2 * C + C // 2

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    q, k, v, do = rnd(B, T, H, K, scale=K**-0.5), rnd(B, T, H, K, scale=K**-0.5), rnd(B, T, H, V), rnd(B, T, H, V)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 2).to(device) if mode == "g" else None
    g_gamma = (-torch.rand(H, generator=gen) * 0.2).to(device) if mode == "gamma" else None
    s_fold = torch.randn(B, H, K, V, generator=gen).to(device) if fold else None
    scale = K**-0.5
    ref = TorchChunkKernels(C)
    dec = ref.prepare(g, g_gamma, T)
    h, _ = ref.states(k, v, dec, s_fold, False)  # h with the fold already in
    h_local, _ = ref.states(k, v, dec, None, False)
    want_o = ref.output(q, k, v, dec, h_local, scale, fold=s_fold)
    dh, _ = ref.state_grads(q, do, dec, scale)
    want = ref.grads(q, k, v, dec, h, dh, do, scale, fold=s_fold)

    g2 = None if g is None else ref.chunk_cum_log2(dec, T)
    gamma2 = None if g_gamma is None else (g_gamma.float() / LN2).contiguous()
    w_start = w_tail = None
    if fold:
        totals = ref.chunk_totals_log2(dec, B, T).to(device)
        w_start, w_tail = (w.expand(B, w.shape[1], H).contiguous() for w in fold_log_weights(totals))
    f32 = (lambda x: x.float().contiguous())
    o = chunk_fwd_o(q, k, v, f32(h_local), g2, gamma2, scale, C, fold=s_fold, fold_w=w_start)
    dq, dk, db = chunk_bwd_dqkg(q, k, v, do, f32(h), f32(dh), g2, gamma2, scale, C, fold=s_fold, fold_w=w_tail)
    dv = chunk_bwd_dv(q, k, do, f32(dh), g2, gamma2, scale, C, fold=s_fold, fold_w=w_tail)
    got = [o, dq, dk, dv]
    if db is not None:
        got.append(ref.dg_from_db(db, C))
    errs = [((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
            for a, b in zip(got, [want_o, *want])]
    worst = max(errs)
    return bool(math.isfinite(worst) and worst < SELF_CHECK_RTOL), worst


_VERDICTS: dict[tuple, tuple[bool, float]] = {}


def checked(device, dtype, K: int, V: int, chunk_size: int, mode: str, fold: bool) -> bool:
    """Whether this kernel variant may be used here: Triton present, not disabled, self-check passed."""
    if triton is None or os.environ.get("COMMFLOW_LINEAR_TRITON", "1") == "0":
        return False
    key = (str(device), dtype, K, V, chunk_size, mode, fold)
    if key not in _VERDICTS:
        _VERDICTS[key] = self_check(device, dtype, K, V, chunk_size, mode, fold)
        if not _VERDICTS[key][0]:
            warnings.warn(f"commflow's Triton linear-attention kernels failed their self-check on {key} "
                          f"(relative error {_VERDICTS[key][1]:.3g} > {SELF_CHECK_RTOL}); using torch instead",
                          RuntimeWarning, stacklevel=2)
    return _VERDICTS[key][0]


def verdicts() -> dict[tuple, tuple[bool, float]]:
    """Self-check results so far: ``{(device, dtype, K, V, chunk, mode, fold): (ok, worst error)}``."""
    return dict(_VERDICTS)


def prime(device, dtype, K: int, V: int, chunk_size: int = 64, *, group=None) -> dict[tuple, tuple[bool, float]]:
    """Self-check every variant (3 decay modes x fold or not) now, and, in a process group,
    agree on the verdicts: a variant is used only if it passed on every rank (one all-reduce
    of 6 flags, on every rank of ``group``; call it on all of them at the same point).

    Without it the verdicts are taken lazily inside the first forward and backward, per rank.
    Returns the (agreed) verdicts of these variants."""
    import torch.distributed as dist

    variants = [(mode, fold) for mode in ("none", "gamma", "g") for fold in (False, True)]
    keys = [(str(device), dtype, K, V, chunk_size, mode, fold) for mode, fold in variants]
    for mode, fold in variants:
        checked(device, dtype, K, V, chunk_size, mode, fold)
    if group is not None or (dist.is_available() and dist.is_initialized()):
        usable = triton is not None and os.environ.get("COMMFLOW_LINEAR_TRITON", "1") != "0"
        flags = torch.tensor([1.0 if usable and _VERDICTS[k][0] else 0.0 for k in keys], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
        for key, flag in zip(keys, flags.tolist()):
            if usable and _VERDICTS[key][0] and not flag:
                warnings.warn(f"commflow's Triton kernels {key} passed here but failed on another rank; "
                              "using torch on every rank", RuntimeWarning, stacklevel=2)
            if usable:
                _VERDICTS[key] = (bool(flag), _VERDICTS[key][1])
    return {k: _VERDICTS[k] for k in keys if k in _VERDICTS}


# ----------------------------------------------------------------------------- autotune control

AUTOTUNE_LIMIT = 8
"""At most this many configurations are timed per new key in ``"limited"`` mode."""
_AUTOTUNE_MODE = "full"
_ORIGINAL_RUN = None


def _preferred(configs) -> list:
    """Configurations in the order ``"off"`` tries them: few pipeline stages (least shared
    memory) and 4 warps first, then the declared order (stable sort)."""
    return sorted(configs, key=lambda c: (c.num_stages, abs(c.num_warps - 4)))


def _limited(configs, limit: int) -> list:
    """A deterministic spread of at most ``limit`` configurations (the same on every rank):
    4 or 8 warps and 2 or 3 stages where the list has such, then evenly spaced picks."""
    common = [c for c in configs if c.num_warps in (4, 8) and c.num_stages in (2, 3)] or list(configs)
    if len(common) <= limit:
        return common
    return [common[round(i * (len(common) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else common[:1]


def _run_with_mode(self, *args, **kwargs):
    mode = _AUTOTUNE_MODE
    if mode == "full" or len(self.configs) <= 1:
        return _ORIGINAL_RUN(self, *args, **kwargs)
    from triton.runtime.errors import OutOfResources

    saved = self.configs
    try:
        if mode == "limited":  # the tuner times only these; its pick is cached under the usual key
            self.configs = _limited(saved, AUTOTUNE_LIMIT)
            return _ORIGINAL_RUN(self, *args, **kwargs)
        # "off": one configuration, no timing, nothing cached (a later tuned run still tunes)
        self.nargs = dict(zip(self.arg_names, args))
        candidates = self.prune_configs(kwargs) if self.early_config_prune else saved
        error = None
        for config in _preferred(candidates):
            self.configs = [config]
            try:
                return _ORIGINAL_RUN(self, *args, **kwargs)
            except OutOfResources as e:  # too much shared memory for this chip: the next one
                error = e
        raise error
    finally:
        self.configs = saved


@contextlib.contextmanager
def autotune_mode(mode: str):
    """Within the block every Triton autotuner of the process (fla's, commflow's) runs new keys
    in ``mode``: ``"off"`` (one configuration, untimed, not cached), ``"limited"`` (time at most
    :data:`AUTOTUNE_LIMIT`), ``"full"`` (Triton's behaviour). Keys tuned before are unaffected."""
    global _AUTOTUNE_MODE, _ORIGINAL_RUN
    if mode not in ("off", "limited", "full"):
        raise ValueError(f"mode must be 'off', 'limited' or 'full', got {mode!r}")
    if triton is None:
        yield
        return
    from triton.runtime.autotuner import Autotuner

    if _ORIGINAL_RUN is None:  # patched once; the mode decides what the patch does
        _ORIGINAL_RUN = Autotuner.run
        Autotuner.run = _run_with_mode
    saved, _AUTOTUNE_MODE = _AUTOTUNE_MODE, mode
    try:
        yield
    finally:
        _AUTOTUNE_MODE = saved
