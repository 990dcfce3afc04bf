"""Local (one-rank) chunked linear-attention kernels: plain torch, and fla's Triton kernels on GPU.

The sequence is cut into chunks of ``C`` tokens. Per chunk ``n`` with chunk-local
inclusive cumulative log decay ``b_t`` (``b_last`` at the chunk's end) and ``h_n`` the
state entering the chunk (see :mod:`commflow.sp.linear_reference` for the model)::

    o_t     = scale * (exp(b_t) q_t^T h_n + sum_{s <= t in n} exp(b_t - b_s) (q_t . k_s) v_s)
    h_{n+1} = exp(b_last) h_n + sum_{s in n} exp(b_last - b_s) k_s v_s^T

and the backward, with ``dh_n`` the gradient of the state *leaving* chunk ``n``::

    dh_{n-1} = exp(b_last) dh_n + scale * sum_{t in n} exp(b_t) q_t do_t^T      (dh0 at the start)
    dq_t = scale * (exp(b_t) h_n do_t + sum_{s <= t} exp(b_t - b_s) (do_t . v_s) k_s)
    dk_s = exp(b_last - b_s) dh_n v_s + scale * sum_{t >= s} exp(b_t - b_s) (do_t . v_s) q_t
    dv_s = exp(b_last - b_s) dh_n^T k_s + scale * sum_{t >= s} exp(b_t - b_s) (q_t . k_s) do_t
    db_t = q_t . dq_t - k_t . dk_t  (+ at t = last: exp(b_last) <h_n, dh_n> + sum_s k_s . dk_s^inter)
    dg   = reverse cumsum of db within the chunk

Every backend implements the same steps, so LASP-2 can run them apart and put its
collectives between them:

* :meth:`LinearKernels.states`      -> per-chunk entering states ``h [B, NT, H, K, V]`` and the final state;
* :meth:`LinearKernels.output`      -> ``o`` from ``h``, optionally with a *fold* state ``F`` added to every
  chunk's entering state, decayed from the start of the shard (``h_n + exp(G_{n,start}) F``): the
  incoming state of a rank, at no extra pass over ``q`` or ``o``;
* :meth:`LinearKernels.state_grads` -> ``dh`` with a zero final-state gradient, and ``dh0`` (for LASP-2:
  the part of the incoming-state gradient that this rank's own output produces);
* :meth:`LinearKernels.grads`       -> ``dq, dk, dv, dg`` from ``h`` and ``dh``, optionally with a fold
  ``F`` added to every chunk's leaving-state gradient, decayed to the end of the shard
  (``dh_n + exp(G_end - G_{n,end}) F``): the gradient arriving from later ranks;
* :meth:`LinearKernels.backward`    -> the above for an initial state and a final-state gradient.

Backends: :class:`TorchChunkKernels` (any device, computes in float32, or float64 for
float64 inputs: CPU tests, gradcheck, fallback) and :class:`FlaChunkKernels` (fla-core
0.6.0 Triton kernels; for the data-dependent gate its refused Hopper backward kernel is
replaced, see :mod:`commflow.sp.linear_triton`). :func:`chunk_linear_attention` is the
single-process autograd op over either.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import torch

from ._common import autocast_off

__all__ = [
    "Decay",
    "FlaChunkKernels",
    "LinearKernels",
    "TorchChunkKernels",
    "chunk_linear_attention",
    "fla_available",
    "fold_log_weights",
    "select_kernels",
    "torch_chunk_dqkg",
]

LN2 = math.log(2.0)


@dataclass(kw_only=True)
class Decay:
    """Decay of one call, prepared for one backend (opaque outside the backend)."""

    mode: str
    """``"none"``, ``"gamma"`` (constant per head) or ``"g"`` (data-dependent)."""
    g: torch.Tensor | None = None
    """The caller's ``[B, S, H]`` log decay (mode ``"g"``)."""
    g_gamma: torch.Tensor | None = None
    """The caller's ``[H]`` log decay (mode ``"gamma"``)."""
    chunk_cum: torch.Tensor | None = None
    """Backend form of the chunk-local cumulative decay (torch: natural log, chunked;
    fla: base-2 log ``[B, S, H]``)."""
    gamma2: torch.Tensor | None = None
    """fla: ``g_gamma / ln 2``."""
    cache: dict = field(default_factory=dict)
    """Derived tensors a backend keeps for reuse (fold weights)."""


def decay_mode(g: torch.Tensor | None, g_gamma: torch.Tensor | None) -> str:
    return "g" if g is not None else ("gamma" if g_gamma is not None else "none")


class LinearKernels:
    """One backend of the chunked local kernel (see the module docstring for the math)."""

    name = "abstract"
    chunk_size = 64

    def prepare(self, g: torch.Tensor | None, g_gamma: torch.Tensor | None, seq_len: int) -> Decay:
        raise NotImplementedError

    def states(self, k, v, decay: Decay, initial_state, output_final_state: bool, states_in_fp32: bool = False):
        """``(h [B, NT, H, K, V], final [B, H, K, V] fp32 or None)``; ``h[:, n]`` enters chunk ``n``."""
        raise NotImplementedError

    def output(self, q, k, v, decay: Decay, h, scale: float, fold=None) -> torch.Tensor:
        """``o``; ``fold`` ``[B, H, K, V]`` fp32 is added to every chunk's state, decayed from the shard start."""
        raise NotImplementedError

    def state_grads(self, q, do, decay: Decay, scale: float):
        """``(dh [B, NT, H, K, V] fp32, dh0 [B, H, K, V] fp32)`` for a zero final-state gradient."""
        raise NotImplementedError

    def grads(self, q, k, v, decay: Decay, h, dh, do, scale: float, fold=None):
        """``(dq, dk, dv, dg or None)``; ``h`` from :meth:`states` (``states_in_fp32=True``), ``dh``
        from :meth:`state_grads`; ``fold`` is added to every chunk's ``dh``, decayed to the shard end."""
        raise NotImplementedError

    def chunk_totals(self, decay: Decay, batch: int, seq_len: int) -> torch.Tensor:
        """Natural-log decay of each chunk ``[B, NT, H]`` (fp32; zeros without decay)."""
        raise NotImplementedError

    def prepare_fold(self, decay: Decay, q) -> None:
        """Compute (and cache on ``decay``) what a fold needs, e.g. while a collective is in flight."""

    def backward(self, q, k, v, decay: Decay, h, do, initial_state, dht, scale: float):
        """``(dq, dk, dv, dg, dh0)`` with an initial state (in ``h``) and a final-state gradient ``dht``."""
        dh, dh0 = self.state_grads(q, do, decay, scale)
        dq, dk, dv, dg = self.grads(q, k, v, decay, h, dh, do, scale, fold=dht)
        if initial_state is None:
            return dq, dk, dv, dg, None
        if dht is not None:  # dh0 = D + Gamma dht, Gamma the decay over the whole sequence
            total = self.chunk_totals(decay, q.shape[0], q.shape[1]).sum(1).to(device=dh0.device, dtype=dh0.dtype)
            dh0 = dh0 + torch.exp(total)[..., None, None] * dht.to(dh0.dtype)
        return dq, dk, dv, dg, dh0


def seq_cumsum(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``torch.cumsum(x, dim)`` run along the innermost dim.

    Why: on CUDA, a scan along an outer dim of a ``[B, S, H]`` tensor parallelises over
    ``B H`` only (``H`` threads walking ``S`` steps each: 23 ms for ``S`` = 64K, ``H`` = 16 on
    an H100, measured by ``benchmarks lasp2_profile``), while the innermost-dim scan
    parallelises over ``S`` too (tens of microseconds). Same additions, same order.
    """
    if dim in (-1, x.dim() - 1):
        return torch.cumsum(x, dim)
    return torch.cumsum(x.movedim(dim, -1).contiguous(), -1).movedim(-1, dim)


def fold_log_weights(totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From per-chunk log decays ``[B, NT, H]``: the log weights of a fold at each chunk,
    from the shard start (exclusive prefix sum) and to the shard end (exclusive suffix sum)."""
    inclusive = seq_cumsum(totals, 1)
    start = inclusive - totals
    tail = inclusive[:, -1:] - inclusive
    return start.contiguous(), tail.contiguous()


# ----------------------------------------------------------------------------- torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunked(x: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, S, H, ...]`` -> ``[B, NT, C, H, ...]``, zero-padded to a multiple of ``C``."""
    S = x.shape[1]
    pad = (-S) % C
    x = x.to(dtype)
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    return x.reshape(x.shape[0], -1, C, *x.shape[2:])


def _unchunked(x: torch.Tensor, S: int) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :S]


def _intra_decay(b: torch.Tensor | None, C: int, device) -> torch.Tensor:
    """``[B, NT, H, C, C]`` weights ``exp(b_t - b_s)`` for ``s <= t`` (row t, column s), else 0."""
    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    if b is None:
        return causal.to(torch.float32)
    bh = b.permute(0, 1, 3, 2)  # [B, NT, H, C]
    diff = (bh[..., :, None] - bh[..., None, :]).masked_fill(~causal, float("-inf"))
    return torch.exp(diff)


def torch_chunk_dqkg(q, k, v, do, b, h, dh, scale: float, C: int, need_dg: bool):
    """``dq, dk`` and the per-position ``db`` (before the chunk-local reverse cumsum) in torch.

    All tensors chunked ``[B, NT, C, H, D]`` (``h``, ``dh``: ``[B, NT, H, K, V]``), ``b``
    chunk-local cumulative natural-log decay ``[B, NT, C, H]`` or None. Returns tensors
    in the compute dtype of the inputs.
    """
    decay = _intra_decay(b, C, q.device).to(q.dtype)
    dA = torch.einsum("bnthv,bnshv->bnhts", do, v) * decay * scale  # (do_t . v_s), masked
    dq_inter = torch.einsum("bnthv,bnhkv->bnthk", do, h) * scale
    dk_inter = torch.einsum("bnshv,bnhkv->bnshk", v, dh)
    if b is not None:
        dq_inter = dq_inter * torch.exp(b)[..., None]
        dk_inter = dk_inter * torch.exp(b[:, :, -1:, :] - b)[..., None]
    dq = dq_inter + torch.einsum("bnhts,bnshk->bnthk", dA, k)
    dk = dk_inter + torch.einsum("bnhts,bnthk->bnshk", dA, q)
    db = None
    if need_dg:
        db = (q * dq).sum(-1) - (k * dk).sum(-1)  # [B, NT, C, H]
        last = torch.exp(b[:, :, -1, :]) * (h * dh).sum((-2, -1)) + (k * dk_inter).sum(-1).sum(2)
        db = torch.cat([db[:, :, :-1], db[:, :, -1:] + last[:, :, None]], dim=2)
    return dq, dk, db


class TorchChunkKernels(LinearKernels):
    """Plain-torch chunked kernels: any device, float32 (or float64) compute.

    The chunk size may be small (the tests use 4 so a shard of 16 tokens has chunk
    boundaries inside it); the sequence is zero-padded to a multiple of it (padded
    tokens have ``q = k = v = 0`` and ``g = 0``, so they change nothing).
    """

    name = "torch"

    def __init__(self, chunk_size: int = 64):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def prepare(self, g, g_gamma, seq_len):
        mode = decay_mode(g, g_gamma)
        dec = Decay(mode=mode, g=g, g_gamma=g_gamma)
        if mode == "none":
            return dec
        if mode == "gamma":  # materialise the constant gate; no gradient flows to it
            ref = g_gamma
            full = g_gamma.detach()[None, None, :].expand(1, seq_len, g_gamma.shape[0])
        else:
            ref, full = g, g.detach()
        cdt = _compute_dtype(ref)
        dec.chunk_cum = torch.cumsum(_chunked(full[..., None], self.chunk_size, cdt)[..., 0], dim=2)
        return dec

    def _b(self, decay: Decay, B: int) -> torch.Tensor | None:
        if decay.chunk_cum is None:
            return None
        return decay.chunk_cum.expand(B, *decay.chunk_cum.shape[1:])

    def chunk_totals(self, decay, batch, seq_len):
        b = self._b(decay, batch)
        if b is None:
            n = -(-seq_len // self.chunk_size)
            return torch.zeros(batch, n, 1, dtype=torch.float32)
        return b[:, :, -1, :]  # padded tokens have g = 0: the last slot is the chunk's total

    def _fold_weights(self, decay, batch, seq_len, device, dtype):
        start, tail = fold_log_weights(self.chunk_totals(decay, batch, seq_len).to(device=device, dtype=dtype))
        return torch.exp(start), torch.exp(tail)  # [B, NT, H or 1]

    def states(self, k, v, decay, initial_state, output_final_state, states_in_fp32=False):
        C, cdt = self.chunk_size, _compute_dtype(k)
        B, _, H, K = k.shape
        kc, vc = _chunked(k, C, cdt), _chunked(v, C, cdt)
        b = self._b(decay, B)
        if b is not None:
            kc = kc * torch.exp(b[:, :, -1:, :] - b)[..., None]
            chunk_decay = torch.exp(b[:, :, -1, :])  # [B, NT, H]
        local = torch.einsum("bnchk,bnchv->bnhkv", kc, vc)
        state = local.new_zeros(B, H, K, v.shape[-1])
        if initial_state is not None:
            state = state + initial_state.to(cdt)
        h = []
        for n in range(local.shape[1]):
            h.append(state)
            state = (state * chunk_decay[:, n, :, None, None] if b is not None else state) + local[:, n]
        return torch.stack(h, dim=1), (state if output_final_state else None)

    def output(self, q, k, v, decay, h, scale, fold=None):
        C, cdt, S = self.chunk_size, _compute_dtype(q), q.shape[1]
        qc, kc, vc = _chunked(q, C, cdt), _chunked(k, C, cdt), _chunked(v, C, cdt)
        b = self._b(decay, q.shape[0])
        h = h.to(cdt)
        if fold is not None:
            start, _ = self._fold_weights(decay, q.shape[0], S, q.device, cdt)
            h = h + start[..., None, None] * fold.to(cdt)[:, None]
        q_dec = qc if b is None else qc * torch.exp(b)[..., None]
        inter = torch.einsum("bnchk,bnhkv->bnchv", q_dec, h)
        scores = torch.einsum("bnthk,bnshk->bnhts", qc, kc) * _intra_decay(b, C, q.device).to(cdt)
        intra = torch.einsum("bnhts,bnshv->bnthv", scores, vc)
        return _unchunked(scale * (inter + intra), S).to(q.dtype)

    def state_grads(self, q, do, decay, scale):
        C, cdt = self.chunk_size, _compute_dtype(q)
        B, _, H, K = q.shape
        qc, doc = _chunked(q, C, cdt), _chunked(do, C, cdt)
        b = self._b(decay, B)
        q_dec = qc if b is None else qc * torch.exp(b)[..., None]
        from_q = scale * torch.einsum("bnchk,bnchv->bnhkv", q_dec, doc)
        cur = q.new_zeros(B, H, K, do.shape[-1], dtype=cdt)
        dh = []
        for n in reversed(range(qc.shape[1])):  # swept from the end
            dh.append(cur)
            cur = (cur * torch.exp(b[:, n, -1, :])[..., None, None] if b is not None else cur) + from_q[:, n]
        return torch.stack(dh[::-1], dim=1), cur

    def grads(self, q, k, v, decay, h, dh, do, scale, fold=None):
        C, cdt, S = self.chunk_size, _compute_dtype(q), q.shape[1]
        qc, kc, vc, doc = (_chunked(x, C, cdt) for x in (q, k, v, do))
        b = self._b(decay, q.shape[0])
        h, dh = h.to(cdt), dh.to(cdt)
        if fold is not None:
            _, tail = self._fold_weights(decay, q.shape[0], S, q.device, cdt)
            dh = dh + tail[..., None, None] * fold.to(cdt)[:, None]
        dq, dk, db = torch_chunk_dqkg(qc, kc, vc, doc, b, h, dh, scale, C, need_dg=decay.mode == "g")
        scores = torch.einsum("bnthk,bnshk->bnhts", qc, kc) * _intra_decay(b, C, q.device).to(cdt)
        dv_inter = torch.einsum("bnshk,bnhkv->bnshv", kc, dh)
        if b is not None:
            dv_inter = dv_inter * torch.exp(b[:, :, -1:, :] - b)[..., None]
        dv = dv_inter + scale * torch.einsum("bnhts,bnthv->bnshv", scores, doc)
        dg = None
        if db is not None:
            dg = _unchunked(db.flip(2).cumsum(2).flip(2)[..., None], S)[..., 0].to(decay.g.dtype)
        return _unchunked(dq, S).to(q.dtype), _unchunked(dk, S).to(k.dtype), _unchunked(dv, S).to(v.dtype), dg

    # fla-layout views of the decay, for checking the Triton kernels against this backend

    def chunk_cum_log2(self, decay, seq_len) -> torch.Tensor:
        """Chunk-local cumulative log2 decay ``[B, T, H]`` fp32 (fla's ``g`` after its cumsum)."""
        return (_unchunked(decay.chunk_cum[..., None], seq_len)[..., 0] / LN2).float().contiguous()

    def chunk_totals_log2(self, decay, batch, seq_len) -> torch.Tensor:
        return (self.chunk_totals(decay, batch, seq_len) / LN2).float().contiguous()

    def dg_from_db(self, db, chunk_size) -> torch.Tensor:
        """Chunk-local reverse cumsum of a per-token ``db [B, T, H]``."""
        T = db.shape[1]
        return _unchunked(_chunked(db[..., None], chunk_size, torch.float32).flip(2).cumsum(2).flip(2), T)[..., 0]


# ----------------------------------------------------------------------------- fla


def fla_available() -> bool:
    try:
        import fla.ops.common.chunk_h  # noqa: F401
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


class FlaChunkKernels(LinearKernels):
    """fla-core's Triton kernels where they are allowed and suffice, commflow's elsewhere.

    fla (``chunk_simple_gla``'s pieces): ``chunk_local_cumsum``, ``chunk_fwd_h``, ``chunk_bwd_dh``,
    ``chunk_fwd_o`` and ``chunk_bwd_dqkwg`` / ``chunk_bwd_dv`` without a fold and without a
    data-dependent gate. commflow (:mod:`commflow.sp.linear_triton`): the output with a fold,
    and ``dq, dk, dg`` / ``dv`` with a fold or a data-dependent gate (fla 0.6.0 refuses its
    gated ``chunk_bwd_dqkwg`` on Hopper with Triton 3.4-3.7.0, fla #640). Each commflow
    kernel variant is self-checked against the torch backend on first use; if it fails
    (or ``own_kernels=False``), the torch formulation runs instead, on fla's tensors.
    """

    name = "fla"

    def __init__(self, chunk_size: int = 64, own_kernels: bool = True):
        if chunk_size != 64:
            raise ValueError(f"chunk_size must be 64 for the fla kernels, got {chunk_size}")
        self.chunk_size = chunk_size
        self.own_kernels = own_kernels

    def prepare(self, g, g_gamma, seq_len):
        from fla.ops.utils import chunk_local_cumsum

        dec = Decay(mode=decay_mode(g, g_gamma), g=g, g_gamma=g_gamma)
        if g is not None:  # fla's kernels run on exp2: pre-scale by 1/ln2 like chunk_simple_gla does
            dec.chunk_cum = chunk_local_cumsum(g.detach().float(), chunk_size=self.chunk_size, scale=1 / LN2)
        if g_gamma is not None:
            dec.gamma2 = (g_gamma.detach().float() / LN2).contiguous()
        return dec

    def _own(self, q, v, decay, fold: bool) -> bool:
        if not self.own_kernels:
            return False
        from .linear_triton import checked

        return checked(q.device, q.dtype, q.shape[-1], v.shape[-1], self.chunk_size, decay.mode, fold)

    def chunk_totals_log2(self, decay, batch, seq_len) -> torch.Tensor:
        C = self.chunk_size
        n = -(-seq_len // C)
        if decay.mode == "g":
            last = torch.clamp(torch.arange(n, device=decay.g.device) * C + C - 1, max=seq_len - 1)
            return decay.chunk_cum[:, last, :].float()
        lengths = torch.clamp(seq_len - torch.arange(n) * C, max=C).float()
        if decay.mode == "gamma":
            return (lengths.to(decay.gamma2.device)[None, :, None] * decay.gamma2[None, None, :]).expand(batch, n, -1)
        return torch.zeros(batch, n, 1)

    def chunk_totals(self, decay, batch, seq_len):
        return self.chunk_totals_log2(decay, batch, seq_len) * LN2

    def _fold_log2(self, decay, q, which: int):
        if "fold_log2" not in decay.cache:
            weights = fold_log_weights(self.chunk_totals_log2(decay, q.shape[0], q.shape[1]).to(q.device))
            decay.cache["fold_log2"] = [w.expand(q.shape[0], w.shape[1], q.shape[2]).contiguous() for w in weights]
        return decay.cache["fold_log2"][which]

    def prepare_fold(self, decay, q):
        self._fold_log2(decay, q, 0)

    def states(self, k, v, decay, initial_state, output_final_state, states_in_fp32=False):
        from fla.ops.common.chunk_h import chunk_fwd_h

        return chunk_fwd_h(k=k, v=v, g=decay.chunk_cum, g_gamma=decay.gamma2, h0=initial_state,
                           output_final_state=output_final_state, chunk_size=self.chunk_size,
                           states_in_fp32=states_in_fp32)

    def output(self, q, k, v, decay, h, scale, fold=None):
        from fla.ops.common.chunk_o import chunk_fwd_o

        if fold is None:
            return chunk_fwd_o(q=q, k=k, v=v, h=h, g=decay.chunk_cum, g_gamma=decay.gamma2, scale=scale,
                               chunk_size=self.chunk_size)
        weights = self._fold_log2(decay, q, 0)
        if self._own(q, v, decay, fold=True):
            from .linear_triton import chunk_fwd_o as own_fwd_o

            return own_fwd_o(q, k, v, h, decay.chunk_cum, decay.gamma2, scale, self.chunk_size,
                             fold=fold.float().contiguous(), fold_w=weights)
        h = (h.float() + torch.exp2(weights)[..., None, None] * fold.float()[:, None]).to(h.dtype)
        return chunk_fwd_o(q=q, k=k, v=v, h=h, g=decay.chunk_cum, g_gamma=decay.gamma2, scale=scale,
                           chunk_size=self.chunk_size)

    def state_grads(self, q, do, decay, scale):
        from fla.ops.common.chunk_h import chunk_bwd_dh

        zero = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], do.shape[-1], dtype=torch.float32)
        # chunk_bwd_dh reads only shapes from k and v; an h0 makes it return dh0.
        return chunk_bwd_dh(q=q, k=q, v=do, do=do, h0=zero, dht=None, scale=scale, g=decay.chunk_cum,
                            g_gamma=decay.gamma2, chunk_size=self.chunk_size, states_in_fp32=True)

    def grads(self, q, k, v, decay, h, dh, do, scale, fold=None):
        from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv
        from fla.ops.utils import chunk_local_cumsum

        C = self.chunk_size
        weights = None if fold is None else self._fold_log2(decay, q, 1)
        gated = decay.mode == "g"
        if (fold is not None or gated) and self._own(q, v, decay, fold=fold is not None):
            from .linear_triton import chunk_bwd_dqkg
            from .linear_triton import chunk_bwd_dv as own_dv

            f = None if fold is None else fold.float().contiguous()
            dq, dk, db = chunk_bwd_dqkg(q, k, v, do, h, dh, decay.chunk_cum, decay.gamma2, scale, C, fold=f,
                                        fold_w=weights)
            dv = own_dv(q, k, do, dh, decay.chunk_cum, decay.gamma2, scale, C, fold=f, fold_w=weights)
        else:  # fla's kernels, or the torch formulation where fla's is refused
            if fold is not None:
                dh = dh.float() + torch.exp2(weights)[..., None, None] * fold.float()[:, None]
            if gated:
                dq, dk, db = _fla_layout_dqkg_torch(q, k, v, do, decay.chunk_cum, h, dh, scale, C)
            else:
                dq, dk, _, _ = chunk_bwd_dqkwg(q=q, k=k, v=v, do=do, h=h, dh=dh, g_gamma=decay.gamma2, scale=scale,
                                               chunk_size=C)
            dv = chunk_bwd_dv(q=q, k=k, do=do, dh=dh, g=decay.chunk_cum, g_gamma=decay.gamma2, scale=scale,
                              chunk_size=C)
        dg = chunk_local_cumsum(db, chunk_size=C, reverse=True).to(decay.g.dtype) if gated else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg


def _fla_layout_dqkg_torch(q, k, v, do, g2, h, dh, scale, C):
    """:func:`torch_chunk_dqkg` on fla's layout (base-2 chunk-local ``g2 [B, S, H]``)."""
    S = q.shape[1]
    cdt = torch.float32
    qc, kc, vc, doc = (_chunked(x, C, cdt) for x in (q, k, v, do))
    # Padding g2 with its last value keeps b_last right for a partial last chunk.
    b = _chunked(g2[..., None] * LN2, C, cdt)[..., 0]
    pad = (-S) % C
    if pad:
        b[:, -1, C - pad:] = b[:, -1, C - pad - 1: C - pad]
    dq, dk, db = torch_chunk_dqkg(qc, kc, vc, doc, b, h.float(), dh.float(), scale, C, need_dg=True)
    if pad:  # the chunk-end term sits on the padded last slot: move it to the last real token
        db[:, -1, C - pad - 1] += db[:, -1, C - pad:].sum(1)
    return _unchunked(dq, S).to(q.dtype), _unchunked(dk, S).to(k.dtype), _unchunked(db[..., None], S)[..., 0]


def select_kernels(device: torch.device | str, *, backend: str | None = None, chunk_size: int | None = None
                   ) -> LinearKernels:
    """The backend for tensors on ``device``.

    ``backend``: ``"torch"``, ``"fla"`` (fla + commflow's Triton kernels), ``"fla-only"``
    (fla's kernels, the torch formulation where commflow's would run) or None for
    ``$COMMFLOW_LINEAR_KERNELS`` else auto (fla on CUDA when importable, torch otherwise).
    """
    backend = backend or os.environ.get("COMMFLOW_LINEAR_KERNELS") or "auto"
    cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        backend = "fla" if cuda and fla_available() else "torch"
    if backend == "torch":
        return TorchChunkKernels(chunk_size or 64)
    if backend in ("fla", "fla-only"):
        if not cuda:
            raise ValueError(f"backend {backend!r} needs CUDA tensors, got device {device}")
        if not fla_available():
            raise ValueError(f"backend {backend!r} needs fla-core and triton (pip install 'commflow[gpu]')")
        return FlaChunkKernels(chunk_size or 64, own_kernels=backend == "fla")
    raise ValueError(f"backend must be one of 'auto', 'torch', 'fla', 'fla-only', got {backend!r}")


# ----------------------------------------------------------------------------- autograd op


class _ChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    @autocast_off  # the kernels choose their dtypes (fp32 states)
    def forward(ctx, q, k, v, g, g_gamma, initial_state, scale, output_final_state, kernels):
        dec = kernels.prepare(g, g_gamma, q.shape[1])
        h, ht = kernels.states(k, v, dec, initial_state, output_final_state)
        o = kernels.output(q, k, v, dec, h, scale)
        ctx.save_for_backward(q, k, v, g, g_gamma, initial_state)
        ctx.scale, ctx.kernels = scale, kernels
        return o, ht

    @staticmethod
    @autocast_off
    def backward(ctx, do, dht):
        q, k, v, g, g_gamma, initial_state = ctx.saved_tensors
        kernels = ctx.kernels
        dec = kernels.prepare(g, g_gamma, q.shape[1])
        h, _ = kernels.states(k, v, dec, initial_state, False, states_in_fp32=True)
        dq, dk, dv, dg, dh0 = kernels.backward(q, k, v, dec, h, do.contiguous(), initial_state, dht, ctx.scale)
        return dq, dk, dv, dg, None, dh0, None, None, None


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    kernels: LinearKernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal chunked linear attention on one process (differentiable, incl. the states).

    ``q, k`` ``[B, S, H, K]``, ``v`` ``[B, S, H, V]``, ``g`` ``[B, S, H]`` (float32/64, <= 0)
    or ``g_gamma`` ``[H]``; ``initial_state`` ``[B, H, K, V]`` (float32/64). Returns
    ``(o [B, S, H, V], final_state [B, H, K, V] fp32 or None)``. Gradients flow to
    ``q, k, v, g`` and ``initial_state`` (not to ``g_gamma``).
    """
    if g is not None and g_gamma is not None:
        raise ValueError("pass at most one of g (data-dependent decay) and g_gamma (constant decay)")
    kernels = kernels or select_kernels(q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (q, k, v, g, initial_state)
    ):
        dec = kernels.prepare(g, g_gamma, q.shape[1])
        h, ht = kernels.states(k, v, dec, initial_state, output_final_state)
        return kernels.output(q, k, v, dec, h, scale), ht
    if g_gamma is not None and g_gamma.requires_grad:
        warnings.warn("g_gamma is a constant decay: it gets no gradient", stacklevel=2)
    return _ChunkLinearAttention.apply(q, k, v, g, g_gamma, initial_state, scale, output_final_state, kernels)
