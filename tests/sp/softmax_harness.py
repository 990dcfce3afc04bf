"""Shared cases for the softmax SP strategies (Ulysses, ring, all-gather).

Functions here run on the ranks of a ``dist_pool`` (module-level, so they pickle).
Every rank builds the same global tensors from a seed, takes its shard, runs the
strategy forward and backward, and compares the output and the gradients of its
shard with the naive single-process reference (:mod:`commflow.sp.reference`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

import commflow.sp
from commflow.sp import shard
from commflow.sp.kernels import local_attention
from commflow.sp.reference import attention_reference


def strategy_fn(name: str):
    """``"ulysses"`` -> ``commflow.sp.ulysses_attention`` (looked up when used)."""
    return getattr(commflow.sp, f"{name}_attention")

# Named tolerances on max|got - reference| / max|reference| of the output and of dq,
# dk, dv (this rank's shard). fp64 shows the algebra is exact; fp32 is the kernels'
# rounding. With bf16 the fused kernels return every block's output and gradients
# rounded to 8 mantissa bits (one ulp is 2**-8 = 3.9e-3 of the leading binade); the
# strategies sum those blocks in fp32 and round once more, so a shard's gradient
# carries up to ~W + 1 roundings: 2e-2 allows 5 ulp.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2}


@dataclass(frozen=True)
class Case:
    causal: bool
    layout: str = "contiguous"
    hq: int = 4
    hkv: int = 4
    batch: int = 1
    dtype: str = "float32"
    seq_per_rank: int = 8
    head_dim: int = 8
    extra: tuple = ()  # extra keyword arguments as (name, value) pairs

    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]


def global_inputs(case: Case, world: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    s = case.seq_per_rank * world
    shapes = {
        "q": (case.batch, s, case.hq, case.head_dim),
        "k": (case.batch, s, case.hkv, case.head_dim),
        "v": (case.batch, s, case.hkv, case.head_dim),
        "dout": (case.batch, s, case.hq, case.head_dim),
    }
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in shapes.items()}


def run_case(strategy: str, case: Case, seed: int = 0, device: str = "cpu") -> dict:
    """On every rank: errors of this rank's shard (output, dq, dk, dv) vs the reference."""
    world = dist.get_world_size()
    g = {n: t.to(device) for n, t in global_inputs(case, world, seed).items()}
    q, k, v = (g[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
    ref = attention_reference(q, k, v, causal=case.causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g["dout"])
    local = [shard(g[n], layout=case.layout).requires_grad_(True) for n in ("q", "k", "v")]
    out = strategy_fn(strategy)(*local, causal=case.causal, layout=case.layout, **dict(case.extra))
    out.backward(shard(g["dout"], layout=case.layout))
    expected = [ref.detach(), *ref_grads]
    got = [out.detach(), *(t.grad for t in local)]
    errors = {}
    for name, e, x in zip(("out", "dq", "dk", "dv"), got, expected):
        x = shard(x, layout=case.layout).double()
        errors[name] = ((e.double() - x).abs().max() / x.abs().max()).item()
    errors["dtypes_ok"] = all(t.dtype == getattr(torch, case.dtype) for t in got)
    errors["shapes_ok"] = out.shape == local[0].shape and all(t.grad.shape == t.shape for t in local)
    return errors


def run_cases(strategy: str, cases: list[Case]) -> list[dict]:
    return [run_case(strategy, case) for case in cases]


def world_one_is_the_local_kernel(strategy: str, cases: list[Case]) -> list[bool]:
    """Group size 1: the strategy is the single-process kernel, bit for bit (fwd and grads)."""
    results = []
    for case in cases:
        g = global_inputs(case, 1)
        a = [g[n].clone().requires_grad_(True) for n in ("q", "k", "v")]
        b = [g[n].clone().requires_grad_(True) for n in ("q", "k", "v")]
        out_a = strategy_fn(strategy)(*a, causal=case.causal, layout=case.layout)
        out_b = local_attention(*b, causal=case.causal)
        out_a.backward(g["dout"])
        out_b.backward(g["dout"])
        results.append(torch.equal(out_a, out_b) and all(torch.equal(x.grad, y.grad) for x, y in zip(a, b)))
    return results


def check_matches_reference(pool, strategy: str, cases: list[Case]) -> None:
    """The body of each strategy's gloo test: every rank's errors within the case's tolerance,
    dtypes and shapes kept."""
    per_rank = pool.run(run_cases, strategy, cases)
    for rank, results in enumerate(per_rank):
        for case, err in zip(cases, results):
            worst = max(err["out"], err["dq"], err["dk"], err["dv"])
            assert worst <= case.tolerance(), (rank, case, err)
            assert err["dtypes_ok"] and err["shapes_ok"], (rank, case, err)


def check_world_one(pool, strategy: str) -> None:
    """On a group of one (``pool`` of world 1): bitwise the local kernel, and fp64 exact."""
    layouts = ("contiguous", "zigzag")
    cases = [Case(causal=c, layout=lay, hq=4, hkv=2, batch=2) for c in (False, True) for lay in layouts]
    cases += [Case(causal=True, hq=4, hkv=1, dtype="bfloat16")]
    (bitwise,) = pool.run(world_one_is_the_local_kernel, strategy, cases)
    assert all(bitwise)
    (errors,) = pool.run(run_cases, strategy, [Case(causal=True, hq=4, hkv=2, dtype="float64")])
    assert max(errors[0][n] for n in ("out", "dq", "dk", "dv")) <= 1e-12


# Bad inputs that every strategy refuses (scenario of :func:`error_messages`, regex of the
# message); a strategy adds its own before the opt-in uneven-shards check.
COMMON_BAD_INPUTS = [
    ("not_4d", "q must be 4-D"),
    ("dtype", "must share one dtype"),
    ("device", "must be on one device"),
    ("kv_shape", "k and v must have the same shape"),
    ("seq", "same batch and local sequence length"),
    ("gqa", r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
    ("zigzag_odd", r"divisible by 2 x group size \(4\)"),
    ("layout", "layout must be one of"),
]
UNEVEN_SHARDS = ("uneven_shards", "ranks hold shards of different shapes")


def bad_input_cases(*own: tuple[str, str]) -> list[tuple[str, str]]:
    """``(scenario, expected)`` pairs: the common ones, the strategy's ``own``, uneven shards."""
    return [*COMMON_BAD_INPUTS, *own, UNEVEN_SHARDS]


def check_bad_input(pool, strategy: str, scenario: str, expected: str, prefix: str) -> None:
    """Every rank raises a ValueError matching ``expected`` that starts with ``prefix``."""
    for message in pool.run(error_messages, strategy, scenario):
        assert re.search(expected, message), message
        assert message.startswith(prefix), message


def error_messages(strategy: str, scenario: str) -> str:
    """Run one bad call on every rank; return the ValueError text (or a marker if none)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    fn = strategy_fn(strategy)
    q = torch.randn(1, 4, 4, 8)
    k = torch.randn(1, 4, 2, 8)
    v = torch.randn(1, 4, 2, 8)
    kwargs: dict = {}
    if scenario == "not_4d":
        q = q[0]
    elif scenario == "dtype":
        k = k.double()
    elif scenario == "device":
        k = k.to("meta")
    elif scenario == "kv_shape":
        v = torch.randn(1, 4, 1, 8)
    elif scenario == "seq":
        k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    elif scenario == "gqa":
        k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)
    elif scenario == "zigzag_odd":
        q, k, v = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
        kwargs["layout"] = "zigzag"
    elif scenario == "layout":
        kwargs["layout"] = "striped"
    elif scenario == "heads_per_rank":
        q = torch.randn(1, 4, 3 * world - 1, 8)  # not divisible by the group size
        k = v = torch.randn(1, 4, 1, 8)
    elif scenario == "head_chunks":
        kwargs["head_chunks"] = 3
    elif scenario == "uneven_shards":
        os.environ["COMMFLOW_SP_CHECK_SHARDS"] = "1"
        n = 4 + 2 * rank
        q, k, v = torch.randn(1, n, 4, 8), torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8)
    else:
        raise AssertionError(scenario)
    try:
        fn(q, k, v, **kwargs)
    except ValueError as e:
        return str(e)
    finally:
        os.environ.pop("COMMFLOW_SP_CHECK_SHARDS", None)
    return "<no error>"


def gpu_cases(strategy: str) -> list[Case]:
    """bf16 cases on GPUs: both masks and layouts, MHA and GQA, batch 1 and 2; for the
    pipelined strategies also two head chunks (at 4 ranks, 8 heads: one head per chunk)."""
    cases = []
    for causal in (False, True):
        for layout in ("contiguous", "zigzag"):
            for hkv, batch in ((8, 1), (2, 2)):
                cases.append(Case(causal=causal, layout=layout, hq=8, hkv=hkv, batch=batch, dtype="bfloat16",
                                  seq_per_rank=256, head_dim=64))
            if strategy in ("ulysses", "allgather"):
                cases.append(Case(causal=causal, layout=layout, hq=8, hkv=8, dtype="bfloat16", seq_per_rank=256,
                                  head_dim=64, extra=(("head_chunks", 2),)))
    return cases


def gpu_worker(strategy: str, backends: list[str], cases: list[Case]) -> dict[str, tuple[str, list[dict]]]:
    """Under ``spawn(..., backend="nccl")``: run ``cases`` with SDPA limited to each of ``backends``.

    Returns, per backend, the kernel ours picked for a representative block (the
    test skips a backend this GPU does not offer) and the per-case errors.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from commflow.sp.kernels import select_backend

    device = f"cuda:{torch.cuda.current_device()}"
    results = {}
    for backend in backends:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            probe = torch.randn(1, 256, 8, 64, device=device, dtype=torch.bfloat16)
            chosen = select_backend(probe, probe, probe, causal=True, scale=0.125)
            results[backend] = (chosen, [run_case(strategy, case, device=device) for case in cases])
    return results


GPU_BACKENDS = {"FLASH_ATTENTION": "flash", "CUDNN_ATTENTION": "cudnn"}


def check_gpu_strategy(strategy: str) -> None:
    """The body of each strategy's GPU test: one NCCL spawn on 2-4 GPUs, both fused kernels."""
    import pytest

    from commflow.dist import spawn

    world = min(4, torch.cuda.device_count())
    if world < 2:
        pytest.skip("needs 2 GPUs")
    cases = gpu_cases(strategy)
    per_rank = spawn(gpu_worker, world, strategy, list(GPU_BACKENDS), cases, backend="nccl", timeout_s=600)
    ran = []
    for backend, kernel in GPU_BACKENDS.items():
        if per_rank[0][backend][0] != kernel:
            continue  # this GPU / torch does not offer that kernel here
        ran.append(kernel)
        for rank, by_backend in enumerate(per_rank):
            for case, err in zip(cases, by_backend[backend][1]):
                assert max(err["out"], err["dq"], err["dk"], err["dv"]) <= case.tolerance(), (backend, rank, case, err)
    if not ran:
        pytest.skip("neither flash nor cuDNN attention is available here")


def second_backward_message(strategy: str) -> str:
    """Backward twice over one forward (``retain_graph=True``); the second's error text."""
    case = Case(causal=True, hq=4, hkv=4)
    g = global_inputs(case, dist.get_world_size())
    local = [shard(g[n]).requires_grad_(True) for n in ("q", "k", "v")]
    out = strategy_fn(strategy)(*local, causal=True)
    out.backward(shard(g["dout"]), retain_graph=True)
    try:
        out.backward(shard(g["dout"]))
    except RuntimeError as e:
        return str(e)
    return "<no error>"
