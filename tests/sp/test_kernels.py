"""commflow.sp.kernels: the local LSE kernels, their backward, and the log-sum-exp merge."""

from __future__ import annotations

import itertools

import pytest
import torch

from commflow.sp.kernels import (
    attention_backward,
    attention_forward,
    local_attention,
    merge_,
    select_backend,
)
from commflow.sp.reference import attention_reference

FP64_TOL = 1e-12


def _inputs(b=2, s=12, hq=4, hkv=2, d=8, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return make(b, s, hq, d), make(b, s, hkv, d), make(b, s, hkv, d), make(b, s, hq, d)


@pytest.mark.parametrize("causal, hkv", itertools.product((False, True), (4, 2, 1)))
def test_local_attention_matches_reference(causal, hkv):
    q, k, v, do = _inputs(hkv=hkv)
    a = [t.clone().requires_grad_(True) for t in (q, k, v)]
    b = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = local_attention(*a, causal=causal)
    ref = attention_reference(*b, causal=causal)
    assert (out - ref).abs().max() < FP64_TOL
    for ga, gb in zip(torch.autograd.grad(out, a, do), torch.autograd.grad(ref, b, do)):
        assert (ga - gb).abs().max() < FP64_TOL


def test_lse_is_the_log_sum_exp_of_the_scores():
    q, k, v, _ = _inputs(hkv=4)
    _, lse, _ = attention_forward(q, k, v, causal=True, scale=0.3)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.shape == (2, 4, 12) and lse.dtype == torch.float64 and lse.is_contiguous()
    assert (lse - scores.logsumexp(-1)).abs().max() < FP64_TOL


def test_blocks_merged_by_lse_equal_one_call_and_their_backward_sums_up():
    """Keys split into uneven blocks (one causal diagonal, the rest full): merged forward
    equals one call; per-block backward with the final (out, lse) sums to the full grads."""
    q, k, v, do = _inputs(s=10, hkv=2)
    scale = 0.35
    # queries = last 4 tokens; keys 0..5 are in the past (full), keys 6..9 are the diagonal.
    qs, dos = q[:, 6:], do[:, 6:]
    blocks = [(slice(0, 2), False), (slice(2, 6), False), (slice(6, 10), True)]
    out_acc = torch.zeros(qs.shape, dtype=torch.float64)
    lse_acc = torch.full((2, 4, 4), float("-inf"), dtype=torch.float64)
    states = []
    for cols, causal in blocks:
        o, lse, st = attention_forward(qs, k[:, cols], v[:, cols], causal=causal, scale=scale)
        merge_(out_acc, lse_acc, o, lse)
        states.append(st)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*full, causal=True, scale=scale)
    assert (out_acc - ref[:, 6:]).abs().max() < FP64_TOL
    ref_grads = torch.autograd.grad(ref[:, 6:], full, dos)
    dq = torch.zeros_like(qs)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for (cols, causal), st in zip(blocks, states):
        gq, gk, gv = attention_backward(dos, qs, k[:, cols], v[:, cols], out_acc, lse_acc, st, causal=causal, scale=scale)
        dq += gq
        dk[:, cols] += gk
        dv[:, cols] += gv
    assert (dq - ref_grads[0][:, 6:]).abs().max() < FP64_TOL
    assert (dk - ref_grads[1]).abs().max() < FP64_TOL
    assert (dv - ref_grads[2]).abs().max() < FP64_TOL


def test_merge_is_stable_for_far_apart_log_sum_exps():
    """Blocks whose scores differ by 1e4 (exp would overflow fp32) merge without inf/nan,
    and the dominant block wins."""
    out_acc = torch.zeros(1, 3, 1, 2)
    lse_acc = torch.full((1, 1, 3), float("-inf"))
    small, big = torch.full((1, 3, 1, 2), 1.0), torch.full((1, 3, 1, 2), 5.0)
    merge_(out_acc, lse_acc, small, torch.full((1, 1, 3), -5000.0))
    merge_(out_acc, lse_acc, big, torch.full((1, 1, 3), 5000.0))
    assert torch.isfinite(out_acc).all() and torch.isfinite(lse_acc).all()
    assert torch.equal(out_acc, big) and torch.equal(lse_acc, torch.full((1, 1, 3), 5000.0))
    # Equal weights average exactly and add log(2).
    out_acc = torch.zeros(1, 1, 1, 1)
    lse_acc = torch.full((1, 1, 1), float("-inf"))
    merge_(out_acc, lse_acc, torch.full((1, 1, 1, 1), 2.0), torch.zeros(1, 1, 1))
    merge_(out_acc, lse_acc, torch.full((1, 1, 1, 1), 4.0), torch.zeros(1, 1, 1))
    assert out_acc.item() == 3.0 and abs(lse_acc.item() - torch.log(torch.tensor(2.0)).item()) < 1e-7


def test_first_merge_copies_the_block_exactly():
    o = torch.randn(2, 5, 3, 4)
    lse = torch.randn(2, 3, 5)
    out_acc, lse_acc = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    merge_(out_acc, lse_acc, o, lse)
    assert torch.equal(out_acc, o) and torch.equal(lse_acc, lse)


def test_bf16_math_path_accumulates_in_fp32():
    q, k, v, _ = _inputs(dtype=torch.bfloat16)
    out, lse, state = attention_forward(q, k, v, causal=True, scale=0.3)
    assert state.backend == "math" and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref = attention_reference(q, k, v, causal=True, scale=0.3)  # fp32 from the same bf16 inputs
    assert (out.float() - ref.float()).abs().max() <= 2**-8 * ref.float().abs().max()


def test_non_square_causal_block_is_refused():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="causal kernel calls must be square"):
        attention_forward(q[:, :4], k, v, causal=True, scale=1.0)


def test_cpu_selects_the_math_backend():
    q, k, v, _ = _inputs(dtype=torch.float32)
    assert select_backend(q, k, v, causal=True, scale=1.0) == "math"


# --- GPU: every fused backend against the math path, in the layouts the strategies use ---


def _gpu_layouts(q, k, v):
    """The tensor layouts the strategies hand to the kernels."""
    b, s, hq, d = q.shape
    packed = torch.cat([q, k, v], dim=2)  # Ulysses' received buffer: heads of q | k | v per token
    hkv = k.shape[2]
    yield "bshd", q, k, v
    yield "packed", packed[:, :, :hq], packed[:, :, hq : hq + hkv], packed[:, :, hq + hkv :]
    yield "half_rows", q[:, s // 2 :], k, v  # zigzag: second half of the queries vs all keys


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "CUDNN_ATTENTION"])
@pytest.mark.parametrize("hkv", [8, 2])
def test_gpu_fused_backends_match_math(backend, hkv):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = {"FLASH_ATTENTION": "flash", "CUDNN_ATTENTION": "cudnn"}[backend]
    q, k, v, do = _inputs(b=2, s=512, hq=8, hkv=hkv, d=64, dtype=torch.bfloat16, device="cuda")
    scale = 64**-0.5
    for layout, qq, kk, vv in _gpu_layouts(q, k, v):
        for causal in (False, True) if qq.shape[1] == kk.shape[1] else (False,):
            with sdpa_kernel(getattr(SDPBackend, backend)):
                chosen = select_backend(qq, kk, vv, causal=causal, scale=scale)
                if chosen != name:
                    pytest.skip(f"{name} not available for {layout} on this GPU/torch (chose {chosen})")
                out, lse, st = attention_forward(qq, kk, vv, causal=causal, scale=scale)
            ref_out, ref_lse, ref_st = attention_forward(qq, kk, vv, causal=causal, scale=scale, backend="math")
            assert out.shape == qq.shape and lse.shape == (2, 8, qq.shape[1]), layout
            assert (out.float() - ref_out.float()).abs().max() < 2e-2, (layout, causal)
            assert (lse - ref_lse).abs().max() < 1e-2, (layout, causal)
            dos = do[:, -qq.shape[1] :]
            grads = attention_backward(dos, qq, kk, vv, out, lse, st, causal=causal, scale=scale)
            ref_grads = attention_backward(dos, qq, kk, vv, out, lse, ref_st, causal=causal, scale=scale)
            for g, r in zip(grads, ref_grads):
                assert g.shape == r.shape
                assert (g.float() - r.float()).abs().max() < 5e-2 * max(1.0, r.float().abs().max().item()), (
                    layout, causal,
                )
