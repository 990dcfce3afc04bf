"""LASP-2H: one attention API for hybrid stacks of linear and softmax layers, one shard layout.

Sun et al. (arXiv 2502.07563) pair LASP-2 for the linear layers with an all-gather of
K, V for the softmax layers (instead of a ring), so both kinds of layer communicate
with one collective of their own and the whole model shares one sequence sharding.

The layout is chosen once for the model, because every layer sees the same token
shard (embeddings, RoPE positions, the loss). The choice, and why (docs/lasp2.md):

* ``"zigzag"`` (default): rank ``r`` holds chunks ``r`` and ``2W-1-r`` of ``2W``. Causal
  softmax work is balanced (:func:`softmax_pairs_per_rank`). LASP-2 keeps one all-gather:
  the scan runs over the ``2W`` chunks, each rank contributing two d x d states instead
  of one, and linear attention has the same work per token wherever the token sits.
* ``"contiguous"``: what serial state passing (LASP-1, fla's CP) needs; under a causal
  mask rank ``r`` scores about ``(2r+1)/W`` times the average rank's (query, key) pairs, so
  the last rank does ``2 - 1/W`` times the average softmax work and every softmax layer
  runs at its pace.

Typical use (the model owns the projections; this module only routes attention)::

    cfg = HybridConfig.interleaved(n_layers=8, softmax_every=4)       # L L L S L L L S
    x_local = shard(x, layout=cfg.layout)                              # once, at the input
    attn = [HybridAttention(cfg, i, group=sp_group) for i in range(8)]
    o = attn[i](q, k, v, g=g)                                          # [B, S/W, H, D] shards
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .allgather import allgather_attention
from .lasp2 import lasp2_attention
from .layout import LAYOUTS, check_seq_divisible, positions

__all__ = ["HybridAttention", "HybridConfig", "hybrid_attention", "load_imbalance", "softmax_pairs_per_rank"]

KINDS = ("linear", "softmax")


@dataclass(kw_only=True)
class HybridConfig:
    """Which attention each layer runs, and the one shard layout of the model."""

    layers: tuple[str, ...]
    """Per layer: ``"linear"`` (LASP-2) or ``"softmax"`` (all-gather K, V)."""
    layout: str = "zigzag"
    """Sequence sharding for every layer: ``"zigzag"`` (balanced causal softmax) or ``"contiguous"``."""
    causal: bool = True
    """Causal attention in every layer (decoder LM)."""
    linear_kernels: str | None = field(default=None)
    """Backend of the linear layers' local kernel (None: fla on CUDA, torch otherwise)."""

    def __post_init__(self):
        self.layers = tuple(self.layers)
        bad = [(i, kind) for i, kind in enumerate(self.layers) if kind not in KINDS]
        if bad:
            raise ValueError(f"layers must each be one of {KINDS}, got {bad[0][1]!r} at layer {bad[0][0]}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @classmethod
    def interleaved(cls, n_layers: int, softmax_every: int = 4, **kwargs) -> HybridConfig:
        """Every ``softmax_every``-th layer softmax, the rest linear (LASP-2H's 1/4 hybrid: L L L S)."""
        if n_layers < 1 or softmax_every < 1:
            raise ValueError(f"n_layers and softmax_every must be >= 1, got {n_layers}, {softmax_every}")
        kinds = tuple("softmax" if (i + 1) % softmax_every == 0 else "linear" for i in range(n_layers))
        return cls(layers=kinds, **kwargs)

    def kind(self, layer: int) -> str:
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer must be in [0, {len(self.layers)}), got {layer}")
        return self.layers[layer]

    def positions(self, seq_len: int, rank: int, world: int, device=None) -> torch.Tensor:
        """Global positions of this rank's tokens (for RoPE and the loss), ``[seq_len // world]``."""
        return positions(seq_len, rank, world, self.layout, device=device)


def hybrid_attention(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    group=None,
    layout: str = "zigzag",
    causal: bool = True,
    scale: float | None = None,
    kernels=None,
) -> torch.Tensor:
    """Attention of one layer over this rank's shard ``[B, S/W, H, D]`` in ``layout``.

    ``kind="linear"``: :func:`commflow.sp.lasp2_attention` (``g`` / ``g_gamma`` decay allowed);
    ``kind="softmax"``: :func:`commflow.sp.allgather_attention` (``k, v`` may have fewer heads, GQA).
    Returns this rank's output rows ``[B, S/W, H, D_v]`` in the same layout.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "softmax":
        if g is not None or g_gamma is not None:
            raise ValueError("softmax layers take no decay: pass g=None and g_gamma=None for kind='softmax'")
        return allgather_attention(q, k, v, group=group, causal=causal, scale=scale, layout=layout)
    return lasp2_attention(q, k, v, g=g, g_gamma=g_gamma, group=group, causal=causal, scale=scale, layout=layout,
                           kernels=kernels)


class HybridAttention(torch.nn.Module):
    """The attention op of layer ``layer`` of a hybrid stack (no parameters of its own)."""

    def __init__(self, config: HybridConfig, layer: int, *, group=None):
        super().__init__()
        self.config, self.layer, self.group = config, layer, group
        self.kind = config.kind(layer)

    def forward(self, q, k, v, *, g=None, g_gamma=None, scale=None) -> torch.Tensor:
        return hybrid_attention(self.kind, q, k, v, g=g, g_gamma=g_gamma, group=self.group,
                                layout=self.config.layout, causal=self.config.causal, scale=scale,
                                kernels=self.config.linear_kernels)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kind={self.kind}, layout={self.config.layout}"


def softmax_pairs_per_rank(seq_len: int, world: int, layout: str, *, causal: bool = True) -> list[int]:
    """(query, key) pairs each rank's softmax attention must score: its share of the work.

    Causal: a query at global position ``p`` scores ``p + 1`` keys. Every kernel FLOP of
    attention (``4 D`` per pair forward, about ``2.5x`` that with the backward) scales with it,
    so the ratio between ranks is the FLOP ratio. (The blockwise kernels also score the
    masked half of diagonal blocks; that adds the same small amount to every rank.)
    """
    check_seq_divisible(seq_len, world, layout)
    if not causal:
        return [seq_len * seq_len // world] * world
    return [int((positions(seq_len, r, world, layout) + 1).sum()) for r in range(world)]


def load_imbalance(work: list[float]) -> float:
    """``max / mean``: how much longer the slowest rank works than a balanced split (1.0 = balanced)."""
    return max(work) / (sum(work) / len(work))
