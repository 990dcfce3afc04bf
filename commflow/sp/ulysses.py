"""Ulysses (DeepSpeed-Ulysses) attention: all-to-all from sequence shards to head shards.

Each rank starts with all heads of ``S/W`` tokens and, after one all-to-all, holds
``Hq/W`` query heads (and their key/value heads) of all ``S`` tokens; it runs the
ordinary local kernel and a second all-to-all brings the output back to sequence
shards. The backward mirrors it: ``dO`` forward, ``dQ, dK, dV`` back.

What makes it fast (and what DeepSpeed's ``DistributedAttention`` does not do):

* **the least copying**: per direction, one copy on the sequence-sharded side
  (packing each send buffer rank-major, writing the result into the caller's
  layout) and none on the head-sharded side: q, k and v each travel in their own
  all-to-all and arrive as dense ``[B, S, h, D]`` tensors (views of the receive
  buffer for ``B = 1``), the layout single-GPU SDPA takes; the kernel's output and
  its dq, dk, dv come back dense and are sent as they are. DeepSpeed copies before
  and after every all-to-all. The copies that remain move 8-byte words (``_words``),
  and each runs beside the previous tensor's transfer.
* **overlap**: the local heads can be processed in ``head_chunks`` groups; the
  all-to-alls of group ``c + 1`` are queued before group ``c``'s kernel and the
  return of group ``c - 1`` right after it, so only the first and the last
  transfer are exposed. Measured on H100 this buys less than the smaller kernel
  calls cost, so the default is one chunk (a plain all-to-all, kernel, all-to-all)
  and more chunks are the memory setting (see ``head_chunks`` below). A
  transfer queued beside a running kernel only gets SMs as the kernel's blocks
  retire; a high-priority NCCL stream (``TORCH_NCCL_HIGH_PRIORITY=1`` or
  ``ProcessGroupNCCL.Options(is_high_priority_stream=True)``) lets it in first
  (measured: ~2% faster at 32K-64K, within noise at 128K).
* **memory**: what the backward needs (head-sharded q, k, v, out) is freed chunk
  by chunk as the backward proceeds, and the returned gradients are allocated only
  after the first chunk's kernel, while an SDPA node (DeepSpeed's) holds all of it
  until its whole backward is done, beside its gradients and workspace.

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
    check_head_chunks,
    check_inputs,
    check_shards_agree,
    default_scale,
    global_to_zigzag,
    group_info,
    wait_all,
    zigzag_to_global,
)
from .kernels import acc_dtype, attention_backward, attention_forward, local_attention

__all__ = ["ulysses_attention"]


def _words(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed as 8-byte words along its last dim where the strides allow, else ``x``.

    The packing copies move rows of ``h * D`` elements between strided layouts, and
    torch's strided copy kernel costs per element: on H100 a bf16 pack ran at ~1.45 TB/s,
    the copies of one Ulysses step at 128K on 4 GPUs summed to 3 ms (1.3 % of the step;
    1.9 ms as words, benchmarks/results/sp_ulysses_profile_4xH100_20261127-s10*.json).
    Moved as int64 (bits, no arithmetic) the same bytes take a quarter of the elements."""
    size = x.element_size()
    if size >= 8 or x.dim() == 0 or x.stride(-1) != 1 or (x.shape[-1] * size) % 8 or x.data_ptr() % 8:
        return x
    ratio = 8 // size
    if (x.storage_offset() % ratio) or any(st % ratio for st in x.stride()[:-1]):
        return x
    return x.view(torch.int64)


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()``, copied as 8-byte words where it takes a copy."""
    if x.is_contiguous():
        return x
    words = _words(x)
    return words.contiguous().view(x.dtype) if words is not x else x.contiguous()


def _copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, as 8-byte words where both allow it and the dtypes are equal (bits
    are moved, never converted: a bf16 source into an fp16 destination takes the plain copy)."""
    if dst.dtype != src.dtype:
        dst.copy_(src)
        return
    dw, sw = _words(dst), _words(src)
    if dw is dst or sw is src:
        dst.copy_(src)
    else:
        dw.copy_(sw)


def _all_to_all(send: torch.Tensor, info):
    """Start an all-to-all of ``send [W, ...]`` (row ``j`` goes to rank ``j``; packed first
    if strided); returns (recv, work)."""
    send = _contiguous(send)
    recv = torch.empty_like(send)
    return recv, dist.all_to_all_single(recv, send, group=info.group, async_op=True)


def _all_to_all_many(sends: list[torch.Tensor], info):
    """Start one all-to-all per tensor of ``sends`` (each ``[W, ...]``, any strides).

    Each tensor is packed right before its own collective is issued, so packing the
    next one runs on the compute stream beside the previous transfer (packing all
    first left the three packs of q, k, v in front of the first transfer). The results
    land in one allocation (so what is saved for the backward is one block per chunk);
    returns (list of received tensors, list of works).
    """
    flat = torch.empty(sum(t.numel() for t in sends), dtype=sends[0].dtype, device=sends[0].device)
    recvs, works, offset = [], [], 0
    for send in sends:
        send = _contiguous(send)
        recv = flat[offset : offset + send.numel()].view(send.shape)
        offset += send.numel()
        recvs.append(recv)
        works.append(dist.all_to_all_single(recv, send, group=info.group, async_op=True))
        del send
    return recvs, works


def _seq_major(x: torch.Tensor, world: int) -> torch.Tensor:
    """``[B, S, h, D]`` (rows in rank order) -> ``[W, B, S/W, h, D]`` send view (dense when
    ``B = 1`` and ``x`` is contiguous, which is what the kernels return; strided otherwise,
    packed by the all-to-all helpers)."""
    b, s = x.shape[:2]
    if b == 1:
        return x.contiguous().view(world, 1, s // world, *x.shape[2:])
    return x.view(b, world, s // world, *x.shape[2:]).transpose(0, 1)


def _full_sequence(recv: torch.Tensor) -> torch.Tensor:
    """Received ``[W, B, S/W, h, D]`` (rows from rank ``j`` at ``j``) -> ``[B, S, h, D]``
    (a view for ``B = 1``: dense ``[B, S, h, D]``, the layout single-GPU SDPA gets)."""
    w, b, s_local = recv.shape[:3]
    if b == 1:
        return recv.view(1, w * s_local, *recv.shape[3:])
    return _contiguous(recv.transpose(0, 1)).view(b, w * s_local, *recv.shape[3:])


class _Ulysses(torch.autograd.Function):
    """Pipelined over ``chunks`` head groups; see the module docstring.

    What the backward needs per chunk (head-sharded q, k, v, out and lse over the
    whole sequence) is kept in ``ctx.chunks_saved`` rather than
    ``save_for_backward`` so that the backward can free each chunk's tensors as
    soon as that chunk's gradients are computed: they are intermediates, never
    the caller's tensors, so no version check is lost. The price is one backward
    per forward (``retain_graph=True`` and a second backward raise).
    """

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
            # One copy per tensor (rank-major), then one all-to-all each: every tensor
            # arrives dense, [B, S, h, D], as single-GPU SDPA would get it.
            return _all_to_all_many([t[:, :, :, c].permute(2, 0, 1, 3, 4) for t in (q6, k6, v6)], info)

        out = torch.empty_like(q)
        out6 = out.view(b, s_local, w, chunks, hq_c, d)

        def finish(c, recv, work):
            work.wait()
            _copy_(out6[:, :, :, c], recv.permute(1, 2, 0, 3, 4))  # head group j of chunk c came from rank j

        saved, returning = [], None
        pending = send_qkv(0)
        for c in range(chunks):
            # The next chunk's all-to-all is queued before this chunk's kernel: on a
            # high-priority NCCL stream it then runs beside the kernel.
            nxt = send_qkv(c + 1) if c + 1 < chunks else None
            recvs, works = pending
            wait_all(works)
            q_c, k_c, v_c = (_full_sequence(t) for t in recvs)
            if reorder:
                q_c, k_c, v_c = (zigzag_to_global(t, w) for t in (q_c, k_c, v_c))
            out_c, lse_c, state = attention_forward(q_c, k_c, v_c, causal=causal, scale=scale)
            saved.append((q_c, k_c, v_c, out_c, lse_c, state))
            sent = (c, *_all_to_all(_seq_major(global_to_zigzag(out_c, w) if reorder else out_c, w), info))
            if returning:  # the previous chunk's return ran under this chunk's kernel
                finish(*returning)
            returning, pending = sent, nxt
            del recvs, works, q_c, k_c, v_c, out_c, lse_c
        finish(*returning)
        ctx.chunks_saved = saved
        ctx.info, ctx.causal, ctx.scale, ctx.reorder = info, causal, scale, reorder
        ctx.shape, ctx.kv_heads, ctx.repeat, ctx.chunks, ctx.heads = q.shape, k.shape[2], repeat, chunks, (hq_c, hkv_c)
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.chunks_saved is None:
            raise RuntimeError("ulysses_attention: backward ran twice; it frees its saved tensors (no retain_graph)")
        saved, ctx.chunks_saved = ctx.chunks_saved, None
        info, w, chunks = ctx.info, ctx.info.world, ctx.chunks
        b, s_local, hq, d = ctx.shape
        hq_c, hkv_c = ctx.heads
        do6 = dout.reshape(b, s_local, w, chunks, hq_c, d)

        def send_dout(c):
            return _all_to_all(do6[:, :, :, c].permute(2, 0, 1, 3, 4), info)

        # Separate allocations (autograd takes them over as the .grad of the inputs),
        # made at the first return, i.e. after the first chunk's kernel: not beside
        # the saved tensors of every chunk, where the peak would otherwise be.
        shapes = [ctx.shape, (b, s_local, ctx.kv_heads, d), (b, s_local, ctx.kv_heads, d)]
        finals: list[torch.Tensor] = []

        def finish(c, recvs, works):
            # dq, dk and dv one by one: dq is unpacked while dk and dv are still in flight,
            # and each wait lets go of that sent gradient before its final is allocated
            # (so the peak is what waiting for all three and then allocating gave).
            for j, (recv, work) in enumerate(zip(recvs, works)):
                work.wait()
                if len(finals) <= j:
                    finals.append(torch.empty(shapes[j], dtype=dout.dtype, device=dout.device))
                _copy_(finals[j].view(b, s_local, w, chunks, -1, d)[:, :, :, c], recv.permute(1, 2, 0, 3, 4))

        returning = None
        pending = send_dout(0)
        for c in range(chunks):
            nxt = send_dout(c + 1) if c + 1 < chunks else None
            q_c, k_c, v_c, out_c, lse_c, state = saved[c]
            saved[c] = None  # freed once this chunk's kernel has run
            recv, work = pending
            work.wait()
            do_c = _full_sequence(recv)
            if ctx.reorder:
                do_c = zigzag_to_global(do_c, w)
            grads = attention_backward(do_c, q_c, k_c, v_c, out_c, lse_c, state, causal=ctx.causal, scale=ctx.scale)
            del q_c, k_c, v_c, out_c, lse_c, do_c, recv, work
            # dq, dk, dv come back dense [B, S, h, D]: each is already a send buffer.
            sends = [_seq_major(global_to_zigzag(g, w) if ctx.reorder else g, w) for g in grads]
            del grads
            sent = (c, *_all_to_all_many(sends, info))
            del sends
            if returning:
                finish(*returning)
            returning, pending = sent, nxt
        finish(*returning)
        dq, dk, dv = finals
        if ctx.repeat > 1:  # the copies of a repeated key/value head share its gradient
            heads = ctx.kv_heads // ctx.repeat
            acc = acc_dtype(dout.dtype)
            dk = dk.view(b, s_local, heads, ctx.repeat, d).sum(3, dtype=acc).to(dout.dtype)
            dv = dv.view(b, s_local, heads, ctx.repeat, d).sum(3, dtype=acc).to(dout.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "contiguous",
    head_chunks: int = 1,
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
            key/value heads). 1 (default) is the fastest measured: on 2 H100 at
            64K-512K tokens, 1 chunk ran 0-2 % faster than 2 (and on 4 H100, 3 %
            faster at 32K, level at 64K-128K), since the all-to-alls are ~1 % of
            the time there and smaller kernel calls run slower. 2 or more chunks
            hide part of the all-to-all and lower the peak memory (2 chunks: -13 %
            at 512K on 2 H100) for the longest sequences.

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
    check_head_chunks(fn, head_chunks, local_kv_heads, "key/value heads per rank")
    scale = default_scale(q.shape[-1], scale)
    if w == 1:
        return local_attention(q, k, v, causal=causal, scale=scale)
    check_shards_agree(fn, q, k, info)
    return _Ulysses.apply(q, k, v, info, causal, scale, layout, repeat, head_chunks)
