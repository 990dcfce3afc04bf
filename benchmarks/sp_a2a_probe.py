"""Probe: a copy-engine all-to-all for Ulysses, against packing + NCCL, alone and beside the kernel.

Not a registered benchmark (``python -m benchmarks.sp_a2a_probe --nproc 4 --seq 131072 [--chunks 2]
[--out FILE]``). Ulysses at 128K on 4 H100 runs at 0.953-0.961 of the 1-GPU limit
(docs/sp.md); what is left is its all-to-alls and their packing copies, which cannot hide
under the attention kernel over NCCL (NCCL's kernel and the packing take SMs; two head
chunks ran slower than one). The question here: do strided copy-engine transfers
(``copy_rows_`` below, ``cudaMemcpy2DAsync``: each head slice of ``q [1, S/W, H, D]`` pushed as
``S/W`` rows straight into slot ``rank`` of the peer's symmetric buffer, one barrier, then
one dense copy out of this rank's buffer) move the same bytes as fast, and leave a kernel
beside them at full speed? Per head chunk of ``H/W/chunks`` heads, for q, k and v:

* ``pack_nccl_ms``: today's path (``_all_to_all_many``: pack, NCCL all-to-all), to the wait.
* ``ce_ms`` / ``ce_no_copy_out_ms``: the copy-engine all-to-all, with and without the copy
  out of the symmetric buffer (checked bit-equal to the NCCL result).
* ``kernel_ms``: the forward attention kernel of one chunk (``[1, S, h, D]``, causal) alone;
  ``kernel_with_nccl_ms`` / ``kernel_with_ce_ms``: the next chunk's transfer issued first
  (packing on the compute stream, as Ulysses does; copy-engine pushes on a side stream),
  then the kernel, to the end of both.

Medians over ``--rounds`` samples, slowest rank.

Found (session 12, 4x H100, ``sp_a2a_probe_4xH100_20261127-s12-chunks{2,1}.json``): the strided
copy-engine all-to-all is bit-equal to NCCL's and *slower* (1.75 vs 1.49 ms per chunk of 4 heads,
32 MB per peer per tensor; 2.79 vs 2.61 ms for 8 heads); beside the kernel it hides about half of
itself (kernel 31.1 ms alone, 32.0 with it, 32.6 with packing + NCCL), and the same kernel timed
again at the end of the run took 38.2 ms: the kernel's own drift is larger than either effect.
A two-chunk copy-engine Ulysses was therefore not built (docs/sp.md, session 12).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import json
import os
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
HEADS, HEAD_DIM = 32, 128

# --- strided copies on the copy engines ----------------------------------------------------
# ``Tensor.copy_`` between two dense tensors is one ``cudaMemcpyAsync`` (a copy engine, no SM,
# also into a peer's mapped symmetric buffer); between a strided and a dense tensor it launches
# an elementwise kernel. A head slice of a dense ``[B, S, H, D]`` tensor is ``B*S`` rows of
# ``h*D`` contiguous elements, ``H*D`` apart: ``cudaMemcpy2DAsync`` moves that shape on a copy
# engine. PyTorch does not expose it, so it is called from the CUDA runtime PyTorch loaded.

_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice: both pointers are device (or peer-mapped) memory


@functools.lru_cache(maxsize=1)
def _cudart():
    """The loaded CUDA runtime with ``cudaMemcpy2DAsync`` typed, or None."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libcudart.so" in line})
    except OSError:
        pass
    if not paths:  # not loaded yet (no CUDA call so far): the copy PyTorch ships with
        torch_lib = os.path.dirname(os.path.dirname(torch.__file__))
        paths = sorted(glob.glob(os.path.join(torch_lib, "nvidia", "*", "lib", "libcudart.so*")))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            fn = lib.cudaMemcpy2DAsync
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                       ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        return fn
    return None


def _available() -> bool:
    """Whether strided copies can run on the copy engines here (CUDA and its runtime found)."""
    return torch.cuda.is_available() and _cudart() is not None


def as_rows(dst: torch.Tensor, src: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(rows, width, dst_pitch, src_pitch)`` in bytes if ``dst`` and ``src`` (same shape and
    dtype) are both ``rows`` runs of ``width`` contiguous bytes, each at its own uniform
    pitch, else None. The row is the innermost dims dense in *both* tensors; the dims outside
    it must collapse to one uniform stride in each."""
    if dst.numel() == 0:
        return None
    size = dst.element_size()
    dims = [(n, a, b) for n, a, b in zip(dst.shape, dst.stride(), src.stride()) if n != 1]
    width = 1
    while dims and dims[-1][1] == width and dims[-1][2] == width:
        width *= dims.pop()[0]
    if not dims:
        return 1, width * size, width * size, width * size
    rows, dst_pitch, src_pitch = dims[-1]
    for n, a, b in reversed(dims[:-1]):
        if a != dst_pitch * rows or b != src_pitch * rows:
            return None
        rows *= n
    if dst_pitch < width or src_pitch < width:
        return None
    return rows, width * size, dst_pitch * size, src_pitch * size


def copy_rows_(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """``dst.copy_(src)`` on a copy engine where the pair is row-shaped (:func:`as_rows`);
    otherwise (or on CPU) ``dst.copy_(src)``. Same shape and dtype required.

    Runs on ``stream`` (default: the current one), as ``copy_`` would, and is captured by
    CUDA graphs like any ``cudaMemcpy*Async``.
    """
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy_rows_: dst {tuple(dst.shape)} {dst.dtype} and src {tuple(src.shape)} {src.dtype} "
                         f"must have the same shape and dtype")
    if dst.device.type != "cuda" or src.device.type != "cuda" or not _available():
        return dst.copy_(src)
    shape = as_rows(dst, src)
    if shape is None:
        return dst.copy_(src)
    rows, width, dst_pitch, src_pitch = shape
    stream = stream if stream is not None else torch.cuda.current_stream(dst.device)
    err = _cudart()(dst.data_ptr(), dst_pitch, src.data_ptr(), src_pitch, width, rows, _DEVICE_TO_DEVICE,
                    stream.cuda_stream)
    if err:
        raise RuntimeError(f"copy_rows_: cudaMemcpy2DAsync failed with CUDA error {err} "
                           f"(rows {rows}, width {width} B, pitches {dst_pitch} / {src_pitch} B)")
    return dst



def _worker(cfg: dict) -> dict:
    import torch.distributed as dist

    from benchmarks.timing import max_over_ranks, time_ms
    from commflow.dist import init_distributed
    from commflow.overlap import symm
    from commflow.overlap.validate import check_group
    from commflow.sp._common import group_info
    from commflow.sp.kernels import attention_forward
    from commflow.sp.ulysses import _all_to_all_many, _full_sequence

    info = init_distributed(device="cuda")
    dev, world, rank = info.device, info.world_size, info.rank
    g = check_group(None, dev)
    seq, chunks, rounds = cfg["seq"], cfg["chunks"], cfg["rounds"]
    s_local, h = seq // world, HEADS // world // chunks
    dt = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(rank)
    qkv = [torch.randn(1, s_local, HEADS, HEAD_DIM, device=dev, dtype=dt, generator=gen) for _ in range(3)]
    six = [t.view(1, s_local, world, chunks, h, HEAD_DIM) for t in qkv]
    slot = s_local * h * HEAD_DIM  # elements one rank sends one peer, per tensor
    ws = symm.workspace(g, "a2a_probe", dev)
    ws.ensure(3 * world * slot * 2)
    comm = symm.comm_stream(dev)
    main = torch.cuda.current_stream(dev)

    sp_group = group_info(g.group)  # what Ulysses' helpers take

    def pack_nccl(c=0):
        return _all_to_all_many([t[:, :, :, c].permute(2, 0, 1, 3, 4) for t in six], sp_group)

    def nccl_done(c=0):
        recvs, works = pack_nccl(c)
        for w_ in works:
            w_.wait()
        return recvs

    def ce_push(c=0):
        comm.wait_stream(main)
        with torch.cuda.stream(comm):
            for i, t in enumerate(six):
                for step in range(world):
                    p = (rank + step) % world
                    dst = ws.view(p, (1, s_local, h, HEAD_DIM), dt, (i * world + rank) * slot)
                    copy_rows_(dst, t[:, :, p, c], stream=comm)
            ws.barrier()

    def ce_done(c=0, copy_out=True):
        ce_push(c)
        with torch.cuda.stream(comm):
            if copy_out:
                flat = torch.empty(3 * world * slot, dtype=dt, device=dev)
                flat.copy_(ws.view(rank, (3 * world * slot,), dt, 0))
            else:
                flat = ws.view(rank, (3 * world * slot,), dt, 0)
        main.wait_stream(comm)
        if copy_out:
            flat.record_stream(main)
        return [flat[i * world * slot:(i + 1) * world * slot].view(world, 1, s_local, h, HEAD_DIM) for i in range(3)]

    # Correctness: the copy-engine all-to-all equals NCCL's, bit for bit.
    ref = [r.clone() for r in nccl_done()]
    got = ce_done()
    torch.cuda.synchronize(dev)
    equal = all(torch.equal(a, b) for a, b in zip(ref, got))
    equal = bool(max_over_ranks(0.0 if equal else 1.0) == 0.0)
    del ref, got

    q_full, k_full, v_full = (_full_sequence(r.clone()) for r in nccl_done())
    scale = HEAD_DIM ** -0.5

    def kernel():
        return attention_forward(q_full, k_full, v_full, causal=True, scale=scale)

    def kernel_with_nccl():
        recvs, works = pack_nccl(1 % chunks)  # the next chunk's transfer, then this chunk's kernel
        out = kernel()
        for w_ in works:
            w_.wait()
        return out, recvs

    def kernel_with_ce():
        ce_push(1 % chunks)
        out = kernel()
        main.wait_stream(comm)
        return out

    def timed(fn) -> float:
        return max_over_ranks(time_ms(fn, warmup=2, iters=rounds, device=dev, barrier=True)["median_ms"])

    row = {"seq": seq, "world": world, "chunks": chunks, "heads_per_chunk": h,
           "mb_per_peer_per_tensor": slot * 2 / 2**20, "bit_equal": equal,
           "copy_engine_available": _available()}
    row["pack_nccl_ms"] = timed(nccl_done)
    row["ce_ms"] = timed(ce_done)
    row["ce_no_copy_out_ms"] = timed(lambda: ce_done(copy_out=False))
    row["kernel_ms"] = timed(kernel)
    row["kernel_with_nccl_ms"] = timed(kernel_with_nccl)
    row["kernel_with_ce_ms"] = timed(kernel_with_ce)
    row["kernel_ms_again"] = timed(kernel)
    if rank == 0:
        print(json.dumps(row), flush=True)
    dist.barrier()
    return {"rows": [row], "torch": torch.__version__}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("sp_a2a_probe", _worker, argv, __doc__, nproc=4,
                      options={"seq": 131072, "chunks": 2, "rounds": 5}, timeout_s=300, env=ENV)


if __name__ == "__main__":
    sys.exit(main())
