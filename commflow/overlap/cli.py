"""``commflow overlap``: explain a plan, measure the calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Tensor-parallel GEMM + collective overlap: plans and calibration.", no_args_is_help=True)


@app.command("plan")
def plan_cmd(
    op: str = typer.Argument(..., help="matmul_reduce_scatter | all_gather_matmul | matmul_all_reduce"),
    m: int = typer.Argument(..., help="rows (tokens in the TP group; after the gather for all_gather_matmul)"),
    n: int = typer.Argument(..., help="columns of the local weight"),
    k: int = typer.Argument(..., help="local reduction dim (x.shape[-1])"),
    world_size: int = typer.Option(4, help="tensor-parallel group size"),
    device: str = typer.Option("cuda", help="whose calibration: cuda | cpu"),
    calibration: Annotated[Path | None, typer.Option(help="a calibration JSON (default: saved, else defaults)")] = None,
    mode: str = typer.Option("auto", help="auto | overlap | sequential"),
    reduction: str = typer.Option("fp32", help="fp32 | backend"),
    transport: str = typer.Option("", help="symm | nccl (default: symm for a CUDA calibration with fp32)"),
) -> None:
    """Say whether the op would overlap at this shape, with predicted times and the reason."""
    import torch

    from .calibration import calibration_path, default_calibration, load_calibration
    from .plan import plan

    if calibration is not None:
        cal = load_calibration(calibration)
    else:
        name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else device
        path = calibration_path(name, world_size)
        cal = load_calibration(path) if path.exists() else default_calibration(device, world_size)
    typer.echo(plan(op, m, n, k, world_size=world_size, calibration=cal, mode=mode, reduction=reduction,
                    transport=transport or None).explain())


def _calibrate_worker(device: str, dtype: str) -> dict:
    import torch

    from .calibration import calibrate, calibration_path

    cal = calibrate(device=device if device == "cpu" else None, dtype=getattr(torch, dtype))
    return {"calibration": cal.to_json(), "path": str(calibration_path(cal.device, cal.world_size))}


@app.command("calibrate")
def calibrate_cmd(
    nproc: int = typer.Option(2, help="ranks to measure on (one per GPU)"),
    device: str = typer.Option("cuda", help="cuda | cpu"),
    dtype: str = typer.Option("bfloat16", help="element type of the GEMMs and collectives"),
) -> None:
    """Measure GEMM rate, collective latency/bandwidth, contention; save for the plan."""
    import json
    import os

    from commflow.dist import spawn

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

    out = spawn(_spawned, nproc, device, dtype, backend=None, init=False)[0]
    cal = out["calibration"]
    typer.echo(json.dumps({k: v for k, v in cal.items() if k != "measurements"}, indent=2))
    typer.echo(f"saved {out['path']}")


def _spawned(device: str, dtype: str) -> dict:
    from commflow.dist import init_distributed

    init_distributed(device=device)
    return _calibrate_worker(device, dtype)
