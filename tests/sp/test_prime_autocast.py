"""lasp2.prime_kernels, and the sp kernels' dtypes under autocast.

prime_kernels runs the multi-rank code path of a LASP-2 step locally. On GPU its point
is loading every Triton kernel before a collective is in flight; here we check that it
drives the same kernel calls (with the incoming-state fold and the outgoing gradient)
that a rank of a real group does, and no communication at all.

Autocast: the trainer runs under bf16 autocast; the sp kernels choose their own dtypes
(fp32 state chains and accumulations), which autocast used to undo (the 4xH100 LLLS
hang of docs/train.md came from it).
"""

import pytest
import torch

from commflow.sp.lasp2 import prime_kernels
from commflow.sp.linear_kernels import TorchChunkKernels


class _Recording(TorchChunkKernels):
    def __init__(self):
        super().__init__(chunk_size=64)
        self.calls = []

    def states(self, k, v, decay, initial_state, output_final_state, states_in_fp32=False):
        self.calls.append(("states", initial_state is not None, output_final_state))
        return super().states(k, v, decay, initial_state, output_final_state, states_in_fp32)

    def output(self, q, k, v, decay, h, scale, fold=None):
        self.calls.append(("output", fold is not None))
        return super().output(q, k, v, decay, h, scale, fold=fold)

    def grads(self, q, k, v, decay, h, dh, do, scale, fold=None):
        self.calls.append(("grads", fold is not None, decay.mode))
        return super().grads(q, k, v, decay, h, dh, do, scale, fold=fold)


@pytest.mark.parametrize("decay", ["none", "gamma", "g"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_multi_rank_path_without_communication(decay, layout, monkeypatch):
    import commflow.sp.lasp2 as lasp2

    def no_collective(*a, **k):
        raise AssertionError("prime_kernels must not communicate")

    monkeypatch.setattr(lasp2, "all_gather_tensor", no_collective)
    kern = _Recording()
    prime_kernels(batch=2, heads=2, head_dim=16, world=4, dtype=torch.float32, device="cpu", decay=decay,
                  layout=layout, kernels=kern)
    assert ("states", False, True) in kern.calls  # forward: local states, final state out
    assert ("output", True) in kern.calls  # S_in folded into the output kernel
    assert ("states", True, False) in kern.calls  # backward: states recomputed from S_in
    assert ("grads", True, decay) in kern.calls  # dS_out folded into the gradients


def test_one_rank_path():
    kern = _Recording()
    prime_kernels(batch=1, heads=2, head_dim=16, world=1, dtype=torch.float32, device="cpu", decay="g", kernels=kern)
    assert ("output", False) in kern.calls and ("grads", False, "g") in kern.calls
    assert not any(c[0] == "output" and c[1] for c in kern.calls)


@pytest.mark.parametrize("kwargs, rule", [({"decay": "gated"}, "decay"), ({"world": 0}, "world")])
def test_bad_arguments(kwargs, rule):
    args = {"batch": 1, "heads": 2, "head_dim": 16, "world": 2, "dtype": torch.float32, "device": "cpu"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=rule):
        prime_kernels(**args)


class _DtypeRecording(TorchChunkKernels):
    def __init__(self):
        super().__init__(chunk_size=64)
        self.dtypes = []

    def states(self, k, v, decay, initial_state, output_final_state, states_in_fp32=False):
        if initial_state is not None:
            self.dtypes.append(("h0", initial_state.dtype))
        return super().states(k, v, decay, initial_state, output_final_state, states_in_fp32)

    def output(self, q, k, v, decay, h, scale, fold=None):
        if fold is not None:
            self.dtypes.append(("fold", fold.dtype))
        return super().output(q, k, v, decay, h, scale, fold=fold)

    def grads(self, q, k, v, decay, h, dh, do, scale, fold=None):
        if fold is not None:
            self.dtypes.append(("ds_out", fold.dtype))
        return super().grads(q, k, v, decay, h, dh, do, scale, fold=fold)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_state_chain_stays_fp32_under_autocast(layout):
    """Under bf16 autocast (the trainer's) the incoming states and outgoing gradients of
    every rank position stay fp32: the rank scan's einsum used to come back in bf16 on
    every rank but the first, losing precision and giving the ranks different kernels."""
    import commflow.sp.lasp2 as lasp2

    seen = {}
    for rank in range(4):
        kern = _DtypeRecording()
        q, k, v = (torch.randn(1, 256, 2, 16, requires_grad=True) for _ in range(3))
        g = torch.nn.functional.logsigmoid(torch.randn(1, 256, 2)).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = lasp2.lasp2_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), g=g, group=lasp2._LocalWorld(rank, 4),
                                      layout=layout, kernels=kern, check_decay_sign=False)
        o.float().sum().backward()
        seen[rank] = kern.dtypes
        assert kern.dtypes and all(dt == torch.float32 for _, dt in kern.dtypes), (rank, kern.dtypes)
    assert len({tuple(v) for v in seen.values()}) == 1  # every rank position runs the same kernels


def test_torch_kernels_keep_fp32_accumulation_under_autocast():
    """LASP-2 on the torch kernels inside a bf16 autocast region gives what it gives
    outside one (the same bf16 inputs): autocast must not recast its fp32 einsums."""
    import commflow.sp.lasp2 as lasp2

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 16).bfloat16().requires_grad_() for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 256, 2)).requires_grad_()
    grads = []
    for autocast in (False, True):
        for t in (q, k, v, g):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o = lasp2.lasp2_attention(q, k, v, g=g, group=lasp2._LocalWorld(2, 4), kernels="torch",
                                      check_decay_sign=False)
        o.float().sum().backward()
        grads.append((o.detach().clone(), *(t.grad.clone() for t in (q, k, v, g))))
    for plain, cast in zip(*grads):
        assert plain.dtype == cast.dtype
        torch.testing.assert_close(cast, plain, rtol=0, atol=0)


def test_math_softmax_kernel_keeps_fp32_under_autocast():
    from commflow.sp import kernels

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 16).bfloat16() for _ in range(3))
    plain = kernels._math_forward(q, k, v, True, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = kernels._math_forward(q, k, v, True, 0.25)
    for a, b in zip(plain, cast):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
