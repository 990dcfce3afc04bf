"""CUDA graphs of the copy-engine schedules: one replay instead of tens of launches.

Why: a copy-engine call (:mod:`commflow.overlap.symm`) issues 20-40 small host calls
(GEMMs per destination block, copies, stream waits, barriers, sums, events). On the
4xH100 host (Python 3.12, torch 2.11) one ``torch.mm`` launch alone costs ~30 us and a
whole GEMM + reduce-scatter call 320-620 us of host time, which is its entire wall time
up to M ~ 8192 (``benchmarks/overlap_probe.py``, docs/overlap_results.md): the GPU waits
for the host. A CUDA graph replays the same kernels, copies and cross-stream events in
one launch.

What it costs: the input is copied into the graph's static buffer before each replay and
the output copied out after (the graph's buffers are reused by the next replay), one pass
over ``x`` and one over ``y``; and one capture per signature. The reduce-scatter and
all-reduce of one row group skip the copy out: their last step (the sum; the pulls of
the reduced blocks) runs after the replay, straight into new memory (``split``, symm.py).

Signature: the op, the workspace (and its size: growing it replaces its buffer) and the
parity of its step counter (the two halves of
the workspace alternate per step, see symm.py; a schedule of an odd number of steps
alternates between two graphs), the input's shape/stride/dtype, and the *address* of the
weight (not copied: a parameter keeps its storage across steps; a new address means a new
capture). Graphs are kept in an LRU cache bounded by count (:data:`MAX_GRAPHS`) and by the
bytes their own outputs hold (:data:`MAX_GRAPH_BYTES`; none where the call passes
``shared_out``).

Memory: a model whose layers share a shape needs a graph per layer (and per parity), so a
graph must cost next to nothing to keep. All graphs of one workspace capture into **one
memory pool**, and all graphs of one kind (op and shapes) share **one set of static
inputs** and **one set of output buffers** (:func:`kind_buffers`: the schedule writes its
result there, and the call copies it out). What a graph allocates during its capture is
then only temporaries (the GEMM blocks the copy engines push: dead when the replay ends),
which a later replay of another graph may overwrite without harm; and the output buffers
are read right after the replay that wrote them, on the caller's stream, before the next
replay on the workspace. Both hold provided no two graphs of one workspace run at once: the
rule the workspace already sets (calls on one workspace come from one stream, symm.py).
A graph then holds no device memory of its own. Private pools and outputs cost each graph
its temporaries (~60 MB at Llama-3 8B attention-out, M = 8192, on 4 ranks: 1.44 GB for 24
layers, ``benchmarks/results/overlap_layers_probe_4xH100_20261127-s14.json``) and its output
(an all-gather's ``[M, N/R]`` and gathered ``[M, K]``: 3.75 GiB for the 32 all-gather graphs
of 16 Llama-3 8B MLP blocks at 8192 tokens on 4 ranks,
``overlap_model_probe_4xH100_20261127-s14.json``).

Every rank captures and replays at the same calls (same shapes, same parity sequence);
a rank that captures where another replays is still correct, since a capture call runs
the schedule eagerly too and both issue the same barriers in the same order.

On by default on CUDA since it ran there (4xH100, docs/overlap.md "Results", run 3): the
graph replays pass the GPU correctness tests, and the forced schedule replayed as a graph
runs 1.13x (GEMM + RS) and 1.15x (AG + GEMM) of sequential in geomean on 4 GPUs where
its eager form runs 0.71x and 0.78x. The autotune times each graphed candidate beside
its eager form and keeps the faster, so a graph is used only where it measured faster.
``COMMFLOW_OVERLAP_GRAPHS=0`` or :func:`set_graphs` (False) turns them off. A capture that
fails falls back to the eager schedule for that signature, with one warning.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

__all__ = ["MAX_GRAPHS", "MAX_GRAPH_BYTES", "THRASH_RECAPTURES", "clear", "graphed_call", "graphs_enabled",
           "held_bytes", "kind_buffers", "set_graphs"]

MAX_GRAPHS = 1024
"""Captured graphs kept (least recently used evicted). A model needs one per layer, op,
direction and parity: 80 layers x 8 calls x 2 parities = 1280 at worst. A graph sharing its
workspace's pool costs a few kB of host and device memory beside what ``MAX_GRAPH_BYTES``
counts."""

MAX_GRAPH_BYTES = 4 << 30
"""Bytes the kept graphs' own outputs may hold in all (least recently used evicted): only
graphs captured without ``shared_out`` keep one (the library's schedules all pass it or
split, so this bounds other callers)."""

THRASH_RECAPTURES = 4
"""Recaptures of evicted graphs of one kind (op and shapes, whatever the weight) after which
that kind runs without a graph (``graphed_call``'s fallback): more weights of one shape take
turns than the cache holds."""

_OVERRIDE: bool | None = None


def set_graphs(enabled: bool | None) -> None:
    """Allow graphed candidates (True), forbid them (False); None restores the environment's choice."""
    global _OVERRIDE
    from .functional import clear_caches

    clear_caches()
    _OVERRIDE = enabled


def graphs_enabled(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if _OVERRIDE is not None:
        return _OVERRIDE
    return os.environ.get("COMMFLOW_OVERLAP_GRAPHS", "1") not in ("0", "false", "False", "")


class _Captured:
    __slots__ = ("graph", "inputs", "output", "steps", "nbytes")

    def __init__(self, graph, inputs: list[torch.Tensor], output, steps: int, shared_out: bool = False):
        self.graph, self.inputs, self.output, self.steps = graph, inputs, output, steps
        # What the graph's pool keeps alive for it: the output it is copied out of.
        outs = () if callable(output) or shared_out else output if isinstance(output, tuple) else (output,)
        self.nbytes = sum(t.untyped_storage().nbytes() for t in outs if t is not None)


_GRAPHS: OrderedDict[tuple, _Captured | None] = OrderedDict()
# Why a guard: a graph's signature holds its weight's address, so a model whose layers share
# a shape needs a graph per layer. With more of them in turn than MAX_GRAPHS, the LRU evicts
# each graph before its layer comes round again, and every call would pay an eager run and a
# capture, slower than either path alone. Signatures captured so far per kind (a second
# capture of one is a recapture: it was evicted; a set per kind, not a bounded list of
# evictions, so that a model of any depth is caught), recaptures per kind, and the kinds
# sent back to eager:
_CAPTURED: dict[tuple, set[tuple]] = {}
_RECAPTURES: dict[tuple, int] = {}
_EAGER_KINDS: set[tuple] = set()
# The shared memory (module docstring): one pool per workspace, one set of static inputs per
# kind, one set of output buffers per op, workspace and shapes (freed with their last graph).
_POOLS: dict[int, tuple] = {}
_STATICS: dict[tuple, list[torch.Tensor]] = {}
_BUFFERS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def clear() -> None:
    """Drop every captured graph, the pools, static inputs and output buffers they share, and
    the thrash guard's counts."""
    _GRAPHS.clear()
    _CAPTURED.clear()
    _RECAPTURES.clear()
    _EAGER_KINDS.clear()
    _POOLS.clear()
    _STATICS.clear()
    _BUFFERS.clear()


def _own_bytes() -> int:
    return sum(c.nbytes for c in _GRAPHS.values() if c is not None)


def held_bytes() -> int:
    """Device bytes kept for the graphs beyond their pools' temporaries: their own outputs,
    the shared output buffers and the static inputs."""
    shared = [t for ts in (*_BUFFERS.values(), *_STATICS.values()) for t in ts]
    return _own_bytes() + sum(t.untyped_storage().nbytes() for t in shared)


def kind_buffers(op: str, ws, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
    """Output buffers of ``shapes`` shared by every graph of one op, workspace and shapes:
    a schedule run through :func:`graphed_call` with ``shared_out=True`` writes its result
    into them and the call returns a copy."""
    key = (op, id(ws), shapes, dtype, device)
    bufs = _BUFFERS.get(key)
    if bufs is None:
        bufs = _BUFFERS[key] = tuple(torch.empty(shape, dtype=dtype, device=device) for shape in shapes)
    return bufs


def _pool(ws) -> tuple:
    handle = _POOLS.get(id(ws))
    if handle is None:
        handle = _POOLS[id(ws)] = torch.cuda.graph_pool_handle()
    return handle


def _statics(key: tuple, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    kind = _kind(key)
    if kind not in _STATICS:
        _STATICS[kind] = [t.clone() for t in inputs]
    return _STATICS[kind]


def _kind(key: tuple) -> tuple:
    """A signature without its counter parity and weight addresses: one kind per op and shapes."""
    op, ws_id, nbytes, _parity, extra, inputs, fixed = key
    return op, ws_id, nbytes, extra, inputs, tuple(f[1:] for f in fixed)


def _signature(op: str, ws, parity: int, inputs: tuple[torch.Tensor, ...], fixed: tuple[torch.Tensor, ...],
               extra) -> tuple:
    # The workspace's size too: growing it replaces its buffer, and a graph captured
    # before points at the freed one (it is never replayed again; the LRU drops it).
    return (op, id(ws), getattr(ws, "nbytes", 0), parity, extra,
            tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs),
            tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in fixed))


def _copy_out(output):
    if isinstance(output, tuple):
        return tuple(None if t is None else t.clone() for t in output)
    return output.clone()


def _capture(fn: Callable, statics: list[torch.Tensor], fixed: tuple[torch.Tensor, ...], ws):
    """(graph, its output tensors): ``fn`` on the static inputs, captured into ``ws``'s pool, not run."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the monitor's reporter thread and NCCL's watchdog keep querying
    # events while this thread captures.
    with torch.cuda.graph(graph, pool=_pool(ws), capture_error_mode="thread_local"):
        output = fn(*statics, *fixed)
    return graph, output


def graphed_call(op: str, fn: Callable, inputs: tuple[torch.Tensor, ...], fixed: tuple[torch.Tensor, ...], ws,
                 extra=None, fallback: Callable | None = None, shared_out: bool = False):
    """``fn(*inputs, *fixed)`` through a CUDA graph of it (captured on the first call).

    ``inputs`` are copied into static buffers before each replay; ``fixed`` (the weight)
    is used in place and its address is part of the signature. ``ws`` is the symmetric
    workspace whose step counter ``fn`` advances. ``extra``: anything else the schedule
    depends on (chunk sizes, flags). Returns what ``fn`` returns (tensors, or a tuple of
    tensors and None), never aliasing the graph's buffers: copied out of them, unless
    ``fn`` returns a callable (a schedule run with ``split=True``, symm.splits): then only
    the steps before it are captured, and the callable, run after every replay, makes the
    result in new memory (no copy).

    ``fallback(*inputs, *fixed)``: what runs instead of ``fn`` once the graphs of this kind
    cannot be kept (``THRASH_RECAPTURES``); None runs ``fn`` eagerly.

    ``shared_out``: ``fn`` writes its result into buffers shared by the kind
    (:func:`kind_buffers`), so an eager run's result is copied out too.
    """

    def eager():
        out = fn(*inputs, *fixed)
        out = out() if callable(out) else out
        return _copy_out(out) if shared_out else out

    key = _signature(op, ws, ws.counter & 1, inputs, fixed, extra)
    if key in _GRAPHS:
        hit = _GRAPHS[key]
        _GRAPHS.move_to_end(key)
        if hit is None:  # capture failed once for this signature: eager
            return eager()
        for static, t in zip(hit.inputs, inputs):
            static.copy_(t)
        hit.graph.replay()
        ws.counter += hit.steps
        return hit.output() if callable(hit.output) else _copy_out(hit.output)
    if _EAGER_KINDS and _kind(key) in _EAGER_KINDS:
        return fallback(*inputs, *fixed) if fallback is not None else eager()
    # First call: run it eagerly (this call's result; it also warms cuBLAS, the allocator
    # and the workspace's size, none of which may happen inside a capture), then capture
    # the same steps from the same counter parity for the next calls.
    start = ws.counter
    out = eager()
    steps = ws.counter - start
    after = ws.counter
    ws.counter = start
    key = _signature(op, ws, start & 1, inputs, fixed, extra)  # the eager call may have grown the workspace
    if not _worth_capturing(op, key):
        ws.counter = after
        return out
    try:
        statics = _statics(key, inputs)
        graph, output = _capture(fn, statics, fixed, ws)
        _GRAPHS[key] = _Captured(graph, statics, output, steps, shared_out)
    except Exception as e:  # noqa: BLE001 - the eager schedule is always correct
        warnings.warn(f"commflow.overlap: CUDA graph capture of {op} failed ({type(e).__name__}: {e}); "
                      "this signature runs eagerly", RuntimeWarning, stacklevel=2)
        _GRAPHS[key] = None
    finally:
        ws.counter = after
    evicted = False
    while len(_GRAPHS) > MAX_GRAPHS or (len(_GRAPHS) > 1 and _own_bytes() > MAX_GRAPH_BYTES):
        _GRAPHS.popitem(last=False)
        evicted = True
    if evicted:
        _drop_unused()
    return out


def _drop_unused() -> None:
    """Free the static inputs and output buffers no kept graph uses: with shapes that change
    from step to step (variable sequence lengths) they would otherwise pile up per shape."""
    kinds = {_kind(key) for key in _GRAPHS}
    for kind in [k for k in _STATICS if k not in kinds]:
        del _STATICS[kind]
    live = {t.data_ptr() for c in _GRAPHS.values() if c is not None and not callable(c.output)
            for t in (c.output if isinstance(c.output, tuple) else (c.output,)) if t is not None}
    for key in [k for k, bufs in _BUFFERS.items() if not any(b.data_ptr() in live for b in bufs)]:
        del _BUFFERS[key]


def _worth_capturing(op: str, key: tuple) -> bool:
    """False once a kind thrashes the cache (see _CAPTURED): it goes eager, with one warning."""
    kind = _kind(key)
    seen = _CAPTURED.setdefault(kind, set())
    if key not in seen:
        seen.add(key)
    else:  # captured before, so evicted since
        _RECAPTURES[kind] = n = _RECAPTURES.get(kind, 0) + 1
        if n >= THRASH_RECAPTURES:
            _EAGER_KINDS.add(kind)
            warnings.warn(
                f"commflow.overlap: the CUDA graphs of {op} for one shape are evicted before their weight comes "
                f"round again ({n} recaptures): more weights of this shape take turns than MAX_GRAPHS="
                f"{MAX_GRAPHS} graphs (MAX_GRAPH_BYTES={MAX_GRAPH_BYTES} bytes of their own outputs) hold, so "
                "calls of this shape now run without a graph (the schedule eagerly, or the plain path where "
                "the autotune timed that faster). Raise commflow.overlap.graphs.MAX_GRAPHS (a graph keeps no "
                "device memory of its own where the schedule shares its kind's buffers) to keep them, or set "
                "COMMFLOW_OVERLAP_GRAPHS=0", RuntimeWarning, stacklevel=3)
            return False
    return True
