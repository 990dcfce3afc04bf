"""Bad input gets a ValueError that names the argument and the rule, on every rank, before
any collective (checked by a barrier afterwards: no rank may be left inside one)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from commflow.overlap import all_gather_matmul, get_calibration, matmul_all_reduce, matmul_reduce_scatter
from commflow.overlap import plan as make_plan
from commflow.overlap.calibration import set_calibration

F32 = torch.float32


def _cases():
    x, w = torch.randn(4, 3), torch.randn(3, 5)
    only_rank0 = dist.new_group([0])  # every rank must create it; rank 1 is not a member
    return {
        "scatter not divisible": lambda: matmul_reduce_scatter(torch.randn(3, 3), w),
        "dtype mismatch": lambda: matmul_reduce_scatter(x, w.to(torch.bfloat16)),
        "K mismatch": lambda: matmul_all_reduce(x, torch.randn(4, 5)),
        "scatter_dim = K dim": lambda: matmul_reduce_scatter(x, w, scatter_dim=1),
        "scatter_dim = -1": lambda: matmul_reduce_scatter(x, w, scatter_dim=-1),
        "scatter_dim too large": lambda: matmul_reduce_scatter(torch.randn(2, 4, 3), w, scatter_dim=3),
        "gather_dim out of range": lambda: all_gather_matmul(x, w, gather_dim=2),
        "gather_dim not int": lambda: all_gather_matmul(x, w, gather_dim=0.0),
        "w not a matrix": lambda: matmul_all_reduce(x, torch.randn(3, 5, 1)),
        "x is 1-D": lambda: matmul_all_reduce(torch.randn(3), w),
        "integer dtype": lambda: matmul_all_reduce(x.long(), w.long()),
        "empty": lambda: matmul_all_reduce(torch.randn(0, 3), w),
        "bad mode": lambda: matmul_reduce_scatter(x, w, mode="fast"),
        "bad reduction": lambda: matmul_all_reduce(x, w, reduction="bf16"),
        "n_chunks zero": lambda: matmul_all_reduce(x, w, n_chunks=0),
        "n_chunks too many": lambda: matmul_reduce_scatter(x, w, mode="overlap", n_chunks=6),
        "rows not divisible (fp32 all-reduce)": lambda: matmul_all_reduce(torch.randn(3, 3), w, mode="overlap"),
        # On rank 0 this is a valid world of one; rank 1 is not in the group.
        "group without this rank": lambda: matmul_all_reduce(x, w, group=only_rank0),
    }


def _errors() -> dict[str, str]:
    msgs = {}
    for name, call in _cases().items():
        try:
            call()
            msgs[name] = "no error"
        except ValueError as e:
            msgs[name] = str(e)
    dist.barrier()
    return msgs


EXPECTED = {  # case -> (argument the message starts with, words of the rule)
    "scatter not divisible": ("x:", "divisible by world_size=2"),
    "dtype mismatch": ("w:", "one dtype"),
    "K mismatch": ("w:", "x.shape[-1] == w.shape[0]"),
    "scatter_dim = K dim": ("scatter_dim:", "leading dim"),
    "scatter_dim = -1": ("scatter_dim:", "leading dim"),
    "scatter_dim too large": ("scatter_dim:", "leading dim in [-3, 1]"),
    "gather_dim out of range": ("gather_dim:", "leading dim"),
    "gather_dim not int": ("gather_dim:", "an int"),
    "w not a matrix": ("w:", "matrix"),
    "x is 1-D": ("x:", "at least 2 dims"),
    "integer dtype": ("x:", "not supported"),
    "empty": ("x/w:", "non-empty"),
    "bad mode": ("mode:", "one of"),
    "bad reduction": ("reduction:", "one of"),
    "n_chunks zero": ("n_chunks:", "int >= 1"),
    "n_chunks too many": ("n_chunks:", "n_chunks <= 5"),
    "rows not divisible (fp32 all-reduce)": ("x:", "not divisible by world_size=2"),
}


def test_every_bad_input_raises_before_any_collective(dist_pool):
    results = dist_pool(2).run(_errors)
    for rank, msgs in enumerate(results):
        for case, (arg, rule) in EXPECTED.items():
            assert msgs[case].startswith(arg) and rule in msgs[case], (rank, case, msgs[case])
    assert results[0]["group without this rank"] == "no error"
    assert results[1]["group without this rank"].startswith("group:")
    assert "not a member" in results[1]["group without this rank"]


def _calibration_disagreement() -> str:
    """Ranks that plan from different constants would split paths and hang: refused."""
    cal = get_calibration(torch.device("cpu"), 2)
    if dist.get_rank() == 1:
        from dataclasses import replace

        set_calibration(replace(cal, gemm_tflops=cal.gemm_tflops * 2), device_type="cpu")
    try:
        matmul_all_reduce(torch.randn(6, 7), torch.randn(7, 9))  # a shape no other test uses
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    finally:
        set_calibration(None, device_type="cpu")
    dist.barrier()
    return msg


def test_ranks_with_different_calibrations_are_refused(dist_pool):
    for msg in dist_pool(2).run(_calibration_disagreement):
        assert msg.startswith("calibration:") and "one calibration for the whole group" in msg


def test_plan_argument_errors():
    import pytest

    with pytest.raises(ValueError, match=r"^op: got 'mm'"):
        make_plan("mm", 8, 8, 8, world_size=2)
    with pytest.raises(ValueError, match=r"^m: got 0"):
        make_plan("matmul_reduce_scatter", 0, 8, 8, world_size=2)
    with pytest.raises(ValueError, match=r"^calibration: measured on 2 ranks but world_size=4"):
        make_plan("matmul_reduce_scatter", 8, 8, 8, world_size=4, calibration=get_calibration(torch.device("cpu"), 2))
