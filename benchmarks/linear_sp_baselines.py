"""Baselines for LASP-2 (benchmarks only): the same model and local kernels, other communication.

All take this rank's contiguous shard ``[B, S/W, H, D]`` on the default process group
and return the same output and gradients as :func:`commflow.sp.lasp2_attention` (causal;
decay none / ``g_gamma`` / ``g``); tests/sp/test_lasp2.py checks them against the
reference. Math and names as in :mod:`commflow.sp.lasp2`.

``lasp1_attention``
    LASP-1 (Sun et al., arXiv 2404.02882): the d x d state travels a serial chain
    0 -> 1 -> ... -> W-1 by point-to-point sends (backward: W-1 -> ... -> 0).
    ``serial_compute=False`` is the paper's algorithm: every rank computes its local states
    first, in parallel, and only the state update ``S_out = Gamma S_in + S_local`` waits on
    the chain (W-1 hops of latency); the output then uses the same fold kernel as LASP-2, so
    the two differ only in how the states travel. ``serial_compute=True`` is the order of
    the released code (OpenNLPLab/LASP ``lasp_naive`` / ``lasp_fuse_parallel``): receive,
    then run the whole local kernel with that initial state, then send, so rank r starts
    computing only when rank r-1 has finished.
    Every hop is a batched point-to-point op (:func:`_hop`) on the group's own NCCL
    communicator: an unbatched ``dist.send``/``dist.recv`` would make torch (lazy NCCL
    init) build a separate 2-rank communicator per pair on first use, a blocking
    collective of the pair in the middle of the chain, the pattern behind the hangs that
    other projects report for serial P2P chains. Batched ops need the group's
    communicator to exist: some collective on every rank first (the benchmark does one).

``ring_kv_attention``
    Ring attention (Liu et al., arXiv 2310.01889) applied to linear attention: K, V (and
    ``g``) blocks rotate around the ring in W-1 steps, each rank folding every earlier
    block into its incoming state (``k_j^T v_j``, one GEMM per step) while the next block
    is in flight (then LASP-2's fold kernel for the output); the backward rotates the blocks
    again with fp32 gradient accumulators
    that travel with them and come home after a last hop. Communication grows with the
    sequence: ``W-1`` blocks of ``S/W x H x (2D+1)`` per rank and direction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from commflow.sp.lasp2 import check_lasp2_inputs
from commflow.sp.linear_kernels import LinearKernels, select_kernels, seq_cumsum

__all__ = ["lasp1_attention", "ring_kv_attention"]


def _state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _log_gamma(q, g, g_gamma) -> torch.Tensor:
    """This rank's total log decay ``[B, H]`` in the state dtype."""
    B, S, H = q.shape[:3]
    sdt = _state_dtype(q)
    if g is not None:
        return g.to(sdt).sum(1)
    if g_gamma is not None:
        return (g_gamma.to(sdt) * S)[None].expand(B, H)
    return torch.zeros(B, H, dtype=sdt, device=q.device)


def _hop(send: torch.Tensor | None = None, dst: int | None = None, recv: torch.Tensor | None = None,
         src: int | None = None) -> list:
    """Post a send to ``dst`` and/or a receive from ``src`` as ONE batched op; returns the works.

    Batched (``batch_isend_irecv``), so NCCL runs it on the group's communicator in stream
    order with every other op of the group, and the two ranks of a hop post matching ops in
    the same order (the chain: receive from the left, then send to the right)."""
    ops = []
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, src))
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send, dst))
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _checked_setup(q, k, v, g, g_gamma, scale, kernels) -> tuple[LinearKernels, float]:
    """Like the benchmark's LASP-2 calls: shapes checked, no host sync for the sign of ``g``;
    returns the kernels (an instance, a backend name or None) and the scale (default ``D_k ** -0.5``)."""
    check_lasp2_inputs(q, k, v, g=g, g_gamma=g_gamma, causal=True, scale=scale, check_decay_sign=False)
    kernels = kernels if isinstance(kernels, LinearKernels) else select_kernels(q.device, backend=kernels)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return kernels, scale


class _Lasp1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, g_gamma, scale, kernels: LinearKernels, serial_compute: bool):
        rank, world = dist.get_rank(), dist.get_world_size()
        B, S, H, K = q.shape
        sdt = _state_dtype(q)
        s_in = torch.zeros(B, H, K, v.shape[-1], dtype=sdt, device=q.device)
        dec = kernels.prepare(g, g_gamma, S)
        last = rank == world - 1
        if serial_compute:  # receive, run the whole local kernel from S_in, send
            if rank > 0:
                _wait(_hop(recv=s_in, src=rank - 1))
            h, s_out = kernels.states(k, v, dec, s_in, True)
            send = [] if last else _hop(send=s_out.to(sdt).contiguous(), dst=rank + 1)
            o = kernels.output(q, k, v, dec, h, scale)
        else:  # local states in parallel; only S_out = Gamma S_in + S_local waits on the chain
            h, s_local = kernels.states(k, v, dec, None, True)
            if rank > 0:
                _wait(_hop(recv=s_in, src=rank - 1))
            s_out = torch.exp(_log_gamma(q, g, g_gamma))[..., None, None] * s_in + s_local
            send = [] if last else _hop(send=s_out.to(sdt).contiguous(), dst=rank + 1)
            o = kernels.output(q, k, v, dec, h, scale, fold=s_in)  # the same fold kernel as LASP-2
        _wait(send)
        ctx.save_for_backward(q, k, v, g, g_gamma, s_in)
        ctx.scale, ctx.kernels, ctx.serial_compute = scale, kernels, serial_compute
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, g_gamma, s_in = ctx.saved_tensors
        kernels, scale = ctx.kernels, ctx.scale
        rank, world = dist.get_rank(), dist.get_world_size()
        do = do.contiguous()
        dec = kernels.prepare(g, g_gamma, q.shape[1])
        ds_out = torch.zeros_like(s_in)
        # The chain runs backwards: receive from the right, send to the left.
        if ctx.serial_compute:
            if rank < world - 1:
                _wait(_hop(recv=ds_out, src=rank + 1))
            h, _ = kernels.states(k, v, dec, s_in, False, states_in_fp32=True)
            dq, dk, dv, dg, ds_in = kernels.backward(q, k, v, dec, h, do, s_in, ds_out, scale)
            send = _hop(send=ds_in.to(s_in.dtype).contiguous(), dst=rank - 1) if rank > 0 else []
        else:
            dh, own = kernels.state_grads(q, do, dec, scale)
            if rank < world - 1:
                _wait(_hop(recv=ds_out, src=rank + 1))
            ds_in = own.to(s_in.dtype) + torch.exp(_log_gamma(q, g, g_gamma))[..., None, None] * ds_out
            send = _hop(send=ds_in.contiguous(), dst=rank - 1) if rank > 0 else []
            h, _ = kernels.states(k, v, dec, s_in, False, states_in_fp32=True)
            dq, dk, dv, dg = kernels.grads(q, k, v, dec, h, dh, do, scale, fold=ds_out)
        _wait(send)
        return dq, dk, dv, dg, None, None, None, None


def lasp1_attention(q, k, v, *, g=None, g_gamma=None, scale=None, kernels=None, serial_compute=False):
    """LASP-1 serial state passing on the default group (see the module docstring)."""
    kernels, scale = _checked_setup(q, k, v, g, g_gamma, scale, kernels)
    return _Lasp1.apply(q.contiguous(), k.contiguous(), v.contiguous(), g, g_gamma, scale, kernels, serial_compute)


def _exchange(send: list[torch.Tensor], recv: list[torch.Tensor]):
    """Send to rank+1 and receive from rank-1 (one ring hop); returns the requests."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ops = [dist.P2POp(dist.isend, t, (rank + 1) % world) for t in send]
    ops += [dist.P2POp(dist.irecv, t, (rank - 1) % world) for t in recv]
    return dist.batch_isend_irecv(ops)


def _per_token_gate(g, g_gamma, B: int, S: int, H: int, sdt) -> torch.Tensor | None:
    """The log decay of every token ``[B, S, H]``: ``g`` itself, a constant ``g_gamma`` broadcast
    (in the state dtype), or None without decay."""
    return g if g is not None else (None if g_gamma is None else g_gamma.to(sdt)[None, None].expand(B, S, H))


def _block_decay(g_block: torch.Tensor | None, sdt) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For a block's gate ``[B, S, H]``: the weights ``exp(G_end - G_s)`` and the total log decay."""
    if g_block is None:
        return None, None
    G = seq_cumsum(g_block.to(sdt), 1)
    return torch.exp(G[:, -1:] - G), G[:, -1]


class _RingKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, g_gamma, scale, kernels: LinearKernels):
        rank, world = dist.get_rank(), dist.get_world_size()
        B, S, H, K = q.shape
        sdt = _state_dtype(q)
        dec = kernels.prepare(g, g_gamma, S)
        # The gate travels with the block; a constant g_gamma is the same everywhere.
        g_full = _per_token_gate(g, g_gamma, B, S, H, sdt)
        block = [k, v] + ([g.contiguous()] if g is not None else [])
        s_in = torch.zeros(B, H, K, v.shape[-1], dtype=sdt, device=q.device)
        log_between = torch.zeros(B, H, dtype=sdt, device=q.device)  # log prod of Gamma between block and us
        nxt = [torch.empty_like(t) for t in block]
        reqs = _exchange(block, nxt) if world > 1 else []
        h, _ = kernels.states(k, v, dec, None, False)  # under the first transfer
        for step in range(1, world):
            _wait(reqs)
            block = nxt
            if step < world - 1:  # the next block travels while this one is folded in
                nxt = [torch.empty_like(t) for t in block]
                reqs = _exchange(block, nxt)
            if step > rank:  # block from a later rank (wrapped around): causally invisible
                continue
            kj, vj = block[0], block[1]
            gj = block[2] if g is not None else g_full
            w, log_gamma_j = _block_decay(gj, sdt)
            kd = kj.to(sdt) if w is None else kj.to(sdt) * w[..., None]
            s_j = torch.einsum("bshk,bshv->bhkv", kd, vj.to(sdt))
            s_in = s_in + torch.exp(log_between)[..., None, None] * s_j
            if log_gamma_j is not None:
                log_between = log_between + log_gamma_j
        o = kernels.output(q, k, v, dec, h, scale, fold=s_in if rank > 0 else None)  # LASP-2's fold kernel
        ctx.save_for_backward(q, k, v, g, g_gamma, s_in)
        ctx.scale, ctx.kernels = scale, kernels
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, g_gamma, s_in = ctx.saved_tensors
        kernels, scale = ctx.kernels, ctx.scale
        rank, world = dist.get_rank(), dist.get_world_size()
        B, S, H, K = q.shape
        sdt = s_in.dtype
        do = do.contiguous()
        dec = kernels.prepare(g, g_gamma, S)
        # Own output, S_in held fixed: dq, dk, dv, dg of this rank's tokens, and dh0 = D_r.
        h, _ = kernels.states(k, v, dec, s_in, False, states_in_fp32=True)
        dq, dk, dv, dg, own = kernels.backward(q, k, v, dec, h, do, s_in, None, scale)
        g_full = _per_token_gate(g, g_gamma, B, S, H, sdt)
        gated = g is not None
        # K, V (and g) rotate ahead; the fp32 gradient accumulators of each block follow one
        # hop behind and come home after W hops.
        block = [k, v] + ([g.contiguous()] if gated else [])
        acc = [torch.zeros(B, S, H, K, dtype=sdt, device=q.device),
               torch.zeros(B, S, H, v.shape[-1], dtype=sdt, device=q.device)]
        if gated:
            acc.append(torch.zeros(B, S, H, dtype=sdt, device=q.device))
        cross = torch.zeros(world, B, H, dtype=sdt, device=q.device)  # d log Gamma_i from this rank's loss
        log_between = torch.zeros(B, H, dtype=sdt, device=q.device)
        nxt, acc_nxt = [torch.empty_like(t) for t in block], [torch.empty_like(t) for t in acc]
        kv_reqs = _exchange(block, nxt) if world > 1 else []
        acc_reqs = _exchange(acc, acc_nxt) if world > 1 else []
        for step in range(1, world):
            _wait(kv_reqs)
            block = nxt
            if step < world - 1:
                nxt = [torch.empty_like(t) for t in block]
                kv_reqs = _exchange(block, nxt)
            contrib = None
            if step <= rank:
                j = rank - step
                kj, vj = block[0].to(sdt), block[1].to(sdt)
                gj = block[2] if gated else g_full
                w, log_gamma_j = _block_decay(gj, sdt)
                m = torch.exp(log_between)[..., None, None] * own  # dL/dS_j from this rank's output
                kd = kj if w is None else kj * w[..., None]
                a = torch.einsum("bshk,bhkv,bshv->bsh", kd, m, vj)  # per token: w_s k_s^T M v_s
                contrib = [torch.einsum("bshv,bhkv->bshk", vj, m) * (1.0 if w is None else w[..., None]),
                           torch.einsum("bshk,bhkv->bshv", kd, m)]
                if gated:  # d/dg_u of S_j = sum over s < u: an exclusive prefix sum
                    contrib.append(seq_cumsum(a, 1) - a)
                if j + 1 < rank:
                    cross[j + 1: rank] += a.sum(1)  # <M, S_j> for every Gamma_i between j and us
                if log_gamma_j is not None:
                    log_between = log_between + log_gamma_j
            _wait(acc_reqs)
            acc = acc_nxt if contrib is None else [x + c for x, c in zip(acc_nxt, contrib)]
            acc_nxt = [torch.empty_like(t) for t in acc]
            acc_reqs = _exchange(acc, acc_nxt)
        _wait(acc_reqs)
        acc = acc_nxt if world > 1 else acc
        if world > 1:
            dist.all_reduce(cross)
        dk = (dk.to(sdt) + acc[0]).to(k.dtype)
        dv = (dv.to(sdt) + acc[1]).to(v.dtype)
        if gated:
            dg = (dg.to(sdt) + acc[2] + cross[rank][:, None, :]).to(g.dtype)
        return dq, dk, dv, dg, None, None, None


def ring_kv_attention(q, k, v, *, g=None, g_gamma=None, scale=None, kernels=None):
    """Ring K/V passing for causal linear attention on the default group (module docstring)."""
    kernels, scale = _checked_setup(q, k, v, g, g_gamma, scale, kernels)
    return _RingKV.apply(q.contiguous(), k.contiguous(), v.contiguous(), g, g_gamma, scale, kernels)
