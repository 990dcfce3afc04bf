"""The attention functions ``sp_attention`` measures: ours and the peers, behind one face.

Every strategy is a :class:`Strategy`: which shards it takes (``layout``, or the
per-GPU head slice for the 1-GPU limit), a ``forward(q, k, v)`` on local tensors in
``[B, S_local, H, D]``, and an optional context that must be open around forward
*and* backward (torch context parallel swaps SDPA for its ring inside one). Heavy
or optional imports (deepspeed, DTensor) happen only when a peer is built, so this
module imports on any machine. A peer that cannot run here is reported with the
reason instead of a number.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["ALL", "OURS", "PEERS", "Strategy", "Unavailable", "build"]

OURS = ("ulysses", "ring", "allgather")
PEERS = ("deepspeed", "torch_cp_allgather", "torch_cp_alltoall", "sdpa_1gpu", "sdpa_1gpu_bhsd")
ALL = OURS + PEERS


class Unavailable(RuntimeError):
    """The strategy cannot run on this machine; the message says why."""


@dataclass
class Strategy:
    name: str
    forward: object
    """``(q, k, v) -> out`` on local ``[B, S_local, H, D]`` tensors (autograd-aware)."""
    layout: str = "contiguous"
    """How the global sequence is sharded for it; ``"heads"``: no sharding, a slice of H/W heads."""
    head_major: bool = False
    """Inputs live in ``[B, H, S, D]`` memory (forward still sees ``[B, S, H, D]`` views)."""
    context: object = field(default=contextlib.nullcontext)
    """Zero-argument factory of a context manager that wraps forward and backward."""


def _sdpa(q, k, v, causal, scale):
    """SDPA on ``[B, S, H, D]`` tensors (transposed views: the layout models pass)."""
    gqa = q.shape[2] != k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale,
        **({"enable_gqa": True} if gqa else {}),
    )
    return out.transpose(1, 2)


def _ours(name, cfg, group):
    """``ulysses``, ``ring``, ``allgather``; ``ulysses:4`` / ``allgather:2`` pin head_chunks."""
    from commflow.sp import allgather_attention, ring_attention, ulysses_attention

    base, _, chunks = name.partition(":")
    causal = cfg["causal"]
    if base == "ulysses":
        n = int(chunks) if chunks else cfg["ulysses_chunks"]
        fn = lambda q, k, v: ulysses_attention(q, k, v, group=group, causal=causal, head_chunks=n)
        return Strategy(name, fn, "contiguous")
    if base == "ring":
        fn = lambda q, k, v: ring_attention(q, k, v, group=group, causal=causal, layout=cfg["layout"])
        return Strategy(name, fn, cfg["layout"])
    n = int(chunks) if chunks else cfg["allgather_chunks"]
    fn = lambda q, k, v: allgather_attention(q, k, v, group=group, causal=causal, layout=cfg["layout"], head_chunks=n)
    return Strategy(name, fn, cfg["layout"])


def _deepspeed(cfg, group, world, seq):
    try:
        import deepspeed
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        raise Unavailable(
            f"deepspeed not importable ({type(e).__name__}: {e}); carry the deepspeed 0.19.8 wheel"
        ) from None
    deepspeed.comm.init_distributed(auto_mpi_discovery=False, verbose=False)
    causal, heads, kv_heads = cfg["causal"], cfg["heads"], cfg["kv_heads"]

    def local_attention(q, k, v):
        # DistributedAttention must hand us the head-sharded, full-sequence tensors
        # [B, S, H/W, D]. With batch_dim_idx wrong it silently computes something much
        # cheaper (see shared/research/measured.md), so refuse anything else.
        expected_q = (cfg["batch"], seq, heads // world, cfg["head_dim"])
        expected_kv = (cfg["batch"], seq, max(1, kv_heads // world), cfg["head_dim"])
        if tuple(q.shape) != expected_q or tuple(k.shape) != expected_kv:
            raise AssertionError(f"DeepSpeed gave q {tuple(q.shape)}, k {tuple(k.shape)}; expected {expected_q}")
        return _sdpa(q, k, v, causal, None)

    # [b, s, h, d] input: scatter heads (2), gather sequence (1), batch on dim 0.
    attention = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)
    return Strategy("deepspeed", lambda q, k, v: attention(q, k, v, batch_dim_idx=0), "contiguous")


_MESHES: dict = {}


def _torch_cp(rotate, cfg, device, world, seq):
    if torch.device(device).type != "cuda":
        raise Unavailable("torch context_parallel dispatches the CUDA SDPA ops (flash/efficient/cuDNN); no CPU path")
    if cfg["kv_heads"] != cfg["heads"]:
        raise Unavailable("torch context_parallel's ring does not take GQA (enable_gqa) inputs")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    try:  # newer torch keeps the implementation here; _attention re-exports part of it
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _cp_options,
            set_rotate_method,
        )
    except ImportError:
        from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method

    if world not in _MESHES:  # one mesh (and its communicator) for the whole run
        _MESHES[world] = init_device_mesh("cuda", (world,))
    mesh = _MESHES[world]
    causal = cfg["causal"]
    # Load balancing (head-tail, which is our zigzag) is on by default and only valid
    # for causal attention.
    layout = "zigzag" if causal else "contiguous"

    @contextlib.contextmanager
    def context():
        set_rotate_method(rotate)
        old = _cp_options.enable_load_balance
        _cp_options.enable_load_balance = causal
        # The buffer only tells the context the global length (for the load balancer);
        # q, k, v are already this rank's head-tail shards, as SDPA sees them inside.
        marker = torch.zeros(seq, dtype=torch.int8, device=device)
        try:
            with context_parallel(mesh, buffers=[marker], buffer_seq_dims=[0], no_restore_buffers={marker}):
                yield
        finally:
            _cp_options.enable_load_balance = old

    return Strategy(f"torch_cp_{rotate}", lambda q, k, v: _sdpa(q, k, v, causal, None), layout, context)


def build(name: str, cfg: dict, group, world: int, device, seq: int) -> Strategy:
    """Strategy ``name`` for a global sequence of ``seq`` tokens; raises :class:`Unavailable`."""
    if name.partition(":")[0] in OURS:
        return _ours(name, cfg, group)
    if name == "deepspeed":
        return _deepspeed(cfg, group, world, seq)
    if name in ("torch_cp_allgather", "torch_cp_alltoall"):
        return _torch_cp(name.rsplit("_", 1)[1], cfg, device, world, seq)
    if name in ("sdpa_1gpu", "sdpa_1gpu_bhsd"):
        # The compute limit: one GPU's share of the heads, no communication, in the
        # [B, S, H, D] memory layout models (and our strategies) use, and in [B, H, S, D].
        fn = lambda q, k, v: _sdpa(q, k, v, cfg["causal"], None)
        return Strategy(name, fn, "heads", head_major=name.endswith("bhsd"))
    raise ValueError(f"unknown strategy {name!r}; choose from {ALL}")
