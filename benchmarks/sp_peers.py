"""The attention functions ``sp_attention`` measures: ours and the peers, behind one face.

Every strategy is a :class:`Strategy`: which shards it takes (``layout``, or the
per-GPU head slice for the 1-GPU limit), a ``forward(q, k, v)`` on local tensors in
``[B, S_local, H, D]``, and an optional context that must be open around forward
*and* backward (torch context parallel swaps SDPA for its ring inside one). Heavy
or optional imports (deepspeed, DTensor) happen only when a peer is built, so this
module imports on any machine. A peer that cannot run here is reported with the
reason instead of a number.

Names: a base name (:data:`ALL`), optionally ``:variant`` and ``@normal``:

* ``ulysses:4`` / ``allgather:2``: ours with ``head_chunks`` pinned;
* ``torch_cp_alltoall:cudnn`` (``flash``, ``efficient``, ``default``): torch CP with
  SDPA held to that kernel; plain ``torch_cp_*`` is ``:default`` (SDPA's own choice).
  On torch 2.11 / 4 H100 every one of them fails the check with the same error
  (max relative error 21.7, bit-identical for flash, cuDNN and SDPA's choice), so
  the kernel is not the cause; the same sharding (head-tail = our zigzag, a
  length-only marker buffer) passes against torch 2.13's CP code. ``sp_cp_probe``
  records what torch 2.11 actually runs inside the context;
* ``sdpa_1gpu:flash``: the 1-GPU limit of one pinned SDPA kernel;
* ``@normal``: the strategy on the default process group, whose NCCL stream has
  normal priority, instead of the high-priority group every strategy gets by default.
"""

from __future__ import annotations

import contextlib
from dataclasses import KW_ONLY, dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["ALL", "OURS", "PEERS", "Strategy", "Unavailable", "build", "is_variant", "parse"]

OURS = ("ulysses", "ring", "allgather")
PEERS = ("deepspeed", "torch_cp_allgather", "torch_cp_alltoall", "sdpa_1gpu", "sdpa_1gpu_bhsd")
ALL = OURS + PEERS
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
TORCH_CP_DEFAULT_BACKEND = "default"


def parse(name: str) -> tuple[str, str, bool]:
    """``"ulysses:4@normal"`` -> ``("ulysses", "4", True)``; raises ValueError for unknown names."""
    body, at, priority = name.partition("@")
    base, _, variant = body.partition(":")
    if base not in ALL or (at and priority != "normal"):
        raise ValueError(f"unknown strategy {name!r}; choose from {ALL} (+ ':variant', '@normal')")
    if variant:
        ok = {
            "ulysses": variant.isdigit(),
            "allgather": variant.isdigit(),
            "torch_cp_allgather": variant in (*SDPA_BACKENDS, "default"),
            "torch_cp_alltoall": variant in (*SDPA_BACKENDS, "default"),
            "sdpa_1gpu": variant in SDPA_BACKENDS,
            "sdpa_1gpu_bhsd": variant in SDPA_BACKENDS,
        }.get(base, False)
        if not ok:
            raise ValueError(f"strategy {name!r}: {variant!r} is not a variant of {base!r}")
    return base, variant, bool(at)


def is_variant(name: str) -> bool:
    """A pinned variant or a normal-priority run (measured only up to ``--variant-max-seq``)."""
    return ":" in name or "@" in name


def _sdpa_kernel_context(backend: str | None):
    """A zero-argument factory of ``sdpa_kernel(backend)`` (or of a null context)."""
    if backend is None or backend == "default":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend]))


class Unavailable(RuntimeError):
    """The strategy cannot run on this machine; the message says why."""


@dataclass
class Strategy:
    name: str
    forward: object
    """``(q, k, v) -> out`` on local ``[B, S_local, H, D]`` tensors (autograd-aware)."""
    layout: str = "contiguous"
    """How the global sequence is sharded for it; ``"heads"``: no sharding, a slice of H/W heads."""
    _: KW_ONLY
    # Keyword-only from here: torch CP's Strategy once passed its context positionally,
    # which landed in head_major, so its runs never entered context_parallel at all.
    head_major: bool = False
    """Inputs live in ``[B, H, S, D]`` memory (forward still sees ``[B, S, H, D]`` views)."""
    context: object = field(default=contextlib.nullcontext)
    """Zero-argument factory of a context manager that wraps forward and backward."""


def _sdpa(q, k, v, causal, scale):
    """SDPA on ``[B, S, H, D]`` tensors (transposed views: the layout models pass)."""
    gqa = q.shape[2] != k.shape[2]
    # Optional arguments only when set: the same call the torch CP probe's recipe makes
    # (torch CP replaces SDPA inside its context).
    extra = {**({"enable_gqa": True} if gqa else {}), **({"scale": scale} if scale is not None else {})}
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         **extra)
    return out.transpose(1, 2)


def _ours(name, cfg, group):
    """``ulysses``, ``ring``, ``allgather``; ``ulysses:4`` / ``allgather:2`` pin head_chunks."""
    from commflow.sp import allgather_attention, ring_attention, ulysses_attention

    base, chunks, _ = parse(name)
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


def _deepspeed(name, cfg, group, world, seq):
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
    return Strategy(name, lambda q, k, v: attention(q, k, v, batch_dim_idx=0), "contiguous")


_MESHES: dict = {}


def _torch_cp(name, rotate, backend, cfg, group, device, world, seq):
    if torch.device(device).type != "cuda":
        raise Unavailable("torch context_parallel dispatches the CUDA SDPA ops (flash/efficient/cuDNN); no CPU path")
    if cfg["kv_heads"] != cfg["heads"]:
        raise Unavailable("torch context_parallel's ring does not take GQA (enable_gqa) inputs")
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    key = (world, id(group))
    if key not in _MESHES:  # one mesh per group for the whole run (the group's communicator)
        _MESHES[key] = init_device_mesh("cuda", (world,)) if group is None else DeviceMesh.from_group(group, "cuda")
    mesh = _MESHES[key]
    if group is not None and mesh.get_group().group_name != group.group_name:
        raise Unavailable(f"{name}: its device mesh does not use the benchmark's process group")
    return torch_cp_strategy(name, rotate, backend, cfg["causal"], mesh, device, seq)


def torch_cp_strategy(name, rotate, backend, causal, mesh, device, seq) -> Strategy:
    """torch CP on ``mesh``: SDPA inside ``context_parallel`` (patched by it), rotate
    method ``rotate``, SDPA held to ``backend``."""
    from torch.distributed.tensor.experimental import context_parallel
    try:  # newer torch keeps the implementation here; _attention re-exports part of it
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _cp_options,
            set_rotate_method,
        )
    except ImportError:
        from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method

    kernel = _sdpa_kernel_context(backend)
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
            with context_parallel(mesh, buffers=[marker], buffer_seq_dims=[0], no_restore_buffers={marker}), kernel():
                yield
        finally:
            _cp_options.enable_load_balance = old

    return Strategy(name, lambda q, k, v: _sdpa(q, k, v, causal, None), layout, context=context)


def build(name: str, cfg: dict, groups: dict, world: int, device, seq: int) -> Strategy:
    """Strategy ``name`` for a global sequence of ``seq`` tokens; raises :class:`Unavailable`.

    ``groups``: ``{"high": group, "normal": group}`` (None: the default group); every
    strategy communicates over ``groups["high"]`` unless its name ends in ``@normal``.
    """
    base, variant, normal = parse(name)
    group = groups.get("normal" if normal else "high")
    if base in OURS:
        return _ours(name, cfg, group)
    if base == "deepspeed":
        return _deepspeed(name, cfg, group, world, seq)
    if base in ("torch_cp_allgather", "torch_cp_alltoall"):
        return _torch_cp(name, base.rsplit("_", 1)[1], variant or TORCH_CP_DEFAULT_BACKEND, cfg, group, device, world, seq)
    # The compute limit: one GPU's share of the heads, no communication, in the
    # [B, S, H, D] memory layout models (and our strategies) use, and in [B, H, S, D].
    fn = lambda q, k, v: _sdpa(q, k, v, cfg["causal"], None)
    context = _sdpa_kernel_context(variant or None)
    if variant and torch.device(device).type != "cuda":
        raise Unavailable(f"{name}: pinning an SDPA kernel needs CUDA")
    return Strategy(name, fn, "heads", head_major=base.endswith("bhsd"), context=context)
