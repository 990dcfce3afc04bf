"""LASP-2: linear-attention sequence parallelism with ONE all-gather of d x d states.

Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its
Hybrid" (arXiv 2502.07563), extended to per-head scalar decay (docs/lasp2.md derives it).

Sharding: the global sequence ``[B, S, H, D]`` is split over the ``W`` ranks of ``group``
into ``[B, S/W, H, D]`` shards, contiguously (rank ``r`` holds tokens ``[r S/W, (r+1) S/W)``)
or zigzag (chunks ``r`` and ``2W-1-r`` of ``2W``; the shard is viewed as two segments and
the scan runs over ``2W`` chunks), as :func:`commflow.sp.shard` makes them.

Causal forward on rank ``r`` (``G_t``: inclusive cumulative log decay within the shard):

1. local states with zero initial state: per-chunk ``h`` and the final ``S_r`` (fp32, ``[B, H, D_k, D_v]``);
2. ONE asynchronous all-gather of ``S_r`` and, for a data-dependent ``g``, the shard's
   total log decay ``log Gamma_r = G_last`` ``[B, H]`` (a constant ``g_gamma`` needs no
   communication: ``log Gamma = gamma * S/W`` on every rank);
3. exclusive scan with ``(Ga, Sa) o (Gb, Sb) = (Ga Gb, Gb Sa + Sb)`` in fp32:
   ``S_in(r) = sum_{j<r} (prod_{j<i<r} Gamma_i) S_j`` (:func:`rank_scan`);
4. ``o = o_local + scale * (q * exp(G)) @ S_in``: by default with ``S_in`` folded into every
   chunk's state inside the output kernel (no extra pass); with ``forward_overlap=True`` in
   the paper's order, the local output computed under the all-gather and the term added after.

Backward: the local state-gradient sweep with a zero outgoing gradient gives ``dh`` and
``D_r = scale * (q * exp(G))^T do`` (rank r's own share of ``dS_in(r)``); ONE all-gather of
``D_r``, overlapped with recomputing the states from ``S_in(r)``; the suffix scan
``dS_out(r) = sum_{j>r} (prod_{r<i<j} Gamma_i) D_j``; then the gradient kernels with
``dS_out(r)`` folded into every chunk's ``dh``: the local backward with initial state
``S_in(r)`` and final-state gradient ``dS_out(r)``, which yields ``dq, dk, dv`` and ``dg``
including the cross-rank term ``Gamma_r <dS_out(r), S_in(r)>`` (every position of rank r).

Non-causal (no decay): every rank uses the full ``sum_j k_j^T v_j`` (one all-reduce; the
backward all-reduces ``sum_j q_j^T do_j``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from commflow.dist import all_gather_tensor

from ._common import autocast_off
from .layout import LAYOUTS
from .linear_kernels import LinearKernels, _compute_dtype, decay_mode, select_kernels, seq_cumsum

__all__ = ["check_lasp2_inputs", "chunk_owners", "lasp2_attention", "prime_kernels", "rank_scan"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _LocalWorld:
    """Stand-in for a process group while priming kernels (:func:`prime_kernels`): rank
    ``rank`` of ``size`` ranks whose all-gather copies this rank's payload into every slot,
    so the whole multi-rank code path runs with no communication."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


class _Done:
    def wait(self) -> None:
        return None


def _all_gather_async(out: torch.Tensor, t: torch.Tensor, group):
    if isinstance(group, _LocalWorld):
        out.view(group.size, -1).copy_(t.reshape(1, -1).expand(group.size, -1))
        return _Done()
    return all_gather_tensor(out, t, group=group, async_op=True)


def _rank_world(group) -> tuple[int, int]:
    if isinstance(group, _LocalWorld):
        return group.rank, group.size
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_lasp2_inputs(
    q, k, v, *, g=None, g_gamma=None, causal: bool = True, scale=None, layout: str = "contiguous",
    check_decay_sign: bool = True,
) -> None:
    """Raise a ValueError naming the argument, its value and the rule; no communication.

    Checks use only this rank's tensors, so every rank that got the same kind of bad
    input raises before the first collective. The sign checks of ``g`` / ``g_gamma``
    read a device value (one host sync); ``check_decay_sign=False`` skips them.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim] (4-D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype must be one of {_FLOAT_DTYPES}, got {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k.shape must equal q.shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v.shape[:3] (batch, seq, heads) must equal q.shape[:3] {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape[:3])}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[1] < 1:
        raise ValueError(f"q.shape[1] (local sequence) must be >= 1, got {q.shape[1]}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"layout 'zigzag' needs an even local sequence (two chunks per rank; the global length "
                         f"divisible by 2 x group size), got q.shape[1]={q.shape[1]}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    if g is not None and g_gamma is not None:
        raise ValueError("pass at most one of g (data-dependent decay) and g_gamma (constant decay), got both")
    if not causal and (g is not None or g_gamma is not None):
        raise ValueError("causal=False supports no decay (the bidirectional sum has no order to decay along): "
                         "pass g=None and g_gamma=None")
    B, S, H = q.shape[:3]
    if g is not None:
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (B, S, H):
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"g must have shape [batch, seq, heads] = {(B, S, H)}, got {shape}")
        if g.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"g.dtype must be float32 or float64 (the decay chain is kept in fp32), got {g.dtype}; "
                             "cast with g.float()")
        if g.device != q.device:
            raise ValueError(f"g must be on q's device {q.device}, got {g.device}")
        if check_decay_sign and bool((g > 0).any()):
            raise ValueError(f"g is a log decay and must be <= 0 everywhere, got max {g.max().item():.4g} "
                             "(e.g. g = F.logsigmoid(x))")
    if g_gamma is not None:
        if not isinstance(g_gamma, torch.Tensor) or tuple(g_gamma.shape) != (H,):
            shape = tuple(g_gamma.shape) if isinstance(g_gamma, torch.Tensor) else type(g_gamma).__name__
            raise ValueError(f"g_gamma must have shape [heads] = ({H},), got {shape}")
        if g_gamma.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"g_gamma.dtype must be float32 or float64, got {g_gamma.dtype}")
        if g_gamma.device != q.device:
            raise ValueError(f"g_gamma must be on q's device {q.device}, got {g_gamma.device}")
        if check_decay_sign and bool((g_gamma > 0).any()):
            raise ValueError(f"g_gamma is a log decay and must be <= 0, got {g_gamma.tolist()}")


def rank_scan(states: torch.Tensor, log_gammas: torch.Tensor, index: int, *, reverse: bool) -> torch.Tensor:
    """The rank scans in closed form: folding ``(Ga, Sa) o (Gb, Sb) = (Ga Gb, Gb Sa + Sb)`` over chunks.

    ``states`` ``[N, B, H, K, V]`` and ``log_gammas`` ``[N, B, H]`` of the ``N`` chunks in sequence
    order (fp32). Forward (``reverse=False``): ``S_in(i) = sum_{j<i} (prod_{j<m<i} Gamma_m) S_j``.
    Backward (``reverse=True``): ``dS_out(i) = sum_{j>i} (prod_{i<m<j} Gamma_m) D_j``. The log
    weights are differences of one inclusive cumsum ``c`` (``c_{i-1} - c_j`` and ``c_{j-1} - c_i``),
    sums of log decays <= 0: nothing overflows. Four kernels, whatever ``N``.

    Computes in the inputs' dtype: call it outside autocast, as LASP-2's autograd functions
    do (under ``torch.autocast(bfloat16)`` the einsum returned bf16 states on every rank but
    the first, whose zeros stay fp32: the 4xH100 hang of docs/train.md).
    """
    if not reverse:
        if index == 0:
            return states.new_zeros(states.shape[1:])
        c = torch.cumsum(log_gammas[:index], 0)
        w = torch.exp(c[-1] - c)  # j = 0..i-1: sum_{j<m<i} log Gamma_m
        return torch.einsum("nbh,nbhkv->bhkv", w, states[:index])
    if index == states.shape[0] - 1:
        return states.new_zeros(states.shape[1:])
    c = torch.cumsum(log_gammas[index:-1], 0)
    w = torch.exp(c - c[0])  # j = i+1..N-1: sum_{i<m<j} log Gamma_m
    return torch.einsum("nbh,nbhkv->bhkv", w, states[index + 1:])


def _local_log_decay(q, g, g_gamma) -> torch.Tensor | None:
    """``G`` ``[B, S, H]`` fp32 (fp64 for fp64 inputs): inclusive cumulative log decay over the shard."""
    cdt = _compute_dtype(q)
    if g is not None:
        return seq_cumsum(g.to(cdt), dim=1)
    if g_gamma is not None:
        steps = torch.arange(1, q.shape[1] + 1, device=q.device, dtype=cdt)
        return (steps[:, None] * g_gamma.to(cdt)[None, :])[None]
    return None


def _add_inter(o, q, s_in, G, scale):
    """``o + scale * (q * exp(G)) @ S_in``: the incoming state's share of the output."""
    cdt = _compute_dtype(q)
    # The product runs in q's dtype (bf16 on GPU, like fla's inter-chunk term); the sum in fp32.
    inter = torch.einsum("bshk,bhkv->bshv", q, s_in.to(q.dtype)).to(cdt)
    weight = scale if G is None else scale * torch.exp(G)[..., None]
    return (o.to(cdt) + weight * inter).to(o.dtype)


def chunk_owners(world: int, layout: str) -> list[tuple[int, int]]:
    """Global chunk order as ``(rank, segment)``: contiguous has one chunk per rank; zigzag two,
    rank ``r`` holding chunks ``r`` (segment 0) and ``2W-1-r`` (segment 1)."""
    if layout == "contiguous" or world == 1:
        return [(r, 0) for r in range(world)]
    return [(r, 0) for r in range(world)] + [(r, 1) for r in reversed(range(world))]


def _segments(layout: str, world: int) -> int:
    return 2 if layout == "zigzag" and world > 1 else 1


def _to_global_order(per_rank: torch.Tensor, owners) -> torch.Tensor:
    """``[W, B, n, ...]`` gathered per rank and segment -> ``[n W, B, ...]`` in global chunk order."""
    ranks = torch.tensor([r for r, _ in owners], device=per_rank.device)
    segs = torch.tensor([s for _, s in owners], device=per_rank.device)
    return per_rank[ranks, :, segs]


class _Lasp2Causal(torch.autograd.Function):
    """Causal LASP-2. The shard is viewed as ``n`` segments (1 contiguous, 2 zigzag), each a
    chunk of the global sequence: ``[B, S, H, D]`` -> ``[B n, S/n, H, D]`` (a view); the scan
    runs over all ``n W`` chunks in global order, so zigzag costs one all-gather too."""

    @staticmethod
    @autocast_off  # every dtype here is explicit: fp32 state chain, kernels in the inputs' dtype
    def forward(ctx, q, k, v, g, g_gamma, scale, group, kernels: LinearKernels, layout: str, overlap: bool):
        rank, world = _rank_world(group)
        n = _segments(layout, world)
        B, S, H, K = q.shape
        Vd, c = v.shape[-1], S // n
        qs, ks, vs = (x.view(B * n, c, H, x.shape[-1]) for x in (q, k, v))
        gs = None if g is None else g.view(B * n, c, H)
        dec = kernels.prepare(gs, g_gamma, c)
        h, s_local = kernels.states(ks, vs, dec, None, world > 1)
        s_in = log_gammas = None
        if world == 1:
            o = kernels.output(qs, ks, vs, dec, h, scale)
        else:
            sdt = _compute_dtype(q)  # the state chain's dtype
            payload = s_local.to(sdt).reshape(-1)
            if dec.mode == "g":
                payload = torch.cat([payload, gs.to(sdt).sum(1).reshape(-1)])
            gathered = payload.new_empty(world * payload.numel())
            work = _all_gather_async(gathered, payload, group)
            if overlap:  # the local output runs under the all-gather; S_in's share is added after
                o = kernels.output(qs, ks, vs, dec, h, scale)
            else:
                kernels.prepare_fold(dec, qs)  # the fold's per-chunk weights, under the all-gather
            work.wait()
            s_in, log_gammas = _incoming(gathered, world, rank, layout, B, n, H, K, Vd, dec.mode, g_gamma, c, sdt,
                                         reverse=False)
            if overlap:
                o = _add_inter(o, qs, s_in, _local_log_decay(qs, gs, g_gamma), scale)
            else:  # S_in folded into every chunk's state inside the output kernel: no extra pass
                o = kernels.output(qs, ks, vs, dec, h, scale, fold=s_in)
        ctx.save_for_backward(q, k, v, g, g_gamma, s_in, log_gammas)
        ctx.scale, ctx.group, ctx.kernels, ctx.rank, ctx.world, ctx.layout = scale, group, kernels, rank, world, layout
        ctx.decay = dec  # the prepared decay (chunk cumsum, fold weights): not recomputed in the backward
        return o.reshape(B, S, H, Vd)

    @staticmethod
    @autocast_off
    def backward(ctx, do):
        q, k, v, g, g_gamma, s_in, log_gammas = ctx.saved_tensors
        kernels, scale, rank, world = ctx.kernels, ctx.scale, ctx.rank, ctx.world
        n = _segments(ctx.layout, world)
        B, S, H, K = q.shape
        Vd, c = v.shape[-1], S // n
        qs, ks, vs, dos = (x.view(B * n, c, H, x.shape[-1]) for x in (q, k, v, do.contiguous()))
        dec = ctx.decay
        # dh with a zero outgoing gradient; its dh0 is D, this rank's own share of dS_in.
        dh, d_own = kernels.state_grads(qs, dos, dec, scale)
        ds_out = None
        if world == 1:
            h, _ = kernels.states(ks, vs, dec, None, False, states_in_fp32=True)
        else:
            d_own = d_own.to(s_in.dtype)
            gathered = d_own.new_empty(world * d_own.numel())
            work = _all_gather_async(gathered, d_own.reshape(-1), ctx.group)
            # Overlapped with the all-gather: the states with the incoming state (fp32 for the backward).
            h, _ = kernels.states(ks, vs, dec, s_in, False, states_in_fp32=True)
            work.wait()
            ds_out = _outgoing_grad(gathered, log_gammas, world, rank, ctx.layout, B, n, H, K, Vd)
        # The gradient from later ranks folded into every chunk's dh inside the kernels.
        dq, dk, dv, dg = kernels.grads(qs, ks, vs, dec, h, dh, dos, scale, fold=ds_out)
        dg = None if dg is None else dg.reshape(B, S, H)
        return (dq.reshape(B, S, H, K), dk.reshape(B, S, H, K), dv.reshape(B, S, H, Vd), dg,
                None, None, None, None, None, None)


def _incoming(gathered, world, rank, layout, B, n, H, K, Vd, mode, g_gamma, c, sdt, reverse):
    """``(S_in [B n, H, K, V], log decays of all chunks [n W, B, H])`` from the gathered payload."""
    parts = gathered.view(world, -1)
    n_state = B * n * H * K * Vd
    states = parts[:, :n_state].view(world, B, n, H, K, Vd)
    if mode == "g":
        log_gammas = parts[:, n_state:].view(world, B, n, H)
    elif mode == "gamma":
        log_gammas = (g_gamma.to(sdt) * c).expand(world, B, n, H)
    else:
        log_gammas = states.new_zeros(world, B, n, H)
    owners = chunk_owners(world, layout)
    if n == 1:  # contiguous: the gathered order is the sequence order
        states, log_gammas = states[:, :, 0], log_gammas[:, :, 0]
    else:
        states, log_gammas = _to_global_order(states, owners), _to_global_order(log_gammas, owners)
    mine = [owners.index((rank, seg)) for seg in range(n)]
    s_in = [rank_scan(states, log_gammas, i, reverse=False) for i in mine]
    s_in = s_in[0] if n == 1 else torch.stack(s_in, dim=1)
    return s_in.reshape(B * n, H, K, Vd), log_gammas


def _outgoing_grad(gathered, log_gammas, world, rank, layout, B, n, H, K, Vd):
    """``dS_out [B n, H, K, V]``: the suffix scan of the gathered per-chunk ``D``."""
    owners = chunk_owners(world, layout)
    per_rank = gathered.view(world, B, n, H, K, Vd)
    d_all = per_rank[:, :, 0] if n == 1 else _to_global_order(per_rank, owners)
    mine = [owners.index((rank, seg)) for seg in range(n)]
    ds_out = [rank_scan(d_all, log_gammas, i, reverse=True) for i in mine]
    ds_out = ds_out[0] if n == 1 else torch.stack(ds_out, dim=1)
    return ds_out.reshape(B * n, H, K, Vd)


class _Lasp2Bidirectional(torch.autograd.Function):
    @staticmethod
    @autocast_off  # the d x d total stays in fp32 (fp64)
    def forward(ctx, q, k, v, scale, group):
        _, world = _rank_world(group)
        cdt = _compute_dtype(q)
        total = torch.einsum("bshk,bshv->bhkv", k.to(cdt), v.to(cdt))
        if world > 1:
            dist.all_reduce(total, group=group)
        o = (scale * torch.einsum("bshk,bhkv->bshv", q.to(cdt), total)).to(q.dtype)
        ctx.save_for_backward(q, k, v, total)
        ctx.scale, ctx.group, ctx.world = scale, group, world
        return o

    @staticmethod
    @autocast_off
    def backward(ctx, do):
        q, k, v, total = ctx.saved_tensors
        cdt, scale = total.dtype, ctx.scale
        do_c = do.to(cdt)
        d_total = scale * torch.einsum("bshk,bshv->bhkv", q.to(cdt), do_c)
        work = dist.all_reduce(d_total, group=ctx.group, async_op=True) if ctx.world > 1 else None
        dq = scale * torch.einsum("bshv,bhkv->bshk", do_c, total)  # overlapped with the all-reduce
        if work is not None:
            work.wait()
        dk = torch.einsum("bshv,bhkv->bshk", v.to(cdt), d_total)
        dv = torch.einsum("bshk,bhkv->bshv", k.to(cdt), d_total)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def lasp2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    scale: float | None = None,
    layout: str = "contiguous",
    kernels: LinearKernels | str | None = None,
    forward_overlap: bool = False,
    check_decay_sign: bool = True,
) -> torch.Tensor:
    """Sequence-parallel linear attention over ``group`` (LASP-2).

    Args:
        q, k: ``[B, S/W, H, D_k]``, this rank's contiguous shard of the global ``[B, S, H, D_k]``
            (rank ``r`` holds tokens ``[r S/W, (r+1) S/W)``); every rank passes the same shape.
        v: ``[B, S/W, H, D_v]``, sharded like ``q``.
        g: data-dependent log decay ``[B, S/W, H]`` (float32/64, ``<= 0``), sharded like ``q``.
        g_gamma: constant per-head log decay ``[H]`` (``<= 0``), the same on every rank; no gradient.
        group: the sequence-parallel group (default: the default group; world 1 works).
        causal: False: bidirectional ``o_t = scale q_t^T sum_s k_s v_s^T`` (no decay allowed).
        scale: score scale, default ``D_k ** -0.5``.
        kernels: a :class:`~commflow.sp.linear_kernels.LinearKernels`, a backend name
            (``"torch"``, ``"fla"``, ``"fla-only"``) or None (fla on CUDA, torch otherwise).
        layout: how the sequence is sharded: ``"contiguous"`` (rank ``r`` holds tokens
            ``[r S/W, (r+1) S/W)``) or ``"zigzag"`` (rank ``r`` holds chunks ``r`` and ``2W-1-r`` of
            ``2W``; :func:`commflow.sp.shard`). Zigzag lets a hybrid model keep causal softmax layers
            balanced; here it costs nothing but a payload of two states instead of one.
        forward_overlap: False (default): wait for the all-gather, then fold ``S_in`` into the
            output kernel (no extra pass over ``q``/``o``; the all-gather, ``W`` d x d states,
            is exposed). True: the paper's order, the local output overlapped with the
            all-gather and ``S_in``'s share added after (one extra pass). docs/lasp2.md
            has the measurements behind the default.
        check_decay_sign: check ``g <= 0`` / ``g_gamma <= 0`` (one host sync).

    Returns:
        ``o`` ``[B, S/W, H, D_v]`` in ``q.dtype``, sharded like ``q``. Differentiable in
        ``q, k, v, g``. Communication: one all-gather of ``B H D_k D_v`` fp32 (+ ``B H`` for ``g``)
        per direction, independent of the sequence length.
    """
    check_lasp2_inputs(q, k, v, g=g, g_gamma=g_gamma, causal=causal, scale=scale, layout=layout,
                       check_decay_sign=check_decay_sign)
    if not isinstance(kernels, LinearKernels):
        kernels = select_kernels(q.device, backend=kernels)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not causal:
        return _Lasp2Bidirectional.apply(q, k, v, scale, group)
    if decay_mode(g, g_gamma) == "g" and not g.is_contiguous():
        g = g.contiguous()
    return _Lasp2Causal.apply(q.contiguous(), k.contiguous(), v.contiguous(), g, g_gamma, scale, group, kernels,
                              layout, forward_overlap)


def prime_kernels(
    *, batch: int, heads: int, head_dim: int, world: int, dtype: torch.dtype, device: torch.device | str,
    decay: str = "g", layout: str = "contiguous", forward_overlap: bool = False,
    kernels: LinearKernels | str | None = None,
) -> None:
    """Compile and load now every kernel that a LASP-2 forward and backward with these
    settings launches, on a short local sequence and with no communication.

    Why: a Triton kernel is loaded into the CUDA context at its first launch, and under
    CUDA's lazy loading that load can wait for the kernels already running on the device
    (CUDA programming guide, "Lazy Loading": concurrent execution). If one of them is a
    collective waiting for a peer that is itself stuck loading a kernel, no rank moves:
    the trainer's first LLLS step on 4 H100s hung this way in fla's ``chunk_fwd_h``, every
    rank inside Triton's ``_init_handles`` for minutes. Call this on every rank before the
    first step, with nothing else in flight, and the first step only launches loaded kernels.

    ``batch``, ``heads``, ``head_dim``, ``dtype`` (of q, k, v), ``decay`` (``"none"``,
    ``"gamma"`` or ``"g"``), ``layout``, ``forward_overlap`` and ``world`` (the SP group size)
    as the training step will use them: Triton specialises kernels on such properties.
    """
    if decay not in ("none", "gamma", "g"):
        raise ValueError(f"decay: got {decay!r}; the rule is one of 'none', 'gamma', 'g'")
    if world < 1:
        raise ValueError(f"world: got {world}; the rule is world >= 1")
    device = torch.device(device)
    seq = 2 * 64 * _segments(layout, world)  # two chunks per segment
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt).requires_grad_()

    q, k, v = (rand(batch, seq, heads, head_dim) for _ in range(3))
    g = g_gamma = None
    if decay == "g":
        g = torch.nn.functional.logsigmoid(rand(batch, seq, heads, dt=torch.float32)).detach().requires_grad_()
    elif decay == "gamma":
        g_gamma = torch.log1p(-torch.exp2(-5.0 - torch.arange(heads, device=device, dtype=torch.float32)))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # Triton keys its loaded kernels by the current device

    def step(rank: int) -> torch.Tensor:
        return lasp2_attention(q, k, v, g=g, g_gamma=g_gamma, group=_LocalWorld(rank, world), layout=layout,
                               kernels=kernels, forward_overlap=forward_overlap, check_decay_sign=False)

    # Every rank position (the first, a middle and the last differ in which states they
    # receive), once plainly and once under activation checkpointing: there the forward
    # runs again inside the backward, on autograd's device thread (Triton's kernel cache
    # is per device, and the 4xH100 log showed a forward kernel loaded there mid-step).
    for rank in sorted({0, min(1, world - 1), world - 1}):
        step(rank).float().square().sum().backward()
        torch.utils.checkpoint.checkpoint(step, rank, use_reentrant=False).float().square().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
