"""``commflow launch`` and ``commflow monitor report``.

::

    commflow launch --nproc-per-node 4 --out /tmp/run --resume-arg=--resume \\
        --inject "crash:rank=3,at=25" --inject "hang:rank=1,at=45" -- \\
        python -m commflow.monitor.demo --steps 60 --ckpt-every 10 --out /tmp/run
    commflow monitor report /tmp/run            # or /tmp/run/incidents.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .coordinator import ProbeConfig
from .detect import DetectConfig
from .inject import parse_fault

app = typer.Typer(help="Collective-communication health: incident reports (see also `commflow launch`).",
                  no_args_is_help=True, add_completion=False)


def launch(
    ctx: typer.Context,
    nproc_per_node: Annotated[int, typer.Option("--nproc-per-node", help="workers per node (one per GPU)")],
    nnodes: Annotated[str, typer.Option("--nnodes", help="nodes: N, or MIN:MAX (start MAX, shrink to MIN)")] = "1",
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", help="host:port of the c10d rendezvous")] = None,
    out: Annotated[Path, typer.Option("--out", help="incidents.jsonl, injected.jsonl, logs/")] = Path("commflow_out"),
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir", help="default: OUT/checkpoints")] = None,
    resume_arg: Annotated[str | None, typer.Option("--resume-arg", help="appended to the command on restarts")] = None,
    inject: Annotated[list[str] | None, typer.Option("--inject", help='fault spec, e.g. "hang:rank=1,at=30" (repeatable)')] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed for faults left unspecified and jitter")] = 0,
    max_incidents: Annotated[int, typer.Option("--max-incidents")] = 8,
    min_world: Annotated[int, typer.Option("--min-world", help="give up below this many workers")] = 1,
    world_multiple: Annotated[int, typer.Option("--world-multiple", help="keep the world a multiple of this (sp/tp degree)")] = 1,
    monitor_port: Annotated[int, typer.Option("--monitor-port", help="coordinator port (0: any)")] = 0,
    prometheus_port: Annotated[int | None, typer.Option("--prometheus-port", help="serve Prometheus metrics here")] = None,
    min_hang_s: Annotated[float, typer.Option("--min-hang-s", help="hang deadline floor")] = DetectConfig.min_hang_s,
    startup_hang_s: Annotated[float, typer.Option("--startup-hang-s")] = DetectConfig.startup_hang_s,
    probe_mib: Annotated[float, typer.Option("--probe-mib", help="probe message size per edge")] = 0.25,
    quiet_workers: Annotated[bool, typer.Option("--quiet-workers", help="worker output only in OUT/logs")] = False,
) -> None:
    """Run ``-- CMD ...`` on torch elastic with the monitor on; isolate culprits and restart."""
    from .multinode import parse_nnodes
    from .supervisor import SupervisorConfig
    from .supervisor import launch as run_launch

    inject = list(inject or [])
    cmd = list(ctx.args)
    if not cmd:
        raise typer.BadParameter("give the worker command after '--', e.g. -- python train.py", param_hint="CMD")
    try:
        for spec in inject:
            parse_fault(spec)  # fail fast, before anything starts
        min_nodes, max_nodes = parse_nnodes(nnodes)
        cfg = SupervisorConfig(
            cmd=cmd, nproc_per_node=nproc_per_node, nnodes=max_nodes, min_nodes=min_nodes, rdzv_endpoint=rdzv_endpoint, out=out,
            checkpoint_dir=checkpoint_dir, resume_arg=resume_arg, inject=list(inject), seed=seed,
            max_incidents=max_incidents, min_world=min_world, world_multiple=world_multiple, monitor_port=monitor_port,
            prometheus_port=prometheus_port, tee=not quiet_workers,
            detect=DetectConfig(min_hang_s=min_hang_s, startup_hang_s=startup_hang_s),
            probe=ProbeConfig(nbytes=int(probe_mib * 2**20)),
        )
        code = run_launch(cfg)
    except ValueError as e:
        typer.echo(f"commflow launch: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="the --out DIR of a launch, or its incidents.jsonl")],
    as_json: Annotated[bool, typer.Option("--json", help="print the records as JSON Lines")] = False,
) -> None:
    """Print the incidents of a job (and the faults that were injected into it)."""
    inc_path = path / "incidents.jsonl" if path.is_dir() else path
    if not inc_path.exists():
        typer.echo(f"commflow monitor report: no incidents file at {inc_path}", err=True)
        raise typer.Exit(2)
    incidents = _read(inc_path)
    injected = _read(inc_path.parent / "injected.jsonl")
    if as_json:
        for rec in incidents:
            typer.echo(json.dumps(rec))
        return
    console = Console()
    table = Table(title=f"incidents: {inc_path}")
    for col in ("#", "attempt", "kind", "culprit", "link", "detect s", "localize s", "restart s",
                "resumed", "lost", "world", "evidence"):
        table.add_column(col, overflow="fold")
    for i, rec in enumerate(incidents):
        where = rec.get("where") or []
        multi = "excluded_nodes" in rec  # multi-node jobs leave out whole nodes
        culprit = ", ".join(
            f"rank {w['rank']} (slot {w.get('slot')}, {w.get('host')}" + (f", gpu {w['gpu']}" if w.get("gpu") else "")
            + (f", node {w.get('node')}" if multi else "") + ")"
            for w in where
        ) or ", ".join(f"rank {r}" for r in rec.get("ranks", [])) or "-"
        ev = rec.get("evidence") or {}
        table.add_row(
            str(i), str(rec.get("attempt")), rec.get("kind", "?"), culprit,
            "-" if not rec.get("link") else f"{rec['link'][0]} -> {rec['link'][1]}",
            _fmt(rec.get("detect_s")), _fmt(rec.get("localize_s")), _fmt(rec.get("restart_s")),
            str(rec.get("resumed_from_step")), str(rec.get("lost_steps")),
            f"{rec.get('world_before')} -> {rec.get('world_after')}", str(ev.get("class", ""))[:80],
        )
    console.print(table)
    fired = [e for e in injected if e.get("kind") != "jitter"]
    if fired:
        gt = Table(title="injected faults (ground truth)")
        for col in ("kind", "slot", "rank", "iteration", "attempt", "spec"):
            gt.add_column(col)
        for e in fired:
            gt.add_row(e["kind"], str(e.get("slot")), str(e.get("rank")), str(e.get("iteration")),
                       str(e.get("attempt", "")), str((e.get("fault") or {}).get("text", "")))
        console.print(gt)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"
