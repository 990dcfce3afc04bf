"""``commflow net``: compare routing policies on a fabric, write a planned path assignment.

::

    commflow net compare --topology leaf_spine:leaves=8,spines=8,hosts_per_leaf=8 \\
        --collective allreduce --algorithm ring --hosts rr --size 1GiB --policies ecmp,spray,planned --lp
    commflow net plan --topology fabric.yaml --collective allgather --size 256MiB --splits auto --out plan.json

``--topology`` is a YAML/JSON file or ``BUILDER:key=value,...`` with a builder of
:mod:`commflow.net.topology`. ``--hosts`` is ``all`` (rank i on host i), ``rr`` (round-robin
over leaves/ToRs, so neighbours sit on different switches), ``A-B`` or a comma list.
``--traffic FILE`` (YAML list of jobs with op, algorithm, hosts, size, channels) runs
several jobs at once instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import typer
import yaml
from rich.console import Console
from rich.table import Table

from .io import BUILDERS, load
from .optimal import optimal
from .routing import paths_of, route
from .simulate import simulate
from .topology import Topology
from .traffic import Traffic, collective, concurrent

app = typer.Typer(help="Traffic planning and flow-level simulation (C4P, singlepath vs spraying).",
                  no_args_is_help=True, add_completion=False)

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_size(text: str) -> float:
    """``1GiB`` / ``256MB`` / ``4096`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"size: cannot read {text!r} (examples: 1GiB, 256MB, 4096)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def parse_topology(spec: str) -> Topology:
    """A file path, or ``builder:key=value,...``."""
    if Path(spec).suffix.lower() in {".yaml", ".yml", ".json"}:
        return load(spec)
    name, _, rest = spec.partition(":")
    if name not in BUILDERS:
        raise ValueError(f"topology: {spec!r} is neither a .yaml/.json file nor one of {sorted(BUILDERS)}")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"topology: expected key=value, got {item!r}")
        kwargs[k.strip()] = _value(v.strip())
    try:
        return BUILDERS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"topology: {name}: {e}") from None


def _round_robin(topo: Topology) -> list[int]:
    """Host order that visits every first-hop switch before reusing one."""
    pt = paths_of(topo)
    tor = np.array([topo.link_dst[pt.host_out[int(h)][0]] for h in topo.hosts])
    groups = [list(np.flatnonzero(tor == t)) for t in np.unique(tor)]
    width = max(len(g) for g in groups)
    return [g[i] for i in range(width) for g in groups if i < len(g)]


def parse_hosts(spec: str, topo: Topology) -> list[int]:
    spec = spec.strip()
    if spec == "all":
        return list(range(topo.num_hosts))
    if spec == "rr":
        return _round_robin(topo)
    if re.fullmatch(r"\d+-\d+", spec):
        a, b = map(int, spec.split("-"))
        return list(range(a, b + 1))
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"hosts: cannot read {spec!r} (all | rr | A-B | comma list)") from None


def _traffic(topo, collective_op, algorithm, hosts, size, channels, gpus_per_node, traffic_file) -> Traffic:
    if traffic_file:
        docs = yaml.safe_load(Path(traffic_file).read_text())
        if not isinstance(docs, list) or not docs:
            raise ValueError(f"traffic: {traffic_file} must hold a non-empty list of jobs")
        jobs = [collective(d.get("op", "allreduce"), d.get("algorithm", "ring"),
                           hosts=parse_hosts(str(d.get("hosts", "all")), topo), size_bytes=parse_size(d.get("size", "1GiB")),
                           channels=int(d.get("channels", 1)), gpus_per_node=int(d.get("gpus_per_node", 8)),
                           name=d.get("name")) for d in docs]
        return concurrent(*jobs)
    return collective(collective_op, algorithm, hosts=parse_hosts(hosts, topo), size_bytes=parse_size(size),
                      channels=channels, gpus_per_node=gpus_per_node)


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command()
def compare(
    topology: str = typer.Option(..., help="YAML/JSON file or builder:key=value,..."),
    collective_op: str = typer.Option("allreduce", "--collective", help="allreduce | allgather | reducescatter | alltoall"),
    algorithm: str = typer.Option("ring", help="ring | tree | halving_doubling | hierarchical | direct | pairwise"),
    hosts: str = typer.Option("rr", help="all | rr | A-B | comma list"),
    size: str = typer.Option("1GiB", help="bytes per rank (nccl-tests convention), e.g. 1GiB"),
    channels: int = typer.Option(1, help="connections per ring/tree edge"),
    gpus_per_node: int = typer.Option(8, help="hierarchical: ranks per node"),
    traffic: str = typer.Option(None, help="YAML list of concurrent jobs (overrides the collective options)"),
    policies: str = typer.Option("ecmp,spray,planned", help="comma list of ecmp, spray, planned"),
    splits: str = typer.Option("1", help="sub-flows per flow for ecmp/planned; 'auto' = planner's k*"),
    seeds: int = typer.Option(1, help="ECMP: average over this many hash seeds"),
    lp: bool = typer.Option(False, help="also solve the multi-commodity LP lower bound"),
    png: Path = typer.Option(Path("net_compare.png"), help="figure to write"),  # noqa: B008
    json_out: Path = typer.Option(None, "--json", help="write the numbers here"),  # noqa: B008
) -> None:
    """Simulate one traffic pattern under several routing policies; print a table, save a figure."""
    try:
        topo = parse_topology(topology)
        tr = _traffic(topo, collective_op, algorithm, hosts, size, channels, gpus_per_node, traffic)
        pols = [p.strip() for p in policies.split(",") if p.strip()]
        rows = []
        for pol in pols:
            k = splits if pol == "planned" else (1 if splits == "auto" else int(splits))
            k = k if k == "auto" else int(k)
            runs = [simulate(topo, tr, pol, k, seed) for seed in range(seeds if pol == "ecmp" else 1)]
            rows.append({"policy": pol, "splits": runs[0].splits,
                         "completion_s": float(np.mean([r.completion_s for r in runs])),
                         "worst_completion_s": float(max(r.completion_s for r in runs)),
                         "busbw_GBps": float(np.mean([min(j.busbw_GBps for j in r.jobs) for r in runs])),
                         "max_congestion": float(np.mean([r.max_congestion for r in runs])),
                         "fabric_utilization": np.sort(runs[0].link_utilization[topo.fabric_links])[::-1]})
        bound = optimal(topo, tr, paths="all" if topo.num_hosts <= 512 else "shortest") if lp else None
    except ValueError as e:
        _fail(str(e))
        return
    table = Table(title=f"{topo.describe()} | {tr.num_flows} flows in {len(tr.jobs)} job(s)")
    for col in ("policy", "splits", "completion ms", "min busbw GB/s", "max congestion"):
        table.add_column(col, justify="right" if col != "policy" else "left")
    for r in rows:
        table.add_row(r["policy"], str(r["splits"]), f"{r['completion_s'] * 1e3:.3f}", f"{r['busbw_GBps']:.2f}",
                      f"{r['max_congestion']:.3f}")
    if bound is not None:
        table.add_row("LP bound", "-", f"{bound.completion_lower_bound_s * 1e3:.3f}", "-",
                      f"{bound.max_congestion:.3f}")
    Console().print(table)
    _figure(rows, bound, png, topo.describe())
    Console().print(f"figure: {png}")
    if json_out:
        out = [{k: v for k, v in r.items() if k != "fabric_utilization"} for r in rows]
        doc = {"topology": topo.describe(), "rows": out,
               "lp": None if bound is None else {"max_congestion": bound.max_congestion,
                                                 "completion_lower_bound_s": bound.completion_lower_bound_s}}
        json_out.write_text(json.dumps(doc, indent=1))


def _figure(rows, bound, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [f"{r['policy']} (k={r['splits']})" for r in rows]
    a.bar(names, [r["completion_s"] * 1e3 for r in rows], color="#4c72b0")
    if bound is not None:
        a.axhline(bound.completion_lower_bound_s * 1e3, color="k", ls="--", label="LP lower bound")
        a.legend()
    a.set_ylabel("completion time (ms)")
    a.set_title("collective completion")
    for r, name in zip(rows, names):
        u = r["fabric_utilization"]
        b.plot(np.arange(len(u)) / max(len(u) - 1, 1), u, label=name)
    b.set_xlabel("fabric links, busiest first (fraction)")
    b.set_ylabel("utilization over the run")
    b.set_title("fabric link utilization")
    b.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@app.command("plan")
def plan_cmd(
    topology: str = typer.Option(..., help="YAML/JSON file or builder:key=value,..."),
    collective_op: str = typer.Option("allreduce", "--collective"),
    algorithm: str = typer.Option("ring"),
    hosts: str = typer.Option("rr"),
    size: str = typer.Option("1GiB"),
    channels: int = typer.Option(1),
    gpus_per_node: int = typer.Option(8),
    traffic: str = typer.Option(None, help="YAML list of concurrent jobs"),
    splits: str = typer.Option("1", help="sub-flows (QPs) per connection, or 'auto' for k*"),
    out: Path = typer.Option(Path("plan.json"), help="where to write the assignment"),  # noqa: B008
) -> None:
    """Plan single paths for every (sub)flow and write them as JSON (node names per path)."""
    try:
        topo = parse_topology(topology)
        tr = _traffic(topo, collective_op, algorithm, hosts, size, channels, gpus_per_node, traffic)
        r = route(topo, tr, "planned", splits if splits == "auto" else int(splits))
        res = simulate(topo, tr, routing=r)
    except ValueError as e:
        _fail(str(e))
        return
    r.write_json(out)
    Console().print(f"{len(r.to_json()['assignments'])} sub-flow paths (k={r.splits}, planner {r.meta['planner']}), "
                    f"max congestion {res.max_congestion:.3f}, completion {res.completion_s * 1e3:.3f} ms -> {out}")
