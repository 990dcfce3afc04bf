"""Softmax attention over all-gathered keys and values (the softmax half of LASP-2H).

Every rank keeps its queries and gathers the keys and values of the whole
sequence; its output rows need no communication back. The backward gathers K, V
again (saving the gathered tensors would keep ``W x`` the local K, V alive per
layer between forward and backward) and reduce-scatters dK, dV in fp32.

Overlap: the work is split into ``head_chunks`` groups of key/value heads (with
their query heads). The gather of chunk ``c + 1`` is posted before chunk ``c``
computes, and each chunk starts with its diagonal blocks, which need only the
rank's own keys, so even the first gather runs under a kernel; in the backward
the reduce-scatter of chunk ``c`` runs under chunk ``c + 1``. Only the last
reduce-scatter is fully exposed. It also bounds memory: at most two chunks of
gathered K, V are alive. Within a chunk the backward runs the diagonal blocks,
then the other segments buffer by buffer (the two zigzag halves): a half's
gathered K, V are dropped after its last segment and its fp32 key gradients
allocated at its first that needs a gather, so the first half's gathered K, V and
the second half's fp32 dK, dV are never alive together. One chunk is the default
(fastest measured; see ``head_chunks``), more chunks the memory setting. (As for Ulysses, the transfers only run beside the
kernels if the NCCL stream has high priority; see docs/sp.md.)

Accumulation: the first kernel result for a row range (or a key range) is copied
into the fp32 accumulator, later ones are merged (or added): no zero-fills and no
merge with an empty accumulator.

Causal masks without reordering tokens: the gathered keys are addressed as
*segments* (views of the gather buffers, no copies) and every kernel call is
either a full block or a square diagonal block, merged through the log-sum-exp:

* ``contiguous``: rank ``r`` attends to ranks ``0..r-1`` in full and to itself
  causally. Rank ``W-1`` does about twice the average work.
* ``zigzag``: first and second halves are gathered separately; rank ``r`` (chunks
  ``r`` and ``2W-1-r``) attends to ``2W`` chunk-pairs' worth of blocks exactly like
  every other rank, so causal work is balanced.
"""

from __future__ import annotations

import torch

from ..dist import all_gather_tensor, reduce_scatter_tensor
from ._common import check_head_chunks, check_inputs, check_shards_agree, default_scale, group_info
from .kernels import acc_dtype, attention_backward, attention_forward, local_attention, merge_

__all__ = ["allgather_attention"]


def _segments(rank: int, world: int, layout: str, causal: bool, s_local: int):
    """Kernel calls of one rank: ``(q_row_start, q_row_stop, buffer, j0, j1, causal)``.

    ``buffer`` names a gather buffer (``all``: whole shards; ``first`` / ``second``:
    the two zigzag halves); ``j0:j1`` are source ranks whose pieces form the keys.
    The causal calls are exactly the diagonal blocks, which need only this rank's
    own keys; they come first so that they run while the gather is in flight. The
    other calls follow grouped by buffer (the backward releases each buffer after its
    last call, so the order bounds its memory; a test holds it).
    """
    r, w, s = rank, world, s_local
    if layout == "contiguous":
        if not causal:
            return [(0, s, "all", 0, w, False)]
        return [(0, s, "all", r, r + 1, True)] + ([(0, s, "all", 0, r, False)] if r else [])
    c = s // 2
    if not causal:  # key order is irrelevant without a mask
        return [(0, s, "first", 0, w, False), (0, s, "second", 0, w, False)]
    segs = [(0, c, "first", r, r + 1, True)]  # chunk r against itself
    segs += [(c, s, "second", r, r + 1, True)]  # chunk 2W-1-r against itself
    segs += [(0, s, "first", 0, r, False)] if r else []  # chunks 0..r-1: every local query sees them
    segs += [(c, s, "first", r, w, False)]  # chunk 2W-1-r sees chunks r..W-1 in full
    if r < w - 1:  # second halves hold chunks 2W-1-j; those with j > r come before ours
        segs += [(c, s, "second", r + 1, w, False)]
    return segs


def _local_rows(layout: str, s_local: int) -> dict[str, tuple[int, int]]:
    """Which rows of the local shard each gather buffer carries."""
    if layout == "contiguous":
        return {"all": (0, s_local)}
    return {"first": (0, s_local // 2), "second": (s_local // 2, s_local)}


def _region(buf: torch.Tensor, j0: int, j1: int) -> torch.Tensor:
    """Keys of source ranks ``j0:j1`` from a gather buffer ``[W, L, B, H, D]`` as ``[B, n*L, H, D]``."""
    return buf[j0:j1].flatten(0, 1).permute(1, 0, 2, 3)


class _Gather:
    """The gathers of one head chunk in flight: ``buffers[(which, name)]`` ``[W, L, B, h, D]``
    (valid after :meth:`wait`) and this rank's own pieces ``local[(which, name)]``
    ``[L, B, h, D]`` (the send buffers, valid at once). :meth:`release` drops one buffer
    (a zigzag half) once its last kernel call is queued."""

    def __init__(self, tensors, rows, heads, info):
        self.buffers, self.local, self._works = {}, {}, []
        for name, (a, b) in rows.items():
            for which, t in tensors.items():
                send = t[:, a:b, heads].permute(1, 0, 2, 3).contiguous()  # [L, B, h, D]
                recv = torch.empty((info.world, *send.shape), dtype=t.dtype, device=t.device)
                self._works.append(all_gather_tensor(recv.flatten(0, 1), send, group=info.group, async_op=True))
                self.buffers[(which, name)] = recv
                self.local[(which, name)] = send

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []

    def release(self, name: str) -> None:
        """Drop buffer ``name``'s gathered and own pieces (after the gathers are done)."""
        self.wait()
        for which in ("k", "v"):
            self.buffers.pop((which, name), None)
            self.local.pop((which, name), None)

    def keys(self, name: str, j0: int, j1: int, rank: int):
        """Keys and values of source ranks ``j0:j1`` as ``[B, n*L, h, D]``; the own piece
        without waiting for the gather, anything else after every buffer's gathers.

        Every buffer's, not only ``name``'s: a gather left in flight beside a large
        kernel call (the second half's while the first half's segments run) holds SMs
        the call needs until it ends and drags its tail out: 454 vs 545 TFLOP/s at
        512K on 4 H100 (``benchmarks/results/sp_allgather_waits_4xH100_20261126-s9.json``)."""
        if (j0, j1) == (rank, rank + 1):
            return tuple(self.local[(which, name)].permute(1, 0, 2, 3) for which in ("k", "v"))
        self.wait()
        return tuple(_region(self.buffers[(which, name)], j0, j1) for which in ("k", "v"))


def _chunk_slices(hq: int, hkv: int, chunks: int):
    gq, gk = hq // chunks, hkv // chunks
    return [(slice(c * gq, (c + 1) * gq), slice(c * gk, (c + 1) * gk)) for c in range(chunks)]


def _row_parts(layout: str, s: int) -> list[tuple[int, int]]:
    """Row ranges that segments cover whole: the two zigzag chunks, or the whole shard."""
    return [(0, s // 2), (s // 2, s)] if layout == "zigzag" else [(0, s)]


def _split_rows(parts, r0: int, r1: int):
    return [(a, b) for a, b in parts if r0 <= a and b <= r1]


def _fold_rows(acc: torch.Tensor, lse_acc: torch.Tensor | None, done: set, parts, r0, r1, x, x_lse) -> None:
    """Fold one kernel call's rows ``r0:r1`` into the fp32 accumulators.

    The first result for a row range is copied (no zero-fill, no merge); later
    ones are merged through the log-sum-exp (``lse_acc`` given: outputs) or added
    (``lse_acc`` None: dq).
    """
    for a, b in _split_rows(parts, r0, r1):
        part = x[:, a - r0 : b - r0]
        if a not in done:
            acc[:, a:b].copy_(part)
            if lse_acc is not None:
                lse_acc[:, :, a:b].copy_(x_lse[:, :, a - r0 : b - r0])
            done.add(a)
        elif lse_acc is not None:
            merge_(acc[:, a:b], lse_acc[:, :, a:b], part, x_lse[:, :, a - r0 : b - r0])
        else:
            acc[:, a:b] += part


def _fold_keys(buf: torch.Tensor, done: list[bool], j0: int, j1: int, grad: torch.Tensor) -> None:
    """Add a call's key gradient (source ranks ``j0:j1``, ``[B, n*L, h, D]``) into the fp32
    buffer ``[W, L, B, h, D]``: copied where a rank's piece is still untouched, added where not."""
    n_local = buf.shape[1]
    j = j0
    while j < j1:  # runs of equal state, so a call is one or two ops
        k = j
        while k < j1 and done[k] == done[j]:
            k += 1
        piece = grad[:, (j - j0) * n_local : (k - j0) * n_local]
        region = _region(buf, j, k)
        if done[j]:
            region.add_(piece)
        else:
            region.copy_(piece)
        for m in range(j, k):
            done[m] = True
        j = k


class _KeyGrads:
    """The fp32 key gradients of one head chunk, ``buffers[(which, name)]`` ``[W, L, B, h, D]``
    (one row per source rank of gather buffer ``name``), allocated as late as possible.

    A call's gradient is folded in at once, or, with ``defer`` (a diagonal block, which
    needs no gather), kept in the kernel's dtype until the buffer exists: the buffer is
    allocated at the first call that is not deferred, or by :meth:`finish`. Deferred
    calls are folded first, in the order they came, so the sums are the same as
    without deferring.
    """

    def __init__(self, shapes: dict, world: int, dtype: torch.dtype, device: torch.device):
        self.buffers = dict.fromkeys(shapes)  # insertion order: the same on every rank
        self._shapes, self._dtype, self._device = shapes, dtype, device
        self._done = {key: [False] * world for key in shapes}
        self._deferred: dict = {}

    def add(self, key, j0: int, j1: int, grad: torch.Tensor, *, defer: bool = False) -> None:
        if defer and self.buffers[key] is None:
            self._deferred.setdefault(key, []).append((j0, j1, grad))
        else:
            _fold_keys(self._buffer(key), self._done[key], j0, j1, grad)

    def _buffer(self, key) -> torch.Tensor:
        if self.buffers[key] is None:
            self.buffers[key] = torch.empty(self._shapes[key], dtype=self._dtype, device=self._device)
            for j0, j1, grad in self._deferred.pop(key, []):
                _fold_keys(self.buffers[key], self._done[key], j0, j1, grad)
        return self.buffers[key]

    def finish(self) -> None:
        """Allocate what is still missing and zero the rows no call touched (keys no local
        query attends to: contiguous causal)."""
        for key in self.buffers:
            buf = self._buffer(key)
            for j, touched in enumerate(self._done[key]):
                if not touched:
                    buf[j].zero_()


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, info, causal, scale, layout, chunks):
        b, s, hq, d = q.shape
        segs = _segments(info.rank, info.world, layout, causal, s)
        rows = _local_rows(layout, s)
        parts = _row_parts(layout, s)
        acc = acc_dtype(q.dtype)
        out = torch.empty_like(q)
        lse = torch.empty((b, hq, s), dtype=acc, device=q.device)
        slices = _chunk_slices(hq, k.shape[2], chunks)
        states = []
        pending = _Gather({"k": k, "v": v}, rows, slices[0][1], info)
        for c, (qh, _) in enumerate(slices):
            # Post the next chunk's gathers before computing this one: they overlap it,
            # and this chunk's own diagonal blocks run before its gathers are waited for.
            nxt = _Gather({"k": k, "v": v}, rows, slices[c + 1][1], info) if c + 1 < chunks else None
            gather = pending
            q_c = q[:, :, qh] if chunks == 1 else q[:, :, qh].contiguous()
            out_acc = torch.empty((b, s, q_c.shape[2], d), dtype=acc, device=q.device)
            lse_acc = torch.empty((b, q_c.shape[2], s), dtype=acc, device=q.device)
            done: set = set()
            chunk_states = []
            for r0, r1, name, j0, j1, seg_causal in segs:
                k_seg, v_seg = gather.keys(name, j0, j1, info.rank)
                o, o_lse, state = attention_forward(q_c[:, r0:r1], k_seg, v_seg, causal=seg_causal, scale=scale)
                _fold_rows(out_acc, lse_acc, done, parts, r0, r1, o, o_lse)
                chunk_states.append(state)
            states.append(chunk_states)
            gather.wait()
            out[:, :, qh] = out_acc
            lse[:, qh] = lse_acc
            del gather, out_acc, lse_acc
            pending = nxt
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.info, ctx.causal, ctx.scale, ctx.layout, ctx.chunks, ctx.states = info, causal, scale, layout, chunks, states
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        info, scale = ctx.info, ctx.scale
        b, s, hq, d = q.shape
        segs = _segments(info.rank, info.world, ctx.layout, ctx.causal, s)
        rows = _local_rows(ctx.layout, s)
        parts = _row_parts(ctx.layout, s)
        acc = acc_dtype(q.dtype)
        slices = _chunk_slices(hq, k.shape[2], ctx.chunks)
        # The diagonal blocks first (they need no gather: every rank's K, V gathers run
        # under them), then the other segments grouped by gather buffer. A buffer's
        # gathered K, V are released after its last segment and its fp32 key gradients are
        # allocated at its first segment that needs a gather (a diagonal block's dK, dV wait
        # in the kernel's dtype until then), so the first zigzag half's gathered K, V and the
        # second half's fp32 dK, dV are never alive together. Both diagonal blocks come
        # first because the first segment that needs a gather waits for all of them
        # (_Gather.keys says why: 454 vs 545 TFLOP/s at 512K on 4 H100 when a half's gathers
        # ran beside the other half's kernels), and two blocks hide them. The collectives
        # stay where they were (gathers posted up front, one reduce-scatter per chunk at its
        # end): a collective in between would make every rank wait for the one with the
        # most work before it (434 vs 538 TFLOP/s, commit cfddbe6).
        # _segments lists the calls in exactly this order, so the backward runs them as the
        # forward did, and its sums are added in the order they were before the late
        # buffers (the same gradients bit for bit).
        last_use = {seg[2]: i for i, seg in enumerate(segs)}
        dq = dk = dv = None  # allocated once the first chunk's kernels are queued: off the peak
        in_flight = []  # the previous chunk's reduce-scatters: (work, result, target, rows, kv heads)

        def finish(scatters):
            for work, result, target, (a, bnd), kh in scatters:
                work.wait()
                target[:, a:bnd, kh] = result.permute(1, 0, 2, 3)

        pending = _Gather({"k": k, "v": v}, rows, slices[0][1], info)
        for c, (qh, kh) in enumerate(slices):
            nxt = _Gather({"k": k, "v": v}, rows, slices[c + 1][1], info) if c + 1 < ctx.chunks else None
            gather = pending
            q_c, out_c, dout_c = (t[:, :, qh].contiguous() for t in (q, out, dout))
            lse_c = lse[:, qh]
            dq_acc = torch.empty(q_c.shape, dtype=acc, device=q.device)
            done_rows: set = set()
            grads = _KeyGrads({key: buf.shape for key, buf in gather.buffers.items()}, info.world, acc, q.device)
            for i, (r0, r1, name, j0, j1, seg_causal) in enumerate(segs):
                k_seg, v_seg = gather.keys(name, j0, j1, info.rank)
                dq_s, dk_s, dv_s = attention_backward(
                    dout_c[:, r0:r1], q_c[:, r0:r1], k_seg, v_seg, out_c[:, r0:r1], lse_c[:, :, r0:r1],
                    ctx.states[c][i], causal=seg_causal, scale=scale,
                )
                _fold_rows(dq_acc, None, done_rows, parts, r0, r1, dq_s, None)
                grads.add(("k", name), j0, j1, dk_s, defer=seg_causal)  # causal calls: the diagonal blocks
                grads.add(("v", name), j0, j1, dv_s, defer=seg_causal)
                k_seg = v_seg = dk_s = dv_s = None
                if i == last_use[name]:
                    gather.release(name)
            grads.finish()
            gather.wait()
            if dq is None:
                dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            dq[:, :, qh] = dq_acc
            del gather, dq_acc, q_c, out_c, dout_c
            # Sum every rank's contribution to our keys: reduce-scatter in fp32, overlapped
            # with the next chunk. The previous chunk's is done by now (it ran under this
            # chunk); finishing it frees its fp32 buffers, so at most two chunks' are alive.
            scatters = []
            for (which, name), grad in grads.buffers.items():  # the same order on every rank
                result = torch.empty(grad.shape[1:], dtype=acc, device=q.device)
                work = reduce_scatter_tensor(result, grad.flatten(0, 1), group=info.group, async_op=True)
                scatters.append((work, result, dk if which == "k" else dv, rows[name], kh))
            del grads
            finish(in_flight)
            in_flight, pending = scatters, nxt
        finish(in_flight)
        return dq, dk, dv, None, None, None, None, None


def allgather_attention(
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
    """Attention of local queries against the all-gathered keys and values.

    Global ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]`` are sharded along the
    sequence (dim 1) in ``layout`` over the ``W`` ranks of ``group``; each rank
    passes its shards ``q [B, S/W, Hq, D]``, ``k, v [B, S/W, Hkv, D]`` and gets its
    rows of the output, ``[B, S/W, Hq, D]``. ``Hq`` must be a multiple of ``Hkv``
    (GQA / MQA). Gradients flow to the local shards (backward: K, V gathered again,
    dK, dV reduce-scattered in fp32).

    Args:
        causal: token ``i`` attends to ``j <= i`` in global positions of ``layout``.
        scale: softmax scale, default ``1/sqrt(D)``.
        layout: ``"contiguous"`` or ``"zigzag"`` (balances causal work; the local
            sequence must then be even).
        head_chunks: pipeline depth over key/value heads (must divide ``Hkv``).
            1 (default) is the fastest: on 2 H100 (H=32, D=128, causal zigzag)
            it ran 5-9 % faster than 4 chunks at 64K-512K tokens; the gather is
            ~1 % of the time there and four smaller kernel calls with their fp32
            merges cost more than it hides. 4 chunks is the memory setting for
            the longest sequences: at most two chunks of gathered K, V are alive,
            so 4 chunks cut the peak by a third (512K on 2 H100: 37 vs 55 GiB);
            2 chunks save almost nothing.
    """
    info = group_info(group)
    check_inputs("allgather_attention", q, k, v, causal=causal, scale=scale, layout=layout, world=info.world)
    hkv = k.shape[2]
    check_head_chunks("allgather_attention", head_chunks, hkv, "key/value heads")
    scale = default_scale(q.shape[-1], scale)
    if info.world == 1:
        return local_attention(q, k, v, causal=causal, scale=scale)
    check_shards_agree("allgather_attention", q, k, info)
    return _AllGatherAttention.apply(q, k, v, info, causal, scale, layout, head_chunks)
