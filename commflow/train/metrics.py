"""What a run shows and keeps: a live progress bar, metrics.jsonl, a summary table.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step with at
least ``step``, ``loss``, ``acc``, ``tokens_per_s`` and ``comm_frac`` (and
``eval_loss`` / ``eval_acc`` on evaluation steps); a resumed run appends to it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

__all__ = ["RunLog", "summary_table"]


class _ProgressWithStats(Progress):
    """A progress bar with the latest step's numbers on their own line below it."""

    stats = ""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        if self.stats:
            yield Text(self.stats)


class RunLog:
    """Rank 0's view of the run: progress bar, console lines, metrics file."""

    def __init__(self, out: Path, *, total_steps: int, start_step: int, progress: bool, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.console = Console(stderr=False)
        self.records: list[dict[str, Any]] = []
        self._progress = None
        if not enabled:
            return
        self._file = self.path.open("a")
        if progress:
            self._progress = _ProgressWithStats(
                TextColumn("[bold]commflow train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step)
            self._progress.start()

    def step(self, record: dict[str, Any], *, write: bool, show: bool) -> None:
        """Every step: update the bar; on logged steps also write (and maybe print) the record."""
        if not self.enabled:
            return
        stats = (f"loss {record['loss']:.3f}  acc {record['acc']:.3f}  {record['tokens_per_s']:,.0f} tok/s  "
                 f"comm {100 * record['comm_frac']:.0f}%")
        if "eval_acc" in record:
            stats += f"  eval_acc {record['eval_acc']:.3f}"
        if self._progress is not None:
            self._progress.stats = f"step {record['step']}: {stats}"
            self._progress.update(self._task, completed=record["step"])
        if write:
            self.records.append(record)
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if show:
            self.print(f"step {record['step']:>6}  {stats}")

    def print(self, *args: Any) -> None:
        if self.enabled:
            (self._progress.console if self._progress is not None else self.console).print(*args)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self._file.close()


def summarize(records: list[dict[str, Any]], *, warmup_steps: int = 2) -> dict[str, Any]:
    """Means over the logged steps (the first ``warmup_steps`` records excluded from speed)."""
    if not records:
        return {}
    steady = records[warmup_steps:] or records
    evals = [r for r in records if "eval_acc" in r]
    out = {
        "final_loss": records[-1]["loss"],
        "final_acc": records[-1]["acc"],
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in steady),
        "comm_frac": statistics.mean(r["comm_frac"] for r in steady),
        "step_time_s": statistics.mean(r["step_time_s"] for r in steady),
    }
    if evals:
        out["eval_acc"] = evals[-1]["eval_acc"]
        out["eval_loss"] = evals[-1]["eval_loss"]
    return out


def summary_table(summary: dict[str, Any]) -> Table:
    """The end-of-run table (rich)."""
    table = Table(title="commflow train", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model", f"{summary['preset']} ({summary['pattern']}), {summary['params'] / 1e6:.2f}M params"),
        ("mesh", f"dp {summary['dp']} x sp {summary['sp']} ({summary['dp_mode']}, softmax {summary['softmax_sp']}, "
                 f"linear lasp2, layout {summary['layout']}) on {summary['device']}"),
        ("data", summary["data"]),
        ("steps", f"{summary['start_step']} -> {summary['steps']} in {summary['wall_s']:.1f} s"),
        ("final loss / acc", f"{summary.get('final_loss', float('nan')):.4f} / {summary.get('final_acc', float('nan')):.3f}"),
    ]
    if "eval_acc" in summary:
        rows.append(("held-out acc", f"{summary['eval_acc']:.3f} (loss {summary['eval_loss']:.4f})"))
    if "tokens_per_s" in summary:
        rows.append(("tokens/s", f"{summary['tokens_per_s']:,.0f} (step {1e3 * summary['step_time_s']:.1f} ms)"))
        rows.append(("communication", f"{100 * summary['comm_frac']:.1f}% of step time (exposed, rank 0)"))
    rows.append(("metrics", summary["metrics"]))
    rows.append(("checkpoint", summary.get("checkpoint") or "none"))
    for k, v in rows:
        table.add_row(k, str(v))
    return table
