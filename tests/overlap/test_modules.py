"""ColumnParallelLinear / RowParallelLinear equal one nn.Linear MLP, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from commflow.overlap import ColumnParallelLinear, RowParallelLinear

TOL = {"float32": 1e-5, "bfloat16": 3e-2}
"""Max |error| / max |reference| against the fp32 single-process MLP: fp32 layers, and
bf16 layers (bf16 weights, activations and partials, two GEMMs and a GELU deep)."""


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _mlp_errors(dtype_name: str = "float32") -> dict[str, float]:
    """Column -> gelu -> Row, with and without sequence parallelism, every overlap mode."""
    dtype = getattr(torch, dtype_name)
    r, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same full layers and data on every rank
    fc1, fc2 = nn.Linear(6, 4 * world), nn.Linear(4 * world, 5)
    batch, seq = 2, 3 * world
    x_full = torch.randn(batch, seq, 6)
    dy_full = torch.randn(batch, seq, 5)

    xr = x_full.clone().requires_grad_(True)
    fc2(torch.nn.functional.gelu(fc1(xr))).backward(dy_full)
    errors: dict[str, float] = {}
    for sp in (False, True):
        for mode, chunks in (("sequential", None), ("overlap", 2), ("auto", None)):
            col = ColumnParallelLinear.from_linear(fc1, sequence_parallel=sp, overlap=mode, n_chunks=chunks).to(dtype)
            row = RowParallelLinear.from_linear(fc2, sequence_parallel=sp, overlap=mode, n_chunks=chunks).to(dtype)
            x = (x_full.chunk(world, 1)[r] if sp else x_full).detach().clone().to(dtype).requires_grad_(True)
            y = row(torch.nn.functional.gelu(col(x)))
            y.backward((dy_full.chunk(world, 1)[r] if sp else dy_full).to(dtype))
            key = f"sp={sp} mode={mode}"
            y_ref = fc2(torch.nn.functional.gelu(fc1(x_full))).detach()
            errors[key + " y"] = _rel(y, y_ref.chunk(world, 1)[r] if sp else y_ref)
            errors[key + " dx"] = _rel(x.grad, xr.grad.chunk(world, 1)[r] if sp else xr.grad)
            errors[key + " col.w"] = _rel(col.weight.grad, fc1.weight.grad.chunk(world, 0)[r])
            errors[key + " col.b"] = _rel(col.bias.grad, fc1.bias.grad.chunk(world, 0)[r])
            errors[key + " row.w"] = _rel(row.weight.grad, fc2.weight.grad.chunk(world, 1)[r])
            errors[key + " row.b"] = _rel(row.bias.grad, fc2.bias.grad)

    if dtype != torch.float32:
        return errors
    # Megatron's other pair: a column layer that gathers its output, a row layer that
    # splits its replicated input.
    col = ColumnParallelLinear.from_linear(fc1, gather_output=True, overlap="overlap")
    row = RowParallelLinear.from_linear(fc2, input_is_parallel=False, overlap="overlap")
    x = x_full.clone().requires_grad_(True)
    h = col(x)
    errors["gather_output h"] = _rel(h, fc1(x_full).detach())
    row(torch.nn.functional.gelu(h)).backward(dy_full)
    errors["gather_output dx"] = _rel(x.grad, xr.grad)
    errors["gather_output col.w"] = _rel(col.weight.grad, fc1.weight.grad.chunk(world, 0)[r])
    errors["gather_output row.w"] = _rel(row.weight.grad, fc2.weight.grad.chunk(world, 1)[r])
    return errors


@pytest.mark.parametrize("world", [1, 2, 4])
def test_parallel_mlp_equals_nn_linear(dist_pool, world):
    for errors in dist_pool(world).run(_mlp_errors):
        worst = {k: v for k, v in errors.items() if v > TOL["float32"]}
        assert not worst, worst


def test_parallel_mlp_bf16(dist_pool):
    for errors in dist_pool(2).run(_mlp_errors, "bfloat16"):
        worst = {k: v for k, v in errors.items() if v > TOL["bfloat16"]}
        assert not worst, worst


def _layer_errors() -> list[str]:
    msgs = []
    for make in (
        lambda: ColumnParallelLinear(4, 3),  # 3 output features over 2 ranks
        lambda: RowParallelLinear(3, 4),
        lambda: ColumnParallelLinear(4, 4, sequence_parallel=True, gather_output=True),
        lambda: RowParallelLinear(4, 4, sequence_parallel=True, input_is_parallel=False),
        lambda: ColumnParallelLinear(4, 4, overlap="sometimes"),
        lambda: RowParallelLinear(4, 4, reduction="bf16"),
    ):
        try:
            make()
            msgs.append("no error")
        except ValueError as e:
            msgs.append(str(e))
    row = RowParallelLinear(4, 4, sequence_parallel=True, sequence_dim=1)
    try:
        row(torch.randn(2, 3, 2))  # 3 tokens cannot be scattered over 2 ranks
        msgs.append("no error")
    except ValueError as e:
        msgs.append(str(e))
    dist.barrier()  # nobody is stuck in a collective
    return msgs


def test_layer_errors_name_argument_and_rule(dist_pool):
    for msgs in dist_pool(2).run(_layer_errors):
        assert msgs[0].startswith("out_features: 3") and "divisible" in msgs[0]
        assert msgs[1].startswith("in_features: 3") and "divisible" in msgs[1]
        assert msgs[2].startswith("gather_output") and "rule" in msgs[2]
        assert msgs[3].startswith("input_is_parallel") and "rule" in msgs[3]
        assert msgs[4].startswith("overlap: got 'sometimes'")
        assert msgs[5].startswith("reduction: got 'bf16'")
        assert msgs[6].startswith("x: size 3 of scatter_dim=1") and "divisible" in msgs[6]
