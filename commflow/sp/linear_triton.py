"""Own Triton kernel for the gated chunk backward's ``dq, dk, dg`` (scalar data-dependent ``g``).

Why it exists: fla-core 0.6.0 refuses its gated ``chunk_bwd_dqkwg`` on Hopper with Triton
3.4-3.7.0 because Triton miscompiled it there (fla #640; the GPU machine has Triton 3.6).
The bisection in fla PR #826 traced the wrong results to ``tl.dot(tl.trans(b_ds), b_q)``:
transposing a tensor that lives in the wgmma *output* register layout. This kernel
never transposes a computed tensor. It forms both ``ds[t, s] = do_t . v_s`` and
``ds^T[s, t] = v_s . do_t`` as products of tiles loaded from memory (the transposed tile
is loaded with swapped strides), which costs one extra ``[BT, BT]`` product per
``V`` block and keeps every ``tl.dot`` operand a freshly loaded or cast tile.

Math (chunk-local base-2 cumulative gate ``b2``, see :mod:`commflow.sp.linear_kernels`)::

    dq = scale * (exp2(b2_t) do h^T + (ds * M * exp2(b2_t - b2_s)) k)
    dk = exp2(b2_last - b2_s) v dh^T + scale * (ds^T * M^T * exp2(b2_t - b2_s)) q
    db = q . dq - k . dk  (+ at the chunk's last token: exp2(b2_last) <h, dh> + sum_s k_s . dk_s^inter)

``db`` comes back per token, before the chunk-local reverse cumsum that turns it into ``dg``.

Correctness guard: :func:`checked_chunk_bwd_dqkg` runs the kernel once per (device,
dtype, head dims, chunk size) on a small random problem against the torch formulation
(:func:`commflow.sp.linear_kernels.torch_chunk_dqkg`) and, on a mismatch, warns and makes
the caller use the torch formulation instead: a miscompiling Triton never gives wrong
gradients silently. ``COMMFLOW_LASP2_DQKG=torch`` skips the kernel altogether.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

__all__ = ["checked_chunk_bwd_dqkg", "chunk_bwd_dqkg", "self_check"]

try:  # optional: only the GPU path needs Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

LN2 = math.log(2.0)
# The largest relative error (max |kernel - torch| / max |torch|) the self-check accepts:
# bf16 tiles in the products give ~1e-2; the miscompile of fla #640 gave errors of order 1.
SELF_CHECK_RTOL = 5e-2

if triton is not None:

    @triton.autotune(
        configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)],
        key=["H", "K", "V", "BT", "BK", "BV"],
    )
    @triton.jit(do_not_specialize=["T"])
    def _chunk_bwd_dqkg_kernel(
        q, k, v, g, h, dh, do, dq, dk, db, scale, T, n_rows,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    ):
        i_k = tl.program_id(0)
        i_t = tl.program_id(1)
        i_bh = tl.program_id(2)
        i_b = (i_bh // H).to(tl.int64)
        i_h = i_bh % H
        n_chunks = tl.cdiv(T, BT)
        bos = i_b * T  # first token of this batch row
        state = ((i_b * n_chunks + i_t) * H + i_h).to(tl.int64) * K * V

        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        rows = (bos + o_t) * H + i_h  # [BT] token-head row index

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
            b_h = tl.load(h + state + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0)  # h^T [BV, BK]
            b_dh = tl.load(dh + state + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0)
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
            b_ds = tl.dot(b_do, b_vt, b_ds)
            b_dst = tl.dot(b_v, b_dot, b_dst)
            b_dq = tl.dot(b_do, b_h.to(b_do.dtype), b_dq)
            b_dk = tl.dot(b_v, b_dh.to(b_v.dtype), b_dk)

        last = tl.minimum(i_t * BT + BT, T) - 1
        b_g = tl.load(g + rows, mask=m_t, other=0.0)
        b_g_last = tl.load(g + (bos + last) * H + i_h)
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + rows[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)

        b_dq = b_dq * (tl.exp2(b_g) * scale)[:, None]
        b_dk = b_dk * tl.where(m_t, tl.exp2(b_g_last - b_g), 0.0)[:, None]
        # The state's share of d b_last, before the intra-chunk terms join dk.
        b_db_last = tl.sum(b_hdh) * tl.exp2(b_g_last) + tl.sum(b_dk * b_k.to(tl.float32))

        diff = b_g[:, None] - b_g[None, :]  # [t, s]: g_t - g_s, <= 0 where s <= t
        keep = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
        b_ds = tl.where(keep, b_ds * tl.exp2(tl.minimum(diff, 0.0)), 0.0) * scale
        diff_t = b_g[None, :] - b_g[:, None]  # [s, t]: g_t - g_s
        keep_t = (o_t[None, :] >= o_t[:, None]) & m_t[:, None] & m_t[None, :]
        b_dst = tl.where(keep_t, b_dst * tl.exp2(tl.minimum(diff_t, 0.0)), 0.0) * scale
        b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq)
        b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk)

        b_db = tl.sum(b_dq * b_q.to(tl.float32), axis=1) - tl.sum(b_dk * b_k.to(tl.float32), axis=1)
        b_db = tl.where(o_t == last, b_db + b_db_last, b_db)
        tl.store(dq + rows[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(dk + rows[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
        tl.store(db + i_k.to(tl.int64) * n_rows + rows, b_db, mask=m_t)


def chunk_bwd_dqkg(q, k, v, do, g2, h, dh, scale: float, chunk_size: int = 64):
    """``(dq, dk, db)`` for the gated chunk backward (fla's layout).

    ``q, k`` ``[B, T, H, K]``, ``v, do`` ``[B, T, H, V]``, ``g2`` ``[B, T, H]`` fp32 chunk-local
    cumulative log decay in base 2 (fla's ``chunk_local_cumsum(g, scale=1/ln 2)``), ``h`` and
    ``dh`` ``[B, NT, H, K, V]`` (entering states / gradients of the leaving states). ``db`` is
    fp32 ``[B, T, H]``, before the chunk-local reverse cumsum.
    """
    if triton is None:
        raise RuntimeError("chunk_bwd_dqkg needs triton")
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = chunk_size
    BK = min(128, max(16, triton.next_power_of_2(K)))
    BV = min(64, max(16, triton.next_power_of_2(V)))
    NK = triton.cdiv(K, BK)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    db = torch.empty(NK, B, T, H, dtype=torch.float32, device=q.device)
    grid = (NK, triton.cdiv(T, BT), B * H)
    _chunk_bwd_dqkg_kernel[grid](q, k, v, g2, h, dh, do, dq, dk, db, scale, T, B * T * H, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV)
    return dq, dk, db.sum(0) if NK > 1 else db[0]


_VERDICTS: dict[tuple, bool] = {}


def self_check(device, dtype, K: int, V: int, chunk_size: int, *, seed: int = 0) -> tuple[bool, float]:
    """Run the kernel on a small random problem with these compile-time constants and compare
    with the torch formulation. Returns ``(ok, worst relative error)``."""
    from .linear_kernels import TorchChunkKernels, _chunked, _unchunked, torch_chunk_dqkg

    gen = torch.Generator(device="cpu").manual_seed(seed)
    C, B, H = chunk_size, 1, 2
    T = 2 * C + C // 2  # two full chunks and a partial one

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v, do = rnd(B, T, H, K) * K**-0.5, rnd(B, T, H, K), rnd(B, T, H, V), rnd(B, T, H, V)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 3).to(device)
    kern = TorchChunkKernels(C)
    dec = kern.prepare(g, None, T)
    h, _ = kern.states(k, v, dec, None, False)
    dh, _ = kern.state_grads(q, do, dec, None, 0.5, has_initial_state=False)
    b = dec.chunk_cum
    g2 = _unchunked(b[..., None], T)[..., 0] / LN2
    scale = 0.5
    dq, dk, db = chunk_bwd_dqkg(q, k, v, do, g2.float().contiguous(), h.float().contiguous(),
                                dh.float().contiguous(), scale, C)
    chunked = [_chunked(x, C, torch.float32) for x in (q, k, v, do)]
    rq, rk, rdb = torch_chunk_dqkg(*chunked, b.float(), h.float(), dh.float(), scale, C, need_dg=True)
    errs = []
    for mine, ref in ((dq, rq), (dk, rk), (db[..., None], rdb[..., None])):
        ref = _unchunked(ref, T)
        errs.append(((mine.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
    worst = max(errs)
    return bool(worst < SELF_CHECK_RTOL) and math.isfinite(worst), worst


def checked_chunk_bwd_dqkg(q, k, v, do, g2, h, dh, scale: float, chunk_size: int = 64):
    """:func:`chunk_bwd_dqkg` after a once-per-configuration self-check; ``(None, None, None)``
    when the kernel is disabled or failed its check (the caller then uses the torch formulation)."""
    if triton is None or os.environ.get("COMMFLOW_LASP2_DQKG", "triton") == "torch":
        return None, None, None
    key = (str(q.device), q.dtype, q.shape[-1], v.shape[-1], chunk_size)
    if key not in _VERDICTS:
        ok, worst = self_check(q.device, q.dtype, q.shape[-1], v.shape[-1], chunk_size)
        _VERDICTS[key] = ok
        if not ok:
            warnings.warn(f"commflow's Triton gated dq/dk/dg kernel failed its self-check on {key} "
                          f"(relative error {worst:.3g} > {SELF_CHECK_RTOL}); using the torch formulation",
                          RuntimeWarning, stacklevel=2)
    if not _VERDICTS[key]:
        return None, None, None
    return chunk_bwd_dqkg(q, k, v, do, g2, h, dh, scale, chunk_size)
