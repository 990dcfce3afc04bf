"""LASP-2H: a hybrid stack of linear (LASP-2) and softmax (all-gather K/V) layers over one layout.

The distributed stack (residual layers ``x <- x + attn(x Wq, x Wk, x Wv)``, data-dependent
gates ``g = logsigmoid(x wg)`` in the linear layers) must equal the same stack run on the
whole sequence in one process: output, the gradient of the input and of the shared
projection weights, for both layouts.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from commflow.sp import HybridAttention, HybridConfig, hybrid_attention, shard
from commflow.sp.hybrid import load_imbalance, softmax_pairs_per_rank
from commflow.sp.linear_kernels import TorchChunkKernels
from commflow.sp.linear_reference import linear_attention_naive

TOL = 1e-10  # float64 throughout


def _softmax_reference(q, k, v):
    scores = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", p, v)


def _params(n_layers, D, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"wq": torch.randn(D, D, generator=gen, dtype=torch.float64) * D**-0.5,
             "wk": torch.randn(D, D, generator=gen, dtype=torch.float64) * D**-0.5,
             "wv": torch.randn(D, D, generator=gen, dtype=torch.float64) * D**-0.5,
             "wg": torch.randn(D, generator=gen, dtype=torch.float64)} for _ in range(n_layers)]


def _stack(x, params, kinds, attend):
    for p, kind in zip(params, kinds):
        q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
        g = F.logsigmoid(x @ p["wg"] + 2.0) if kind == "linear" else None
        x = x + attend(kind, q, k, v, g)
    return x


def _hybrid_case(layout, kinds):
    world = dist.get_world_size()
    B, S, H, D = 2, 8 * world, 2, 4
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)
    u = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)

    params = [{n: t.clone().requires_grad_() for n, t in p.items()} for p in _params(len(kinds), D, 5)]
    x = x0.clone().requires_grad_()

    def reference(kind, q, k, v, g):
        return linear_attention_naive(q, k, v, g=g)[0] if kind == "linear" else _softmax_reference(q, k, v)

    out_ref = _stack(x, params, kinds, reference)
    gated = [i for i, kind in enumerate(kinds) if kind == "linear"]  # softmax layers use no wg
    leaves = [x] + [p["wq"] for p in params] + [params[i]["wg"] for i in gated]
    ref_grads = torch.autograd.grad((out_ref * u).sum(), leaves)

    cfg = HybridConfig(layers=kinds, layout=layout)
    layers = iter([HybridAttention(cfg, i) for i in range(len(kinds))])
    kern = TorchChunkKernels(chunk_size=4)  # 8-token shards, several chunks per shard

    def distributed(kind, q, k, v, g):
        layer = next(layers)
        assert layer.kind == kind
        if kind == "linear":
            return hybrid_attention(kind, q, k, v, g=g, layout=layout, kernels=kern)
        return layer(q, k, v)

    params_d = [{n: t.detach().clone().requires_grad_() for n, t in p.items()} for p in params]
    x_local = shard(x0, layout=layout).requires_grad_()
    out = _stack(x_local, params_d, kinds, distributed)
    leaves_d = [x_local] + [p["wq"] for p in params_d] + [params_d[i]["wg"] for i in gated]
    grads = list(torch.autograd.grad((out * shard(u, layout=layout)).sum(), leaves_d))
    for g in grads[1:]:  # replicated weights: the loss is the sum over ranks
        dist.all_reduce(g)

    def err(mine, ref):
        return ((mine - ref).abs().max() / ref.abs().max()).item()

    errors = {"out": err(out, shard(out_ref.detach(), layout=layout)),
              "dx": err(grads[0], shard(ref_grads[0], layout=layout))}
    errors.update({f"dparam{i}": err(a, b) for i, (a, b) in enumerate(zip(grads[1:], ref_grads[1:]))})
    return errors


@pytest.mark.parametrize("world", [1, 2, 4])
def test_hybrid_stack_matches_single_process(dist_pool, world):
    kinds = ("linear", "softmax", "linear")
    for layout in ("zigzag", "contiguous"):
        for rank, errors in enumerate(dist_pool(world).run(_hybrid_case, layout, kinds)):
            for name, e in errors.items():
                assert e < TOL, f"{layout} rank {rank}: {name} error {e:.3g}"


def test_interleaved_config():
    cfg = HybridConfig.interleaved(8, softmax_every=4)
    assert cfg.layers == ("linear",) * 3 + ("softmax",) + ("linear",) * 3 + ("softmax",)
    assert cfg.layout == "zigzag"
    torch.testing.assert_close(cfg.positions(16, 1, 2), torch.tensor([4, 5, 6, 7, 8, 9, 10, 11]))


def test_softmax_work_per_rank():
    """Causal pairs per rank: the contiguous imbalance the zigzag layout removes."""
    S, W = 64, 4
    n = S // W
    contiguous = softmax_pairs_per_rank(S, W, "contiguous")
    assert contiguous == [sum(p + 1 for p in range(r * n, (r + 1) * n)) for r in range(W)]
    assert sum(contiguous) == S * (S + 1) // 2
    # Rank r scores n^2 r + n(n+1)/2 pairs; the last one (2W-1)/W of the mean as n grows.
    assert load_imbalance(contiguous) == pytest.approx((n * n * (W - 1) + n * (n + 1) / 2) / (S * (S + 1) / 2 / W))
    zigzag = softmax_pairs_per_rank(S, W, "zigzag")
    assert len(set(zigzag)) == 1 and sum(zigzag) == S * (S + 1) // 2
    assert load_imbalance(zigzag) == 1.0
    big = softmax_pairs_per_rank(2**20, 8, "contiguous")
    assert load_imbalance(big) == pytest.approx(2 - 1 / 8, rel=1e-4)


def _error_cases():
    messages = {}
    q = torch.randn(1, 6, 2, 4)
    g = -torch.rand(1, 6, 2)
    calls = {
        "kind": lambda: hybrid_attention("mamba", q, q, q),
        "softmax with decay": lambda: hybrid_attention("softmax", q, q, q, g=g),
        "config kind": lambda: HybridConfig(layers=("linear", "rnn")),
        "config layout": lambda: HybridConfig(layers=("linear",), layout="striped"),
        "interleaved": lambda: HybridConfig.interleaved(4, softmax_every=0),
        "layer index": lambda: HybridAttention(HybridConfig(layers=("linear",)), 3),
        "zigzag odd linear": lambda: hybrid_attention("linear", q[:, :5], q[:, :5], q[:, :5], layout="zigzag"),
        "zigzag odd softmax": lambda: hybrid_attention("softmax", q[:, :5], q[:, :5], q[:, :5], layout="zigzag"),
    }
    for name, call in calls.items():
        try:
            call()
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    o = hybrid_attention("softmax", q, q, q, layout="zigzag")  # peers must still line up
    return messages, tuple(o.shape)


def test_bad_input_raises_on_every_rank(dist_pool):
    words = {"kind": "kind must be", "softmax with decay": "no decay", "config kind": "layers must",
             "config layout": "layout must", "interleaved": "softmax_every", "layer index": "layer must",
             "zigzag odd linear": "even", "zigzag odd softmax": "even"}
    for rank, (messages, shape) in enumerate(dist_pool(2).run(_error_cases)):
        for name, word in words.items():
            assert messages[name] is not None and word in messages[name], f"rank {rank} {name}: {messages[name]}"
        assert shape == (1, 6, 2, 4)
