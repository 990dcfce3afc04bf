"""Ring attention: key/value blocks travel around the ring, partial results merge by LSE.

Rank ``r`` keeps its queries. In step ``i`` it holds the keys and values of rank
``(r - i) mod W``, computes that block, merges it into fp32 accumulators with the
log-sum-exp (:func:`commflow.sp.kernels.merge_`), and meanwhile already sends the
block on to ``r + 1`` and receives the next one from ``r - 1``
(``dist.batch_isend_irecv``): the transfer of step ``i + 1`` is in flight while
step ``i`` computes.

Backward: the same K, V rotation, plus a dK, dV accumulator (fp32) that travels
*with* its block: each rank adds its contribution and passes it on, and after
``W`` hops it arrives back home holding the sum over all ranks. Each block's
backward runs the kernel with the final ``out`` and ``lse``, so its gradients are
exact contributions.

Causal masks (the "half-block trick"):

* ``contiguous``: blocks from earlier ranks are full, the own block is causal,
  later ranks are skipped; rank ``r`` computes ``r + 1/2`` blocks (unbalanced).
* ``zigzag`` (rank ``r`` holds chunks ``r`` and ``2W-1-r``): the own block is
  causal; a block from an earlier rank is needed only for its first chunk, by all
  local queries; a block from a later rank is needed only by the local second
  chunk, against both of its chunks. Every step is then exactly half a block of
  work on every rank, and nothing fully masked is computed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._common import GroupInfo, check_inputs, check_shards_agree, default_scale, group_info, wait_all
from .kernels import acc_dtype, attention_backward, attention_forward, local_attention, merge_

__all__ = ["ring_attention"]


def _block(step: int, rank: int, world: int, layout: str, causal: bool, s: int):
    """What step ``step`` computes: ``(q0, q1, k0, k1, causal)`` over local rows, or None."""
    src = (rank - step) % world
    if not causal:
        return 0, s, 0, s, False
    if src == rank:
        return 0, s, 0, s, True
    if layout == "contiguous":
        return (0, s, 0, s, False) if src < rank else None
    c = s // 2
    if src < rank:  # its first chunk precedes both of ours; its second follows both
        return 0, s, 0, c, False
    return c, s, 0, s, False  # both of its chunks precede our second chunk only


def _exchange(sends: list[torch.Tensor], recvs: list[torch.Tensor], info: GroupInfo):
    """Send ``sends`` to the next rank and receive ``recvs`` from the previous one (async)."""
    ops = [dist.P2POp(dist.isend, t, info.next_rank, info.group) for t in sends]
    ops += [dist.P2POp(dist.irecv, t, info.prev_rank, info.group) for t in recvs]
    return dist.batch_isend_irecv(ops)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, info, causal, scale, layout):
        b, s, hq, d = q.shape
        w = info.world
        acc = acc_dtype(q.dtype)
        k, v = k.contiguous(), v.contiguous()
        out_acc = torch.empty((b, s, hq, d), dtype=acc, device=q.device)
        lse = torch.empty((b, hq, s), dtype=acc, device=q.device)
        # Two receive buffers alternate; the caller's k, v are only ever sent.
        buffers = [(torch.empty_like(k), torch.empty_like(v)) for _ in range(2 if w > 2 else 1)]
        cur_k, cur_v = k, v
        states = {}
        for step in range(w):
            if step + 1 < w:
                nxt_k, nxt_v = buffers[step % len(buffers)]
                works = _exchange([cur_k, cur_v], [nxt_k, nxt_v], info)
            block = _block(step, info.rank, w, layout, causal, s)
            if block is not None:
                q0, q1, k0, k1, blk_causal = block
                o, o_lse, states[step] = attention_forward(
                    q[:, q0:q1], cur_k[:, k0:k1], cur_v[:, k0:k1], causal=blk_causal, scale=scale
                )
                if step == 0:  # the own block covers every row: copy instead of merging
                    out_acc.copy_(o)
                    lse.copy_(o_lse)
                else:
                    merge_(out_acc[:, q0:q1], lse[:, :, q0:q1], o, o_lse)
            if step + 1 < w:
                wait_all(works)
                cur_k, cur_v = nxt_k, nxt_v
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.info, ctx.causal, ctx.scale, ctx.layout, ctx.states = info, causal, scale, layout, states
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        info, scale = ctx.info, ctx.scale
        b, s, hq, d = q.shape
        w = info.world
        acc = acc_dtype(q.dtype)
        dq = torch.zeros((b, s, hq, d), dtype=acc, device=q.device)
        kv_buffers = [(torch.empty_like(k), torch.empty_like(v)) for _ in range(2 if w > 2 else 1)]
        # The travelling dK, dV accumulator of the block we hold, and the one arriving.
        dkv = [torch.zeros((2, *k.shape), dtype=acc, device=k.device), torch.empty((2, *k.shape), dtype=acc, device=k.device)]
        cur_k, cur_v = k, v
        dkv_works = []
        for step in range(w):
            if step + 1 < w:
                nxt_k, nxt_v = kv_buffers[step % len(kv_buffers)]
                kv_works = _exchange([cur_k, cur_v], [nxt_k, nxt_v], info)
            block = _block(step, info.rank, w, ctx.layout, ctx.causal, s)
            grads = None
            if block is not None:
                q0, q1, k0, k1, blk_causal = block
                dq_b, dk_b, dv_b = attention_backward(
                    dout[:, q0:q1], q[:, q0:q1], cur_k[:, k0:k1], cur_v[:, k0:k1], out[:, q0:q1], lse[:, :, q0:q1],
                    ctx.states[step], causal=blk_causal, scale=scale,
                )
                dq[:, q0:q1] += dq_b
                grads = (k0, k1, dk_b, dv_b)
            # The accumulator for this block arrived from the previous rank while we computed.
            wait_all(dkv_works)
            mine, incoming = dkv[step % 2], dkv[(step + 1) % 2]
            if grads is not None:
                k0, k1, dk_b, dv_b = grads
                mine[0, :, k0:k1] += dk_b
                mine[1, :, k0:k1] += dv_b
            if w > 1:
                dkv_works = _exchange([mine], [incoming], info)
            if step + 1 < w:
                wait_all(kv_works)
                cur_k, cur_v = nxt_k, nxt_v
        wait_all(dkv_works)
        # After W hops the accumulator of our own block is back, summed over every rank.
        total = dkv[w % 2] if w > 1 else dkv[0]
        return dq.to(q.dtype), total[0].to(k.dtype), total[1].to(v.dtype), None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "contiguous",
) -> torch.Tensor:
    """Ring attention over the ranks of ``group``.

    Global ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]`` are sharded along the
    sequence (dim 1) in ``layout``; each rank passes ``q [B, S/W, Hq, D]``,
    ``k, v [B, S/W, Hkv, D]`` and gets its rows of the output ``[B, S/W, Hq, D]``.
    Only key/value blocks (``Hkv`` heads, so GQA/MQA shrink the traffic) travel;
    no head count constraint beyond ``Hq % Hkv == 0``.

    Args:
        causal: token ``i`` attends to ``j <= i`` (global positions of ``layout``).
        scale: softmax scale, default ``1/sqrt(D)``.
        layout: ``"contiguous"`` or ``"zigzag"``; use zigzag for causal attention,
            where it gives every rank the same work per step.
    """
    info = group_info(group)
    check_inputs("ring_attention", q, k, v, causal=causal, scale=scale, layout=layout, world=info.world)
    scale = default_scale(q.shape[-1], scale)
    if info.world == 1:
        return local_attention(q, k, v, causal=causal, scale=scale)
    check_shards_agree("ring_attention", q, k, info)
    return _RingAttention.apply(q, k, v, info, causal, scale, layout)
