"""Pull the peers' blocks out of their symmetric buffers with a few SMs instead of the copy engine.

Why: the GPU's copy engine runs peer-to-peer copies one at a time, in the order the host issued
them, across streams (docs/overlap.md, the session-11 traces). In the row-grouped GEMM +
all-reduce the pulls of group ``g`` (the all-gather half) are issued before the pushes of group
``g + 1``, wait for a barrier, and hold the pushes up behind them; no static order of the two
fixes that. A copy *kernel* takes the pulls off the copy engine's queue: pushes (copy engine)
and pulls (a handful of CTAs on the pull stream) then each move as soon as their own data is
ready, and share only the NVLink links.

Layout: ``dst`` is the group's ``[R * rows, N]`` output rows; peer ``p``'s block goes to rows
``[p * rows, (p + 1) * rows)`` from element offset ``offset`` of ``p``'s buffer (the block is
``rows * N`` contiguous elements there). This rank's own block is not touched.

:func:`pull_reference` is the plain form (one copy-engine ``copy_`` per peer, what
``symm.matmul_all_reduce`` does by default); :func:`pull` is the Triton kernel (CUDA only).
"""

from __future__ import annotations

import torch

try:  # Triton comes with the CUDA build of torch; CPU machines go without it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_WORD = torch.int64  # the kernel moves 8-byte words: a quarter of the loads of bf16 elements


def supported(dst: torch.Tensor, rows: int, offset: int) -> bool:
    """Whether :func:`pull` can move these blocks (CUDA, Triton, whole 8-byte words)."""
    per_word = _WORD.itemsize // dst.element_size()
    return (triton is not None and dst.is_cuda and dst.is_contiguous() and dst.shape[1] % per_word == 0
            and offset % per_word == 0 and dst.data_ptr() % _WORD.itemsize == 0)


def pull_reference(dst: torch.Tensor, peer_block, rank: int, world: int, rows: int) -> None:
    """``dst[p*rows:(p+1)*rows] = peer_block(p)`` for every peer ``p`` (copy engine; any device)."""
    for step in range(1, world):
        p = (rank + step) % world
        dst[p * rows:(p + 1) * rows].copy_(peer_block(p))


if triton is not None:

    @triton.jit
    def _pull_kernel(dst_ptr, table_ptr, src_word, words, rank, WORLD: tl.constexpr, BLOCK: tl.constexpr):
        """Grid-stride over ``(WORLD - 1) * ceil(words / BLOCK)`` pieces, peers interleaved so
        every source link is read at once; ``table_ptr[p]``: base address of rank ``p``'s buffer."""
        pid = tl.program_id(0)
        pieces = tl.cdiv(words, BLOCK)
        lane = tl.arange(0, BLOCK)
        for b in range(pid, pieces * (WORLD - 1), tl.num_programs(0)):
            p = (rank + 1 + b % (WORLD - 1)) % WORLD
            off = (b // (WORLD - 1)) * BLOCK + lane
            mask = off < words
            src = tl.load(table_ptr + p).to(tl.pointer_type(tl.int64)) + src_word
            tl.store(dst_ptr + p.to(tl.int64) * words + off, tl.load(src + off, mask=mask), mask=mask)


def pull(dst: torch.Tensor, table: torch.Tensor, offset: int, rank: int, world: int, rows: int, ctas: int,
         block: int = 2048) -> None:
    """The kernel form of :func:`pull_reference`, on the current stream with ``ctas`` CTAs.

    ``table``: int64 CUDA tensor of every rank's buffer base address (``handle.buffer_ptrs``);
    ``offset``: element offset of the block in each buffer (in ``dst``'s dtype).
    """
    per_word = _WORD.itemsize // dst.element_size()
    words = rows * dst.shape[1] // per_word
    _pull_kernel[(ctas,)](dst.view(_WORD), table, offset // per_word, words, rank, WORLD=world, BLOCK=block,
                          num_warps=8)
