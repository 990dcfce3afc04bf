"""``commflow decentral``: compare disruption scenarios of gossip learning on a graph.

Example (the seed study's setting, as far as it is known)::

    commflow decentral --nodes 100 --graph ba:m=2 --drop 0.3 --at 20 --rounds 100 \\
        --compare data,relay,none --out runs/seed

Only ``typer`` is imported at module level, so mounting this command costs the
``commflow`` entry point nothing; torch and friends load when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["decentral"]

_SCENARIO_HELP = (
    "'relay[:BY]': drop round(f*N) relay-only nodes (no data; default BY=degree, the hubs); "
    "'data[:BY]': drop round(f*N) data-holding nodes (default BY=low-degree); 'none': no drop; "
    "'relay-nodrop[:BY]': round(f*N) relay-only nodes that never drop. "
    "BY: random | degree | betweenness | low-degree | low-betweenness."
)


def decentral(
    nodes: Annotated[int | None, typer.Option(help="Number of nodes N (default 100; a file graph sets its own).")] = None,
    graph: Annotated[str, typer.Option(help="ba:m=2 | er:p=0.05 | ring[:k=1] | torus[:rows=R,cols=C] | file:PATH")] = "ba:m=2",
    drop: Annotated[float, typer.Option(help="Fraction f of all nodes to drop, in [0, 1].")] = 0.3,
    drop_kind: Annotated[str, typer.Option(help="The scenario when --compare is not given. " + _SCENARIO_HELP)] = "relay",
    at: Annotated[int, typer.Option(help="Round (0-based) at whose start the nodes drop.")] = 20,
    rounds: Annotated[int, typer.Option(help="Rounds of local training + averaging.")] = 100,
    eval_every: Annotated[int, typer.Option(help="Score every k rounds (and the last); 1 = every round.")] = 1,
    compare: Annotated[str | None, typer.Option(help="Comma-separated scenarios, e.g. data,relay,none.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory: rounds.jsonl, accuracy.png, run.json.")] = Path("decentral_out"),
    mixing: Annotated[str, typer.Option(help="Averaging rule: uniform | metropolis | data.")] = "metropolis",
    floor: Annotated[float, typer.Option(help="data rule: minimum weight, as a fraction of the mean shard size.")] = 0.1,
    split: Annotated[str, typer.Option(help="iid | dirichlet")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (split=dirichlet).")] = 0.5,
    hidden: Annotated[str, typer.Option(help="Hidden widths of the MLP, comma-separated.")] = "32",
    lr: Annotated[float, typer.Option(help="SGD learning rate.")] = 0.3,
    batch_size: Annotated[int, typer.Option(help="Local minibatch size.")] = 8,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round (0: averaging only).")] = 1,
    same_init: Annotated[bool, typer.Option(help="All nodes start from one model.")] = True,
    link_fail: Annotated[float, typer.Option(help="Fraction of links that fail (all scenarios).")] = 0.0,
    link_fail_at: Annotated[int | None, typer.Option(help="Round of the link failure (default: --at).")] = None,
    link_fail_by: Annotated[str, typer.Option(help="random | betweenness")] = "random",
    rejoin_at: Annotated[int | None, typer.Option(help="Round at which dropped nodes and failed links return.")] = None,
    mode: Annotated[str, typer.Option(help="sim (vectorized, one process) | p2p (one gloo process per node).")] = "sim",
    dtype: Annotated[str, typer.Option(help="float32 | float64")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of every random stream.")] = 0,
    threads: Annotated[int, typer.Option(help="torch intra-op threads (1 is fastest for small runs on a busy box).")] = 1,
) -> None:
    """Gossip learning on a peer-to-peer graph while nodes and links drop out."""
    options = dict(locals())
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a pipe or a log: don't squeeze the table into 80 columns
        console.width = 120
    try:
        _run(console, **options)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


def _run(console, *, nodes, graph, drop, drop_kind, at, rounds, eval_every, compare, out, mixing, floor, split, alpha, hidden,
         lr, batch_size, local_epochs, same_init, link_fail, link_fail_at, link_fail_by, rejoin_at, mode, dtype,
         seed, threads) -> None:
    import torch
    from rich import box
    from rich.progress import Progress
    from rich.table import Table

    from .compare import run_comparison, summary_rows, write_outputs
    from .experiment import DecentralConfig
    from .schedule import FailLinks, Rejoin

    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    torch.set_num_threads(threads)
    try:
        widths = tuple(int(h) for h in hidden.split(","))
    except ValueError:
        raise ValueError(f"hidden={hidden!r}: give comma-separated integers, e.g. 64,32") from None
    if nodes is None and not graph.startswith("file:"):
        nodes = 100
    config = DecentralConfig(nodes=nodes, graph=graph, mixing=mixing, floor=floor, split=split, alpha=alpha,
                             hidden=widths, lr=lr, batch_size=batch_size, local_epochs=local_epochs, rounds=rounds,
                             eval_every=eval_every, same_init=same_init, dtype=dtype, seed=seed)
    scenarios = [s.strip() for s in (compare or drop_kind).split(",") if s.strip()]
    extra: tuple = ()
    if link_fail > 0:
        extra += (FailLinks(at=at if link_fail_at is None else link_fail_at, fraction=link_fail, by=link_fail_by),)
    if rejoin_at is not None:
        extra += (Rejoin(at=rejoin_at),)

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("rounds", total=sum(map(config.scored, range(rounds))) * len(scenarios))
        results = run_comparison(config, scenarios, fraction=drop, at=at, extra_events=extra, mode=mode,
                                 on_round=lambda rec: progress.update(task, advance=1,
                                                                      description=f"{rec['scenario']} round {rec['round']}"))
    title = (f"{config.graph}, N={results[scenarios[0]].params.shape[0]}, drop {drop:g} at round {at}, "
             f"{mixing} mixing, {split}, seed {seed}")
    paths = write_outputs(out, results, config=config, fraction=drop, at=at, title=title,
                          extra={"link_fail": link_fail, "link_fail_at": link_fail_at, "rejoin_at": rejoin_at,
                                 "mode": mode})

    table = Table(title=f"final round {rounds - 1}, accuracy over alive nodes", caption=title, box=box.SIMPLE_HEAD,
                  pad_edge=False)
    table.add_column("scenario", no_wrap=True)
    for col in ("dropped", "relay", "alive", "mean", "min", "max", "Δ none", "comp.", "giant", "isol."):
        table.add_column(col, justify="right", no_wrap=True)
    for row in summary_rows(results):
        delta = "" if row["delta_vs_none"] is None else f"{row['delta_vs_none']:+.3f}"
        table.add_row(row["scenario"], str(row["dropped"]), str(row["relay_nodes"]), str(row["alive"]),
                      f"{row['final_mean_acc']:.3f}", f"{row['final_min_acc']:.3f}", f"{row['final_max_acc']:.3f}",
                      delta, str(row["components"]), str(row["giant_size"]), str(row["isolated"]))
    console.print(table)
    console.print(f"wrote {paths['rounds']}, {paths['png']}, {paths['run']}")
