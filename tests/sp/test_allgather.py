"""commflow.sp.allgather_attention against the naive reference on 1, 2 and 4 gloo ranks."""

from __future__ import annotations

import itertools

import pytest

from tests.sp.softmax_harness import (
    Case,
    bad_input_cases,
    check_bad_input,
    check_matches_reference,
    check_world_one,
)

STRATEGY = "allgather"
LAYOUTS = ("contiguous", "zigzag")


def _cases() -> list[Case]:
    cases = []
    # fp64: the algebra (segments, merges, reduce-scatter) is exact, for every mask,
    # layout and head grouping (MHA, GQA, MQA).
    for causal, layout, (hq, hkv) in itertools.product((False, True), LAYOUTS, ((4, 4), (4, 2), (4, 1))):
        cases.append(Case(causal=causal, layout=layout, hq=hq, hkv=hkv, dtype="float64"))
    # fp32 with batch > 1 (strided key segments) and every pipeline depth.
    for causal, layout, chunks in itertools.product((False, True), LAYOUTS, (1, 2)):
        cases.append(Case(causal=causal, layout=layout, hq=4, hkv=2, batch=2, extra=(("head_chunks", chunks),)))
    # bf16 inputs, outputs and gradients.
    for causal, layout in itertools.product((False, True), LAYOUTS):
        cases.append(Case(causal=causal, layout=layout, hq=4, hkv=2, dtype="bfloat16"))
    return cases


CASES = _cases()


@pytest.mark.parametrize("world", [2, 4])
def test_matches_reference(dist_pool, world):
    check_matches_reference(dist_pool(world), STRATEGY, CASES)


def test_world_one_is_the_local_kernel_exactly(dist_pool):
    check_world_one(dist_pool(1), STRATEGY)


@pytest.mark.parametrize(
    "scenario, expected", bad_input_cases(("head_chunks", "head_chunks must be a positive divisor")),
)
def test_bad_input_raises_on_every_rank(dist_pool, scenario, expected):
    check_bad_input(dist_pool(2), STRATEGY, scenario, expected, prefix="allgather_attention:")


@pytest.mark.gpu
def test_gpu_nccl_matches_reference():
    """bf16 on 2-4 GPUs over NCCL, with SDPA held to flash and then to cuDNN (one spawn)."""
    from tests.sp.softmax_harness import check_gpu_strategy

    check_gpu_strategy(STRATEGY)


def _backward_peak_units(layout):
    """Peak bytes of the tensors the backward allocates with ``torch.empty`` (gather
    buffers, fp32 key gradients, accumulators), alive at once, in units of one local fp32
    shard ``[B, S/W, H, D]``. Runs on every rank of the pool."""
    import weakref

    import torch
    import torch.distributed as dist

    from commflow.sp import allgather_attention

    rank = dist.get_rank()

    b, s_local, h, d = 1, 16, 2, 8
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(b, s_local, h, d, generator=gen, requires_grad=True) for _ in range(3))
    out = allgather_attention(q, k, v, causal=True, layout=layout)
    live: list = []
    peak = [0]
    real_empty = torch.empty

    def tracking_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        live.append((weakref.ref(t), t.numel() * t.element_size()))
        peak[0] = max(peak[0], sum(n for ref, n in live if ref() is not None))
        return t

    torch.empty = tracking_empty
    try:
        out.backward(torch.randn(out.shape, generator=gen))
    finally:
        torch.empty = real_empty
    return peak[0] / (b * s_local * h * d * 4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_keeps_one_half_of_the_gathered_keys_or_the_key_gradients(dist_pool, layout):
    """Zigzag: the first half's gathered K, V are released before the second half's fp32
    dK, dV exist. With every buffer alive at once the peak is at least the gathered K, V
    of the whole sequence (2W shards) + its fp32 dK, dV (2W) + dq's accumulator (1): 4W + 1
    units (the order before the grouping measured 4W + 2 on both layouts); grouped by half
    it is 3W + 1. Contiguous has one buffer: 4W + 1."""
    world = 4
    peaks = dist_pool(world).run(_backward_peak_units, layout)
    expected = 3 * world + 1 if layout == "zigzag" else 4 * world + 1
    assert max(peaks) == pytest.approx(expected, abs=0.5), peaks


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
def test_segments_list_the_diagonal_blocks_first_then_each_buffer_together(layout, causal):
    """The backward runs the calls in this order and releases a buffer after its last
    call: a buffer that came back after another would stay alive beside it."""
    from commflow.sp.allgather import _segments

    for world in (2, 3, 4, 8):
        for rank in range(world):
            segs = _segments(rank, world, layout, causal, 16)
            flags = [seg[5] for seg in segs]
            assert flags == sorted(flags, reverse=True), segs  # causal (diagonal) calls first
            names = [seg[2] for seg in segs if not seg[5]]
            assert names == sorted(names, key=names.index), segs  # each buffer in one run
            assert all((seg[3], seg[4]) == (rank, rank + 1) for seg in segs if seg[5]), segs
