"""Attention for the trainer: which kernel runs a layer, on one rank or across an SP group.

The model calls two functions, :func:`softmax_attention` and :func:`linear_attention`,
with this rank's shard ``[B, S_local, H, D]`` and a :class:`SequenceParallel` plan.
With an SP group (of any size, 1 included) they call commflow.sp: Ulysses, ring or
all-gather KV for softmax layers, LASP-2 for linear layers, each with its fast local
kernels (SDPA flash/cuDNN, fla) on GPU. Without a group they run the plain
single-process references below, the ground truth the tests compare the
sequence-parallel runs against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "SequenceParallel",
    "linear_attention",
    "local_linear_attention",
    "local_softmax_attention",
    "prime_linear_kernels",
    "softmax_attention",
]


@dataclass(frozen=True)
class SequenceParallel:
    """How attention crosses ranks.

    ``group`` holds the ranks that share one sequence; the trainer always passes its
    mesh's sp group (of size 1 when sp = 1, so the same commflow.sp kernels run).
    ``None`` selects the plain single-process references below: the ground truth of
    the tests. ``layout`` is the one shard layout of the whole model ("contiguous" or
    "zigzag"); ``softmax`` names the softmax strategy ("allgather", "ulysses", "ring").
    """

    group: dist.ProcessGroup | None = None
    softmax: str = "allgather"
    layout: str = "contiguous"

    @property
    def reference(self) -> bool:
        return self.group is None


def local_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of whole sequences (torch SDPA).

    q ``[B, S, H, D]``, k and v ``[B, S, H_kv, D]`` with ``H % H_kv == 0`` (GQA);
    returns ``[B, S, H, D]``.
    """
    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def local_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor | None = None,
                           g_gamma: torch.Tensor | None = None) -> torch.Tensor:
    """Causal linear attention with scalar decay, in its quadratic (parallel) form.

    ``o_t = scale * sum_{s <= t} (q_t . k_s) exp(G_t - G_s) v_s`` with ``G`` the running
    sum of the log-decay: per token and head ``g`` ``[B, S, H]`` (gated), or per head
    ``g_gamma`` ``[H]`` (constant), or none (plain linear attention). This is the
    recurrence ``S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale q_t S_t`` of Simple GLA /
    RetNet / LASP-2, written as one masked matrix product: O(S^2), for CPU-sized tests.
    q, k, v ``[B, S, H, D]``; computed in fp32, returned in q's dtype.
    """
    B, S, H, D = q.shape
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = torch.einsum("bthd,bshd->bhts", qf, kf) * D**-0.5
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    if g is None and g_gamma is not None:
        g = g_gamma.float().view(1, 1, H).expand(B, S, H)
    if g is not None:
        cum = g.float().cumsum(1).transpose(1, 2)  # [B, H, S]
        diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))
        scores = scores * diff.exp()
    else:
        scores = scores.masked_fill(~causal, 0.0)
    return torch.einsum("bhts,bshd->bthd", scores, vf).to(q.dtype)


def _sp_function(name: str):
    import commflow.sp as sp

    fn = getattr(sp, name, None)
    if fn is None:
        raise NotImplementedError(f"commflow.sp.{name} is not available in this checkout")
    return fn


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SequenceParallel) -> torch.Tensor:
    """Causal softmax attention of this rank's shard ``[B, S_local, H, D]`` (k, v may have fewer heads)."""
    if plan.reference:
        return local_softmax_attention(q, k, v)
    fn = _sp_function(f"{plan.softmax}_attention")
    return fn(q, k, v, group=plan.group, causal=True, layout=plan.layout)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SequenceParallel, *,
                     g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None) -> torch.Tensor:
    """Causal linear attention of this rank's shard ``[B, S_local, H, D]`` (LASP-2 across ranks)."""
    if plan.reference:
        return local_linear_attention(q, k, v, g=g, g_gamma=g_gamma)
    # The model's decays are log-sigmoids or log(1 - 2^-n): <= 0 by construction, so
    # skip LASP-2's sign check (a host sync per layer).
    return _sp_function("lasp2_attention")(q, k, v, g=g, g_gamma=g_gamma, group=plan.group, causal=True,
                                           layout=plan.layout, check_decay_sign=False)


_DECAY_MODES = {"none": "none", "constant": "gamma", "gated": "g"}


def prime_linear_kernels(plan: SequenceParallel, *, batch: int, heads: int, head_dim: int, linear_decay: str,
                         dtype: torch.dtype, device: torch.device) -> None:
    """Load the linear layers' GPU kernels before the first step (no communication).

    A Triton kernel loaded for the first time while a collective is in flight can hang
    every rank (see :func:`commflow.sp.lasp2.prime_kernels`); the trainer calls this once
    on every rank before training. A no-op off CUDA and for the reference plan.
    """
    if plan.reference or device.type != "cuda":
        return
    from commflow.sp.lasp2 import prime_kernels

    world = dist.get_world_size(plan.group) if plan.group is not None else 1
    prime_kernels(batch=batch, heads=heads, head_dim=head_dim, world=world, dtype=dtype, device=device,
                  decay=_DECAY_MODES[linear_decay], layout=plan.layout)
