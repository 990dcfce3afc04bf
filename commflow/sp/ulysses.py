"""Ulysses (DeepSpeed-Ulysses) attention: all-to-all from sequence shards to head shards.

Each rank starts with all heads of ``S/W`` tokens and, after one all-to-all, holds
``Hq/W`` query heads (and their key/value heads) of all ``S`` tokens; it runs the
ordinary local kernel and a second all-to-all brings the output back to sequence
shards. The backward mirrors it: ``dO`` forward, ``dQ, dK, dV`` back.

What makes it fast (and what DeepSpeed's ``DistributedAttention`` does not do):

* **one packed all-to-all for q, k and v**: the send buffer holds, per destination
  rank and token, that rank's query heads followed by its key and value heads
  (``[W, B, S/W, hq + 2 hkv, D]``), so the three tensors cost one collective, and
  the received buffer *is* the head-sharded q, k, v (strided views, no unpacking
  copy for ``B = 1``); gradients return the same way in one collective.
* **overlap**: the local heads are processed in ``head_chunks`` groups; the
  all-to-all of group ``c + 1`` and the return of group ``c - 1`` run while group
  ``c`` computes, so only the first and the last transfer are exposed.
* exactly one copy per direction on the sequence-sharded side (packing the
  send buffer, writing the result into the caller's layout) and none on the
  head-sharded side; the kernel sees the same ``[B, S, h, D]`` tensors as
  single-GPU SDPA.

GQA/MQA: key/value heads must split evenly over the ``W`` ranks. With ``Hkv`` not
a multiple of ``W`` each key/value head is repeated ``W / gcd(Hkv, W)`` times (the
least that makes them split), and the backward sums the copies' gradients.
Query heads must be divisible by ``W``; otherwise use ring or all-gather attention,
which have no head constraint.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._common import (
    check_inputs,
    check_shards_agree,
    default_scale,
    global_to_zigzag,
    group_info,
    zigzag_to_global,
)
from .kernels import acc_dtype, attention_backward, attention_forward, local_attention

__all__ = ["ulysses_attention"]


def _all_to_all(send: torch.Tensor, info):
    """Start an all-to-all of ``send [W, ...]`` (row ``j`` goes to rank ``j``); returns (recv, work)."""
    recv = torch.empty_like(send)
    return recv, dist.all_to_all_single(recv, send, group=info.group, async_op=True)


def _seq_major(x: torch.Tensor, world: int) -> torch.Tensor:
    """``[B, S, h, D]`` (rows in rank order) -> ``[W, B, S/W, h, D]`` send buffer."""
    b, s = x.shape[:2]
    if b == 1:
        return x.contiguous().view(world, 1, s // world, *x.shape[2:])
    return x.view(b, world, s // world, *x.shape[2:]).transpose(0, 1).contiguous()


def _full_sequence(recv: torch.Tensor) -> torch.Tensor:
    """Received ``[W, B, S/W, h, D]`` (rows from rank ``j`` at ``j``) -> ``[B, S, h, D]``."""
    w, b, s_local = recv.shape[:3]
    if b == 1:
        return recv.view(1, w * s_local, *recv.shape[3:])
    return recv.transpose(0, 1).reshape(b, w * s_local, *recv.shape[3:])


class _Ulysses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, info, causal, scale, layout, repeat, chunks):
        w = info.world
        b, s_local, hq, d = q.shape
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        hq_c, hkv_c = hq // w // chunks, k.shape[2] // w // chunks
        reorder = causal and layout == "zigzag"  # without a mask the token order is irrelevant
        # [B, S/W, W, chunks, h, D]: destination rank, then chunk, then heads within the chunk.
        q6, k6, v6 = (t.reshape(b, s_local, w, chunks, -1, d) for t in (q, k, v))

        def send_qkv(c):
            send = torch.empty((w, b, s_local, hq_c + 2 * hkv_c, d), dtype=q.dtype, device=q.device)
            torch.cat([t[:, :, :, c].permute(2, 0, 1, 3, 4) for t in (q6, k6, v6)], dim=3, out=send)
            return _all_to_all(send, info)

        out = torch.empty_like(q)
        out6 = out.view(b, s_local, w, chunks, hq_c, d)
        def finish(c, recv, work):
            work.wait()
            out6[:, :, :, c] = recv.permute(1, 2, 0, 3, 4)  # head group j of chunk c came from rank j

        saved, states, returning = [], [], None
        pending = send_qkv(0)
        for c in range(chunks):
            nxt = send_qkv(c + 1) if c + 1 < chunks else None  # in flight while chunk c computes
            recv, work = pending
            work.wait()
            qkv = _full_sequence(recv)
            if reorder:
                qkv = zigzag_to_global(qkv, w)
            q_c, k_c, v_c = qkv[:, :, :hq_c], qkv[:, :, hq_c : hq_c + hkv_c], qkv[:, :, hq_c + hkv_c :]
            out_c, lse_c, state = attention_forward(q_c, k_c, v_c, causal=causal, scale=scale)
            saved += [qkv, out_c, lse_c]
            states.append(state)
            sent = (c, *_all_to_all(_seq_major(global_to_zigzag(out_c, w) if reorder else out_c, w), info))
            if returning:  # the previous chunk's return ran under this chunk's kernel
                finish(*returning)
            returning, pending = sent, nxt
        finish(*returning)
        ctx.save_for_backward(*saved)
        ctx.info, ctx.causal, ctx.scale, ctx.reorder, ctx.states = info, causal, scale, reorder, states
        ctx.shape, ctx.kv_heads, ctx.repeat, ctx.chunks, ctx.heads = q.shape, k.shape[2], repeat, chunks, (hq_c, hkv_c)
        return out

    @staticmethod
    def backward(ctx, dout):
        info, w, chunks = ctx.info, ctx.info.world, ctx.chunks
        b, s_local, hq, d = ctx.shape
        hq_c, hkv_c = ctx.heads
        saved = ctx.saved_tensors
        do6 = dout.reshape(b, s_local, w, chunks, hq_c, d)

        def send_dout(c):
            return _all_to_all(do6[:, :, :, c].permute(2, 0, 1, 3, 4).contiguous(), info)

        dq = torch.empty(ctx.shape, dtype=dout.dtype, device=dout.device)
        dkv = torch.empty((2, b, s_local, ctx.kv_heads, d), dtype=dout.dtype, device=dout.device)
        dq6 = dq.view(b, s_local, w, chunks, hq_c, d)
        dkv7 = dkv.view(2, b, s_local, w, chunks, hkv_c, d)
        def finish(c, recv, work):
            work.wait()
            recv = recv.permute(1, 2, 0, 3, 4)  # [B, S/W, W, h, D]: head group j from rank j
            dq6[:, :, :, c] = recv[..., :hq_c, :]
            dkv7[0, :, :, :, c] = recv[..., hq_c : hq_c + hkv_c, :]
            dkv7[1, :, :, :, c] = recv[..., hq_c + hkv_c :, :]

        returning = None
        pending = send_dout(0)
        for c in range(chunks):
            nxt = send_dout(c + 1) if c + 1 < chunks else None
            qkv, out_c, lse_c = saved[3 * c : 3 * c + 3]
            q_c, k_c, v_c = qkv[:, :, :hq_c], qkv[:, :, hq_c : hq_c + hkv_c], qkv[:, :, hq_c + hkv_c :]
            recv, work = pending
            work.wait()
            do_c = _full_sequence(recv)
            if ctx.reorder:
                do_c = zigzag_to_global(do_c, w)
            grads = attention_backward(do_c, q_c, k_c, v_c, out_c, lse_c, ctx.states[c], causal=ctx.causal, scale=ctx.scale)
            packed = torch.cat(grads, dim=2)  # [B, S, hq + 2 hkv, D], the layout the forward sent
            del grads
            sent = (c, *_all_to_all(_seq_major(global_to_zigzag(packed, w) if ctx.reorder else packed, w), info))
            if returning:
                finish(*returning)
            returning, pending = sent, nxt
        finish(*returning)
        dk, dv = dkv[0], dkv[1]
        if ctx.repeat > 1:  # the copies of a repeated key/value head share its gradient
            heads = ctx.kv_heads // ctx.repeat
            acc = acc_dtype(dout.dtype)
            dk = dk.view(b, s_local, heads, ctx.repeat, d).sum(3, dtype=acc).to(dout.dtype)
            dv = dv.view(b, s_local, heads, ctx.repeat, d).sum(3, dtype=acc).to(dout.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def _default_chunks(q: torch.Tensor, local_kv_heads: int, world: int) -> int:
    """Deepest pipeline (4, 2 or 1 head chunks) whose kernel calls still fill a GPU:
    >= 1024 blocks of 128 query rows x heads (the whole sequence is local here)."""
    b, s_local, hq = q.shape[:3]
    for n in (4, 2):
        if local_kv_heads % n == 0 and b * max(1, s_local * world // 128) * (hq // world // n) >= 1024:
            return n
    return 1


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "contiguous",
    head_chunks: int | None = None,
) -> torch.Tensor:
    """Ulysses attention over the ranks of ``group``.

    Global ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]`` are sharded along the
    sequence (dim 1) in ``layout``; each rank passes ``q [B, S/W, Hq, D]``,
    ``k, v [B, S/W, Hkv, D]`` and gets ``[B, S/W, Hq, D]``. Inside, rank ``j``
    computes query heads ``[j Hq/W, (j+1) Hq/W)`` over the whole sequence.

    Args:
        causal: token ``i`` attends to ``j <= i`` (global positions of ``layout``).
        scale: softmax scale, default ``1/sqrt(D)``.
        layout: ``"contiguous"`` (default) or ``"zigzag"``, so Ulysses layers can
            share the shards of ring layers; attention work is balanced either way.
        head_chunks: pipeline depth over the local heads (must divide the local
            key/value heads); default: 4 or 2 where that divides them and each
            kernel call keeps >= 1024 blocks of 128 query rows x heads, else 1.

    Raises:
        ValueError: ``Hq`` not divisible by the group size (use ring or all-gather
            attention), and every check of the other strategies.
    """
    info = group_info(group)
    fn = "ulysses_attention"
    check_inputs(fn, q, k, v, causal=causal, scale=scale, layout=layout, world=info.world)
    w, hq, hkv = info.world, q.shape[2], k.shape[2]
    if hq % w:
        raise ValueError(
            f"{fn}: query heads ({hq}) must be divisible by the group size ({w}) to split them over the "
            f"ranks; use ring_attention or allgather_attention, which have no head constraint"
        )
    repeat = w // math.gcd(hkv, w)  # fewest copies of each key/value head that split over w ranks
    local_kv_heads = hkv * repeat // w
    if head_chunks is None:
        head_chunks = _default_chunks(q, local_kv_heads, w)
    if not isinstance(head_chunks, int) or head_chunks < 1 or local_kv_heads % head_chunks:
        raise ValueError(
            f"{fn}: head_chunks must be a positive divisor of the key/value heads per rank "
            f"({local_kv_heads}), got {head_chunks!r}"
        )
    scale = default_scale(q.shape[-1], scale)
    if w == 1:
        return local_attention(q, k, v, causal=causal, scale=scale)
    check_shards_agree(fn, q, k, info)
    return _Ulysses.apply(q, k, v, info, causal, scale, layout, repeat, head_chunks)
