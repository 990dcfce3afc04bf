"""LASP-2 on gloo ranks against the single-process reference.

Every case builds the same global tensors on every rank (fixed seed), runs the naive
quadratic reference (float64, autograd) on the global sequence, and compares this rank's
slice of it with ``lasp2_attention`` on the rank's contiguous shard: output and the
gradients of q, k, v and g. The torch kernels run with chunk size 4, so a 12-token shard
has chunk boundaries inside it (and 10 tokens a partial chunk).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from commflow.sp import lasp2_attention, shard
from commflow.sp.lasp2 import rank_scan
from commflow.sp.linear_kernels import TorchChunkKernels, chunk_linear_attention
from commflow.sp.linear_reference import linear_attention_naive

TOL_F64 = 1e-10  # float64 end to end: only summation order differs
TOL_F32 = 2e-5  # float32 inputs and state chain, relative to the largest reference value

# (decay mode, causal, batch, local seq, heads, d_k, d_v, dtype)
CASES = [
    ("none", True, 2, 12, 2, 4, 3, torch.float64),
    ("gamma", True, 2, 12, 2, 4, 3, torch.float64),
    ("g", True, 2, 12, 2, 4, 3, torch.float64),
    ("g", True, 1, 10, 3, 3, 5, torch.float64),  # partial last chunk in every shard
    ("none", False, 2, 12, 2, 4, 3, torch.float64),
    ("g", True, 2, 12, 2, 4, 3, torch.float32),
]


def _inputs(mode, batch, seq, heads, dk, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, dk, generator=gen, dtype=dtype)
    k = torch.randn(batch, seq, heads, dk, generator=gen, dtype=dtype)
    v = torch.randn(batch, seq, heads, dv, generator=gen, dtype=dtype)
    do = torch.randn(batch, seq, heads, dv, generator=gen, dtype=dtype)
    gdt = torch.float64 if dtype == torch.float64 else torch.float32
    # Gates near 1 (log decay ~ -0.05..-0.7) keep cross-rank terms far from zero.
    g = F.logsigmoid(torch.randn(batch, seq, heads, generator=gen, dtype=gdt) + 2.0) if mode == "g" else None
    g_gamma = -torch.rand(heads, generator=gen, dtype=gdt) * 0.3 if mode == "gamma" else None
    return q, k, v, do, g, g_gamma


def _run_cases(cases, attention=lasp2_attention, layout="contiguous", extra=None):
    """Per case: (output error, {grad name: error}) as max |mine - reference| / max |reference|."""
    world = dist.get_world_size()
    results = []
    for mode, causal, batch, seq_local, heads, dk, dv, dtype in cases:
        q, k, v, do, g, g_gamma = _inputs(mode, batch, seq_local * world, heads, dk, dv, dtype)
        leaves = {"q": q, "k": k, "v": v, **({"g": g} if g is not None else {})}
        ref_in = {n: t.double().requires_grad_() for n, t in leaves.items()}
        o_ref, _ = linear_attention_naive(ref_in["q"], ref_in["k"], ref_in["v"], g=ref_in.get("g"),
                                          g_gamma=None if g_gamma is None else g_gamma.double(), causal=causal)
        ref_grads = torch.autograd.grad(o_ref, list(ref_in.values()), do.double())

        local = {n: shard(t, layout=layout).requires_grad_() for n, t in leaves.items()}
        kw = {"causal": causal} if not causal else {}
        if layout != "contiguous":
            kw["layout"] = layout
        kw.update(extra or {})
        o = attention(local["q"], local["k"], local["v"], g=local.get("g"), g_gamma=g_gamma,
                      kernels=TorchChunkKernels(chunk_size=4), **kw)
        grads = torch.autograd.grad(o, list(local.values()), shard(do, layout=layout))

        def err(mine, ref):
            ref_local = shard(ref, layout=layout)
            return ((mine.double() - ref_local).abs().max() / ref.abs().max()).item()

        results.append((err(o, o_ref), {n: err(gm, gr) for n, gm, gr in zip(local, grads, ref_grads)}))
    return results


def _run_baselines(cases):
    """The benchmark baselines (LASP-1 chain in both orders, ring K/V) against the reference."""
    from benchmarks.linear_sp_baselines import lasp1_attention, ring_kv_attention

    methods = {
        "lasp1": lambda *a, **kw: lasp1_attention(*a, **kw),
        "lasp1-serial": lambda *a, **kw: lasp1_attention(*a, serial_compute=True, **kw),
        "ring": ring_kv_attention,
    }
    return {name: _run_cases(cases, fn) for name, fn in methods.items()}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_lasp2_matches_reference(dist_pool, world):
    results = dist_pool(world).run(_run_cases, CASES)
    _assert_close(results, CASES)


def test_lasp2_forward_overlap_matches_reference(dist_pool):
    """The paper's order (local output under the all-gather, S_in's share added after)."""
    results = dist_pool(4).run(_run_cases, CASES, lasp2_attention, "contiguous", {"forward_overlap": True})
    _assert_close(results, CASES, label="lasp2-overlap")


@pytest.mark.parametrize("world", [2, 4])
def test_lasp2_zigzag_matches_reference(dist_pool, world):
    """Zigzag shards (two chunks per rank, as LASP-2H uses): the scan runs over 2W chunks."""
    results = dist_pool(world).run(_run_cases, CASES, lasp2_attention, "zigzag")
    _assert_close(results, CASES, label="lasp2-zigzag")


@pytest.mark.parametrize("world", [2, 4])
def test_baselines_match_reference(dist_pool, world):
    causal_cases = [c for c in CASES if c[1]]
    for name, results in _merge(dist_pool(world).run(_run_baselines, causal_cases)).items():
        _assert_close(results, causal_cases, label=name)


def _merge(per_rank):
    """[{method: cases}] per rank -> {method: [cases per rank]}."""
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}


def _assert_close(results, cases, label="lasp2"):
    for rank, per_rank in enumerate(results):
        for case, (o_err, grad_errs) in zip(cases, per_rank):
            tol = TOL_F64 if case[-1] == torch.float64 else TOL_F32
            assert o_err < tol, f"{label} rank {rank} case {case[:3]}: output error {o_err:.3g}"
            for name, e in grad_errs.items():
                assert e < tol, f"{label} rank {rank} case {case[:3]}: d{name} error {e:.3g}"


def test_world_one_equals_local_kernel_exactly():
    """Without a process group, LASP-2 is the local chunked kernel, bit for bit."""
    for mode in ("none", "gamma", "g"):
        q, k, v, do, g, g_gamma = _inputs(mode, 2, 9, 2, 4, 3, torch.float32, seed=1)
        kern = TorchChunkKernels(chunk_size=4)
        ins = [t.clone().requires_grad_() for t in (q, k, v) + ((g,) if g is not None else ())]
        o = lasp2_attention(*ins[:3], g=ins[3] if g is not None else None, g_gamma=g_gamma, kernels=kern)
        grads = torch.autograd.grad(o, ins, do)
        ins2 = [t.clone().requires_grad_() for t in ins]
        o2, _ = chunk_linear_attention(*ins2[:3], g=ins2[3] if g is not None else None, g_gamma=g_gamma,
                                       kernels=kern)
        grads2 = torch.autograd.grad(o2, ins2, do)
        assert torch.equal(o, o2), mode
        for a, b in zip(grads, grads2):
            assert torch.equal(a, b), mode


class _ReplicatedToShard(torch.autograd.Function):
    """Take this rank's contiguous slice of a replicated tensor; the backward gathers every
    rank's slice gradient back into the full (replicated) gradient."""

    @staticmethod
    def forward(ctx, x):
        return shard(x)

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, grad.contiguous())
        return torch.cat(parts, dim=1)


class _ShardToReplicated(torch.autograd.Function):
    """Gather shards into the replicated tensor; every rank holds the same upstream gradient,
    so the backward keeps this rank's slice (no sum over ranks)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return shard(grad.contiguous())


def _gradcheck_global(modes):
    """gradcheck of the replicated map (global q, k, v, g) -> global o, through LASP-2.

    Every rank perturbs the same global element at the same time, so the numerical
    Jacobian is the global one; the analytical one runs LASP-2's backward (all-gather of
    dS, suffix scan, cross-rank dg) on every rank.
    """
    out = {}
    for mode in modes:
        world = dist.get_world_size()
        q, k, v, _, g, g_gamma = _inputs(mode, 1, 3 * world, 2, 2, 2, torch.float64, seed=7)
        inputs = (q, k, v) + ((g,) if g is not None else ())

        def fn(*xs, g_gamma=g_gamma):
            local = [_ReplicatedToShard.apply(x) for x in xs]
            o = lasp2_attention(local[0], local[1], local[2], g=local[3] if len(local) > 3 else None,
                                g_gamma=g_gamma, kernels=TorchChunkKernels(chunk_size=2))
            return _ShardToReplicated.apply(o)

        out[mode] = torch.autograd.gradcheck(fn, [x.clone().requires_grad_() for x in inputs], eps=1e-6,
                                             atol=1e-7, rtol=1e-5)
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_gradcheck_float64(dist_pool, world):
    for rank_result in dist_pool(world).run(_gradcheck_global, ["none", "gamma", "g"]):
        assert rank_result == {"none": True, "gamma": True, "g": True}


def test_rank_scan_equals_sequential_operator_fold():
    """The closed-form scans equal folding (Ga, Sa) o (Gb, Sb) = (Ga Gb, Gb Sa + Sb) rank by rank."""
    gen = torch.Generator().manual_seed(3)
    world, B, H, D = 5, 2, 3, 4
    log_gammas = -torch.rand(world, B, H, generator=gen, dtype=torch.float64)
    states = torch.randn(world, B, H, D, D, generator=gen, dtype=torch.float64)
    for rank in range(world):
        s_in = torch.zeros(B, H, D, D, dtype=torch.float64)
        for j in range(rank):  # (Gamma, S_in) o (Gamma_j, S_j)
            s_in = torch.exp(log_gammas[j])[..., None, None] * s_in + states[j]
        torch.testing.assert_close(rank_scan(states, log_gammas, rank, reverse=False), s_in, rtol=0, atol=1e-12)
        d_out = torch.zeros(B, H, D, D, dtype=torch.float64)
        for j in reversed(range(rank + 1, world)):  # dS_out(j-1) = D_j + Gamma_j dS_out(j)
            d_out = states[j] + torch.exp(log_gammas[j])[..., None, None] * d_out
        torch.testing.assert_close(rank_scan(states, log_gammas, rank, reverse=True), d_out, rtol=0, atol=1e-12)


def test_cross_rank_dg_term_matches_derivation():
    """docs/lasp2.md: dg on rank r = dg of the zero-initial-state kernel with final-state gradient
    dS_out + reverse cumsum of <o_inter_t, do_t> + Gamma_r <dS_out, S_in> at every position.

    Checked in one process on a sequence split in two, rank r = 1, against autograd.
    """
    q, k, v, do, g, _ = _inputs("g", 2, 12, 2, 3, 3, torch.float64, seed=5)
    g = g.requires_grad_()
    o_ref, _ = linear_attention_naive(q, k, v, g=g)
    (dg_ref,) = torch.autograd.grad(o_ref, [g], do)
    half = slice(0, 6), slice(6, 12)
    _, s_in = linear_attention_naive(q[:, half[0]], k[:, half[0]], v[:, half[0]], g=g[:, half[0]].detach())
    qr, kr, vr, dor = (x[:, half[1]] for x in (q, k, v, do))
    gr = g[:, half[1]].detach()
    # dS_out of rank 0 is the gradient w.r.t. its final state = D_1 + Gamma_1 dS_out(1), dS_out(1) = 0 here;
    # test the general rule on rank 1 with a made-up dS_out too (as if a rank 2 followed).
    ds_out = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    gl = gr.clone().requires_grad_()
    o_loc, s_loc = linear_attention_naive(qr, kr, vr, g=gl)
    (dg_local,) = torch.autograd.grad((o_loc * dor).sum() + (s_loc * ds_out).sum(), [gl])
    G = torch.cumsum(gr, 1)
    scale = 3**-0.5
    o_inter = scale * torch.exp(G)[..., None] * torch.einsum("bshk,bhkv->bshv", qr, s_in)
    a = (o_inter * dor).sum(-1)
    cross = torch.exp(G[:, -1]) * (ds_out * s_in).sum((-2, -1))  # Gamma_r <dS_out, S_in>, [B, H]
    dg_formula = dg_local + a.flip(1).cumsum(1).flip(1) + cross[:, None, :]
    # Reference with the same made-up dS_out: full sequence, loss + <dS_out, final state>.
    gg = g.detach().clone().requires_grad_()
    o_full, s_full = linear_attention_naive(q, k, v, g=gg)
    (dg_full,) = torch.autograd.grad((o_full * do).sum() + (s_full * ds_out).sum(), [gg])
    torch.testing.assert_close(dg_formula, dg_full[:, half[1]], rtol=0, atol=1e-10)
    assert dg_ref.shape == g.shape


BAD_INPUTS = {
    "q 3-D": {"q": (2, 8, 4)},
    "k shape": {"k": (2, 8, 2, 5)},
    "v seq": {"v": (2, 7, 2, 3)},
    "dtype mix": {"k_dtype": torch.float64},
    "g shape": {"g": (2, 8)},
    "g dtype": {"g_dtype": torch.bfloat16},
    "g sign": {"g_positive": True},
    "g_gamma shape": {"g_gamma": (3,)},
    "g_gamma sign": {"g_gamma_positive": True},
    "g and g_gamma": {"both": True},
    "non-causal with decay": {"causal": False, "decay": "g"},
    "scale": {"scale": -1.0},
    "layout": {"layout": "striped"},
    "zigzag odd shard": {"layout": "zigzag", "q": (2, 7, 2, 4), "k": (2, 7, 2, 4), "v": (2, 7, 2, 3)},
    "backend": {"kernels": "fla"},
    "unknown backend": {"kernels": "nope"},
}


def _bad_call(spec):
    B, S, H, K, V = 2, 8, 2, 4, 3
    q = torch.randn(*spec.get("q", (B, S, H, K)))
    k = torch.randn(*spec.get("k", (B, S, H, K)), dtype=spec.get("k_dtype", torch.float32))
    v = torch.randn(*spec.get("v", (B, S, H, V)))
    g = g_gamma = None
    if "g" in spec or "g_dtype" in spec or spec.get("g_positive") or spec.get("both") or spec.get("decay") == "g":
        g = -torch.rand(*spec.get("g", (B, S, H)), dtype=spec.get("g_dtype", torch.float32))
        if spec.get("g_positive"):
            g[0, 3, 1] = 0.5
    if "g_gamma" in spec or spec.get("g_gamma_positive") or spec.get("both"):
        g_gamma = -torch.rand(*spec.get("g_gamma", (H,)))
        if spec.get("g_gamma_positive"):
            g_gamma[0] = 0.1
    return lasp2_attention(q, k, v, g=g, g_gamma=g_gamma, causal=spec.get("causal", True),
                           scale=spec.get("scale"), layout=spec.get("layout", "contiguous"),
                           kernels=spec.get("kernels", TorchChunkKernels(chunk_size=4)))


def _error_cases(bad):
    messages = {}
    for name, spec in bad.items():
        try:
            _bad_call(spec)
        except ValueError as e:
            messages[name] = str(e)
        else:
            messages[name] = None
    # No rank may have entered a collective above: a valid call must still line up.
    q = torch.ones(1, 4, 1, 2)
    o = lasp2_attention(q, q, q, kernels=TorchChunkKernels(chunk_size=2))
    return messages, o.sum().item()


def test_bad_input_raises_on_every_rank_before_any_collective(dist_pool):
    results = dist_pool(2).run(_error_cases, BAD_INPUTS)
    expected_words = {
        "q 3-D": "q must be", "k shape": "k.shape", "v seq": "v.shape", "dtype mix": "dtype",
        "g shape": "g must have shape", "g dtype": "g.dtype", "g sign": "<= 0", "g_gamma shape": "g_gamma must have",
        "g_gamma sign": "<= 0", "g and g_gamma": "at most one", "non-causal with decay": "causal=False",
        "scale": "scale", "backend": "CUDA", "unknown backend": "backend must be",
        "layout": "layout must be", "zigzag odd shard": "even local sequence",
    }
    for rank, (messages, total) in enumerate(results):
        for name, words in expected_words.items():
            assert messages[name] is not None, f"rank {rank}: {name} did not raise"
            assert words in messages[name], f"rank {rank}: {name}: {messages[name]}"
        # q = k = v = 1 (d = 2), 4 tokens per rank: o_t = 2^-0.5 * 2 (t + 1) per element, t global.
        expected = 2**-0.5 * 2 * 2 * sum(t + 1 for t in range(4 * rank, 4 * rank + 4))
        assert total == pytest.approx(expected, rel=1e-6)


def test_benchmark_runs_end_to_end_on_cpu(tmp_path):
    """The GPU benchmark's code paths (check, sweep, hybrid timing, report) at toy sizes on CPU."""
    import json

    from benchmarks.__main__ import main
    from benchmarks.lasp2 import report

    out = tmp_path / "lasp2.json"
    assert main(["lasp2", "--device", "cpu", "--nprocs", "2", "--tiny", "--seqs", "64", "--hybrid-seqs", "64",
                 "--methods", "lasp2,lasp1,ring,local", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    (world,) = res["worlds"]
    assert world["check"] and all(r["pass"] for r in world["check"])
    timed = {r["method"] for r in world["sweep"] if r.get("phase") == "fwd+bwd" and r["ms"] > 0}
    assert timed == {"lasp2", "lasp1", "ring", "local"}
    assert {r["layout"] for r in world["hybrid"]} == {"contiguous", "zigzag"}
    (summary,) = res["summary"]
    assert summary["speedup_vs_ring"] > 0 and summary["fraction_of_compute_limit"] > 0
    text = report(out, tmp_path / "r.md", tmp_path / "img")
    assert "vs LASP-1" in text and (tmp_path / "img" / "lasp2_2x_g.png").exists()


def test_benchmark_watchdog_records_a_hung_step_and_resumes(tmp_path):
    """A rank that blocks inside a step (here on purpose, before LASP-1's first hop, so its
    peer waits in the chain) is ended by its watchdog after the step deadline: both ranks'
    stacks are on file (the hung frame and the peer's wait), the step is recorded as a
    timeout, and a fresh world runs every later step."""
    import json

    from benchmarks.__main__ import main

    out, debug = tmp_path / "hang.json", tmp_path / "debug"
    hung = "check/gamma/torch/lasp1"
    assert main(["lasp2", "--device", "cpu", "--nprocs", "2", "--tiny", "--seqs", "64", "--no-hybrid",
                 "--methods", "lasp2,lasp1", "--step-timeout", "5", "--debug-dir", str(debug),
                 "--partial", str(debug / "partial.jsonl"), "--debug-hang", f"{hung}@1", "--out", str(out)]) == 0
    (world,) = json.loads(out.read_text())["results"]["worlds"]
    assert world["restarts"] == 1 and [f["id"] for f in world["failures"]] == [hung]
    assert world["failures"][0]["status"] == "timeout"
    rows = {r["id"]: r for r in world["check"]}
    assert rows[hung]["pass"] is False and rows[hung]["status"] == "timeout"
    later = [r for r in world["check"] if r["id"] != hung]
    assert len(later) == 20 and all(r["pass"] for r in later)  # 21 paths on CPU, one hung
    assert {r["method"] for r in world["sweep"]} == {"lasp2", "lasp1"} and not world["not_run"]
    assert "_simulated_hang" in (debug / "stacks_w2_rank1.txt").read_text()
    assert "_wait" in (debug / "stacks_w2_rank0.txt").read_text()  # rank 0 waits for rank 1's state
    partial = [json.loads(line) for line in (debug / "partial.jsonl").read_text().splitlines()]
    assert any(r.get("id") == hung and r.get("status") == "timeout" for r in partial)
