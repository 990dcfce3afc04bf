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


def test_packing_copies_move_words_and_keep_every_bit():
    """The packing copies view rows as int64 where the strides allow (a quarter of the
    elements for bf16); the bytes must come out exactly, NaN payloads included, and
    tensors the view cannot take fall back to the plain copy."""
    import torch

    from commflow.sp.ulysses import _contiguous, _copy_, _words

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**15), 2**15, (2, 6, 4, 3, 8), generator=g, dtype=torch.int16).view(torch.bfloat16)
    view = x.permute(2, 0, 1, 3, 4)  # strided, last dim contiguous: taken as words
    assert _words(view).dtype == torch.int64 and _words(view).shape[-1] == 2
    packed = _contiguous(view)
    assert packed.is_contiguous() and packed.dtype == torch.bfloat16 and packed.shape == view.shape
    assert torch.equal(packed.view(torch.int16), view.contiguous().view(torch.int16))
    dst = torch.empty(4, 2, 6, 3, 8, dtype=torch.bfloat16).permute(1, 2, 0, 3, 4)
    _copy_(dst, x)
    assert torch.equal(dst.view(torch.int16), x.view(torch.int16))
    for odd in (x[..., :6], x[..., 1:5], x.float().view(torch.int32)[..., :3].view(torch.float32)):
        assert _words(odd) is odd  # last dim not a whole number of words, or misaligned
        bits = {2: torch.int16, 4: torch.int32}[odd.element_size()]  # NaN != NaN: compare bits
        assert torch.equal(_contiguous(odd.transpose(0, 1)).view(bits), odd.transpose(0, 1).contiguous().view(bits))
    assert _words(x.double()).dtype == torch.float64  # already 8-byte elements


def test_packing_copy_converts_between_dtypes_of_one_size():
    """Words move bits: a bf16 source into an fp16 destination must take the converting copy."""
    import torch

    from commflow.sp.ulysses import _copy_

    src = torch.linspace(-3, 3, 64).reshape(2, 4, 8).to(torch.bfloat16)
    dst = torch.empty(4, 2, 8, dtype=torch.float16).transpose(0, 1)
    _copy_(dst, src)
    assert torch.equal(dst.float(), src.float())
