"""commflow.sp.ulysses_attention against the naive reference on 1, 2 and 4 gloo ranks."""

from __future__ import annotations

import itertools
import re

import pytest

from tests.sp.softmax_harness import (
    Case,
    error_messages,
    run_cases,
    second_backward_message,
    world_one_is_the_local_kernel,
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
    per_rank = dist_pool(world).run(run_cases, STRATEGY, CASES)
    for rank, results in enumerate(per_rank):
        for case, err in zip(CASES, results):
            worst = max(err["out"], err["dq"], err["dk"], err["dv"])
            assert worst <= case.tolerance(), (rank, case, err)
            assert err["dtypes_ok"] and err["shapes_ok"], (rank, case, err)


def test_world_one_is_the_local_kernel_exactly(dist_pool):
    cases = [Case(causal=c, layout=lay, hq=4, hkv=2, batch=2) for c in (False, True) for lay in LAYOUTS]
    cases += [Case(causal=True, hq=4, hkv=1, dtype="bfloat16")]
    (bitwise,) = dist_pool(1).run(world_one_is_the_local_kernel, STRATEGY, cases)
    assert all(bitwise)
    (errors,) = dist_pool(1).run(run_cases, STRATEGY, [Case(causal=True, hq=4, hkv=2, dtype="float64")])
    assert max(errors[0][n] for n in ("out", "dq", "dk", "dv")) <= 1e-12


@pytest.mark.parametrize(
    "scenario, expected",
    [
        ("not_4d", "q must be 4-D"),
        ("dtype", "must share one dtype"),
        ("device", "must be on one device"),
        ("kv_shape", "k and v must have the same shape"),
        ("seq", "same batch and local sequence length"),
        ("gqa", r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
        ("zigzag_odd", r"divisible by 2 x group size \(4\)"),
        ("layout", "layout must be one of"),
        ("heads_per_rank", r"query heads \(5\) must be divisible by the group size \(2\)"),
        ("head_chunks", r"head_chunks must be a positive divisor of the key/value heads per rank \(1\)"),
        ("uneven_shards", "ranks hold shards of different shapes"),
    ],
)
def test_bad_input_raises_on_every_rank(dist_pool, scenario, expected):
    messages = dist_pool(2).run(error_messages, STRATEGY, scenario)
    for message in messages:
        assert re.search(expected, message), message
        assert message.startswith("ulysses_attention:"), message


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


def test_default_head_chunks_follow_the_measured_rule():
    """1 chunk until each of 2 chunks keeps >= 2048 blocks of 128 rows x heads (4 H100 sweep)."""
    import torch

    from commflow.sp.ulysses import _default_chunks

    shard_of = lambda total: torch.empty(1, total // 4, 32, 128, device="meta")  # H=32 over 4 ranks
    assert [_default_chunks(shard_of(s), 8, 4) for s in (32768, 65536, 131072, 524288)] == [1, 2, 2, 2]
    assert _default_chunks(shard_of(524288), 1, 4) == 1  # one key/value head per rank cannot split
