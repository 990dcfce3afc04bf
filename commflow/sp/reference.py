"""Naive single-process softmax attention: the ground truth for every SP test.

Deliberately the textbook formula and nothing else: materialise the scores,
mask, softmax, weight the values; GQA by repeating key/value heads. Autograd
provides its gradients. It shares no code with :mod:`commflow.sp.kernels`, so a
bug in the fast path cannot hide in the reference too.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_reference"]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax attention over whole (unsharded) sequences.

    Args:
        q: ``[B, S, Hq, D]`` in token order.
        k, v: ``[B, S, Hkv, D]``; ``Hq`` must be a multiple of ``Hkv`` (query head
            ``h`` reads key/value head ``h // (Hq // Hkv)``).
        causal: token ``i`` attends to tokens ``j <= i``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        compute_dtype: precision of the computation (default: float32, or float64
            for float64 inputs). The result is cast back to ``q.dtype``.
    Returns:
        ``[B, S, Hq, D]`` in ``q.dtype``.
    """
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qc, kc, vc = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    kc = kc.repeat_interleave(hq // hkv, dim=1)
    vc = vc.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if causal:
        s_q, s_k = scores.shape[-2:]
        future = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vc).transpose(1, 2).to(q.dtype)
