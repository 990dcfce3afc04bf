"""Sequence parallelism: attention over a sequence split across ranks.

Every function takes local shards in the ``[batch, seq, heads, head_dim]`` layout
and a ``group`` (default: the default process group). The main APIs are the
attention functions; :func:`shard` / :func:`unshard` move between global tensors
and shards.
"""

from .allgather import allgather_attention
from .hybrid import HybridAttention, HybridConfig, hybrid_attention
from .lasp2 import lasp2_attention
from .layout import LAYOUTS, positions, shard, unshard
from .linear_kernels import chunk_linear_attention
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = [
    "HybridAttention",
    "HybridConfig",
    "LAYOUTS",
    "allgather_attention",
    "chunk_linear_attention",
    "hybrid_attention",
    "lasp2_attention",
    "positions",
    "ring_attention",
    "shard",
    "ulysses_attention",
    "unshard",
]
