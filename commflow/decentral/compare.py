"""Compare named scenarios on one setup, and write what a person reads afterwards.

:func:`run_comparison` runs each scenario (``none``, ``data[:BY]``, ``relay[:BY]``, see
:mod:`commflow.decentral.schedule`) with the same config, drop fraction and drop round,
plus any extra events (link failures, rejoin) shared by all of them. Everything else
(graph, seed, model, rounds) is identical, so differences between the curves come from
who was dropped and whether they held data.

:func:`write_outputs` writes, into one directory:

* ``rounds.jsonl``: one object per scenario per round (the fields of
  :mod:`commflow.decentral.metrics`, plus ``scenario`` and ``round``);
* ``accuracy.png``: one panel per scenario (mean accuracy of alive nodes, min-max band,
  the drop round marked) and a last panel with every scenario's mean side by side;
* ``run.json``: the resolved config, the scenario definitions and the dropped node ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from .experiment import DecentralConfig, RunResult, prepare
from .schedule import Schedule, scenario_events

__all__ = ["run_comparison", "write_outputs", "plot_accuracy", "summary_rows"]


def run_comparison(
    config: DecentralConfig,
    scenarios: Sequence[str],
    *,
    fraction: float,
    at: int,
    extra_events: tuple = (),
    mode: str = "sim",
    on_round: Callable[[dict], None] | None = None,
) -> dict[str, RunResult]:
    """Run every scenario; ``mode`` is ``"sim"`` (vectorized) or ``"p2p"`` (one process per node).

    All scenarios are resolved before the first one runs, so a bad name or an
    impossible schedule fails at once rather than after minutes of training.
    """
    if mode not in ("sim", "p2p"):
        raise ValueError(f"mode={mode!r}: choose 'sim' or 'p2p'")
    if len(set(scenarios)) != len(scenarios) or not scenarios:
        raise ValueError(f"scenarios={list(scenarios)}: give one or more distinct names")
    schedules = {name: Schedule(events=scenario_events(name, fraction=fraction, at=at) + tuple(extra_events))
                 for name in scenarios}
    if not 0.0 <= fraction <= 1.0:  # checked here too: a 'none'-only run has no DropNodes to catch it
        raise ValueError(f"fraction={fraction} must be in [0, 1]")
    prepared = {}
    for name, sched in schedules.items():  # resolve every plan before running any
        try:
            prepared[name] = prepare(config, sched)
        except ValueError as e:
            raise ValueError(f"scenario {name!r}: {e}") from e
    results: dict[str, RunResult] = {}
    for name in scenarios:
        if mode == "sim":
            from .simulator import simulate

            results[name] = simulate(prepared[name], scenario=name, on_round=on_round)
        else:
            from .p2p import run_p2p

            results[name] = run_p2p(config, schedules[name], scenario=name)
            if on_round is not None:
                for rec in results[name].records:
                    on_round(rec)
    return results


def summary_rows(results: dict[str, RunResult]) -> list[dict]:
    """Final-round numbers per scenario, with the change of mean accuracy against ``none``."""
    base = results["none"].records[-1]["mean_acc"] if "none" in results else None
    rows = []
    for name, res in results.items():
        last = res.records[-1]
        rows.append({
            "scenario": name,
            "dropped": len(res.dropped),
            "relay_nodes": len(res.relay_nodes),
            "final_mean_acc": last["mean_acc"],
            "final_min_acc": last["min_acc"],
            "final_max_acc": last["max_acc"],
            "delta_vs_none": None if base is None else last["mean_acc"] - base,
            "components": last["components"],
            "giant_size": last["giant_size"],
            "isolated": last["isolated"],
            "alive": last["alive"],
        })
    return rows


def plot_accuracy(results: dict[str, RunResult], path: Path, *, at: int | None = None, title: str = "") -> None:
    """Accuracy curves side by side (see module doc) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(4, len(names) + 1)
    rows = -(-(len(names) + 1) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows + 0.3), sharey=True, squeeze=False,
                             constrained_layout=True)
    axes = list(grid.flat)[: len(names) + 1]
    for spare in list(grid.flat)[len(names) + 1 :]:
        spare.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (ax, name) in enumerate(zip(axes, names)):
        recs = results[name].records
        r = [x["round"] for x in recs]
        ax.fill_between(r, [x["min_acc"] for x in recs], [x["max_acc"] for x in recs], color=colors[k % 10],
                        alpha=0.2, lw=0, label="min-max over alive nodes")
        ax.plot(r, [x["mean_acc"] for x in recs], color=colors[k % 10], label="mean")
        res = results[name]
        ax.set_title(f"{name}: {len(res.dropped)} dropped" + (f", {len(res.relay_nodes)} relay-only"
                                                               if res.relay_nodes else ""), fontsize=9)
        axes[-1].plot(r, [x["mean_acc"] for x in recs], color=colors[k % 10], label=name)
    for ax in axes:
        if at is not None:
            ax.axvline(at, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (alive nodes)")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[-1].set_title("mean accuracy, all scenarios", fontsize=9)
    axes[-1].legend(fontsize=7, loc="lower right")
    axes[0].set_ylim(0, 1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, results: dict[str, RunResult], *, config: DecentralConfig, fraction: float,
                  at: int, extra: dict | None = None, title: str = "") -> dict[str, Path]:
    """Write ``rounds.jsonl``, ``accuracy.png`` and ``run.json`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"rounds": out_dir / "rounds.jsonl", "png": out_dir / "accuracy.png", "run": out_dir / "run.json"}
    with paths["rounds"].open("w") as f:
        for res in results.values():
            for rec in res.records:
                f.write(json.dumps(rec) + "\n")
    plot_accuracy(results, paths["png"], at=at if any(r.dropped for r in results.values()) else None, title=title)
    run = {
        "config": config.to_dict(),
        "drop_fraction": fraction,
        "drop_at": at,
        **(extra or {}),
        "scenarios": {name: {"dropped": res.dropped, "relay_nodes": res.relay_nodes} for name, res in results.items()},
        "summary": summary_rows(results),
    }
    paths["run"].write_text(json.dumps(run, indent=1))
    return paths
