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
