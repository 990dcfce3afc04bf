"""commflow.sp.ulysses_attention against the naive reference on 1, 2 and 4 gloo ranks."""

from __future__ import annotations

import itertools

import pytest

from tests.sp.softmax_harness import (
    Case,
    bad_input_cases,
    check_bad_input,
    check_matches_reference,
    check_world_one,
    second_backward_message,
)

STRATEGY = "ulysses"
LAYOUTS = ("contiguous", "zigzag")


def _cases() -> list[Case]:
    cases = []
    # fp64: exact algebra. Head groupings: MHA (2 chunks per rank on W=4), GQA with
    # Hkv < W (key/value heads repeated), MQA, and Hkv = 6 that needs 2 copies on W=4.
    heads = ((8, 8), (8, 2), (8, 1), (12, 6))
    for causal, layout, (hq, hkv) in itertools.product((False, True), LAYOUTS, heads):
        cases.append(Case(causal=causal, layout=layout, hq=hq, hkv=hkv, dtype="float64"))
    # fp32 with batch > 1 (the unpacking copies) and both pipeline depths.
    for causal, layout, chunks in itertools.product((False, True), LAYOUTS, (1, 2)):
        cases.append(Case(causal=causal, layout=layout, hq=8, hkv=8, batch=2, extra=(("head_chunks", chunks),)))
    for causal, layout in itertools.product((False, True), LAYOUTS):
        cases.append(Case(causal=causal, layout=layout, hq=8, hkv=4, dtype="bfloat16"))
    return cases


CASES = _cases()


@pytest.mark.parametrize("world", [2, 4])
def test_matches_reference(dist_pool, world):
    check_matches_reference(dist_pool(world), STRATEGY, CASES)


def test_world_one_is_the_local_kernel_exactly(dist_pool):
    check_world_one(dist_pool(1), STRATEGY)


@pytest.mark.parametrize(
    "scenario, expected",
    bad_input_cases(
        ("heads_per_rank", r"query heads \(5\) must be divisible by the group size \(2\)"),
        ("head_chunks", r"head_chunks must be a positive divisor of the key/value heads per rank \(1\)"),
    ),
)
def test_bad_input_raises_on_every_rank(dist_pool, scenario, expected):
    check_bad_input(dist_pool(2), STRATEGY, scenario, expected, prefix="ulysses_attention:")


def test_second_backward_raises(dist_pool):
    """The backward frees each head chunk's saved tensors as it goes, so a second
    backward over the same forward (retain_graph=True) must fail loudly, not silently."""
    for message in dist_pool(2).run(second_backward_message, STRATEGY):
        assert "backward ran twice" in message, message


@pytest.mark.gpu
def test_gpu_nccl_matches_reference():
    """bf16 on 2-4 GPUs over NCCL, with SDPA held to flash and then to cuDNN (one spawn)."""
    from tests.sp.softmax_harness import check_gpu_strategy

    check_gpu_strategy(STRATEGY)
