"""Local linear-attention kernels against the plain references (one process).

CPU: the two references agree; the torch chunked kernels equal the quadratic reference
(output, final state, gradients of q, k, v, g and the initial state, with a final-state
gradient) for several chunk sizes, including chunks that do not divide the sequence;
float64 gradcheck; the fla-layout torch fallback of the gated backward. With Triton
installed, the own Triton kernel runs in Triton's CPU interpreter. On a GPU, the fla
backend (both gated dq/dk/dg paths) against the reference in bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from commflow.sp.linear_kernels import (
    TorchChunkKernels,
    _fla_layout_dqkg_torch,
    chunk_linear_attention,
    fla_available,
    fold_log_weights,
)
from commflow.sp.linear_reference import linear_attention_naive, linear_attention_recurrent

TOL_F64 = 1e-11  # float64: only summation order differs
TOL_BF16 = 3e-2  # bf16 inputs and bf16 tiles in the kernels, relative to the largest reference value


def _problem(mode, B=2, S=13, H=2, K=4, V=3, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    q, k, v = rnd(B, S, H, K, scale=K**-0.5), rnd(B, S, H, K), rnd(B, S, H, V)
    gdt = torch.float64 if dtype == torch.float64 else torch.float32
    g = F.logsigmoid(torch.randn(B, S, H, generator=gen, dtype=torch.float64) + 2).to(device, gdt) if mode == "g" else None
    g_gamma = (-torch.rand(H, generator=gen, dtype=torch.float64) * 0.3).to(device, gdt) if mode == "gamma" else None
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(device, gdt)
    do = rnd(B, S, H, V)
    d_final = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(device, gdt)
    return q, k, v, g, g_gamma, h0, do, d_final


def _rel(mine, ref):
    return ((mine.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("mode", ["none", "gamma", "g"])
def test_references_agree(mode):
    q, k, v, g, g_gamma, h0, _, _ = _problem(mode)
    o1, s1 = linear_attention_naive(q, k, v, g=g, g_gamma=g_gamma, initial_state=h0)
    o2, s2 = linear_attention_recurrent(q, k, v, g=g, g_gamma=g_gamma, initial_state=h0)
    torch.testing.assert_close(o1, o2, rtol=0, atol=TOL_F64)
    torch.testing.assert_close(s1, s2, rtol=0, atol=TOL_F64)


def _grads(fn, q, k, v, g, g_gamma, h0, do, d_final):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, h0) + ((g,) if g is not None else ())]
    o, final = fn(*leaves[:3], g=leaves[4] if g is not None else None, g_gamma=g_gamma, initial_state=leaves[3])
    grads = torch.autograd.grad((o * do).sum() + (final * d_final).sum(), leaves)
    return o, final, grads


def _check_chunked_against_naive(kern, prob, ref_prob, tol):
    """``chunk_linear_attention`` with ``kern`` on ``prob`` vs the quadratic reference on
    ``ref_prob``: output, final state and every gradient within ``tol`` (relative)."""
    o_ref, s_ref, g_ref = _grads(linear_attention_naive, *ref_prob)

    def chunked(q, k, v, **kw):
        return chunk_linear_attention(q, k, v, output_final_state=True, kernels=kern, **kw)

    o, s, grads = _grads(chunked, *prob)
    assert _rel(o, o_ref) < tol and _rel(s, s_ref) < tol
    for name, a, b in zip(["q", "k", "v", "h0", "g"], grads, g_ref):
        assert _rel(a, b) < tol, f"d{name}"


@pytest.mark.parametrize("mode", ["none", "gamma", "g"])
@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_torch_chunked_equals_reference(mode, chunk):
    """Chunk 4 and 5 leave a partial last chunk of 13 tokens; 16 is one partial chunk."""
    prob = _problem(mode)
    _check_chunked_against_naive(TorchChunkKernels(chunk), prob, prob, TOL_F64)


@pytest.mark.parametrize("mode", ["none", "gamma", "g"])
def test_gradcheck_float64(mode):
    q, k, v, g, g_gamma, h0, _, _ = _problem(mode, B=1, S=6, H=1, K=2, V=2)
    kern = TorchChunkKernels(4)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, h0) + ((g,) if g is not None else ())]

    def fn(q, k, v, h0, g=None):
        return chunk_linear_attention(q, k, v, g=g, g_gamma=g_gamma, initial_state=h0, output_final_state=True,
                                      kernels=kern)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_g_and_g_gamma_together_are_refused():
    q, k, v, g, _, _, _, _ = _problem("g")
    with pytest.raises(ValueError, match="at most one"):
        chunk_linear_attention(q, k, v, g=g, g_gamma=torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("seq", [16, 13])
def test_fla_layout_torch_fallback_equals_torch_backend(seq):
    """The torch gated dq/dk/dg on fla's tensors (base-2 chunk-local g, [B, T, H] layout) equals
    the torch backend's backward, including a partial last chunk (13 tokens, chunk 4)."""
    C = 4
    q, k, v, g, _, h0, do, d_final = _problem("g", S=seq, dtype=torch.float32)
    kern = TorchChunkKernels(C)
    dec = kern.prepare(g, None, seq)
    h, _ = kern.states(k, v, dec, h0, False, states_in_fp32=True)
    dq_ref, dk_ref, _, dg_ref, _ = kern.backward(q, k, v, dec, h, do, h0, d_final, 0.7)
    dh, _ = kern.state_grads(q, do, dec, 0.7)
    _, tail = fold_log_weights(kern.chunk_totals(dec, q.shape[0], seq))
    dh = dh + torch.exp(tail)[..., None, None] * d_final[:, None]  # the final-state gradient, folded
    dq, dk, db = _fla_layout_dqkg_torch(q, k, v, do, kern.chunk_cum_log2(dec, seq), h, dh, 0.7, C)
    dg = kern.dg_from_db(db, C)
    for mine, ref in ((dq, dq_ref), (dk, dk_ref), (dg, dg_ref)):
        assert _rel(mine, ref) < 1e-5


@pytest.mark.parametrize("mode", ["none", "gamma", "g"])
def test_output_fold_equals_initial_state(mode):
    """Folding S into the output equals running the chunks from initial state S."""
    q, k, v, g, g_gamma, h0, _, _ = _problem(mode)
    kern = TorchChunkKernels(4)
    dec = kern.prepare(g, g_gamma, q.shape[1])
    h_with, _ = kern.states(k, v, dec, h0, False)
    h_local, _ = kern.states(k, v, dec, None, False)
    torch.testing.assert_close(kern.output(q, k, v, dec, h_local, 0.5, fold=h0), kern.output(q, k, v, dec, h_with, 0.5),
                               rtol=0, atol=TOL_F64)


_INTERPRETER_CHECK = textwrap.dedent("""
    import triton.runtime.autotuner as autotuner
    autotuner.Autotuner._bench = lambda self, *args, config, **meta: [1.0, 1.0, 1.0]  # no timing on CPU
    import torch
    from commflow.sp.linear_triton import self_check
    # Every kernel (output, dv, dq/dk/dg) in every decay mode, with and without a fold; then
    # several K and V blocks with masked tails.
    cases = [(16, 16, 16, mode, fold) for mode in ("none", "gamma", "g") for fold in (False, True)]
    cases += [(32, 48, 16, "g", True), (160, 80, 16, "gamma", True)]
    for K, V, C, mode, fold in cases:
        ok, err = self_check("cpu", torch.float32, K, V, C, mode, fold)
        print(K, V, C, mode, fold, ok, err)
        assert ok and err < 1e-5, (K, V, C, mode, fold, err)
""")


def test_triton_gated_kernel_in_interpreter():
    """commflow's Triton kernels, run by Triton's CPU interpreter, equal the torch backend."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


_AUTOTUNE_CHECK = textwrap.dedent("""
    import triton.runtime.autotuner as autotuner
    timed = []

    def fake_bench(self, *args, config, **meta):  # no timing on CPU: record what would be timed
        timed.append(config)
        return [float(config.kwargs.get("BV", 1)), 1.0, 1.0]

    autotuner.Autotuner._bench = fake_bench
    import torch
    from commflow.dist import init_distributed
    from commflow.sp import linear_triton as lt

    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V, C = 1, 40, 2, 16, 16, 16
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for d in (K, K, V))
    h = torch.randn(B, 3, H, K, V, generator=gen)
    tuner = lt._chunk_fwd_o_kernel
    with lt.autotune_mode("off"):  # one configuration, nothing timed, nothing cached
        o_off = lt.chunk_fwd_o(q, k, v, h, None, None, 0.5, C)
    assert timed == [] and tuner.cache == {}, (timed, tuner.cache)
    lt.AUTOTUNE_LIMIT = 2
    with lt.autotune_mode("limited"):  # at most 2 of the 4 timed, the pick cached
        o_lim = lt.chunk_fwd_o(q, k, v, h, None, None, 0.5, C)
    assert len(timed) == 2 and len(tuner.cache) == 1, (timed, tuner.cache)
    assert len(tuner.configs) == 4  # the full list is back
    o_full = lt.chunk_fwd_o(q, k, v, h, None, None, 0.5, C)  # default "full": the key is tuned already
    assert len(timed) == 2
    torch.testing.assert_close(o_off, o_lim, rtol=0, atol=0)
    torch.testing.assert_close(o_full, o_lim, rtol=0, atol=0)
    # prime: the 6 self-checks, agreed over a (one-rank) process group
    init_distributed("gloo")
    verdicts = lt.prime("cpu", torch.float32, K, V, C)
    assert len(verdicts) == 6 and all(ok for ok, _ in verdicts.values()), verdicts
    print("ok")
""")


def test_triton_autotune_modes_and_prime_in_interpreter():
    """autotune_mode("off") times and caches nothing, "limited" times at most AUTOTUNE_LIMIT
    configurations, and prime() self-checks all six variants (one all-reduce to agree)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _AUTOTUNE_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fla", "fla-only"])
@pytest.mark.parametrize("mode", ["none", "gamma", "g"])
def test_fla_backend_equals_reference_bf16(mode, backend):
    if not fla_available():
        pytest.skip("fla-core not installed")
    from commflow.sp.linear_kernels import select_kernels

    prob = _problem(mode, B=2, S=200, H=4, K=64, V=64, dtype=torch.bfloat16, device="cuda")
    ref = tuple(None if t is None else t.double() for t in prob)  # the same (rounded) inputs, in float64
    _check_chunked_against_naive(select_kernels("cuda", backend=backend), prob, ref, TOL_BF16)
