"""What the benchmarks' report and plot code shares: matplotlib without a display, a result
file in, a markdown page and figures out, and the ``report`` command line.

A benchmark ``NAME`` with a report writes ``docs/NAME_results.md`` and ``docs/img/NAME_*.png``
by default (``python -m benchmarks.NAME report RESULT.json``). Not a benchmark: it registers
nothing, and imports matplotlib only when a figure is made.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

__all__ = ["load_result", "pyplot", "report_main", "report_paths", "save_figure", "write_markdown"]

_ROOT = Path(__file__).resolve().parent.parent


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only: benchmark machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int) -> None:
    """Lay ``fig`` out, write it to ``path`` and close it (figures are not kept open)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def load_result(path: str | Path) -> tuple[dict, dict, dict]:
    """A result file (benchmarks/results.py) as ``(record, record["env"] or {}, record["results"])``."""
    record = json.loads(Path(path).read_text())
    return record, record.get("env", {}), record["results"]


def report_paths(name: str, md_out: str | Path | None, img_dir: str | Path | None) -> tuple[Path, Path]:
    """Where a report goes: ``md_out`` or ``docs/NAME_results.md``, and ``img_dir`` or ``docs/img``
    (created)."""
    md_out = Path(md_out) if md_out else _ROOT / "docs" / f"{name}_results.md"
    img_dir = Path(img_dir) if img_dir else _ROOT / "docs" / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    return md_out, img_dir


def write_markdown(lines: list[str], md_out: Path) -> str:
    """Write ``lines`` as one markdown file (newline-terminated); returns its text."""
    text = "\n".join(lines) + "\n"
    md_out.write_text(text)
    return text


def report_main(argv: list[str], name: str, help: str, report: Callable[..., str], *, several: bool = False) -> int:
    """``python -m benchmarks.NAME report RESULT.json [--md PATH] [--img-dir DIR]``;
    ``several``: the report takes one or more result files (a list)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}")
    sub = p.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help=help)
    rp.add_argument("json", nargs="+" if several else None)
    rp.add_argument("--md", default=None)
    rp.add_argument("--img-dir", default=None)
    a = p.parse_args(argv)
    report(a.json, a.md, a.img_dir)
    print(f"wrote {a.md or f'docs/{name}_results.md'} and {name}_*.png")
    return 0
